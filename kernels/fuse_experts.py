"""Triton primitives of ``fuse_experts`` / ``fused_experts_kd_loss`` (backend ``"triton"``; contract
in :mod:`kdengine.ops.fuse_experts`, math in :mod:`kdengine.reference.fuse_experts`).

One program per row. The K experts of a row are read together as a [K_PAD, BLOCK] tile (K_PAD =
next power of two >= K; padded experts read −inf and get α = 0), so K is a compile-time constant
and the loop runs over V only. fp32 math, softmaxes in base 2: with x_k = z_k · log2(e) / T,

    L_k = log2 Σ_c exp2(x_k,c)          log2 p_k = x_k − L_k         (likewise x_s, L_s, the student)

Passes over the row (constexpr flags compile the unused ones away):

1. statistics: per expert an online max m, sum d = Σ exp2(x − m) and w = Σ exp2(x − m)·(x − m), all
   rescaled when m grows; the student's (and, for a hard-label CE at T != 1, its T=1) online sum.
   With e_c = exp2(x_c − m), p_c = e_c / d and log2 p_c = (x_c − m) − log2 d, so the entropy in nats is

       H = −Σ p ln p = ln2 · (log2 d − Σ e (x − m) / d) = ln2 · (log2 d − w / d).

   Keeping w relative to the running max avoids the cancellation of lse − Σ p u for confident
   rows. When the max grows from m to m', the sums seen so far become d' = f·d and
   w' = f·(w + (m − m')·d) with f = exp2(m − m'). α then follows from H (``entropy``), from
   max_c p_c = exp2(m − L) = 1 / d (``confidence``), is 1/K (``uniform``) or is read (``weights``).
1b. logit space only: the online log-sum-exp L̄ of x̄ = Σ_k α_k x_k (= z̄ · log2(e) / T), so
   log2 p̄ = x̄ − L̄. (prob space needs no pass: log2 p̄ = log2 Σ_k α_k exp2(x_k − L_k) per column.)
2. the divergence D and its row sums; for forward_kl / soft_ce / mse also the student gradient.
3. when needed: the remaining gradients, from the row sums of pass 2.

Gradients, with a = ln p̄ and b = ln q the fused-teacher and student log-probabilities, r = ∂D/∂a and
σ = ∂D/∂b taken elementwise (terms proportional to p̄ in r, or to q in σ, cancel below and are
dropped):

    student          dD/ds   = (σ − q Σσ) / T                  (mse: 2 (s − T a) / V, raw logits)
    experts, logit   dD/dz_k = α_k (r − p̄ Σr) / T
    experts, prob    dD/dz_k = α_k (r ρ_k − p_k Σ_j r_j ρ_k,j) / T,   ρ_k = p_k / p̄ = exp2(log2 p_k − log2 p̄)

(ρ_k <= 1/α_k, so the prob-space form never divides by a vanishing p̄.) Everything written is the
gradient of Σ_rows row_loss · grad_scale; grad_scale is read from a 0-d device tensor (no host sync).

The last forward pass over experts and student (1b when D is online, else 2) counts their NaN /
+inf logits (every expert, α_k = 0 included); a row with any gets a NaN loss and NaN gradients
(``divergence.poison``, kept in the statistics), and ``fuse_experts`` NaN log-probs.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from kdengine.kernels.divergence import (
    FORWARD_KL,
    KIND_IDS,
    LN2,
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
    tvd_centered,
    tvd_chunk_sums,
    tvd_distance,
    tvd_sign,
    tvd_student_grad,
    tvd_teacher_grad,
)

_UNIFORM = tl.constexpr(0)
_ENTROPY = tl.constexpr(1)
_CONFIDENCE = tl.constexpr(2)
_GIVEN = tl.constexpr(3)
_WEIGHTING_IDS = {"uniform": 0, "entropy": 1, "confidence": 2}

_LOGIT = tl.constexpr(0)
_PROB = tl.constexpr(1)
_SPACE_IDS = {"logit": 0, "prob": 1}


# Elements of one [K_PAD, BLOCK] expert tile. Pass 2 of prob space keeps about six such tiles live,
# so 4096 elements over 8 warps is 16 per thread and tile.
_TILE = 4096
_ELEMENTS_PER_THREAD = 16


def launch_config(k: int, vocab: int) -> tuple[int, int, int]:
    """(K_PAD, BLOCK, num_warps) for K experts over rows of ``vocab`` columns."""
    k_pad = triton.next_power_of_2(max(k, 1))
    block = min(max(64, _TILE // k_pad), triton.next_power_of_2(max(vocab, 1)))
    num_warps = max(1, min(16, k_pad * block // (32 * _ELEMENTS_PER_THREAD)))
    return k_pad, block, num_warps


@triton.jit
def _load_experts(e_row, stride_k, k_offs, offs, K, V, c):
    # [K_PAD, BLOCK] tile of x = z · c; padded experts and out-of-row lanes read −inf.
    ptrs = e_row + k_offs[:, None].to(tl.int64) * stride_k + offs[None, :]
    mask = (k_offs[:, None] < K) & (offs[None, :] < V)
    return tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32) * c


@triton.jit
def _expert_stats_step(m, ref, d, w, x):
    # One [K_PAD, BLOCK] chunk of the per-expert online statistics (m, ref, d, w) of pass 1.
    m_new = tl.maximum(m, tl.max(x, axis=1))
    ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    f = tl.exp2(m - ref_new)
    e = tl.exp2(x - ref_new[:, None])
    shifted = e * tl.where(x > float("-inf"), x - ref_new[:, None], 0.0)
    # w' = f · (w + (m − m') d) + Σ e (x − m'): the old terms re-expressed against the new max.
    w = f * (w + (ref - ref_new) * d) + tl.sum(shifted, axis=1)
    d = f * d + tl.sum(e, axis=1)
    return m_new, ref_new, d, w


@triton.jit
def _expert_stats_finish(ref, d, w, k_offs, K):
    # (L_k as (reference max, log2 d), H_k in nats, d_k) per expert; padded experts give zeros.
    # log2 p_k = (x − ref) − log2 d (see finish_lse_split).
    real = k_offs < K
    safe_d = tl.where(real, d, 1.0)
    lse = (tl.where(real, ref, 0.0), tl.where(real, tl.log2(safe_d), 0.0))
    entropy = tl.where(real, (tl.log2(safe_d) - w / safe_d) * LN2, 0.0)
    return lse, entropy, d


@triton.jit
def _expert_stats(e_row, stride_k, k_offs, K, V, c, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    # Pass 1 over the experts: (L_k, H_k, d_k) per expert (_expert_stats_finish) and the number of
    # NaN / +inf logits in the row's experts.
    cols = tl.arange(0, BLOCK)
    m = tl.full([K_PAD], float("-inf"), tl.float32)
    ref = tl.zeros([K_PAD], tl.float32)
    d = tl.zeros([K_PAD], tl.float32)
    w = tl.zeros([K_PAD], tl.float32)
    bad = tl.zeros([K_PAD, BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        x = _load_experts(e_row, stride_k, k_offs, start + cols, K, V, c)
        bad += nonfinite(x)
        m, ref, d, w = _expert_stats_step(m, ref, d, w, x)
    lse, entropy, d = _expert_stats_finish(ref, d, w, k_offs, K)
    return lse, entropy, d, tl.sum(tl.sum(bad, axis=1), axis=0)


@triton.jit
def _mixture(entropy, d, k_offs, K, sharpness, w_row, WEIGHTING: tl.constexpr):
    # α [K_PAD] of one row, 0 on padded experts.
    real = k_offs < K
    if WEIGHTING == _UNIFORM:
        raw = tl.where(real, 1.0, 0.0)
    elif WEIGHTING == _ENTROPY:
        # softmax_k(−H_k / sharpness)
        neg = tl.where(real, -entropy / sharpness, float("-inf"))
        raw = tl.exp(neg - tl.max(neg, axis=0))
    elif WEIGHTING == _CONFIDENCE:
        # max_c p_k,c = 1 / d_k (d counts the max itself as exp2(0) = 1, so d >= 1)
        raw = tl.where(real, 1.0 / tl.where(real, d, 1.0), 0.0)
    else:
        # already normalised by the caller (NaN rows stay NaN)
        raw = tl.load(w_row + k_offs, mask=real, other=0.0).to(tl.float32)
    return raw / tl.sum(raw, axis=0)


@triton.jit
def _fused_x(x, alpha):
    # x̄ = Σ_k α_k x_k; experts with α_k = 0 are skipped (0 · −inf would be NaN).
    return tl.sum(tl.where(alpha[:, None] > 0, alpha[:, None] * x, 0.0), axis=0)


@triton.jit
def _fused_lse(e_row, stride_k, k_offs, alpha, K, V, c, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    # Pass 1b (logit space): L̄ = log2 Σ exp2(x̄).
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    d = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        xbar = _fused_x(_load_experts(e_row, stride_k, k_offs, start + cols, K, V, c), alpha)
        m, f, e = online_step(m, xbar)
        d = d * f + e
    return finish_lse_split(m, d)


@triton.jit
def _fused_log2p(x, lse, alpha, lse_fused, SPACE: tl.constexpr):
    # lse: the experts' (ref [K_PAD], log2 d [K_PAD]); lse_fused: L̄ as (ref, log2 d) (logit space).
    # (log2 p̄ [BLOCK], log2 p_k [K_PAD, BLOCK]) of one chunk. The second is only meaningful (and
    # only used) in prob space.
    if SPACE == _LOGIT:
        a2 = (_fused_x(x, alpha) - lse_fused[0]) - lse_fused[1]
        lp = x
    else:
        lp = (x - lse[0][:, None]) - lse[1][:, None]
        # log2 Σ_k α_k p_k = max + log2 Σ_k exp2(log2 α_k + log2 p_k − max)
        log2_alpha = tl.log2(tl.where(alpha > 0, alpha, 1.0))
        t = tl.where(alpha[:, None] > 0, lp + log2_alpha[:, None], float("-inf"))
        hi = tl.max(t, axis=0)
        ref = tl.where(hi == float("-inf"), 0.0, hi)
        a2 = tl.where(hi == float("-inf"), float("-inf"),
                      ref + tl.log2(tl.sum(tl.exp2(t - ref[None, :]), axis=0)))
    return a2, lp


@triton.jit
def _chunk_terms(e_row, stride_k, s_row, k_offs, offs, K, V, c, lse, alpha, lse_f, lse_s, temperature, beta,
                 log2_beta, log2_1m_beta, SPACE: tl.constexpr, KIND: tl.constexpr):
    # One chunk of a pass over experts and student: (s, log2 p̄, log2 p_k, log2 q, D term, r, σ, the
    # chunk's count of NaN / +inf logits per column).
    x = _load_experts(e_row, stride_k, k_offs, offs, K, V, c)
    s = load_row(s_row, offs, V)
    a2, lp = _fused_log2p(x, lse, alpha, lse_f, SPACE)
    b2 = (s * c - lse_s[0]) - lse_s[1]
    term, r, sigma = _terms(a2, b2, s, temperature, beta, log2_beta, log2_1m_beta, KIND)
    return s, a2, lp, b2, term, r, sigma, tl.sum(nonfinite(x), axis=0) + nonfinite(s)


@triton.jit
def _terms(a2, b2, s, temperature, beta, log2_beta, log2_1m_beta, KIND: tl.constexpr):
    # The shared divergence core against the fused teacher: (D term, r = ∂D/∂a, σ = ∂D/∂b),
    # a = ln p̄, b = ln q. mse compares the student with the teacher logits T·a (its r is
    # T · ∂(D·V)/∂(T a)); all three without mse's 1/V.
    term, r, sigma = divergence_terms(a2, b2, s, temperature * a2 * LN2, beta, log2_beta, log2_1m_beta, KIND)
    if KIND == MSE:
        r = r * temperature
    return term, r, sigma


# Row statistics of the fused loss ([N, _stats_width(K_PAD)] fp32), written by the forward kernel
# and read by the backward kernel: the student's L_s (reference max, log2 Σ) at T and its log2-sum
# at T=1, the fused L̄ (logit space), Σr, Σσ, the tvd sums, then per expert (K_PAD slots each) L_k
# (reference, log2 d), c_k = Σ_j r_j ρ_k,j and p_k's sums split by the sign of p̄ − q (tvd).
_S_M_S = tl.constexpr(0)
_S_LS_S = tl.constexpr(1)
_S_L_1 = tl.constexpr(2)
_S_M_F = tl.constexpr(3)
_S_LS_F = tl.constexpr(4)
_S_SUM_R = tl.constexpr(5)
_S_SUM_SIG = tl.constexpr(6)
_S_TVD = tl.constexpr(7)  # TVD_SUMS slots
_S_POISON = tl.constexpr(15)  # NaN when the row has a NaN / +inf logit, else 0 (divergence.poison)
_S_EXPERTS = tl.constexpr(16)
_EXPERT_BLOCKS = tl.constexpr(6)  # L_k ref, L_k log2 d, c_k, W₊, W₋, W₀ of p_k


def _stats_width(k_pad: int) -> int:
    return _S_EXPERTS.value + _EXPERT_BLOCKS.value * k_pad


@triton.jit
def _fused_experts_kd_fwd_kernel(
    s_ptr, stride_s,                     # [N, V] student logits (unit column stride)
    e_ptr, stride_ek, stride_en,         # [K, N, V] expert logits (unit column stride)
    labels_ptr, row_w_ptr,               # [N] or unused
    weights_ptr, stride_w,               # normalised fp32 weights [K] (stride_w = 0) or [N, K]
    loss_ptr, alpha_ptr, ent_ptr,        # [N], [N, K], [N, K] fp32
    stats_ptr,                           # [N, _stats_width(K_PAD)] fp32 (zero-filled by the host)
    V, K, ignore_index,
    c, c1, sharpness, temperature, kd_scale, hard_weight, beta, log2_beta, log2_1m_beta,
    WEIGHTING: tl.constexpr, SPACE: tl.constexpr, KIND: tl.constexpr, HARD: tl.constexpr,
    OWN_T1: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_ROW_W: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: K · N · V may exceed 2³¹
    s_row = s_ptr + row * stride_s
    e_row = e_ptr + row * stride_en
    stats_row = stats_ptr + row * (_S_EXPERTS + _EXPERT_BLOCKS * K_PAD)
    cols = tl.arange(0, BLOCK)
    k_offs = tl.arange(0, K_PAD)
    k_real = k_offs < K
    SOFTMAX: tl.constexpr = KIND != MSE
    # Logit space knows α before reading the row (uniform / given weights): the expert statistics
    # (entropies to return) ride along the fused pass instead of a pass of their own.
    MERGED: tl.constexpr = SPACE == _LOGIT and (WEIGHTING == _UNIFORM or WEIGHTING == _GIVEN)
    # forward_kl / soft_ce / reverse_kl in logit space: D accumulates online in the fused pass, with
    # the student's log-sum-exp (no pass 2).
    ONLINE: tl.constexpr = SPACE == _LOGIT and (KIND == FORWARD_KL or KIND == SOFT_CE or KIND == REVERSE_KL)

    label = -1
    valid = row >= 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
    row_w = 1.0
    if HAS_ROW_W:
        row_w = tl.load(row_w_ptr + row).to(tl.float32)
    w_row = weights_ptr + row * stride_w

    # ---- pass 1: expert statistics and α (unless MERGED), the student's sums (unless ONLINE) -----
    zeros_k = tl.zeros([K_PAD], tl.float32)
    lse = (zeros_k, zeros_k)
    entropy = zeros_k
    if MERGED:
        alpha = _mixture(zeros_k, zeros_k, k_offs, K, sharpness, w_row, WEIGHTING)
    else:
        lse, entropy, d_k, _ = _expert_stats(e_row, stride_ek, k_offs, K, V, c, K_PAD, BLOCK)
        alpha = _mixture(entropy, d_k, k_offs, K, sharpness, w_row, WEIGHTING)
    bad = tl.zeros([BLOCK], tl.float32)  # NaN / +inf logits, counted in the last pass over every input
    m_s = float("-inf")
    z_s = tl.zeros([BLOCK], tl.float32)
    m_1 = float("-inf")
    z_1 = tl.zeros([BLOCK], tl.float32)
    if (SOFTMAX or OWN_T1) and not ONLINE:
        for start in range(0, V, BLOCK):
            s = load_row(s_row, start + cols, V)
            if SOFTMAX:
                m_s, f, e = online_step(m_s, s * c)
                z_s = z_s * f + e
            if OWN_T1:
                m_1, f1, e1 = online_step(m_1, s * c1)
                z_1 = z_1 * f1 + e1

    # ---- pass 1b (logit space): L̄ of x̄ = Σ α_k x_k; MERGED: the expert statistics; ONLINE: D --------
    lse_f = (0.0, 0.0)
    dvg = 0.0
    sum_r = 0.0
    sum_sig = 0.0
    if SPACE == _LOGIT:
        m_f = float("-inf")
        z_f = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        mk = tl.full([K_PAD], float("-inf"), tl.float32)
        refk = zeros_k
        dk = zeros_k
        wk = zeros_k
        for start in range(0, V, BLOCK):
            x = _load_experts(e_row, stride_ek, k_offs, start + cols, K, V, c)
            if MERGED:
                mk, refk, dk, wk = _expert_stats_step(mk, refk, dk, wk, x)
            xbar = _fused_x(x, alpha)
            m_f, f_f, e_f = online_step(m_f, xbar)
            z_f = z_f * f_f + e_f
            if ONLINE:
                # the student's log-sum-exp and D against p̄ = softmax2(x̄), online (as kd_loss's pass 1)
                s = load_row(s_row, start + cols, V)
                bad += tl.sum(nonfinite(x), axis=0) + nonfinite(s)
                xs = s * c
                m_s, f_s, e_s = online_step(m_s, xs)
                z_s = z_s * f_s + e_s
                acc = online_kl_step(acc, xbar, f_f, e_f, xs, f_s, e_s, KIND)
                if OWN_T1:
                    m_1, f1, e1 = online_step(m_1, s * c1)
                    z_1 = z_1 * f1 + e1
        lse_f = finish_lse_split(m_f, z_f)
        if MERGED:
            lse, entropy, d_k = _expert_stats_finish(refk, dk, wk, k_offs, K)
    lse_s = (0.0, 0.0)  # (reference max, log2 Σ): log2 q = (s c − ref) − log2 Σ
    if SOFTMAX:
        lse_s = finish_lse_split(m_s, z_s)
    if ONLINE:
        dvg, sum_r, sum_sig = online_kl_finish(acc, z_f, z_s, lse_f, lse_s, KIND)
    tl.store(alpha_ptr + row * K + k_offs, alpha, mask=k_real)
    tl.store(ent_ptr + row * K + k_offs, entropy, mask=k_real)

    # Hard-label CE at T=1: ln Σ exp(s) − s[label]. A label outside [0, V) (and not ignore_index)
    # makes it NaN: no finite loss for a row whose target does not exist.
    ce = 0.0
    lse_1 = lse_s[0] + lse_s[1]
    if HARD:
        if OWN_T1:
            lse_1 = finish_lse(m_1, z_1)
        in_row = valid & (label >= 0) & (label < V)
        ce = tl.where(in_row, lse_1 * LN2 - tl.load(s_row + label, mask=in_row, other=0.0).to(tl.float32),
                      float("nan"))

    # ---- pass 2 (unless ONLINE): D and the row sums of the gradients ---------------------------------
    CK: tl.constexpr = SPACE == _PROB
    tvd = tl.zeros([TVD_SUMS], tl.float32)
    c_k = zeros_k
    k_plus = zeros_k
    k_minus = zeros_k
    k_zero = zeros_k
    if not ONLINE:
        acc_d = tl.zeros([BLOCK], tl.float32)
        acc_r = tl.zeros([BLOCK], tl.float32)
        acc_sig = tl.zeros([BLOCK], tl.float32)
        acc_c = tl.zeros([K_PAD, BLOCK], tl.float32)
        acc_kp = tl.zeros([K_PAD, BLOCK], tl.float32)
        acc_km = tl.zeros([K_PAD, BLOCK], tl.float32)
        acc_kz = tl.zeros([K_PAD, BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            s, a2, lp, b2, term, r, sigma, n_bad = _chunk_terms(e_row, stride_ek, s_row, k_offs, offs, K, V, c, lse,
                                                                alpha, lse_f, lse_s, temperature, beta, log2_beta,
                                                                log2_1m_beta, SPACE, KIND)
            bad += n_bad
            acc_d += term
            acc_r += r
            acc_sig += sigma
            if KIND == TVD:
                tvd += tvd_chunk_sums(a2, b2)
            if CK:
                live = (alpha[:, None] > 0) & (a2[None, :] > float("-inf"))
                if KIND == TVD:  # p_k split by the sign of p̄ − q
                    g = tvd_sign(a2, b2)[None, :]
                    p_k = tl.where(live, tl.exp2(lp), 0.0)
                    acc_kp += tl.where(g > 0, p_k, 0.0)
                    acc_km += tl.where(g < 0, p_k, 0.0)
                    acc_kz += tl.where(g == 0, p_k, 0.0)
                else:  # c_k = Σ_j r_j ρ_k,j
                    acc_c += r[None, :] * tl.where(live, tl.exp2(lp - a2[None, :]), 0.0)
        dvg = tl.sum(acc_d, axis=0)
        sum_r = tl.sum(acc_r, axis=0)
        sum_sig = tl.sum(acc_sig, axis=0)
        c_k = tl.sum(acc_c, axis=1)
        k_plus = tl.sum(acc_kp, axis=1)
        k_minus = tl.sum(acc_km, axis=1)
        k_zero = tl.sum(acc_kz, axis=1)
        if KIND == MSE:
            dvg = dvg / V
        if KIND == TVD:
            dvg = tvd_distance(tvd)

    tl.store(stats_row + _S_M_S, lse_s[0])
    tl.store(stats_row + _S_LS_S, lse_s[1])
    tl.store(stats_row + _S_L_1, lse_1)
    tl.store(stats_row + _S_M_F, lse_f[0])
    tl.store(stats_row + _S_LS_F, lse_f[1])
    tl.store(stats_row + _S_SUM_R, sum_r)
    tl.store(stats_row + _S_SUM_SIG, sum_sig)
    tl.store(stats_row + _S_TVD + tl.arange(0, TVD_SUMS), tvd)
    nan_row = poison(tl.sum(bad, axis=0))
    tl.store(stats_row + _S_POISON, nan_row)
    expert_stats = stats_row + _S_EXPERTS + k_offs
    tl.store(expert_stats, lse[0])
    tl.store(expert_stats + K_PAD, lse[1])
    tl.store(expert_stats + 2 * K_PAD, c_k)
    tl.store(expert_stats + 3 * K_PAD, k_plus)
    tl.store(expert_stats + 4 * K_PAD, k_minus)
    tl.store(expert_stats + 5 * K_PAD, k_zero)
    # row loss = row_weight · (kd_weight · [T²] · D + hard_weight · CE), 0 on ignored rows
    tl.store(loss_ptr + row, tl.where(valid, row_w * (kd_scale * dvg + hard_weight * ce) + nan_row, 0.0))


@triton.jit
def _fused_experts_kd_bwd_kernel(
    s_ptr, stride_s, e_ptr, stride_ek, stride_en,
    labels_ptr, row_w_ptr,
    scale_ptr, stride_scale,             # dL/d(row loss): 0-d (stride 0) or [N]
    alpha_ptr, stats_ptr,                # the forward's α [N, K] and statistics
    gs_ptr, ge_ptr,                      # contiguous [N, V] / [K, N, V] gradients or unused
    N, V, K, ignore_index,
    c, c1, temperature, coef_s, coef_e, hard_weight, beta, log2_beta, log2_1m_beta,
    SPACE: tl.constexpr, KIND: tl.constexpr, HARD: tl.constexpr, OWN_T1: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_ROW_W: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_E: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # One pass: every gradient asked for, multiplied by dL/d(row loss) · row_weight (fp32, one rounding).
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    e_row = e_ptr + row * stride_en
    stats_row = stats_ptr + row * (_S_EXPERTS + _EXPERT_BLOCKS * K_PAD)
    cols = tl.arange(0, BLOCK)
    k_offs = tl.arange(0, K_PAD)
    k_real = k_offs < K

    label = -1
    valid = row >= 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
    w = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    if HAS_ROW_W:
        w = w * tl.load(row_w_ptr + row).to(tl.float32)
    nan_row = tl.load(stats_row + _S_POISON)  # a NaN / +inf logit: NaN gradients, like the NaN loss
    nan_student = nan_row
    if HARD:
        nan_student += tl.where(valid & ((label < 0) | (label >= V)), float("nan"), 0.0)
    alpha = tl.load(alpha_ptr + row * K + k_offs, mask=k_real, other=0.0)
    lse_s = (tl.load(stats_row + _S_M_S), tl.load(stats_row + _S_LS_S))
    lse_1 = tl.load(stats_row + _S_L_1)
    lse_f = (tl.load(stats_row + _S_M_F), tl.load(stats_row + _S_LS_F))
    sum_r = tl.load(stats_row + _S_SUM_R)
    sum_sig = tl.load(stats_row + _S_SUM_SIG)
    tvd = tl.load(stats_row + _S_TVD + tl.arange(0, TVD_SUMS))
    expert_stats = stats_row + _S_EXPERTS + k_offs
    lse = (tl.load(expert_stats), tl.load(expert_stats + K_PAD))
    c_k = tl.load(expert_stats + 2 * K_PAD)
    k_plus = tl.load(expert_stats + 3 * K_PAD)
    k_minus = tl.load(expert_stats + 4 * K_PAD)
    k_zero = tl.load(expert_stats + 5 * K_PAD)

    gs_row = gs_ptr + row * V
    ge_row = ge_ptr + row * V
    for start in range(0, V, BLOCK):
        offs = start + cols
        s, a2, lp, b2, term, r, sigma, _ = _chunk_terms(e_row, stride_ek, s_row, k_offs, offs, K, V, c, lse, alpha,
                                                        lse_f, lse_s, temperature, beta, log2_beta, log2_1m_beta,
                                                        SPACE, KIND)
        if GRAD_S:
            # dD/du_s = σ − q Σσ (kdengine.kernels.divergence); mse: σ on raw logits
            if KIND == MSE:
                g_s = coef_s * sigma
            elif KIND == TVD:
                g_s = coef_s * tvd_student_grad(a2, b2, tvd)
            else:
                g_s = coef_s * (sigma - tl.exp2(b2) * sum_sig)
            g_s += nan_student
            if HARD:
                g_s += hard_weight * (tl.exp2(s * c1 - lse_1) - tl.where(offs == label, 1.0, 0.0))
            tl.store(gs_row + offs, tl.where(valid, w * g_s, 0.0).to(gs_row.dtype.element_ty), mask=offs < V)
        if GRAD_E:
            if SPACE == _LOGIT:
                if KIND == TVD:  # r − p̄ Σr = p̄ (g − Σ p̄ g)
                    g_bar = tvd_teacher_grad(a2, b2, tvd)
                else:
                    g_bar = r - tl.exp2(a2) * sum_r
                g_e = alpha[:, None] * g_bar[None, :]
            else:
                live = (alpha[:, None] > 0) & (a2[None, :] > float("-inf"))
                p_k = tl.where(live, tl.exp2(lp), 0.0)
                if KIND == TVD:  # r ρ_k − p_k c_k = p_k (g − Σ p_k g)
                    g_e = alpha[:, None] * p_k * tvd_centered(tvd_sign(a2, b2)[None, :], k_plus[:, None],
                                                              k_minus[:, None], k_zero[:, None])
                else:
                    rho = tl.where(live, tl.exp2(lp - a2[None, :]), 0.0)
                    g_e = alpha[:, None] * (r[None, :] * rho - p_k * c_k[:, None])
            ptrs = ge_row + k_offs[:, None].to(tl.int64) * N * V + offs[None, :]
            tl.store(ptrs, tl.where(valid, w * coef_e * g_e + nan_row, 0.0).to(ge_ptr.dtype.element_ty),
                     mask=k_real[:, None] & (offs[None, :] < V))


@triton.jit
def _fuse_experts_kernel(
    e_ptr, stride_ek, stride_en, weights_ptr, stride_w,
    out_ptr, alpha_ptr, ent_ptr,         # [N, V], [N, K], [N, K] fp32, contiguous
    V, K, c, sharpness,
    WEIGHTING: tl.constexpr, SPACE: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    e_row = e_ptr + row * stride_en
    cols = tl.arange(0, BLOCK)
    k_offs = tl.arange(0, K_PAD)
    lse, entropy, d, n_bad = _expert_stats(e_row, stride_ek, k_offs, K, V, c, K_PAD, BLOCK)
    alpha = _mixture(entropy, d, k_offs, K, sharpness, weights_ptr + row * stride_w, WEIGHTING)
    nan_row = poison(n_bad)  # a NaN / +inf logit in any expert: the row's log-probs are NaN
    tl.store(alpha_ptr + row * K + k_offs, alpha, mask=k_offs < K)
    tl.store(ent_ptr + row * K + k_offs, entropy, mask=k_offs < K)
    lse_f = (0.0, 0.0)
    if SPACE == _LOGIT:
        lse_f = _fused_lse(e_row, stride_ek, k_offs, alpha, K, V, c, K_PAD, BLOCK)
    out_row = out_ptr + row * V
    for start in range(0, V, BLOCK):
        offs = start + cols
        a2, _ = _fused_log2p(_load_experts(e_row, stride_ek, k_offs, offs, K, V, c), lse, alpha, lse_f, SPACE)
        tl.store(out_row + offs, a2 * LN2 + nan_row, mask=offs < V)


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    """Any row (and expert) stride is fine; a column stride other than 1 costs one contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _weights_args(weights, placeholder, weighting):
    """(pointer, row stride, WEIGHTING id) for normalised fp32 weights [K] / [N, K] or None."""
    if weights is None:
        return placeholder, 0, _WEIGHTING_IDS[weighting]
    weights = weights.to(torch.float32).contiguous()
    return weights, (weights.shape[1] if weights.dim() == 2 else 0), 3


