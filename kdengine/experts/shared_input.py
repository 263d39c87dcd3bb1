"""Shared-input forward of K soft-prompt experts appended after the input on a causal LM.

With ``placement="append"`` every expert reads ``[x; P_k; y]``. In a causal LM the prompt only
influences positions after it, so x's hidden states and key/values are the same for every
expert. :func:`shared_input_forward` therefore runs the frozen model twice:

1. **x once**, under ``no_grad`` (x does not depend on the prompts): ``B`` rows, ``use_cache``
   keeps every layer's key/values in a ``transformers.DynamicCache``; x's logits come from here
   and are broadcast (``expand``) to every expert, never recomputed.
2. **The expert segments** ``[P_k; y]`` (``S = P + Ly`` tokens each) against that cache, with
   explicit ``position_ids`` (each segment restarts at ``n_b``, the real length of example b's
   x) and a custom 4-D attention mask (x's padding hidden; segments causal and blind to each
   other). Gradients flow to ``prompts`` through this pass only.

Two layouts of the segments (same result, different costs; ``layout="auto"`` picks one):

* ``"packed"``: one row per example, its k segments side by side (``[B, k*S]``), a
  block-diagonal segment mask (the DPO prefix-sharing mask generalised to k). x's cache is
  **never replicated**: ``DynamicLayer.update`` concatenates x's ``[B, h, Lx, d]`` keys/values
  with the new ones, i.e. one copy of x's cache per layer, which the Cache API forces.
  The price is attention work on masked segment pairs: scores are ``k*S x (Lx + k*S)``
  per example instead of ``k x S x (Lx + S)``.
* ``"batched"``: one row per (example, segment) (``[B*k, S]``), so no wasted attention, but
  the cache must have ``B*k`` rows. A batch of ``B*k`` rows whose x part repeats each of the B
  cached rows cannot be a strided view of a ``[B, ...]`` tensor, and ``DynamicLayer.update``
  concatenates anyway, so ``batch_repeat_interleave`` copies x's cache k times per layer
  (plus the concatenation copy).

``"auto"`` uses ``"packed"`` while the wasted segment-pair scores (``k*(k-1)*S^2``) stay below
the x-part scores (``k*S*Lx``), i.e. ``(k - 1) * S <= Lx``: short prompts/responses after a long
input (scoring, classification); otherwise ``"batched"``.

Logits are ``model.get_output_embeddings()(hidden)`` computed only at the positions returned
(never at prompt positions), which holds for GPT-2, Llama, Mistral, Qwen2 and similar models;
models that post-process logits (final logit soft-capping) are refused. Attention must be
``"eager"`` or ``"sdpa"`` (the kernels that accept an arbitrary 4-D mask).
"""

from __future__ import annotations

import torch

from kdengine import compat

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
LAYOUTS = ("auto", "packed", "batched")


def _check_padding_mask(name: str, mask: torch.Tensor, shape: tuple[int, int], device) -> torch.Tensor:
    """A right-padded 0/1 mask of ``shape``: returns it as bool (ValueError otherwise)."""
    if mask.dim() != 2 or tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, expected {device} (the model's device)")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must hold only 0/1 values")
    mask = mask.bool()
    if shape[1] > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(f"{name} must be right-padded (ones then zeros in every row)")
    return mask


def _check_model(model) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "base_model") or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"model must be a transformers causal LM (PreTrainedModel), got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
        raise ValueError(f"model must be a decoder-only causal LM with an LM head, got {type(model).__name__}")
    attn = getattr(config, "_attn_implementation", None)
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"shared_input_forward needs attn_implementation in {ATTN_IMPLEMENTATIONS} (it passes a "
                         f"custom 4-D attention mask), got {attn!r}; load the model with "
                         "attn_implementation='sdpa'")
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ValueError("models with final_logit_softcapping are not supported: logits are computed as "
                         "get_output_embeddings()(hidden_states)")


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int, device) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"{name} must be an integer tensor [B, L], got "
                         f"{getattr(ids, 'dtype', type(ids))} {list(getattr(ids, 'shape', []))}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device}, expected {device} (the model's device)")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} must hold token ids in [0, {vocab_size})")


