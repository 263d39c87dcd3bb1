"""The one Triton divergence core, used by every loss kernel (kd_loss, fuse_experts).

Everything is per column, fp32, in base 2: a2 = log2 p (teacher, or the fused teacher p̄) and
b2 = log2 q (student) at temperature T, so p = exp2(a2), q = exp2(b2), ln p = ln2 · a2. With
a = ln p and b = ln q, :func:`divergence_terms` returns the column's term of D and its two
partial derivatives r = ∂D/∂a and σ = ∂D/∂b (terms proportional to p in r, or to q in σ, cancel in
the softmax Jacobian and are dropped). The softmax Jacobian then gives the logit gradients

    dD/du_s = σ − q Σσ        dD/du_t = r − p Σr          (u = logits / T)

so a kernel needs only the row sums Σσ and Σr (known constants for the KL family: forward_kl and
soft_ce have Σσ = −Σp = −1 and Σr = D; reverse_kl has Σr = −1 and Σσ = D).

TVD is the exception: σ = −q g and r = p g with g = ½ sign(p − q), so σ − q Σσ = −q (g − Σ q g).
In a peaked row Σ q g ≈ −½ + δ with δ ~ 1e-5, and g − Σ q g cancels to δ in fp32. With Σ q = 1 and
the sums of q split by the sign of g (W₊ over p > q, W₋ over p < q, W₀ over p = q),

    g − Σ w g = W₋ + W₀/2  (g = ½),   −(W₊ + W₀/2)  (g = −½),   (W₋ − W₊)/2  (g = 0)

is a sum of positive terms: :func:`tvd_centered` evaluates it with no cancellation. D itself has
the same trap (|p − q| of a peaked column is 1 − 1): as Σ p = Σ q, D = Σ_{p>q} (p − q) =
Σ_{p<q} (q − p), and :func:`tvd_distance` takes the side with the smaller mass.

Non-finite inputs are never hidden: a kernel counts the NaN and +inf logits of a row
(:func:`nonfinite`) in a pass that reads every input, and :func:`poison` turns a non-zero count into a
NaN added to the row's loss and gradients. Only −inf means a masked column.

mse works on raw logits s and t (D · V = Σ (s − t)², columns where either is −inf contribute 0):
r = ∂(D·V)/∂t = −2 (s − t) and σ = ∂(D·V)/∂s = 2 (s − t).
"""

from __future__ import annotations

import triton
import triton.language as tl

FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
SOFT_CE = tl.constexpr(2)
JSD = tl.constexpr(3)
TVD = tl.constexpr(4)
MSE = tl.constexpr(5)
KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "soft_ce": 2, "jsd": 3, "tvd": 4, "mse": 5}

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def online_step(m, x):
    # One chunk of an online base-2 softmax: the new running max m' = max(m, max x), the factor
    # exp2(m − m') that rescales the sums accumulated so far, and exp2(x − m') for this chunk.
    # While every value seen is −inf (masked columns) m' = −inf: 0 is used as the reference
    # instead, so no −inf − (−inf) = NaN appears.
    m_new = tl.maximum(m, tl.max(x, axis=0))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m - ref), tl.exp2(x - ref)


@triton.jit
def finish_lse(m, d):
    # log2 Σ exp2(x) from the running max m and the per-lane rescaled sums d.
    ref = tl.where(m == float("-inf"), 0.0, m)
    return ref + tl.log2(tl.sum(d, axis=0))


@triton.jit
def finish_lse_split(m, d):
    # (reference max, log2 Σ exp2(x − ref)): a log2-probability is (x − ref) − log2 Σ. Adding the two
    # first would round at the fp32 spacing of |x| (~4e-6 at x = 28), the whole log-probability of
    # the top column of a peaked row.
    ref = tl.where(m == float("-inf"), 0.0, m)
    return ref, tl.log2(tl.sum(d, axis=0))


@triton.jit
def online_kl_step(acc, a_t, f_t, e_t, a_s, f_s, e_s, KIND: tl.constexpr):
    # One chunk of the KL family's D accumulated online, relative to the running normaliser of its
    # weights (f, e: online_step's rescale factor and exp2 of the teacher / student at base-2 logits
    # a); zero-weight columns contribute 0 (0 · log 0 = 0):
    #   forward_kl acc = Σ e_t (a_t − a_s)   soft_ce acc = Σ e_t a_s   reverse_kl acc = Σ e_s (a_s − a_t)
    if KIND == FORWARD_KL:
        acc = acc * f_t + tl.where(a_t > float("-inf"), e_t * (a_t - a_s), 0.0)
    elif KIND == SOFT_CE:
        acc = acc * f_t + tl.where(a_t > float("-inf"), e_t * a_s, 0.0)
    else:
        acc = acc * f_s + tl.where(a_s > float("-inf"), e_s * (a_s - a_t), 0.0)
    return acc


