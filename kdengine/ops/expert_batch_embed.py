"""``expert_batch_embed``: token-embedding gather fused with the K prompt copies of a batched input.

Row layout and math: :mod:`kdengine.reference.expert_batch_embed`. Three backends:

* ``cuda``   kdengine._C through ``kdengine.ops._cuda``: CUDA tensors, fp32/bf16/fp16 weight.
* ``triton`` kdengine.kernels.expert_batch_embed: CUDA tensors (or CPU under TRITON_INTERPRET=1).
* ``torch``  one embedding lookup plus one gather over [R, L+P] source positions (no loop over
  rows or experts); backward by ``index_add_`` in fp32 (deterministic on CPU; on CUDA as
  deterministic as torch's index_add_). Any device and float dtype.

Every backend implements two functions with the same signatures:

* ``forward(input_ids, weight, prompts, attention_mask, experts, placement) -> (embeds, mask)``
* ``backward(grad_embeds, input_ids, attention_mask, experts, num_experts, placement,
  weight_requires_grad, vocab) -> (grad_prompts fp32 [K, P, H], grad_weight fp32 [V, H] | None)``

The fused backward reductions are deterministic (fixed summation order, no atomics).
``ExpertBatchEmbedFunction`` wraps them; the dispatcher always passes a materialised
``attention_mask`` [B, L].
"""

from __future__ import annotations

import torch

