"""Triton row primitive of ``kd_loss`` (backend ``"triton"``; contract in :mod:`kdengine.ops.kd_loss`).

One program per row streams the row over V in BLOCK-wide chunks with fp32 math. Nothing of
size [N, V] is allocated except the gradients themselves (input dtype, written during the
forward), so the extra memory is O(N).

All softmax arithmetic runs in base 2: with a = logits · log2(e) / T (so a = u · log2 e for
u = logits / T) and L = log2 Σ_v exp2(a_v),

    q = softmax(u_s) = exp2(a_s − L_s),   ln q = ln2 · (a_s − L_s)      (p likewise from the teacher).

Passes over the row (constexpr flags compile the unused ones away):

1. statistics: online max + rescaled sum of exp2 for a_s and a_t (and for the student at T=1
   when a hard-label CE needs it and T != 1). forward_kl, reverse_kl and soft_ce also
   accumulate D here with the same rescaling, so their loss needs this pass only.
2. forward_kl / reverse_kl / soft_ce: the gradients (D is known). jsd / tvd: D and the row
   sums their gradients need. mse: D and the gradients (raw logits, no softmax).
3. jsd / tvd only: the gradients.

Gradients are those of Σ_rows row_loss · grad_scale; grad_scale is a 0-d device tensor read by
the kernel, so nothing synchronises with the host.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

_FORWARD_KL = tl.constexpr(0)
_REVERSE_KL = tl.constexpr(1)
_SOFT_CE = tl.constexpr(2)
_JSD = tl.constexpr(3)
_TVD = tl.constexpr(4)
_MSE = tl.constexpr(5)
_KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "soft_ce": 2, "jsd": 3, "tvd": 4, "mse": 5}

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

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
def _online_step(m, x):
    # One chunk of an online base-2 softmax: the new running max m' = max(m, max x), the factor
    # exp2(m − m') that rescales the sums accumulated so far, and exp2(x − m') for this chunk.
    # While every value seen is −inf (masked columns) m' = −inf: 0 is used as the reference
    # instead, so no −inf − (−inf) = NaN appears.
    m_new = tl.maximum(m, tl.max(x, axis=0))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m - ref), tl.exp2(x - ref)


@triton.jit
def _load(row_ptr, offs, V):
    # Out-of-row lanes read −inf: zero probability, and excluded by every finite-mask below.
    return tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)


@triton.jit
def _zero_row(loss_ptr, gs_row, gt_row, V, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr):
    # Ignored row (label == ignore_index): loss 0 and zero gradients.
    tl.store(loss_ptr, 0.0)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + cols
        if GRAD_S:
            tl.store(gs_row + offs, tl.zeros([BLOCK], tl.float32).to(gs_row.dtype.element_ty), mask=offs < V)
        if GRAD_T:
            tl.store(gt_row + offs, tl.zeros([BLOCK], tl.float32).to(gt_row.dtype.element_ty), mask=offs < V)


@triton.jit
def _kd_row(s_row, t_row, gs_row, gt_row, loss_ptr, V, label, row_w, grad_w,
            c, kd_scale, soft_coef, hard_weight, beta, log2_beta, log2_1m_beta,
            KIND: tl.constexpr, HARD: tl.constexpr, OWN_T1: tl.constexpr,
            GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr):
    # row_w: row weight; grad_w = grad_scale · row_w. soft_coef: the factor from dD/du to the
    # logits' gradient (kd_scale / T, or kd_scale · 2 / V for mse on raw logits).
    cols = tl.arange(0, BLOCK)
    k_soft = grad_w * soft_coef
    k_hard = grad_w * hard_weight
    SOFTMAX: tl.constexpr = KIND != _MSE

    # ---- pass 1: softmax statistics (+ D of forward_kl / reverse_kl / soft_ce) ----------------
    m_s = float("-inf")
    z_s = tl.zeros([BLOCK], tl.float32)
    m_t = float("-inf")
    z_t = tl.zeros([BLOCK], tl.float32)
    m_1 = float("-inf")
    z_1 = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    if SOFTMAX or OWN_T1:
        for start in range(0, V, BLOCK):
            offs = start + cols
            s = _load(s_row, offs, V)
            if SOFTMAX:
                a_s = s * c
                a_t = _load(t_row, offs, V) * c
                m_s, alpha_s, e_s = _online_step(m_s, a_s)
                z_s = z_s * alpha_s + e_s
                m_t, alpha_t, e_t = _online_step(m_t, a_t)
                z_t = z_t * alpha_t + e_t
                # D accumulated with the running normaliser of its weights (zero-weight columns
                # contribute 0: 0 · log 0 = 0):
                #   forward_kl = ln2 · (Σ p (a_t − a_s) − L_t + L_s),  Σ p x = Σ e_t x / Σ e_t
                #   soft_ce    = ln2 · (L_s − Σ p a_s)
                #   reverse_kl = ln2 · (Σ q (a_s − a_t) − L_s + L_t)
                if KIND == _FORWARD_KL:
                    acc = acc * alpha_t + tl.where(a_t > float("-inf"), e_t * (a_t - a_s), 0.0)
                if KIND == _SOFT_CE:
                    acc = acc * alpha_t + tl.where(a_t > float("-inf"), e_t * a_s, 0.0)
                if KIND == _REVERSE_KL:
                    acc = acc * alpha_s + tl.where(a_s > float("-inf"), e_s * (a_s - a_t), 0.0)
            if OWN_T1:
                m_1, alpha_1, e_1 = _online_step(m_1, s * _LOG2E)
                z_1 = z_1 * alpha_1 + e_1

    d = 0.0
    if SOFTMAX:
        l_s = m_s + tl.log2(tl.sum(z_s, axis=0))
        l_t = m_t + tl.log2(tl.sum(z_t, axis=0))
        if KIND == _FORWARD_KL:
            d = _LN2 * (tl.sum(acc, axis=0) / tl.sum(z_t, axis=0) - l_t + l_s)
        if KIND == _SOFT_CE:
            d = _LN2 * (l_s - tl.sum(acc, axis=0) / tl.sum(z_t, axis=0))
        if KIND == _REVERSE_KL:
            d = _LN2 * (tl.sum(acc, axis=0) / tl.sum(z_s, axis=0) - l_s + l_t)

    # Hard-label CE at T=1: ln Σ exp(s) − s[label]; its gradient is softmax(s) − onehot(label).
    ce = 0.0
    if HARD:
        if OWN_T1:
            l_1 = m_1 + tl.log2(tl.sum(z_1, axis=0))
        else:
            l_1 = l_s  # T == 1: the student statistics are already those at T=1
        in_row = (label >= 0) & (label < V)
        s_label = tl.load(s_row + label, mask=in_row, other=0.0).to(tl.float32)
        ce = _LN2 * l_1 - s_label

    # ---- pass 2 ---------------------------------------------------------------------------------
    acc_p = tl.zeros([BLOCK], tl.float32)  # jsd: Σ p F, tvd: Σ p g, mse: Σ (s − t)²
    acc_q = tl.zeros([BLOCK], tl.float32)  # jsd: Σ q G, tvd: Σ q g
    acc_d = tl.zeros([BLOCK], tl.float32)  # tvd: Σ ½|p − q|
    GRADS_IN_PASS2: tl.constexpr = (GRAD_S or GRAD_T) and (KIND == _FORWARD_KL or KIND == _SOFT_CE
                                                           or KIND == _REVERSE_KL)
    if GRADS_IN_PASS2 or KIND == _JSD or KIND == _TVD or KIND == _MSE:
        for start in range(0, V, BLOCK):
            offs = start + cols
            in_v = offs < V
            s = _load(s_row, offs, V)
            t = _load(t_row, offs, V)
            g_s = tl.zeros([BLOCK], tl.float32)
            if SOFTMAX:
                a_s = s * c
                a_t = t * c
                lq = a_s - l_s  # log2 q
                lp = a_t - l_t  # log2 p
                q = tl.exp2(lq)
                p = tl.exp2(lp)
                if KIND == _FORWARD_KL or KIND == _SOFT_CE:
                    # dD/du_s = q − p; dD/du_t = p ⊙ (log p − log q − D)  (soft_ce: p ⊙ (−log q − D))
                    g_s = k_soft * (q - p)
                    if KIND == _FORWARD_KL:
                        inner = _LN2 * (lp - lq) - d
                    else:
                        inner = -_LN2 * lq - d
                    g_t = k_soft * tl.where(a_t > float("-inf"), p * inner, 0.0)
                if KIND == _REVERSE_KL:
                    # dD/du_s = q ⊙ (log q − log p − D); dD/du_t = p − q
                    g_s = k_soft * tl.where(a_s > float("-inf"), q * (_LN2 * (lq - lp) - d), 0.0)
                    g_t = k_soft * (p - q)
                if KIND == _JSD:
                    # m = β p + (1−β) q with log2 m = logaddexp2(log2 p + log2 β, log2 q + log2(1−β));
                    # F = β ln(p/m), G = (1−β) ln(q/m). D = Σ p F + Σ q G, which are also the
                    # row sums the gradients need (pass 3).
                    x = lp + log2_beta
                    y = lq + log2_1m_beta
                    hi = tl.maximum(x, y)
                    ref = tl.where(hi == float("-inf"), 0.0, hi)
                    lm = hi + tl.log2(1.0 + tl.exp2(tl.minimum(x, y) - ref))
                    acc_p += tl.where(a_t > float("-inf"), p * (beta * _LN2 * (lp - lm)), 0.0)
                    acc_q += tl.where(a_s > float("-inf"), q * ((1.0 - beta) * _LN2 * (lq - lm)), 0.0)
                if KIND == _TVD:
                    # D = ½ Σ |p − q|; g = ½ sign(p − q) (0 where p = q, as autograd's abs)
                    diff = p - q
                    g = tl.where(diff > 0, 0.5, tl.where(diff < 0, -0.5, 0.0))
                    acc_d += 0.5 * tl.abs(diff)
                    acc_p += p * g
                    acc_q += q * g
            else:
                # mse on raw logits: columns where either logit is not finite contribute 0;
                # dD/ds = 2 (s − t) / V = −dD/dt (soft_coef carries 2 / V).
                diff = tl.where((tl.abs(s) < float("inf")) & (tl.abs(t) < float("inf")), s - t, 0.0)
                acc_p += diff * diff
                g_s = k_soft * diff
                g_t = -g_s
            if GRADS_IN_PASS2 or KIND == _MSE:
                if GRAD_S:
                    if HARD:
                        if OWN_T1:
                            q1 = tl.exp2(s * _LOG2E - l_1)
                        else:
                            q1 = q
                        g_s += k_hard * (q1 - tl.where(offs == label, 1.0, 0.0))
                    tl.store(gs_row + offs, g_s.to(gs_row.dtype.element_ty), mask=in_v)
                if GRAD_T:
                    tl.store(gt_row + offs, g_t.to(gt_row.dtype.element_ty), mask=in_v)

    sum_p = tl.sum(acc_p, axis=0)
    sum_q = tl.sum(acc_q, axis=0)
    if KIND == _JSD:
        d = sum_p + sum_q
    if KIND == _TVD:
        d = tl.sum(acc_d, axis=0)
    if KIND == _MSE:
        d = sum_p / V

    # ---- pass 3 (jsd, tvd): gradients from the row sums -----------------------------------------
    if (GRAD_S or GRAD_T) and (KIND == _JSD or KIND == _TVD):
        for start in range(0, V, BLOCK):
            offs = start + cols
            in_v = offs < V
            s = _load(s_row, offs, V)
            a_s = s * c
            a_t = _load(t_row, offs, V) * c
            lq = a_s - l_s
            lp = a_t - l_t
            q = tl.exp2(lq)
            p = tl.exp2(lp)
            if KIND == _JSD:
                # dD/du_s = q ⊙ (G − Σ q G); dD/du_t = p ⊙ (F − Σ p F)
                x = lp + log2_beta
                y = lq + log2_1m_beta
                hi = tl.maximum(x, y)
                ref = tl.where(hi == float("-inf"), 0.0, hi)
                lm = hi + tl.log2(1.0 + tl.exp2(tl.minimum(x, y) - ref))
                g_s = (1.0 - beta) * _LN2 * (lq - lm) - sum_q
                g_s = k_soft * tl.where(a_s > float("-inf"), q * g_s, 0.0)
                g_t = k_soft * tl.where(a_t > float("-inf"), p * (beta * _LN2 * (lp - lm) - sum_p), 0.0)
            else:
                # dD/du_s = q ⊙ (Σ q g − g); dD/du_t = p ⊙ (g − Σ p g)
                diff = p - q
                g = tl.where(diff > 0, 0.5, tl.where(diff < 0, -0.5, 0.0))
                g_s = k_soft * q * (sum_q - g)
                g_t = k_soft * p * (g - sum_p)
            if GRAD_S:
                if HARD:
                    if OWN_T1:
                        q1 = tl.exp2(s * _LOG2E - l_1)
                    else:
                        q1 = q
                    g_s += k_hard * (q1 - tl.where(offs == label, 1.0, 0.0))
                tl.store(gs_row + offs, g_s.to(gs_row.dtype.element_ty), mask=in_v)
            if GRAD_T:
                tl.store(gt_row + offs, g_t.to(gt_row.dtype.element_ty), mask=in_v)

    # row loss = row_weight · (kd_weight · [T²] · D + hard_weight · CE)
    tl.store(loss_ptr, row_w * (kd_scale * d + hard_weight * ce))


@triton.jit
def _kd_loss_rows_kernel(s_ptr, t_ptr, labels_ptr, weights_ptr, grad_scale_ptr, loss_ptr, gs_ptr, gt_ptr,
                         V, stride_s, stride_t, ignore_index,
                         c, kd_scale, soft_coef, hard_weight, beta, log2_beta, log2_1m_beta,
                         KIND: tl.constexpr, HARD: tl.constexpr, OWN_T1: tl.constexpr,
                         HAS_LABELS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                         GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: N · V may exceed 2³¹
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    gs_row = gs_ptr + row * V
    gt_row = gt_ptr + row * V
    row_w = 1.0
    if HAS_WEIGHTS:
        row_w = tl.load(weights_ptr + row).to(tl.float32)
    grad_w = tl.load(grad_scale_ptr) * row_w
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        if label != ignore_index:
            _kd_row(s_row, t_row, gs_row, gt_row, loss_ptr + row, V, label, row_w, grad_w,
                    c, kd_scale, soft_coef, hard_weight, beta, log2_beta, log2_1m_beta,
                    KIND, HARD, OWN_T1, GRAD_S, GRAD_T, BLOCK)
        else:
            _zero_row(loss_ptr + row, gs_row, gt_row, V, GRAD_S, GRAD_T, BLOCK)
    else:
        _kd_row(s_row, t_row, gs_row, gt_row, loss_ptr + row, V, -1, row_w, grad_w,
                c, kd_scale, soft_coef, hard_weight, beta, log2_beta, log2_1m_beta,
                KIND, HARD, OWN_T1, GRAD_S, GRAD_T, BLOCK)


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    """Any row stride is fine; a column stride other than 1 costs one contiguous copy."""
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def kd_loss_rows_triton(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                        row_weights: torch.Tensor | None, grad_scale: torch.Tensor, spec,
                        need_grad_student: bool, need_grad_teacher: bool):
    """Row losses and gradients of kd_loss in one fused forward (the ``rows`` primitive).

    Args:
        student, teacher: [N, V] float32 / bfloat16 / float16 (dtypes may differ), CUDA tensors
            (CPU tensors under TRITON_INTERPRET=1); any row stride.
        labels: [N] integer or None; rows equal to ``spec.ignore_index`` give loss 0 and zero
            gradients; other labels must lie in [0, V) when ``spec.hard_weight != 0``.
        row_weights: [N] float or None.
        grad_scale: 0-d tensor on the same device, d(reduced loss)/d(Σ row_loss).
        spec: KDLossSpec (``kind``, temperature, ``kd_scale``, hard_weight, ignore_index, jsd_beta).
        need_grad_student, need_grad_teacher: which gradients to write.

    Returns:
        (row_loss fp32 [N], grad_student [N, V] in student's dtype or None,
        grad_teacher [N, V] in teacher's dtype or None); gradients are those of
        Σ row_loss · grad_scale and are contiguous.
    """
    n, v = student.shape
    device = student.device
    row_loss = torch.empty(n, dtype=torch.float32, device=device)
    grad_s = torch.empty((n, v), dtype=student.dtype, device=device) if need_grad_student else None
    grad_t = torch.empty((n, v), dtype=teacher.dtype, device=device) if need_grad_teacher else None
    if n == 0 or v == 0:  # an empty vocabulary has D = 0 (and nothing to differentiate)
        return row_loss.zero_(), grad_s, grad_t
    student = _unit_column_stride(student)
    teacher = _unit_column_stride(teacher)
    kind = spec.kind
    temperature = float(spec.temperature)
    hard = labels is not None and spec.hard_weight != 0.0
    beta = float(spec.jsd_beta)
    if kind == "mse":
        c, soft_coef = 0.0, spec.kd_scale * 2.0 / v
    else:
        c, soft_coef = math.log2(math.e) / temperature, spec.kd_scale / temperature
    log2_beta, log2_1m_beta = (math.log2(beta), math.log2(1.0 - beta)) if kind == "jsd" else (0.0, 0.0)
    block, num_warps = launch_config(v)
    placeholder = row_loss  # pointer argument of an absent tensor; constexpr flags keep it unread
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _kd_loss_rows_kernel[(n,)](
            student, teacher,
            placeholder if labels is None else labels.contiguous(),
            placeholder if row_weights is None else row_weights.contiguous(),
            grad_scale.to(torch.float32), row_loss,
            placeholder if grad_s is None else grad_s,
            placeholder if grad_t is None else grad_t,
            v, student.stride(0), teacher.stride(0), int(spec.ignore_index),
            c, float(spec.kd_scale), soft_coef, float(spec.hard_weight), beta, log2_beta, log2_1m_beta,
            KIND=_KIND_IDS[kind], HARD=hard, OWN_T1=hard and (kind == "mse" or temperature != 1.0),
            HAS_LABELS=labels is not None, HAS_WEIGHTS=row_weights is not None,
            GRAD_S=grad_s is not None, GRAD_T=grad_t is not None, BLOCK=block, num_warps=num_warps,
        )
    return row_loss, grad_s, grad_t