def _device_guard(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _loss_constants(spec) -> dict:
    """Scalar arguments shared by the fused loss kernels."""
    kind = spec.kind
    temperature = float(spec.temperature)
    beta = float(spec.jsd_beta)
    log2_beta, log2_1m_beta = (math.log2(beta), math.log2(1.0 - beta)) if kind == "jsd" else (0.0, 0.0)
    return dict(c=math.log2(math.e) / temperature, c1=math.log2(math.e), temperature=temperature,
                hard_weight=float(spec.hard_weight), beta=beta, log2_beta=log2_beta, log2_1m_beta=log2_1m_beta,
                ignore_index=int(spec.ignore_index))


def _loss_flags(spec, labels, row_weights) -> dict:
    hard = labels is not None and spec.hard_weight != 0.0
    return dict(KIND=KIND_IDS[spec.kind], HARD=hard,
                OWN_T1=hard and (spec.kind == "mse" or float(spec.temperature) != 1.0),
                HAS_LABELS=labels is not None, HAS_ROW_W=row_weights is not None)


def fused_experts_kd_forward_triton(student, experts, labels, row_weights, spec, weighting, space, sharpness,
                                    weights):
    """Forward of fused_experts_kd_loss: row losses, α, entropies and the row statistics only.

    Args:
        student: [N, V] float32/bfloat16/float16; experts: [K, N, V] (K <= 16), same or another of
            those dtypes; CUDA tensors (CPU under TRITON_INTERPRET=1); any row / expert stride.
        labels: [N] integer or None (rows equal to ``spec.ignore_index`` give loss 0; with
            ``spec.hard_weight != 0`` a label outside [0, V) gives a NaN row loss).
        row_weights: [N] float or None. spec: KDLossSpec. weighting / space / sharpness: as
            ``fuse_experts``. weights: normalised fp32 [K] or [N, K], or None.

    Returns:
        (row_loss fp32 [N], alpha fp32 [N, K], entropy fp32 [N, K], stats fp32 [N, S]); stats is what
        :func:`fused_experts_kd_backward_triton` reads. Traffic: logit space, forward/reverse KL and
        soft CE: the experts are read twice (once with uniform or given weights) and the student
        once; other divergences and prob space read each input once more.
    """
    k, n, v = experts.shape
    device = student.device
    k_pad, block, num_warps = launch_config(k, v)
    row_loss = torch.zeros(n, dtype=torch.float32, device=device)
    alpha = torch.empty((n, k), dtype=torch.float32, device=device)
    entropy = torch.empty((n, k), dtype=torch.float32, device=device)
    stats = torch.zeros((n, _stats_width(k_pad)), dtype=torch.float32, device=device)
    if n == 0:
        return row_loss, alpha, entropy, stats
    student = _unit_column_stride(student)
    experts = _unit_column_stride(experts)
    placeholder = row_loss  # pointer argument of an absent tensor; constexpr flags keep it unread
    w_arg, stride_w, weighting_id = _weights_args(weights, placeholder, weighting)
    with _device_guard(device):
        _fused_experts_kd_fwd_kernel[(n,)](
            student, student.stride(0), experts, experts.stride(0), experts.stride(1),
            placeholder if labels is None else labels.contiguous(),
            placeholder if row_weights is None else row_weights.contiguous(),
            w_arg, stride_w, row_loss, alpha, entropy, stats, v, k,
            sharpness=float(sharpness), kd_scale=float(spec.kd_scale), **_loss_constants(spec),
            WEIGHTING=weighting_id, SPACE=_SPACE_IDS[space], **_loss_flags(spec, labels, row_weights),
            K_PAD=k_pad, BLOCK=block, num_warps=num_warps,
        )
    return row_loss, alpha, entropy, stats


def fused_experts_kd_backward_triton(student, experts, labels, row_weights, alpha, stats, scale, spec, space,
                                     need_grad_student, need_grad_experts):
    """Backward of fused_experts_kd_loss: the gradients of Σ_rows scale · row_loss (α constant),
    recomputed in one pass over the inputs from the forward's α and statistics.

    Args:
        student, experts, labels, row_weights, spec, space: as given to the forward.
        alpha, stats: the forward's outputs. scale: fp32 on the device, 0-d or [N]: dL/d(row_loss).
        need_grad_student, need_grad_experts: which gradients to write.

    Returns:
        (grad_student [N, V] in the student's dtype or None, grad_experts [K, N, V] in the experts'
        dtype or None), contiguous; computed in fp32 with ``scale`` in and rounded once.
    """
    k, n, v = experts.shape
    device = student.device
    grad_s = torch.empty((n, v), dtype=student.dtype, device=device) if need_grad_student else None
    grad_e = torch.empty((k, n, v), dtype=experts.dtype, device=device) if need_grad_experts else None
    if n == 0 or not (need_grad_student or need_grad_experts):
        return grad_s, grad_e
    student = _unit_column_stride(student)
    experts = _unit_column_stride(experts)
    scale = scale.to(torch.float32).contiguous()
    kd_scale, temperature = float(spec.kd_scale), float(spec.temperature)
    # coef_s: from the per-column σ to dL/ds; coef_e: from dD/d(log p̄) terms to dL/dz_k.
    if spec.kind == "mse":
        coef_s, coef_e = kd_scale / v, kd_scale / (temperature * v)
    else:
        coef_s = coef_e = kd_scale / temperature
    k_pad, block, num_warps = launch_config(k, v)
    placeholder = stats
    with _device_guard(device):
        _fused_experts_kd_bwd_kernel[(n,)](
            student, student.stride(0), experts, experts.stride(0), experts.stride(1),
            placeholder if labels is None else labels.contiguous(),
            placeholder if row_weights is None else row_weights.contiguous(),
            scale, 1 if scale.dim() == 1 else 0, alpha, stats,
            placeholder if grad_s is None else grad_s, placeholder if grad_e is None else grad_e,
            n, v, k, coef_s=coef_s, coef_e=coef_e,
            **_loss_constants(spec),
            SPACE=_SPACE_IDS[space], **_loss_flags(spec, labels, row_weights),
            GRAD_S=grad_s is not None, GRAD_E=grad_e is not None, K_PAD=k_pad, BLOCK=block, num_warps=num_warps,
        )
    return grad_s, grad_e


def fuse_experts_triton(experts, temperature, weighting, space, sharpness, weights):
    """(fused log-probs fp32 [N, V], alpha fp32 [N, K], entropy fp32 [N, K]) of [K, N, V] experts
    (fp32/bf16/fp16, K <= 16, CUDA or CPU under TRITON_INTERPRET=1); ``weights`` as in
    :func:`fused_experts_kd_rows_triton`."""
    k, n, v = experts.shape
    device = experts.device
    out = torch.empty((n, v), dtype=torch.float32, device=device)
    alpha = torch.empty((n, k), dtype=torch.float32, device=device)
    entropy = torch.empty((n, k), dtype=torch.float32, device=device)
    if n == 0:
        return out, alpha, entropy
    experts = _unit_column_stride(experts)
    k_pad, block, num_warps = launch_config(k, v)
    w_arg, stride_w, weighting_id = _weights_args(weights, out, weighting)
    with _device_guard(device):
        _fuse_experts_kernel[(n,)](
            experts, experts.stride(0), experts.stride(1), w_arg, stride_w, out, alpha, entropy,
            v, k, math.log2(math.e) / float(temperature), float(sharpness),
            WEIGHTING=weighting_id, SPACE=_SPACE_IDS[space], K_PAD=k_pad, BLOCK=block, num_warps=num_warps,
        )
    return out, alpha, entropy