@triton.jit
def online_kl_finish(acc, z_t, z_s, lse_t, lse_s, KIND: tl.constexpr):
    # (D, Σr, Σσ) from online_kl_step's sums and the (reference, log2 Σ) log-sum-exps L of both sides:
    #   forward_kl = ln2 · (Σ p (a_t − a_s) − L_t + L_s)   soft_ce = ln2 · (L_s − Σ p a_s)
    #   reverse_kl = ln2 · (Σ q (a_s − a_t) − L_s + L_t),  Σ p x = Σ e_t x / Σ e_t
    # and the gradients' row sums (module docstring): Σσ = −1, Σr = D; reverse_kl Σr = −1, Σσ = D.
    if KIND == FORWARD_KL:
        d = LN2 * (tl.sum(acc, axis=0) / tl.sum(z_t, axis=0) + (lse_s[0] - lse_t[0]) + (lse_s[1] - lse_t[1]))
        return d, d, -1.0
    elif KIND == SOFT_CE:
        d = LN2 * (lse_s[0] + lse_s[1] - tl.sum(acc, axis=0) / tl.sum(z_t, axis=0))
        return d, d, -1.0
    else:
        d = LN2 * (tl.sum(acc, axis=0) / tl.sum(z_s, axis=0) + (lse_t[0] - lse_s[0]) + (lse_t[1] - lse_s[1]))
        return d, -1.0, d


@triton.jit
def nonfinite(x):
    # 1.0 where a logit is NaN or +inf (a broken input), else 0.0. Only −inf means "masked": the
    # column masks (x > −inf) are False for NaN too, so without this count a NaN would be hidden.
    return tl.where((x != x) | (x == float("inf")), 1.0, 0.0)


@triton.jit
def poison(count):
    # NaN when the row held a NaN or +inf logit (count > 0), else 0: added to the row's loss and to
    # each of its gradients, so a broken row is never a finite number.
    return tl.where(count > 0, float("nan"), 0.0)


@triton.jit
def load_row(row_ptr, offs, V):
    # Out-of-row lanes read −inf: zero probability, and excluded by every finite-mask.
    return tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)


@triton.jit
def divergence_terms(a2, b2, s, t, beta, log2_beta, log2_1m_beta, KIND: tl.constexpr):
    # (term of D, r = ∂D/∂a, σ = ∂D/∂b) of one chunk; −inf columns give 0 (0 · log 0 = 0).
    # s, t: raw student / teacher logits, read by mse only (its term is D · V).
    p = tl.exp2(a2)
    q = tl.exp2(b2)
    live_p = a2 > float("-inf")
    live_q = b2 > float("-inf")
    la = tl.where(live_p, a2, 0.0) * LN2
    lb = tl.where(live_q, b2, 0.0) * LN2
    if KIND == FORWARD_KL:
        # D = Σ p (a − b): r = p (a − b) (+ p, dropped), σ = −p
        term = tl.where(live_p, p * (la - lb), 0.0)
        r = term
        sigma = -p
    elif KIND == REVERSE_KL:
        # D = Σ q (b − a): r = −q, σ = q (b − a) (+ q, dropped)
        term = tl.where(live_q, q * (lb - la), 0.0)
        r = -q
        sigma = term
    elif KIND == SOFT_CE:
        # D = −Σ p b: r = −p b, σ = −p
        term = tl.where(live_p, -p * lb, 0.0)
        r = term
        sigma = -p
    elif KIND == JSD:
        # m = β p + (1−β) q, log2 m = logaddexp2(log2 p + log2 β, log2 q + log2(1−β));
        # D = Σ p F + Σ q G with F = β ln(p/m), G = (1−β) ln(q/m): r = p F, σ = q G.
        x = a2 + log2_beta
        y = b2 + log2_1m_beta
        hi = tl.maximum(x, y)
        ref = tl.where(hi == float("-inf"), 0.0, hi)
        lm = (ref + tl.log2(tl.exp2(x - ref) + tl.exp2(y - ref))) * LN2
        r = tl.where(live_p, p * (beta * (la - lm)), 0.0)
        sigma = tl.where(live_q, q * ((1.0 - beta) * (lb - lm)), 0.0)
        term = r + sigma
    elif KIND == TVD:
        # D = ½ Σ |p − q|, g = ½ sign(p − q) (0 where equal, as autograd's abs): r = p g, σ = −q g
        g = tvd_sign(a2, b2)
        term = 0.5 * tl.abs(p - q)
        r = p * g
        sigma = -q * g
    else:
        diff = tl.where((tl.abs(s) < float("inf")) & (tl.abs(t) < float("inf")), s - t, 0.0)
        term = diff * diff
        r = -2.0 * diff
        sigma = 2.0 * diff
    return term, r, sigma


