"""Reference of ``kdengine.ops.expert_batch_embed``: the K-expert batched prompt input, row by row.

Rows and experts (``B`` examples, ``K`` prompts of ``P`` vectors):

    experts None     R = K·B, row r = k·B + b uses example b and expert k (expert-major)
    experts [B]      R = B,   row b uses expert experts[b]
    experts [B, k]   R = B·k, row b·k + j uses expert experts[b, j]

Each row is built from its example's token embeddings ``E = weight[input_ids[b]]`` ([L, H]) and
its expert's prompt ``prompts[k]`` ([P, H], cast to the weight's dtype), with ``n`` real tokens:

    prepend   row = [prompt; E]                        mask = [1]*P + attention_mask[b]
    append    row = [E[:n]; prompt; E[n:]]             mask = [1]*n + [1]*P + [0]*(L - n)

For ``append`` ``n = attention_mask[b].sum()`` and the mask must be right-padded (ones then
zeros), so ``E[n:]`` are the pad tokens' embeddings. Plain indexing and ``torch.cat``: autograd
gives the prompt gradient (summed over the rows that use each expert) and the weight gradient.
"""

from __future__ import annotations

import torch

PLACEMENTS = ("prepend", "append")


def insert_offsets(attention_mask: torch.Tensor, row_example: torch.Tensor, placement: str) -> torch.Tensor:
    """int64 [R]: the position of the prompt in each row (0 for prepend, n_b for append)."""
    if placement == "prepend":
        return torch.zeros_like(row_example)
    return attention_mask.long().sum(1)[row_example]


def row_tables(
    batch: int, num_experts: int, experts: torch.Tensor | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_example, row_expert)``, int64 [R]: the example and the expert of every output row."""
    if experts is None:
        row_example = torch.arange(batch, device=device).repeat(num_experts)
        row_expert = torch.arange(num_experts, device=device).repeat_interleave(batch)
        return row_example, row_expert
    per_example = 1 if experts.dim() == 1 else experts.shape[1]
    row_example = torch.arange(batch, device=device).repeat_interleave(per_example)
    return row_example, experts.reshape(-1).long()


def expert_batch_embed_reference(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    prompts: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    experts: torch.Tensor | None = None,
    placement: str = "prepend",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused ``expert_batch_embed`` (no input checks): ``(embeds [R, P+L, H], mask [R, P+L])``.

    Embeds have the weight's dtype; the mask has ``attention_mask``'s dtype (int64 when None).
    """
    batch, length = input_ids.shape
    num_experts, plen, _ = prompts.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=input_ids.device)
    row_example, row_expert = row_tables(batch, num_experts, experts, input_ids.device)
    rows, masks = [], []
    for b, k in zip(row_example.tolist(), row_expert.tolist(), strict=True):
        tokens = weight[input_ids[b]]
        prompt = prompts[k].to(weight.dtype)
        ones = torch.ones(plen, dtype=attention_mask.dtype, device=attention_mask.device)
        if placement == "prepend":
            rows.append(torch.cat([prompt, tokens]))
            masks.append(torch.cat([ones, attention_mask[b]]))
        else:
            n = int(attention_mask[b].sum())
            rows.append(torch.cat([tokens[:n], prompt, tokens[n:]]))
            masks.append(torch.cat([attention_mask[b, :n], ones, attention_mask[b, n:]]))
    return torch.stack(rows), torch.stack(masks)
