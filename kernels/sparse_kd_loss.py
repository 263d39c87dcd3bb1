"""Triton kernels of ``sparse_kd_loss`` (backend ``"triton"``; contract in :mod:`kdengine.ops.sparse_kd_loss`,
math in :mod:`kdengine.reference.sparse_kd_loss`).

Recompute-in-backward, one program per row, fp32 math in base 2 as :mod:`kdengine.kernels.kd_loss`:
u = student · log2(e) / T, L = log2 Σ_v exp2(u_v), log2 q = u − L; the teacher's k log-probs come
as natural logs and become a2 = log p · log2(e).

The divergence works on a small vector of "slots" (KP lanes, KP = next power of 2 ≥ k + 1): lane
i < k is column idx_i, lane k the tail (tail="bucket"), other lanes are −inf on both sides (zero
weight). The per-slot term of D and its partials come from :func:`divergence_terms` of
:mod:`kdengine.kernels.divergence`; with σ = ∂D/∂b per slot and S = Σ σ over the slots whose
student probability depends on u, the gradient w.r.t. u is

    column idx_i:        σ_i − q_i S                       (bucket, ignore; renormalize with q̃)
    any other column j:  q_j · (σ_tail / Q_tail − S)       (bucket; −q_j S for ignore, 0 for renormalize)

(the student tail is Q_tail = Σ_{j∉K} q_j = 1 − Σ_K q; clamped at TAIL_FLOOR it is a constant and
σ_tail drops out). divergence_terms drops terms of σ proportional to q, which cancel when the slots'
q sum to 1 (bucket, renormalize); tail="ignore" sums k columns whose q do not, so reverse_kl adds
its dropped +q there.

Forward (``_sparse_fwd_kernel``): one pass over the student row (online log-sum-exp at T, at T=1 too
for a hard label at T != 1, NaN/+inf count), then the k gathered columns. Backward
(``_sparse_bwd_kernel``): the slots again (k gathers), one pass over the row writing q_j · coefficient
(+ the hard-label term), then the k columns overwritten with theirs. Traffic in units of one [N, V]
pass: forward 1 read, backward 1 read + 1 write = 3, plus O(k / V). Nothing [N, V] is kept.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdengine.kernels.divergence import (
    KIND_IDS,
    LN2,
    LOG2E,
    REVERSE_KL,
    TVD,
    divergence_terms,
    finish_lse,
    finish_lse_split,
    load_row,
    nonfinite,
    online_step,
    poison,
    tvd_chunk_sums,
    tvd_distance,
    tvd_student_grad,
)
from kdengine.kernels.kd_loss import _device_guard, _row_label, _unit_column_stride, launch_config
from kdengine.reference.sparse_kd_loss import TAIL_FLOOR, TAILS

TAIL_IDS = {name: i for i, name in enumerate(TAILS)}
BUCKET = tl.constexpr(TAIL_IDS["bucket"])
RENORMALIZE = tl.constexpr(TAIL_IDS["renormalize"])
IGNORE = tl.constexpr(TAIL_IDS["ignore"])
_FLOOR = tl.constexpr(TAIL_FLOOR)
# Row statistics written by the forward, read by the backward (fp32 [N, STATS]).
STATS = 4
_STATS = tl.constexpr(STATS)
_M_S = tl.constexpr(0)  # student at T: reference max and log2 Σ exp2 (finish_lse_split)
_LS_S = tl.constexpr(1)
_L_1 = tl.constexpr(2)  # log2 Σ exp2 of the student at T=1 (hard label)
_POISON = tl.constexpr(3)  # NaN when the row is broken (divergence.poison), else 0


@triton.jit
def _lse2(x):
    # (reference, log2 Σ exp2(x − reference)) of a small vector; −inf lanes count 0.
    m = tl.max(x, axis=0)
    return finish_lse_split(m, tl.exp2(x - tl.where(m == float("-inf"), 0.0, m)))


@triton.jit
def _slots(s_row, lp_row, idx_row, V, K, c, r_s, ls_s, beta, log2_beta, log2_1m_beta,
           KIND: tl.constexpr, TAIL: tl.constexpr, KP: tl.constexpr):
    # The k gathered columns and the tail as slots. Returns (idx, ok, D, g, tail_coef, bad):
    # g = ∂D/∂u at column idx_i, tail_coef the factor of q_j at the other columns, bad > 0 when
    # an index is out of [0, V), repeated, or a log-prob is NaN / +inf.
    kk = tl.arange(0, KP)
    in_k = kk < K
    idx = tl.load(idx_row + kk, mask=in_k, other=0).to(tl.int64)
    ok = in_k & (idx >= 0) & (idx < V)
    lp = tl.load(lp_row + kk, mask=in_k, other=float("-inf")).to(tl.float32)
    same = (idx[:, None] == idx[None, :]) & (kk[:, None] < kk[None, :]) & in_k[:, None] & in_k[None, :]
    bad = tl.sum(tl.where(in_k & ~ok, 1.0, 0.0) + nonfinite(lp), axis=0) + tl.sum(tl.sum(same.to(tl.float32), 1), 0)
    u = tl.load(s_row + idx, mask=ok, other=float("-inf")).to(tl.float32) * c
    a2 = lp * LOG2E
    is_tail = kk == K
    if TAIL == RENORMALIZE:
        # p / P and q / Q over the k columns: log-sum-exps of the k lanes only.
        ra, la = _lse2(a2)
        ru, lu = _lse2(u)
        a2 = (a2 - ra) - la
        b2 = (u - ru) - lu
    else:
        b2 = tl.where(ok, (u - r_s) - ls_s, float("-inf"))
        if TAIL == BUCKET:
            # tail slot: 1 − Σ_K p against 1 − Σ_K q, each at least TAIL_FLOOR
            p_tail = tl.maximum(1.0 - tl.sum(tl.exp2(a2), axis=0), _FLOOR)
            q_raw = 1.0 - tl.sum(tl.exp2(b2), axis=0)
            q_tail = tl.maximum(q_raw, _FLOOR)
            a2 = tl.where(is_tail, tl.log2(p_tail), a2)
            b2 = tl.where(is_tail, tl.log2(q_tail), b2)
    term, r, sigma = divergence_terms(a2, b2, a2, b2, beta, log2_beta, log2_1m_beta, KIND)
    d = tl.sum(term, axis=0)
    q = tl.exp2(b2)
    q_k = tl.sum(tl.where(in_k, q, 0.0), axis=0)
    if TAIL == IGNORE and KIND == REVERSE_KL:
        sigma += q  # ∂(q (b − a))/∂b = q (b − a) + q: the +q cancels only when Σ q = 1
    sigma_k = tl.sum(tl.where(in_k, sigma, 0.0), axis=0)
    g = sigma - q * sigma_k
    tail_coef = 0.0
    if TAIL == BUCKET:
        # σ_tail / Q_tail − S = σ_tail · Q_K / Q_tail − Σ_K σ (no 1 − Q_tail to cancel). A clamped
        # student tail is a constant: its σ leaves S and the other columns get −q_j Σ_K σ.
        sigma_tail = tl.sum(tl.where(is_tail, sigma, 0.0), axis=0)
        live = q_raw > _FLOOR
        g -= q * tl.where(live, sigma_tail, 0.0)
        tail_coef = tl.where(live, sigma_tail * q_k / q_tail, 0.0) - sigma_k
    elif TAIL == IGNORE:
        tail_coef = -sigma_k
    if KIND == TVD and TAIL != IGNORE:
        # the slots are a distribution (Σ q = 1 unless the tail is clamped): D and the gradient from
        # the sums split by the sign of p − q, as kd_loss (no 1 − 1 in peaked rows)
        sums = tvd_chunk_sums(a2, b2)
        g_tvd = tvd_student_grad(a2, b2, sums)
        if TAIL == BUCKET:
            d = tl.where(live, tvd_distance(sums), d)
            g = tl.where(live, g_tvd, g)
            tail_coef = tl.where(live, tl.sum(tl.where(is_tail, g_tvd, 0.0), axis=0) / q_tail, tail_coef)
        else:
            d = tvd_distance(sums)
            g = g_tvd
    return idx, ok, d, g, tail_coef, bad


@triton.jit
def _sparse_fwd_kernel(s_ptr, lp_ptr, idx_ptr, labels_ptr, weights_ptr, loss_ptr, stats_ptr,
                       V, K, stride_s, stride_lp, stride_idx, ignore_index,
                       c, kd_scale, hard_weight, beta, log2_beta, log2_1m_beta,
                       KIND: tl.constexpr, TAIL: tl.constexpr, HARD: tl.constexpr, OWN_T1: tl.constexpr,
                       HAS_LABELS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
                       KP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: N · V may exceed 2³¹
    label, valid = _row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    if valid:
        s_row = s_ptr + row * stride_s
        stats_row = stats_ptr + row * _STATS
        cols = tl.arange(0, BLOCK)
        # ---- the one pass over the row: log-sum-exps of the student at T (and T=1), NaN/+inf count
        m_s = float("-inf")
        z_s = tl.zeros([BLOCK], tl.float32)
        m_1 = float("-inf")
        z_1 = tl.zeros([BLOCK], tl.float32)
        bad = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            s = load_row(s_row, start + cols, V)
            bad += nonfinite(s)
            m_s, alpha_s, e_s = online_step(m_s, s * c)
            z_s = z_s * alpha_s + e_s
            if OWN_T1:
                m_1, alpha_1, e_1 = online_step(m_1, s * LOG2E)
                z_1 = z_1 * alpha_1 + e_1
        r_s, ls_s = finish_lse_split(m_s, z_s)
        # ---- the k columns (and the tail): D
        _, _, d, _, _, bad_k = _slots(s_row, lp_ptr + row * stride_lp, idx_ptr + row * stride_idx, V, K,
                                               c, r_s, ls_s, beta, log2_beta, log2_1m_beta, KIND, TAIL, KP)
        loss = kd_scale * d
        # hard-label CE at T=1: ln Σ exp(s) − s[label]; a label outside [0, V) gives NaN
        l_1 = r_s + ls_s
        if HARD:
            if OWN_T1:
                l_1 = finish_lse(m_1, z_1)
            in_row = (label >= 0) & (label < V)
            s_label = tl.load(s_row + label, mask=in_row, other=0.0).to(tl.float32)
            loss += hard_weight * tl.where(in_row, LN2 * l_1 - s_label, float("nan"))
        nan_row = poison(tl.sum(bad, axis=0) + bad_k)
        loss += nan_row
        if HAS_WEIGHTS:
            loss = loss * tl.load(weights_ptr + row).to(tl.float32)
        tl.store(stats_row + _M_S, r_s)
        tl.store(stats_row + _LS_S, ls_s)
        tl.store(stats_row + _L_1, l_1)
        tl.store(stats_row + _POISON, nan_row)
        tl.store(loss_ptr + row, loss)
    else:
        tl.store(loss_ptr + row, 0.0)  # ignored row; its statistics stay zero (unused)


@triton.jit
def _sparse_bwd_kernel(s_ptr, lp_ptr, idx_ptr, labels_ptr, weights_ptr, scale_ptr, stride_scale, stats_ptr, gs_ptr,
                       V, K, stride_s, stride_lp, stride_idx, ignore_index,
                       c, soft_coef, hard_weight, beta, log2_beta, log2_1m_beta,
                       KIND: tl.constexpr, TAIL: tl.constexpr, HARD: tl.constexpr, OWN_T1: tl.constexpr,
                       HAS_LABELS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
                       KP: tl.constexpr):
    # dL/ds = w · (soft_coef · dD/du + hard_weight · (softmax(s) − onehot(label))), w = dL/d(row loss) ·
    # row_weight (scale_ptr: grad_output · the reduction's factor, stride 0, or [N] for "none").
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    gs_row = gs_ptr + row * V
    stats_row = stats_ptr + row * _STATS
    cols = tl.arange(0, BLOCK)
    label, valid = _row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    if valid:
        w = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
        if HAS_WEIGHTS:
            w = w * tl.load(weights_ptr + row).to(tl.float32)
        r_s = tl.load(stats_row + _M_S)
        ls_s = tl.load(stats_row + _LS_S)
        l_1 = tl.load(stats_row + _L_1)
        nan_row = tl.load(stats_row + _POISON)
        if HARD:
            nan_row += tl.where((label < 0) | (label >= V), float("nan"), 0.0)
        idx, ok, _, g, tail_coef, _ = _slots(s_row, lp_ptr + row * stride_lp, idx_ptr + row * stride_idx, V,
                                                    K, c, r_s, ls_s, beta, log2_beta, log2_1m_beta, KIND, TAIL, KP)
        k_soft = w * soft_coef
        k_hard = w * hard_weight
        # ---- every column as a non-top-k one: q_j · tail_coef (+ hard label)
        for start in range(0, V, BLOCK):
            offs = start + cols
            s = load_row(s_row, offs, V)
            grad = k_soft * tail_coef * tl.exp2((s * c - r_s) - ls_s) + nan_row
            if HARD:
                if OWN_T1:
                    q1 = tl.exp2(s * LOG2E - l_1)
                else:
                    q1 = tl.exp2((s * c - r_s) - ls_s)
                grad += k_hard * (q1 - tl.where(offs == label, 1.0, 0.0))
            tl.store(gs_row + offs, grad.to(gs_row.dtype.element_ty), mask=offs < V)
        tl.debug_barrier()  # the k columns below overwrite what the pass wrote there
        # ---- the k columns: their slot gradient (+ hard label)
        grad_k = k_soft * g + nan_row
        if HARD:
            s_k = tl.load(s_row + idx, mask=ok, other=0.0).to(tl.float32)
            if OWN_T1:
                q1_k = tl.exp2(s_k * LOG2E - l_1)
            else:
                q1_k = tl.exp2((s_k * c - r_s) - ls_s)
            grad_k += k_hard * (q1_k - tl.where(idx == label, 1.0, 0.0))
        tl.store(gs_row + idx, grad_k.to(gs_row.dtype.element_ty), mask=ok)
    else:
        for start in range(0, V, BLOCK):  # an ignored row: exact zeros
            offs = start + cols
            tl.store(gs_row + offs, tl.zeros([BLOCK], tl.float32).to(gs_row.dtype.element_ty), mask=offs < V)


def _launch_args(spec, tail: str, labels, row_weights, k: int) -> dict:
    """Constants and constexpr flags shared by both kernels."""
    temperature = float(spec.temperature)
    beta = float(spec.jsd_beta)
    hard = labels is not None and spec.hard_weight != 0.0
    return dict(
        ignore_index=int(spec.ignore_index), c=math.log2(math.e) / temperature, hard_weight=float(spec.hard_weight),
        beta=beta, log2_beta=math.log2(beta) if spec.kind == "jsd" else 0.0,
        log2_1m_beta=math.log2(1.0 - beta) if spec.kind == "jsd" else 0.0,
        KIND=KIND_IDS[spec.kind], TAIL=TAIL_IDS[tail], HARD=hard, OWN_T1=hard and temperature != 1.0,
        HAS_LABELS=labels is not None, HAS_WEIGHTS=row_weights is not None,
        KP=triton.next_power_of_2(k + 1),
    )


def sparse_kd_loss_forward_triton(student: torch.Tensor, logprobs: torch.Tensor, indices: torch.Tensor,
                                  labels: torch.Tensor | None, row_weights: torch.Tensor | None, spec, tail: str):
    """Row losses and row statistics of sparse_kd_loss (reads the student row once).

    Args:
        student: [N, V] float32 / bfloat16 / float16, CUDA (CPU under TRITON_INTERPRET=1), any row stride.
        logprobs: [N, k] float (the teacher's log p at the k columns), indices: [N, k] integer, k ≤ TRITON_MAX_K.
        labels, row_weights, spec: as :func:`kdengine.kernels.kd_loss.kd_loss_forward_triton`; tail: TAILS.

    Returns:
        (row_loss fp32 [N], stats fp32 [N, STATS]) — read by :func:`sparse_kd_loss_backward_triton`.
    """
    n, v = student.shape
    k = indices.shape[1]
    row_loss = torch.zeros(n, dtype=torch.float32, device=student.device)
    stats = torch.zeros((n, STATS), dtype=torch.float32, device=student.device)
    if n == 0:
        return row_loss, stats
    student = _unit_column_stride(student)
    logprobs, indices = logprobs.contiguous(), indices.contiguous()
    block, num_warps = launch_config(v)
    placeholder = row_loss  # pointer argument of an absent tensor; constexpr flags keep it unread
    with _device_guard(student.device):
        _sparse_fwd_kernel[(n,)](
            student, logprobs, indices,
            placeholder if labels is None else labels.contiguous(),
            placeholder if row_weights is None else row_weights.contiguous(),
            row_loss, stats, v, k, student.stride(0), logprobs.stride(0), indices.stride(0),
            kd_scale=float(spec.kd_scale), **_launch_args(spec, tail, labels, row_weights, k),
            BLOCK=block, num_warps=num_warps,
        )
    return row_loss, stats


def sparse_kd_loss_backward_triton(student: torch.Tensor, logprobs: torch.Tensor, indices: torch.Tensor,
                                   labels: torch.Tensor | None, row_weights: torch.Tensor | None,
                                   stats: torch.Tensor, scale: torch.Tensor, spec, tail: str) -> torch.Tensor:
    """Student gradient [N, V] (student dtype, contiguous) of Σ_rows scale · row_loss, recomputed from the
    logits and the forward's statistics; ``scale`` is fp32 on the device, 0-d or [N] (read by the kernel)."""
    n, v = student.shape
    k = indices.shape[1]
    grad = torch.empty((n, v), dtype=student.dtype, device=student.device)
    if n == 0:
        return grad
    student = _unit_column_stride(student)
    logprobs, indices = logprobs.contiguous(), indices.contiguous()
    scale = scale.to(torch.float32).contiguous()
    block, num_warps = launch_config(v)
    placeholder = stats
    with _device_guard(student.device):
        _sparse_bwd_kernel[(n,)](
            student, logprobs, indices,
            placeholder if labels is None else labels.contiguous(),
            placeholder if row_weights is None else row_weights.contiguous(),
            scale, 1 if scale.dim() == 1 else 0, stats, grad,
            v, k, student.stride(0), logprobs.stride(0), indices.stride(0),
            soft_coef=float(spec.kd_scale) / float(spec.temperature), **_launch_args(spec, tail, labels, row_weights, k),
            BLOCK=block, num_warps=num_warps,
        )
    return grad
