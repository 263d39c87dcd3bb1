"""Triton kernels of ``expert_batch_embed`` (row layout: :mod:`kdengine.reference.expert_batch_embed`).

Every output row r has an example b_r, an expert k_r and an insert offset n_r (0 for prepend,
the number of real tokens for append). Output position t of row r reads

    t < n_r            token embedding  weight[input_ids[b_r, t]]
    n_r <= t < n_r+P   prompt slot      prompts[k_r, t - n_r]
    t >= n_r + P       token embedding  weight[input_ids[b_r, t - P]]

Forward: one program per (row, block of positions) gathers both sources into a [BLOCK_T, BLOCK_H]
tile and writes the embeddings and the mask in one pass. Backward, deterministic (no atomics):

* prompts: rows are sorted by expert (stable), and one program per (expert, slot block, hidden
  block) sums its rows in that fixed order: dP[k, p] = Σ_{r: k_r = k} dE[r, n_r + p].
* weight: the R·L token positions are sorted by token id (stable); the program that owns the first
  entry of each id's segment sums the segment in order: dW[v] = Σ_{(r, l): ids = v} dE[r, t(r, l)].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdengine.reference.expert_batch_embed import insert_offsets, row_tables

BLOCK_T = 16
BLOCK_P = 16
BLOCK_H = 64


@triton.jit
def _expert_batch_embed_fwd_kernel(
    ids_ptr,  # [B, L] token ids
    stride_ids_b,
    stride_ids_l,
    weight_ptr,  # [Vocab, H] embedding table
    stride_w_v,
    stride_w_h,
    prompts_ptr,  # [K, P, H] prompts, already in the weight's dtype
    stride_p_k,
    stride_p_p,
    stride_p_h,
    mask_ptr,  # [B, L] int32 attention mask
    stride_m_b,
    stride_m_l,
    row_example_ptr,  # [R] int64 example of each row
    row_expert_ptr,  # [R] int64 expert of each row
    insert_ptr,  # [R] int64 position of the prompt in each row
    out_ptr,  # [R, P+L, H] embeddings (H contiguous)
    stride_o_r,
    stride_o_t,
    out_mask_ptr,  # [R, P+L] int32 mask
    stride_om_r,
    L,
    P,
    H,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.load(row_example_ptr + r)
    k = tl.load(row_expert_ptr + r)
    n = tl.load(insert_ptr + r)
    in_row = t < L + P
    # Which source each position reads: prompt slot t - n, or token t (before) / t - P (after).
    is_prompt = (t >= n) & (t < n + P) & in_row
    is_token = in_row & ~is_prompt
    token_pos = tl.where(t < n, t, t - P)
    slot = t - n
    ids = tl.load(ids_ptr + b * stride_ids_b + token_pos * stride_ids_l, mask=is_token, other=0).to(tl.int64)
    m = tl.load(mask_ptr + b * stride_m_b + token_pos * stride_m_l, mask=is_token, other=1)
    tl.store(out_mask_ptr + r * stride_om_r + t, tl.where(is_prompt, 1, m), mask=in_row)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_ok = h < H
        w = tl.load(
            weight_ptr + ids[:, None] * stride_w_v + h[None, :] * stride_w_h,
            mask=is_token[:, None] & h_ok[None, :],
            other=0.0,
        )
        p = tl.load(
            prompts_ptr + k * stride_p_k + slot[:, None] * stride_p_p + h[None, :] * stride_p_h,
            mask=is_prompt[:, None] & h_ok[None, :],
            other=0.0,
        )
        value = tl.where(is_prompt[:, None], p, w)
        tl.store(
            out_ptr + r * stride_o_r + t[:, None] * stride_o_t + h[None, :],
            value,
            mask=in_row[:, None] & h_ok[None, :],
        )


@triton.jit
def _expert_batch_embed_bwd_prompts_kernel(
    grad_ptr,  # [R, P+L, H] upstream gradient
    stride_g_r,
    stride_g_t,
    stride_g_h,
    rows_ptr,  # [R] int64 rows sorted by expert (stable)
    offsets_ptr,  # [K+1] int64 start of each expert's rows in rows_ptr
    insert_ptr,  # [R] int64 insert offsets
    out_ptr,  # [K, P, H] fp32 prompt gradient (H contiguous)
    stride_o_k,
    stride_o_p,
    P,
    H,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (p < P)[:, None] & (h < H)[None, :]
    start = tl.load(offsets_ptr + k)
    end = tl.load(offsets_ptr + k + 1)
    # dP[k, p] = Σ over expert k's rows r (fixed order) of dE[r, n_r + p], accumulated in fp32.
    acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    for i in range(start, end):
        r = tl.load(rows_ptr + i)
        n = tl.load(insert_ptr + r)
        g = tl.load(
            grad_ptr + r * stride_g_r + (n + p)[:, None] * stride_g_t + h[None, :] * stride_g_h,
            mask=ok,
            other=0.0,
        )
        acc += g.to(tl.float32)
    tl.store(out_ptr + k * stride_o_k + p[:, None] * stride_o_p + h[None, :], acc, mask=ok)


@triton.jit
def _expert_batch_embed_bwd_weight_kernel(
    grad_ptr,  # [R, P+L, H] upstream gradient
    stride_g_r,
    stride_g_t,
    stride_g_h,
    sorted_ids_ptr,  # [R·L] int64 token ids, sorted (stable)
    order_ptr,  # [R·L] int64 flat entry r·L + l of each sorted id
    seg_end_ptr,  # [R·L] int64 end of the id's segment at its first entry, else j
    insert_ptr,  # [R] int64 insert offsets
    out_ptr,  # [Vocab, H] fp32 weight gradient (H contiguous, zeroed)
    stride_o_v,
    L,
    P,
    H,
    BLOCK_H: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    end = tl.load(seg_end_ptr + j)
    # Only the first entry of a segment has end > j: it sums the whole segment in sorted order.
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in range(j, end):
        e = tl.load(order_ptr + i)
        r = e // L
        pos = e % L
        n = tl.load(insert_ptr + r)
        t = tl.where(pos < n, pos, pos + P)
        acc += tl.load(grad_ptr + r * stride_g_r + t * stride_g_t + h * stride_g_h, mask=h_ok, other=0.0).to(
            tl.float32
        )
    if end > j:
        v = tl.load(sorted_ids_ptr + j)
        tl.store(out_ptr + v * stride_o_v + h, acc, mask=h_ok)


def expert_batch_embed_triton(input_ids, weight, prompts, attention_mask, experts, placement):
    """Forward launcher: ``(embeds [R, P+L, H] weight dtype, mask [R, P+L] attention_mask dtype)``.

    Inputs as ``kdengine.ops.expert_batch_embed`` after validation (``attention_mask`` is a tensor).
    """
    batch, length = input_ids.shape
    num_experts, plen, hidden = prompts.shape
    row_example, row_expert = row_tables(batch, num_experts, experts, input_ids.device)
    insert = insert_offsets(attention_mask, row_example, placement)
    rows, width = row_example.shape[0], length + plen
    # [K, P, H] is small: cast it once here (round to nearest, as torch) rather than in the kernel.
    prompts = prompts.to(weight.dtype)
    embeds = torch.empty(rows, width, hidden, dtype=weight.dtype, device=weight.device)
    mask = torch.empty(rows, width, dtype=torch.int32, device=weight.device)
    if rows:
        mask_in = attention_mask.to(torch.int32)
        _expert_batch_embed_fwd_kernel[(rows, triton.cdiv(width, BLOCK_T))](
            input_ids,
            input_ids.stride(0),
            input_ids.stride(1),
            weight,
            weight.stride(0),
            weight.stride(1),
            prompts,
            prompts.stride(0),
            prompts.stride(1),
            prompts.stride(2),
            mask_in,
            mask_in.stride(0),
            mask_in.stride(1),
            row_example,
            row_expert,
            insert,
            embeds,
            embeds.stride(0),
            embeds.stride(1),
            mask,
            mask.stride(0),
            length,
            plen,
            hidden,
            BLOCK_T=BLOCK_T,
            BLOCK_H=min(BLOCK_H, triton.next_power_of_2(hidden)),
        )
    return embeds, mask.to(attention_mask.dtype)


def expert_batch_embed_backward_triton(
    grad_embeds, input_ids, attention_mask, experts, num_experts, placement, weight_requires_grad, vocab
):
    """Backward launcher: ``(grad_prompts fp32 [K, P, H], grad_weight fp32 [Vocab, H] or None)``."""
    batch, length = input_ids.shape
    rows, width, hidden = grad_embeds.shape
    plen = width - length
    device = grad_embeds.device
    row_example, row_expert = row_tables(batch, num_experts, experts, device)
    insert = insert_offsets(attention_mask, row_example, placement)
    block_h = min(BLOCK_H, triton.next_power_of_2(hidden))

    by_expert = torch.sort(row_expert, stable=True).indices
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.bincount(row_expert, minlength=num_experts).cumsum(0)
    grad_prompts = torch.empty(num_experts, plen, hidden, dtype=torch.float32, device=device)
    _expert_batch_embed_bwd_prompts_kernel[
        (num_experts, triton.cdiv(plen, BLOCK_P), triton.cdiv(hidden, block_h))
    ](
        grad_embeds,
        grad_embeds.stride(0),
        grad_embeds.stride(1),
        grad_embeds.stride(2),
        by_expert,
        offsets,
        insert,
        grad_prompts,
        grad_prompts.stride(0),
        grad_prompts.stride(1),
        plen,
        hidden,
        BLOCK_P=BLOCK_P,
        BLOCK_H=block_h,
    )
    if not weight_requires_grad:
        return grad_prompts, None

    grad_weight = torch.zeros(vocab, hidden, dtype=torch.float32, device=device)
    flat_ids = input_ids[row_example].reshape(-1).long()
    if flat_ids.numel():
        sorted_ids, order = torch.sort(flat_ids, stable=True)
        position = torch.arange(sorted_ids.numel(), device=device)
        first = torch.ones_like(sorted_ids, dtype=torch.bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        seg_end = torch.where(first, torch.searchsorted(sorted_ids, sorted_ids, right=True), position)
        _expert_batch_embed_bwd_weight_kernel[(sorted_ids.numel(), triton.cdiv(hidden, block_h))](
            grad_embeds,
            grad_embeds.stride(0),
            grad_embeds.stride(1),
            grad_embeds.stride(2),
            sorted_ids,
            order,
            seg_end,
            insert,
            grad_weight,
            grad_weight.stride(0),
            length,
            plen,
            hidden,
            BLOCK_H=block_h,
        )
    return grad_prompts, grad_weight