from kdengine.ops import _backends
from kdengine.reference.expert_batch_embed import PLACEMENTS, insert_offsets, row_tables

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def _is_integer(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def check_inputs(input_ids, weight, prompts, attention_mask, experts, placement) -> None:
    """Shape/dtype/device checks (ValueError naming the argument, what it got and what it needs)."""
    if not isinstance(input_ids, torch.Tensor) or not _is_integer(input_ids) or input_ids.dim() != 2:
        got = (
            f"{input_ids.dtype} {tuple(input_ids.shape)}"
            if isinstance(input_ids, torch.Tensor)
            else type(input_ids).__name__
        )
        raise ValueError(f"input_ids must be a 2-D integer tensor [B, L], got {got}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        got = (
            f"{weight.dtype} {tuple(weight.shape)}"
            if isinstance(weight, torch.Tensor)
            else type(weight).__name__
        )
        raise ValueError(f"embedding_weight must be a 2-D float tensor [Vocab, H], got {got}")
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 3 or prompts.dtype not in FLOAT_DTYPES:
        got = (
            f"{prompts.dtype} {tuple(prompts.shape)}"
            if isinstance(prompts, torch.Tensor)
            else type(prompts).__name__
        )
        raise ValueError(f"prompts must be a 3-D float tensor [K, P, H], got {got}")
    if prompts.shape[2] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: prompts have H={prompts.shape[2]} but embedding_weight has "
            f"H={weight.shape[1]}; both must have the model's hidden size"
        )
    if prompts.shape[0] < 1 or prompts.shape[1] < 1:
        raise ValueError(
            f"prompts must have K >= 1 experts and P >= 1 virtual tokens, got {tuple(prompts.shape)}"
        )
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    batch = input_ids.shape[0]
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype.is_floating_point:
            raise ValueError("attention_mask must be an integer or bool tensor of 0/1 [B, L]")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
    if experts is not None:
        if not isinstance(experts, torch.Tensor) or not _is_integer(experts):
            raise ValueError("experts must be an integer tensor [B] (one expert per example) or [B, k]")
        if experts.dim() not in (1, 2) or experts.shape[0] != batch or experts.numel() == 0:
            raise ValueError(
                f"experts must have shape [B]=[{batch}] or [B, k]=[{batch}, k>=1], got {tuple(experts.shape)}"
            )
    devices = {t.device for t in (input_ids, weight, prompts, attention_mask, experts) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")


def check_values(input_ids, vocab, attention_mask, experts, num_experts, placement) -> None:
    """Index ranges and (append) right padding, in one host sync."""
    checks = [input_ids.min() < 0, input_ids.max() >= vocab]
    if experts is not None:
        checks += [experts.min() < 0, experts.max() >= num_experts]
    if placement == "append":
        m = attention_mask.long()
        checks += [((m != 0) & (m != 1)).any(), (m[:, 1:] > m[:, :-1]).any()]
    bad = torch.stack(checks).tolist()
    if bad[0] or bad[1]:
        raise ValueError(
            f"input_ids must lie in [0, {vocab}) (the embedding vocabulary), got "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )
    if experts is not None and (bad[2] or bad[3]):
        raise ValueError(
            f"experts must lie in [0, {num_experts}), got [{int(experts.min())}, {int(experts.max())}]"
        )
    if placement == "append" and any(bad[-2:]):
        raise ValueError(
            "placement='append' needs a right-padded 0/1 attention_mask (ones, then zeros): the "
            "prompt goes right after each example's last real token"
        )


def source_positions(length: int, plen: int, insert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every output position t of every row: ``(is_prompt [R, P+L] bool, token position [R, P+L])``.

    With n the row's insert offset: t < n -> token t; n <= t < n+P -> prompt slot t-n;
    t >= n+P -> token t-P.
    """
    t = torch.arange(length + plen, device=insert.device).unsqueeze(0)
    n = insert.unsqueeze(1)
    is_prompt = (t >= n) & (t < n + plen)
    token_pos = torch.where(t < n, t, t - plen).clamp(0, max(length - 1, 0))
    return is_prompt, token_pos


def text_positions(length: int, plen: int, insert: torch.Tensor) -> torch.Tensor:
    """int64 [R, L]: the output position of token l of each row (l before the prompt, l + P after)."""
    pos = torch.arange(length, device=insert.device).unsqueeze(0)
    return torch.where(pos < insert.unsqueeze(1), pos, pos + plen)


def expert_batch_embed_torch_forward(input_ids, weight, prompts, attention_mask, experts, placement):
    """torch backend forward: one embedding lookup and one gather over the [R, L+P] sources."""
    batch, length = input_ids.shape
    num_experts, plen, hidden = prompts.shape
    row_example, row_expert = row_tables(batch, num_experts, experts, input_ids.device)
    insert = insert_offsets(attention_mask, row_example, placement)
    is_prompt, token_pos = source_positions(length, plen, insert)
    tokens = torch.nn.functional.embedding(input_ids, weight)[row_example]  # [R, L, H]
    slots = prompts[row_expert].to(weight.dtype)  # [R, P, H]
    table = torch.cat([tokens, slots], dim=1)  # [R, L+P, H]
    t = torch.arange(length + plen, device=input_ids.device).unsqueeze(0)
    source = torch.where(is_prompt, length + t - insert.unsqueeze(1), token_pos)  # [R, P+L]
    embeds = table.gather(1, source.unsqueeze(-1).expand(-1, -1, hidden))
    token_mask = attention_mask[row_example].gather(1, token_pos)
    mask = torch.where(is_prompt, torch.ones_like(token_mask), token_mask)
    return embeds, mask


def expert_batch_embed_torch_backward(
    grad_embeds, input_ids, attention_mask, experts, num_experts, placement, weight_requires_grad, vocab
):
    """torch backend backward: index_add of the prompt slots and token positions, fp32 accumulation
    (float64 for a float64 gradient). Returns ``(grad_prompts [K, P, H], grad_weight [V, H] | None)``."""
    batch, length = input_ids.shape
    rows, width, hidden = grad_embeds.shape
    plen = width - length
    acc = torch.float64 if grad_embeds.dtype == torch.float64 else torch.float32
    row_example, row_expert = row_tables(batch, num_experts, experts, input_ids.device)
    insert = insert_offsets(attention_mask, row_example, placement)
    slot_pos = insert.unsqueeze(1) + torch.arange(plen, device=insert.device)  # [R, P]
    g_slots = grad_embeds.gather(1, slot_pos.unsqueeze(-1).expand(-1, -1, hidden)).to(acc)
    grad_prompts = torch.zeros(num_experts, plen, hidden, dtype=acc, device=grad_embeds.device)
    grad_prompts.index_add_(0, row_expert, g_slots)
    if not weight_requires_grad:
        return grad_prompts, None
    text = text_positions(length, plen, insert)  # [R, L]
    g_tokens = grad_embeds.gather(1, text.unsqueeze(-1).expand(-1, -1, hidden)).to(acc)
    grad_weight = torch.zeros(vocab, hidden, dtype=acc, device=grad_embeds.device)
    grad_weight.index_add_(0, input_ids[row_example].reshape(-1).long(), g_tokens.reshape(-1, hidden))
    return grad_prompts, grad_weight


def kernels(name: str):
    """``(forward, backward)`` of a backend (Triton/_C imported lazily, only when used)."""
    if name == "torch":
        return expert_batch_embed_torch_forward, expert_batch_embed_torch_backward
    if name == "triton":
        from kdengine.kernels.expert_batch_embed import (  # noqa: PLC0415
            expert_batch_embed_backward_triton,
            expert_batch_embed_triton,
        )

        return expert_batch_embed_triton, expert_batch_embed_backward_triton
    if name == "cuda":
        from kdengine.ops._cuda import (  # noqa: PLC0415
            expert_batch_embed_backward_cuda,
            expert_batch_embed_cuda,
        )

        return expert_batch_embed_cuda, expert_batch_embed_backward_cuda
    raise ValueError(name)


class ExpertBatchEmbedFunction(torch.autograd.Function):
    """Every backend: forward gather; backward prompt (and weight) reduction, accumulated in fp32."""

    @staticmethod
    def forward(ctx, prompts, weight, input_ids, attention_mask, experts, placement, forward, backward):
        embeds, mask = forward(input_ids, weight, prompts, attention_mask, experts, placement)
        ctx.mark_non_differentiable(mask)
        ctx.placement, ctx.backward_fn = placement, backward
        ctx.num_experts, ctx.vocab = prompts.shape[0], weight.shape[0]
        ctx.prompt_dtype, ctx.weight_dtype = prompts.dtype, weight.dtype
        ctx.save_for_backward(input_ids, attention_mask, experts)
        return embeds, mask

    @staticmethod
    def backward(ctx, grad_embeds, _grad_mask):
        input_ids, attention_mask, experts = ctx.saved_tensors
        need_prompts, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_prompts, grad_weight = ctx.backward_fn(
            grad_embeds,
            input_ids,
            attention_mask,
            experts,
            ctx.num_experts,
            ctx.placement,
            need_weight,
            ctx.vocab,
        )
        grad_prompts = grad_prompts.to(ctx.prompt_dtype) if need_prompts else None
        grad_weight = grad_weight.to(ctx.weight_dtype) if need_weight else None
        return grad_prompts, grad_weight, None, None, None, None, None, None


def _kernel_reasons(name: str, input_ids, weight, prompts, attention_mask, experts) -> list[str]:
    reasons = _backends.tensor_device_reasons(name, [input_ids, weight, prompts, attention_mask, experts])
    if name == "torch":
        return reasons
    for label, t in (("embedding_weight", weight), ("prompts", prompts)):
        if t.dtype not in KERNEL_DTYPES:
            reasons.append(f"{label} dtype {t.dtype} unsupported (fp32/bf16/fp16)")
    return reasons


def expert_batch_embed(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    prompts: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    experts: torch.Tensor | None = None,
    placement: str = "prepend",
    backend: str | None = "auto",
):
    """Batched input of K soft-prompt experts: token embeddings gathered and prompts written in one pass.

    Args:
        input_ids: [B, L] integer token ids in [0, Vocab).
        embedding_weight: [Vocab, H] float32/bfloat16/float16 (float64: torch backend only). Gets a
            gradient (deterministic scatter-add) when it requires grad.
        prompts: [K, P, H] float, cast to the weight's dtype. Its gradient is summed over the rows
            that use each expert (deterministic).
        attention_mask: [B, L] integer/bool 0/1, default all ones. ``append`` needs right padding.
        experts: None (all K experts, expert-major rows r = k·B + b, R = K·B), [B] integer (row b
            uses expert experts[b], R = B) or [B, k] (row b·k + j uses experts[b, j], R = B·k).
        placement: ``prepend`` (row = [prompt; tokens]) or ``append`` (the prompt right after each
            example's last real token: [tokens[:n]; prompt; pad tokens]).
        backend: ``auto`` | ``cuda`` | ``triton`` | ``torch``; ``KDENGINE_BACKEND`` overrides.

    Returns:
        ``(inputs_embeds [R, P+L, H] in the weight's dtype, attention_mask [R, P+L])``; the mask has
        ``attention_mask``'s dtype (int64 when None). One host sync validates the index ranges
        (and the right padding for ``append``).
    """
    check_inputs(input_ids, embedding_weight, prompts, attention_mask, experts, placement)
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
    if input_ids.numel():
        check_values(
            input_ids, embedding_weight.shape[0], attention_mask, experts, prompts.shape[0], placement
        )
    name = _backends.select(
        "expert_batch_embed",
        backend,
        lambda b: _kernel_reasons(b, input_ids, embedding_weight, prompts, attention_mask, experts),
    )
    forward, backward = kernels(name)
    return ExpertBatchEmbedFunction.apply(
        prompts, embedding_weight, input_ids, attention_mask, experts, placement, forward, backward
    )