def _expert_index(experts, num_experts: int, batch: int, device) -> tuple[torch.Tensor, str]:
    """``[B, k]`` expert ids per example and the output mode ("all" | "one" | "topk")."""
    if experts is None:
        return torch.arange(num_experts, device=device).expand(batch, num_experts), "all"
    if not isinstance(experts, torch.Tensor) or experts.dtype not in (torch.long, torch.int):
        raise ValueError(f"experts must be None or an integer tensor [B] or [B, k], got {type(experts).__name__} "
                         f"{getattr(experts, 'dtype', '')}")
    if experts.dim() not in (1, 2) or experts.shape[0] != batch or experts.numel() == 0:
        raise ValueError(f"experts must have shape [B] or [B, k] with B = {batch} and k >= 1, "
                         f"got {list(experts.shape)}")
    if experts.device != device:
        raise ValueError(f"experts is on {experts.device}, expected {device} (the model's device)")
    if experts.min() < 0 or experts.max() >= num_experts:
        raise ValueError(f"experts must hold expert ids in [0, {num_experts})")
    if experts.dim() == 1:
        return experts.long()[:, None], "one"
    return experts.long(), "topk"


def _segment_mask(x_mask: torch.Tensor, seg_valid: torch.Tensor, k: int, layout: str) -> torch.Tensor:
    """Boolean 4-D mask (True = may attend) for the segment pass.

    Query (segment s, offset i) of example b sees x key j iff x_mask[b, j], and segment key
    (s', i') iff s' == s, i' <= i and seg_valid[b, i'] (the prompt, then y's real tokens).

    Shapes: packed [B, 1, k*S, Lx + k*S]; batched [B*k, 1, S, Lx + S] (rows b-major).
    """
    batch, seg_len = seg_valid.shape
    device = x_mask.device
    causal = torch.ones(seg_len, seg_len, dtype=torch.bool, device=device).tril()
    own = causal[None] & seg_valid[:, None, :]                           # [B, S, S]
    if layout == "batched":
        x_part = x_mask[:, None, :].expand(batch, seg_len, -1)           # [B, S, Lx]
        mask = torch.cat([x_part, own], dim=-1).repeat_interleave(k, dim=0)
        return mask[:, None]
    same_segment = torch.eye(k, dtype=torch.bool, device=device)
    # [B, k, S, k, S]: block-diagonal over segments, `own` inside each block.
    blocks = same_segment[None, :, None, :, None] & own[:, None, :, None, :]
    blocks = blocks.reshape(batch, k * seg_len, k * seg_len)
    x_part = x_mask[:, None, :].expand(batch, k * seg_len, -1)
    return torch.cat([x_part, blocks], dim=-1)[:, None]


def _attention_mask(mask: torch.Tensor, attn: str, dtype: torch.dtype) -> torch.Tensor:
    """sdpa takes the boolean mask; eager adds it to the scores (0 / dtype min)."""
    if attn == "sdpa":
        return mask
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, torch.finfo(dtype).min)


def choose_layout(k: int, seg_len: int, x_len: int) -> str:
    """The ``"auto"`` rule: packed while wasted segment-pair scores <= x-part scores."""
    return "packed" if (k - 1) * seg_len <= x_len else "batched"