@triton.jit
def tvd_sign(a2, b2):
    # g = ½ sign(p − q), compared in log space (monotone: same sign as p − q, no exp2 rounding).
    return tl.where(a2 > b2, 0.5, tl.where(a2 < b2, -0.5, 0.0))


@triton.jit
def tvd_centered(g, w_plus, w_minus, w_zero):
    # g − Σ w g for a distribution w (Σ w = 1) from its sums split by the sign of g: positive terms
    # only, so nothing cancels (the TVD fix; see the module docstring).
    return tl.where(g > 0, w_minus + 0.5 * w_zero,
                    tl.where(g < 0, -(w_plus + 0.5 * w_zero), 0.5 * (w_minus - w_plus)))


# Slots of the [TVD_SUMS] vector of tvd_chunk_sums: D₊, D₋, then Σ p and Σ q over p > q, p < q, p = q.
TVD_SUMS = tl.constexpr(8)
TVD_D_PLUS = tl.constexpr(0)
TVD_D_MINUS = tl.constexpr(1)
TVD_P = tl.constexpr(2)  # p's W₊, W₋, W₀ at 2, 3, 4
TVD_Q = tl.constexpr(5)  # q's W₊, W₋, W₀ at 5, 6, 7


@triton.jit
def tvd_chunk_sums(a2, b2):
    # [TVD_SUMS]: one chunk's D₊ = Σ_{p>q} (p − q), D₋ = Σ_{p<q} (q − p) and the sums of p and q split
    # by the sign of p − q; a kernel adds them over the row's chunks.
    g = tvd_sign(a2, b2)
    p = tl.exp2(a2)
    q = tl.exp2(b2)
    slot = tl.arange(0, TVD_SUMS)
    out = tl.where(slot == TVD_D_PLUS, tl.sum(tl.where(g > 0, p - q, 0.0), axis=0), 0.0)
    out = tl.where(slot == TVD_D_MINUS, tl.sum(tl.where(g < 0, q - p, 0.0), axis=0), out)
    for side in tl.static_range(3):  # W₊, W₋, W₀
        if side == 0:
            keep = g > 0
        elif side == 1:
            keep = g < 0
        else:
            keep = g == 0
        out = tl.where(slot == TVD_P + side, tl.sum(tl.where(keep, p, 0.0), axis=0), out)
        out = tl.where(slot == TVD_Q + side, tl.sum(tl.where(keep, q, 0.0), axis=0), out)
    return out


@triton.jit
def pick(vec, i):
    # vec[i] of a small vector, as a scalar.
    return tl.sum(tl.where(tl.arange(0, vec.shape[0]) == i, vec, 0.0), axis=0)


@triton.jit
def tvd_distance(sums):
    # D from the row's tvd_chunk_sums: D₊ and D₋ are equal in exact arithmetic; the side whose mass
    # (Σ_{p>q} p or Σ_{p<q} q) is smaller carries the smaller rounding error.
    return tl.where(pick(sums, TVD_P) <= pick(sums, TVD_Q + 1), pick(sums, TVD_D_PLUS), pick(sums, TVD_D_MINUS))


@triton.jit
def tvd_student_grad(a2, b2, sums):
    # dD/du_s = σ − q Σσ = −q (g − Σ q g), from the row's tvd_chunk_sums.
    return -tl.exp2(b2) * tvd_centered(tvd_sign(a2, b2), pick(sums, TVD_Q), pick(sums, TVD_Q + 1),
                                       pick(sums, TVD_Q + 2))


@triton.jit
def tvd_teacher_grad(a2, b2, sums):
    # dD/du_t = r − p Σr = p (g − Σ p g), from the row's tvd_chunk_sums.
    return tl.exp2(a2) * tvd_centered(tvd_sign(a2, b2), pick(sums, TVD_P), pick(sums, TVD_P + 1),
                                      pick(sums, TVD_P + 2))
