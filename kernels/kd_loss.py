"""Triton kernels of ``kd_loss`` (backend ``"triton"``; contract in :mod:`kdengine.ops.kd_loss`).

Recompute-in-backward: the forward writes only per-row statistics, the backward reads the logits
again and writes the gradient already multiplied by grad_output, in fp32, rounded once into the
input dtype. Nothing of size [N, V] is kept between the two (the autograd Function saves the
logits it was given and the [N, STATS] row statistics).

One program per row streams the row over V in BLOCK-wide chunks with fp32 math, in base 2: with
a = logits · log2(e) / T and L = log2 Σ_v exp2(a_v), log2 q = a_s − L_s and log2 p = a_t − L_t.
The divergence math per column is :mod:`kdengine.kernels.divergence` (shared with fuse_experts).

Forward (``_kd_loss_fwd_kernel``), passes over the row (constexpr flags compile the unused away):

1. statistics: online max + rescaled sum of exp2 for a_s and a_t (and for the student at T=1 when
   a hard-label CE needs it and T != 1). forward_kl, reverse_kl and soft_ce also accumulate D here
   with the same rescaling, so their loss needs this pass only.
2. jsd / tvd / mse only: D and the row sums their gradients need.

The first pass that reads both rows also counts their NaN / +inf logits; a row with any gets a NaN
loss and NaN gradients (``divergence.poison``, kept in the statistics).

Backward (``_kd_loss_bwd_kernel``): one pass writing dL/ds and/or dL/dt from the statistics.

Traffic in units of one [N, V] pass of the input dtype (student gradient only; each extra
gradient adds 1): forward 2 (KL family, mse) or 4 (jsd, tvd); backward 3. Forward + backward:
5 (KL family, mse) and 7 (jsd, tvd); forward only: 2 and 4.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from kdengine.kernels.divergence import (
    FORWARD_KL,
    JSD,
    KIND_IDS,
    LN2,
    LOG2E,
    MSE,
    REVERSE_KL,
    SOFT_CE,
    TVD,
    TVD_SUMS,
    divergence_terms,
    finish_lse,
    finish_lse_split,
    load_row,
    nonfinite,
    online_kl_finish,
    online_kl_step,
    online_step,
    poison,
    tvd_chunk_sums,
    tvd_distance,
    tvd_student_grad,
    tvd_teacher_grad,
)

# Row statistics written by the forward, read by the backward (fp32 [N, STATS]).
STATS = 16
_STATS = tl.constexpr(STATS)
_M_S = tl.constexpr(0)  # student at T: reference max and log2 Σ exp2 (finish_lse_split)
_LS_S = tl.constexpr(1)
_M_T = tl.constexpr(2)  # teacher at T: likewise
_LS_T = tl.constexpr(3)
_L_1 = tl.constexpr(4)  # log2 Σ exp2 of the student at T=1 (hard label)
_SUM_R = tl.constexpr(5)  # Σr, Σσ (kdengine.kernels.divergence)
_SUM_SIGMA = tl.constexpr(6)
_TVD = tl.constexpr(7)  # tvd: the row's tvd_chunk_sums (7 ... 14)
_POISON = tl.constexpr(15)  # NaN when the row has a NaN or +inf logit, else 0 (divergence.poison)

# Columns per chunk. A chunk holds ~8 fp32 vectors live in pass 1 (two inputs, their scaled
# values and exponentials, the running sums), so BLOCK / (32 · num_warps) = 8 elements per
# thread keeps that near 64 registers, and 8 bf16 values per thread are one 128-bit load.
# 4096 columns with 16 warps: a 128k-vocabulary row is 32 chunks per pass.
_MAX_BLOCK = 4096
_ELEMENTS_PER_THREAD = 8


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``vocab`` columns."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(vocab, 1)))
    num_warps = max(1, min(16, block // (32 * _ELEMENTS_PER_THREAD)))
    return block, num_warps


@triton.jit
def _row_label(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    # (label, valid): rows whose label is ignore_index contribute nothing.
    label = -1
    valid = row >= 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
    return label, valid


@triton.jit
def _kd_fwd_row(s_row, t_row, stats_row, V, label, c, kd_scale, hard_weight, beta, log2_beta, log2_1m_beta,
                KIND: tl.constexpr, HARD: tl.constexpr, OWN_T1: tl.constexpr, BLOCK: tl.constexpr):
    # Row loss before the row weight: kd_scale · D + hard_weight · CE; stores the statistics.
    cols = tl.arange(0, BLOCK)
    SOFTMAX: tl.constexpr = KIND != MSE
    ONLINE_KL: tl.constexpr = KIND == FORWARD_KL or KIND == SOFT_CE or KIND == REVERSE_KL

    # ---- pass 1: softmax statistics (+ D of forward_kl / reverse_kl / soft_ce) ----------------
    m_s = float("-inf")
    z_s = tl.zeros([BLOCK], tl.float32)
    m_t = float("-inf")
    z_t = tl.zeros([BLOCK], tl.float32)
    m_1 = float("-inf")
    z_1 = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.float32)  # NaN / +inf logits seen (counted where both rows are read)
    if SOFTMAX or OWN_T1:
        for start in range(0, V, BLOCK):
            offs = start + cols
            s = load_row(s_row, offs, V)
            if SOFTMAX:
                a_s = s * c
                t = load_row(t_row, offs, V)
                bad += nonfinite(s) + nonfinite(t)
                a_t = t * c
                m_s, alpha_s, e_s = online_step(m_s, a_s)
                z_s = z_s * alpha_s + e_s
                m_t, alpha_t, e_t = online_step(m_t, a_t)
                z_t = z_t * alpha_t + e_t
                if ONLINE_KL:  # D of forward_kl / soft_ce / reverse_kl in this same pass
                    acc = online_kl_step(acc, a_t, alpha_t, e_t, a_s, alpha_s, e_s, KIND)
            if OWN_T1:
                m_1, alpha_1, e_1 = online_step(m_1, s * LOG2E)
                z_1 = z_1 * alpha_1 + e_1

    d = 0.0
    sum_r = 0.0
    sum_sigma = 0.0
    r_s = 0.0  # log2 q = (a_s − r_s) − ls_s, log2 p = (a_t − r_t) − ls_t
    ls_s = 0.0
    r_t = 0.0
    ls_t = 0.0
    if SOFTMAX:
        r_s, ls_s = finish_lse_split(m_s, z_s)
        r_t, ls_t = finish_lse_split(m_t, z_t)
        if ONLINE_KL:
            d, sum_r, sum_sigma = online_kl_finish(acc, z_t, z_s, (r_t, ls_t), (r_s, ls_s), KIND)

    # Hard-label CE at T=1: ln Σ exp(s) − s[label]. A label outside [0, V) (and not ignore_index)
    # makes it NaN: no finite loss for a row whose target does not exist.
    ce = 0.0
    l_1 = r_s + ls_s  # T == 1: the student statistics are those at T=1
    if HARD:
        if OWN_T1:
            l_1 = finish_lse(m_1, z_1)
        in_row = (label >= 0) & (label < V)
        s_label = tl.load(s_row + label, mask=in_row, other=0.0).to(tl.float32)
        ce = tl.where(in_row, LN2 * l_1 - s_label, float("nan"))

    # ---- pass 2 (jsd, tvd, mse): D and the row sums ----------------------------------------------
    if KIND == JSD or KIND == TVD or KIND == MSE:
        acc_d = tl.zeros([BLOCK], tl.float32)
        acc_r = tl.zeros([BLOCK], tl.float32)
        acc_sig = tl.zeros([BLOCK], tl.float32)
        tvd = tl.zeros([TVD_SUMS], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            s = load_row(s_row, offs, V)
            t = load_row(t_row, offs, V)
            if KIND == MSE:
                bad += nonfinite(s) + nonfinite(t)
            a2 = (t * c - r_t) - ls_t
            b2 = (s * c - r_s) - ls_s
            term, r, sigma = divergence_terms(a2, b2, s, t, beta, log2_beta, log2_1m_beta, KIND)
            acc_d += term
            acc_r += r
            acc_sig += sigma
            if KIND == TVD:
                tvd += tvd_chunk_sums(a2, b2)
        d = tl.sum(acc_d, axis=0)
        sum_r = tl.sum(acc_r, axis=0)
        sum_sigma = tl.sum(acc_sig, axis=0)
        if KIND == MSE:
            d = d / V
        if KIND == TVD:
            d = tvd_distance(tvd)
            tl.store(stats_row + _TVD + tl.arange(0, TVD_SUMS), tvd)

    tl.store(stats_row + _M_S, r_s)
    tl.store(stats_row + _LS_S, ls_s)
    tl.store(stats_row + _M_T, r_t)
    tl.store(stats_row + _LS_T, ls_t)
    tl.store(stats_row + _L_1, l_1)
    tl.store(stats_row + _SUM_R, sum_r)
    tl.store(stats_row + _SUM_SIGMA, sum_sigma)
    nan_row = poison(tl.sum(bad, axis=0))
    tl.store(stats_row + _POISON, nan_row)
    return kd_scale * d + hard_weight * ce + nan_row


@triton.jit
def _kd_loss_fwd_kernel(s_ptr, t_ptr, labels_ptr, weights_ptr, loss_ptr, stats_ptr,
                        V, stride_s, stride_t, ignore_index,
                        c, kd_scale, hard_weight, beta, log2_beta, log2_1m_beta,
                        KIND: tl.constexpr, HARD: tl.constexpr, OWN_T1: tl.constexpr,
                        HAS_LABELS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: N · V may exceed 2³¹
    label, valid = _row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    if valid:
        loss = _kd_fwd_row(s_ptr + row * stride_s, t_ptr + row * stride_t, stats_ptr + row * _STATS, V, label,
                           c, kd_scale, hard_weight, beta, log2_beta, log2_1m_beta, KIND, HARD, OWN_T1, BLOCK)
        if HAS_WEIGHTS:
            loss = loss * tl.load(weights_ptr + row).to(tl.float32)
        # row loss = row_weight · (kd_weight · [T²] · D + hard_weight · CE)
        tl.store(loss_ptr + row, loss)
    else:
        tl.store(loss_ptr + row, 0.0)  # ignored row; its statistics stay zero (finite, unused)


@triton.jit
def _kd_loss_bwd_kernel(s_ptr, t_ptr, labels_ptr, weights_ptr, scale_ptr, stride_scale, stats_ptr, gs_ptr, gt_ptr,
                        V, stride_s, stride_t, ignore_index,
                        c, soft_coef, hard_weight, beta, log2_beta, log2_1m_beta,
                        KIND: tl.constexpr, HARD: tl.constexpr, OWN_T1: tl.constexpr,
                        HAS_LABELS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                        GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr):
    # dL/ds = w · (soft_coef · dD/du_s + hard_weight · (softmax(s) − onehot(label))), dL/dt likewise,
    # with w = dL/d(row loss) · row_weight read from the device (scale_ptr: the reduced loss's
    # grad_output · grad_scale, stride 0, or reduction="none"'s grad_output [N]).
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    gs_row = gs_ptr + row * V
    gt_row = gt_ptr + row * V
    stats_row = stats_ptr + row * _STATS
    cols = tl.arange(0, BLOCK)
    label, valid = _row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    w = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    if HAS_WEIGHTS:
        w = w * tl.load(weights_ptr + row).to(tl.float32)
    r_s = tl.load(stats_row + _M_S)
    ls_s = tl.load(stats_row + _LS_S)
    r_t = tl.load(stats_row + _M_T)
    ls_t = tl.load(stats_row + _LS_T)
    l_1 = tl.load(stats_row + _L_1)
    sum_r = tl.load(stats_row + _SUM_R)
    sum_sigma = tl.load(stats_row + _SUM_SIGMA)
    tvd = tl.zeros([TVD_SUMS], tl.float32)
    if KIND == TVD:
        tvd = tl.load(stats_row + _TVD + tl.arange(0, TVD_SUMS))
    k_soft = w * soft_coef
    k_hard = w * hard_weight
    # A NaN / +inf logit in the row: NaN gradients for the row, like its NaN loss.
    nan_row = tl.load(stats_row + _POISON)
    # A hard label outside [0, V): NaN student gradients for the row, like its NaN loss.
    nan_student = nan_row
    if HARD:
        nan_student += tl.where(valid & ((label < 0) | (label >= V)), float("nan"), 0.0)
    for start in range(0, V, BLOCK):
        offs = start + cols
        in_v = offs < V
        s = load_row(s_row, offs, V)
        t = load_row(t_row, offs, V)
        a2 = (t * c - r_t) - ls_t
        b2 = (s * c - r_s) - ls_s
        term, r, sigma = divergence_terms(a2, b2, s, t, beta, log2_beta, log2_1m_beta, KIND)
        if KIND == MSE:
            g_s = sigma
            g_t = r
        elif KIND == TVD:
            g_s = tvd_student_grad(a2, b2, tvd)
            g_t = tvd_teacher_grad(a2, b2, tvd)
        else:
            g_s = sigma - tl.exp2(b2) * sum_sigma
            g_t = r - tl.exp2(a2) * sum_r
        if GRAD_S:
            g_s = k_soft * g_s + nan_student
            if HARD:
                if OWN_T1:
                    q1 = tl.exp2(s * LOG2E - l_1)
                else:
                    q1 = tl.exp2(b2)
                g_s += k_hard * (q1 - tl.where(offs == label, 1.0, 0.0))
            # an ignored row writes exact zeros (its zero statistics could make inf · 0 above)
            tl.store(gs_row + offs, tl.where(valid, g_s, 0.0).to(gs_row.dtype.element_ty), mask=in_v)
        if GRAD_T:
            tl.store(gt_row + offs, tl.where(valid, k_soft * g_t + nan_row, 0.0).to(gt_row.dtype.element_ty),
                     mask=in_v)


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    """Any row stride is fine; a column stride other than 1 costs one contiguous copy."""
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _scalars(spec, vocab: int) -> dict:
    """Host constants of a KDLossSpec shared by both kernels."""
    kind = spec.kind
    temperature = float(spec.temperature)
    beta = float(spec.jsd_beta)
    return dict(
        c=0.0 if kind == "mse" else math.log2(math.e) / temperature,
        hard_weight=float(spec.hard_weight), beta=beta,
        log2_beta=math.log2(beta) if kind == "jsd" else 0.0,
        log2_1m_beta=math.log2(1.0 - beta) if kind == "jsd" else 0.0,
        ignore_index=int(spec.ignore_index),
    )


def _flags(spec, labels, row_weights) -> dict:
    hard = labels is not None and spec.hard_weight != 0.0
    return dict(KIND=KIND_IDS[spec.kind], HARD=hard,
                OWN_T1=hard and (spec.kind == "mse" or float(spec.temperature) != 1.0),
                HAS_LABELS=labels is not None, HAS_WEIGHTS=row_weights is not None)


def _device_guard(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def kd_loss_forward_triton(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                           row_weights: torch.Tensor | None, spec):
    """Row losses and row statistics of kd_loss (forward kernel; reads each logit once per pass).

    Args:
        student, teacher: [N, V] float32 / bfloat16 / float16 (dtypes may differ), CUDA tensors
            (CPU tensors under TRITON_INTERPRET=1); any row stride.
        labels: [N] integer or None; rows equal to ``spec.ignore_index`` give loss 0. With
            ``spec.hard_weight != 0`` a label outside [0, V) gives that row a NaN loss.
        row_weights: [N] float or None.
        spec: KDLossSpec (``kind``, temperature, ``kd_scale``, hard_weight, ignore_index, jsd_beta).

    Returns:
        (row_loss fp32 [N], stats fp32 [N, STATS]) — the statistics :func:`kd_loss_backward_triton` reads.
    """
    n, v = student.shape
    device = student.device
    row_loss = torch.zeros(n, dtype=torch.float32, device=device)
    stats = torch.zeros((n, STATS), dtype=torch.float32, device=device)
    if n == 0 or v == 0:  # an empty vocabulary has D = 0 (and nothing to differentiate)
        return row_loss, stats
    student = _unit_column_stride(student)
    teacher = _unit_column_stride(teacher)
    block, num_warps = launch_config(v)
    placeholder = row_loss  # pointer argument of an absent tensor; constexpr flags keep it unread
    with _device_guard(device):
        _kd_loss_fwd_kernel[(n,)](
            student, teacher,
            placeholder if labels is None else labels.contiguous(),
            placeholder if row_weights is None else row_weights.contiguous(),
            row_loss, stats, v, student.stride(0), teacher.stride(0),
            kd_scale=float(spec.kd_scale), **_scalars(spec, v), **_flags(spec, labels, row_weights),
            BLOCK=block, num_warps=num_warps,
        )
    return row_loss, stats


def kd_loss_backward_triton(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                            row_weights: torch.Tensor | None, stats: torch.Tensor, scale: torch.Tensor, spec,
                            need_grad_student: bool, need_grad_teacher: bool, grad_dtypes=(None, None)):
    """Gradients of Σ_rows scale · row_loss, recomputed from the logits and the forward's statistics.

    Args:
        student, teacher, labels, row_weights, spec: as given to :func:`kd_loss_forward_triton`.
        stats: its fp32 [N, STATS] statistics.
        scale: fp32 on the device, 0-d (every row: grad_output · the reduction's factor) or [N]
            (per row, reduction="none"): dL/d(row_loss). Read by the kernel: no host sync.
        need_grad_student, need_grad_teacher: which gradients to write.
        grad_dtypes: (student's, teacher's) gradient dtype, None: that of the logits (linear_kd_loss
            asks for bf16 gradients of fp32 logits: written directly, no fp32 [N, V] buffer).

    Returns:
        (grad_student [N, V] or None, grad_teacher [N, V] or None) in ``grad_dtypes`` (default the
        logits' dtypes), contiguous; computed in fp32 with ``scale`` in, rounded once.
    """
    n, v = student.shape
    device = student.device
    dtype_s, dtype_t = (d or x.dtype for d, x in zip(grad_dtypes, (student, teacher), strict=True))
    grad_s = torch.empty((n, v), dtype=dtype_s, device=device) if need_grad_student else None
    grad_t = torch.empty((n, v), dtype=dtype_t, device=device) if need_grad_teacher else None
    if n == 0 or v == 0 or not (need_grad_student or need_grad_teacher):
        return grad_s, grad_t
    student = _unit_column_stride(student)
    teacher = _unit_column_stride(teacher)
    scale = scale.to(torch.float32).contiguous()
    if spec.kind == "mse":
        soft_coef = spec.kd_scale / v
    else:
        soft_coef = spec.kd_scale / float(spec.temperature)
    block, num_warps = launch_config(v)
    placeholder = stats
    with _device_guard(device):
        _kd_loss_bwd_kernel[(n,)](
            student, teacher,
            placeholder if labels is None else labels.contiguous(),
            placeholder if row_weights is None else row_weights.contiguous(),
            scale, 1 if scale.dim() == 1 else 0, stats,
            placeholder if grad_s is None else grad_s,
            placeholder if grad_t is None else grad_t,
            v, student.stride(0), teacher.stride(0),
            soft_coef=float(soft_coef), **_scalars(spec, v), **_flags(spec, labels, row_weights),
            GRAD_S=grad_s is not None, GRAD_T=grad_t is not None, BLOCK=block, num_warps=num_warps,
        )
    return grad_s, grad_t