def shared_input_forward(model, prompts: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, *, experts: torch.Tensor | None = None,
                         response_ids: torch.Tensor | None = None,
                         response_attention_mask: torch.Tensor | None = None, last_only: bool = False,
                         layout: str = "auto", split_x: bool = False):
    """Logits of ``[x; P_k; y]`` for K appended soft-prompt experts, computing x once.

    Args:
        model: a frozen transformers causal LM (``attn_implementation`` "eager" or "sdpa"), in the
            mode the caller wants (``eval()`` for deterministic dropout-free teachers).
        prompts: ``[K, P, H]`` float soft prompts (any float dtype; cast to the model's embedding
            dtype); gradients flow to it.
        input_ids: ``[B, Lx]`` int64/int32 token ids of x, right-padded.
        attention_mask: ``[B, Lx]`` 0/1 (or bool), right-padded; None = no padding. Every example
            needs at least one real x token.
        experts: None (all K experts), LongTensor ``[B]`` (one expert per example) or ``[B, k]``
            (k experts per example, repeats allowed).
        response_ids: ``[B, Ly]`` token ids of y (right-padded), or None for no response.
        response_attention_mask: ``[B, Ly]`` 0/1, right-padded; None = no padding.
        last_only: return only the logits of the last real token of ``[x; P_k; y]``: the last
            prompt position without a response (next-token scoring / classification), else the
            last real response token (the last prompt position for an empty response row).
        layout: "auto" | "packed" | "batched" (see the module docstring); all give the same logits.
        split_x: return ``(x_logits, y_logits)`` instead of their concatenation along positions:
            x's logits as one computation broadcast over the experts (stride 0 on the expert axis,
            never copied; ``x_logits.reshape(K, B * Lx, V)`` is still a view and is what
            :func:`kdengine.ops.fused_experts_kd_loss` takes as [K, N, V] expert logits) and the
            experts' own y logits. The concatenation writes x's logits once per expert.

    Returns:
        Logits (the model's dtype) for x's and y's positions, prompt positions removed:
        experts None -> ``[K, B, Lx + Ly, V]``; ``[B]`` -> ``[B, Lx + Ly, V]``;
        ``[B, k]`` -> ``[B, k, Lx + Ly, V]``. With ``last_only`` the position axis is dropped
        (``[K, B, V]``, ``[B, V]``, ``[B, k, V]``). The x part equals across experts (an expanded
        view of one computation when there is no response, or with ``split_x``: then a pair of
        the x part, Lx positions, and the y part, Ly positions, in those layouts; ``last_only``
        ignores ``split_x``). Logits at padded positions are finite but unspecified.

    Raises:
        ValueError: on a model that is not a supported causal LM, or inputs of the wrong shape,
            dtype, device, value range or padding side.
    """
    _check_model(model)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    embed = model.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    vocab_size = embed.weight.shape[0]
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 3 or not prompts.is_floating_point():
        raise ValueError(f"prompts must be a float tensor [K, P, H], got {getattr(prompts, 'dtype', type(prompts))} "
                         f"{list(getattr(prompts, 'shape', []))}")
    num_experts, prompt_len, hidden = prompts.shape
    if num_experts < 1 or prompt_len < 1 or hidden != embed.weight.shape[1]:
        raise ValueError(f"prompts must be [K >= 1, P >= 1, H = {embed.weight.shape[1]}] (the model's hidden "
                         f"size), got {list(prompts.shape)}")
    if prompts.device != device:
        raise ValueError(f"prompts is on {prompts.device}, expected {device} (the model's device)")
    _check_ids("input_ids", input_ids, vocab_size, device)
    batch, x_len = input_ids.shape
    if batch < 1 or x_len < 1:
        raise ValueError(f"input_ids must be [B >= 1, Lx >= 1], got {list(input_ids.shape)}")
    if attention_mask is None:
        x_mask = torch.ones(batch, x_len, dtype=torch.bool, device=device)
    else:
        x_mask = _check_padding_mask("attention_mask", attention_mask, (batch, x_len), device)
    x_lengths = x_mask.sum(dim=1)
    if (x_lengths == 0).any():
        raise ValueError("every example needs at least one real input token (attention_mask row of zeros)")
    if response_ids is None:
        if response_attention_mask is not None:
            raise ValueError("response_attention_mask was given without response_ids")
        y_len = 0
        y_mask = torch.ones(batch, 0, dtype=torch.bool, device=device)
    else:
        _check_ids("response_ids", response_ids, vocab_size, device)
        if response_ids.shape[0] != batch:
            raise ValueError(f"response_ids must have B = {batch} rows, got {list(response_ids.shape)}")
        y_len = response_ids.shape[1]
        if response_attention_mask is None:
            y_mask = torch.ones(batch, y_len, dtype=torch.bool, device=device)
        else:
            y_mask = _check_padding_mask("response_attention_mask", response_attention_mask, (batch, y_len), device)
    index, mode = _expert_index(experts, num_experts, batch, device)
    k = index.shape[1]
    lm_head = model.get_output_embeddings()
    base = model.base_model

    # Phase 1: x once, no grad (x does not depend on the prompts); keep every layer's K/V.
    with torch.no_grad():
        out = base(input_ids=input_ids, attention_mask=x_mask.long(), use_cache=True)
        cache = compat.returned_cache(out)
        if any(getattr(cache, "is_sliding", ())):
            raise ValueError("sliding-window attention layers are not supported (the segment mask is full attention)")
        x_logits = None if last_only else project(lm_head, out.last_hidden_state)  # [B, Lx, V]
    if not last_only:
        # x's logits for every expert: an expanded view of the one computation (stride 0).
        x_part = (x_logits[None].expand(k, batch, x_len, -1) if mode == "all"
                  else _arrange(x_logits[:, None].expand(batch, k, x_len, -1), mode))
        if y_len == 0:
            return (x_part, x_part[..., :0, :]) if split_x else x_part

    # Phase 2: the k segments [P_e; y] of every example against x's cache.
    seg_len = prompt_len + y_len
    seg_prompts = prompts.to(dtype)[index]                                    # [B, k, P, H]
    if y_len:
        y_embeds = embed(response_ids)[:, None].expand(batch, k, y_len, hidden)
        seg_embeds = torch.cat([seg_prompts, y_embeds], dim=2)                # [B, k, S, H]
    else:
        seg_embeds = seg_prompts
    seg_valid = torch.cat([torch.ones(batch, prompt_len, dtype=torch.bool, device=device), y_mask], dim=1)
    positions = x_lengths[:, None, None] + torch.arange(seg_len, device=device)  # [B, 1, S]
    positions = positions.expand(batch, k, seg_len)
    if layout == "auto":
        layout = choose_layout(k, seg_len, x_len)
    attn = model.config._attn_implementation
    mask = _attention_mask(_segment_mask(x_mask, seg_valid, k, layout), attn, dtype)
    if layout == "batched":
        if k > 1:
            cache.batch_repeat_interleave(k)
        rows, row_len = batch * k, seg_len
    else:
        rows, row_len = batch, k * seg_len
    hidden_states = base(inputs_embeds=seg_embeds.reshape(rows, row_len, hidden),
                         position_ids=positions.reshape(rows, row_len), attention_mask=mask,
                         use_cache=True, **compat.cache_kwargs(base, cache)).last_hidden_state
    hidden_states = hidden_states.reshape(batch, k, seg_len, hidden)

    if last_only:
        last = prompt_len - 1 + y_mask.sum(dim=1)                             # [B]
        picked = hidden_states[torch.arange(batch, device=device), :, last]    # [B, k, H]
        if mode == "all":
            return project(lm_head, picked.transpose(0, 1))                    # [K, B, V]
        return _arrange(project(lm_head, picked), mode)
    y_hidden = hidden_states[:, :, prompt_len:]                               # [B, k, Ly, H]
    if mode == "all":
        y_logits = project(lm_head, y_hidden.transpose(0, 1))                 # [K, B, Ly, V]
    else:
        y_logits = _arrange(project(lm_head, y_hidden), mode)                 # [B(, k), Ly, V]
    if split_x:
        return x_part, y_logits
    return torch.cat([x_part, y_logits], dim=-2)


def project(lm_head, hidden: torch.Tensor) -> torch.Tensor:
    """``lm_head`` on ``[..., H]`` as one 2-D GEMM: a strided 3-D/4-D input would make matmul fall
    back to a batched GEMM over a broadcast weight (several times slower on CPU)."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    return lm_head(rows).view(*hidden.shape[:-1], -1)


def _arrange(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, k, ...] -> [B, ...] for one expert per example, unchanged for k per example."""
    return logits[:, 0] if mode == "one" else logits
