// The one CUDA divergence core (nvcc only): the per-column terms, row sums and gradients of every
// divergence (kdengine/reference/kd_loss.py), used by kd_row.cuh.
#pragma once

#include "reduce.cuh"

namespace kdengine {

// ---------------------------------------------------------------------------------------------
// The divergence math, per column (kdengine/reference/kd_loss.py). lq = log q, lp = log p at
// temperature T; s, t the raw logits (mse only). Row sums (pass 2): sums[0] = D, and for
//   jsd: sums[1] = Σ q G, sums[2] = Σ p F   (G = (1−β)(lq − lm), F = β(lp − lm), D = Σ qG + Σ pF)
//   tvd: the two sides of the row summed apart, g = ½ sign(p − q) (the TVD fix):
//        sums[0] = D₊ = Σ_{p>q} (p − q), sums[1] = D₋ = Σ_{p<q} (q − p),
//        sums[2..4] = Σ p over p > q, p < q, p = q;  sums[5..7] = Σ q likewise.
//        In a peaked row Σ q g ≈ −½ + δ (δ ~ 1e-6) and q (Σ q g − g) cancels in fp32; with the
//        split sums, g − Σ w g (w = p or q, Σ w = 1) is a sum of positive terms (tvd_centered).
//        D₊ = D₋ exactly; finish_sums keeps the side with the smaller mass (1 − 1 of a peaked
//        column never enters D).
//   mse: sums[2] = Σ (s − t) over finite columns (−inf: masked; NaN / +inf poison the row)
// Zero-probability columns contribute 0 (0·log 0 = 0).
// ---------------------------------------------------------------------------------------------
struct DivergenceConsts {
  float beta, log_beta, log_1m_beta;  // jsd
  float inv_vocab;                    // mse
};

struct Column {
  float lq, lp;  // log q, log p at T
  float s, t;    // raw logits (mse)
};

template <int KIND>
__device__ __forceinline__ void divergence_terms(const Column& c, const DivergenceConsts& k, float (&sums)[kSums]) {
  if constexpr (KIND == kMSE) {
    const float diff = (isfinite(c.s) && isfinite(c.t)) ? c.s - c.t : 0.f;
    sums[0] += diff * diff * k.inv_vocab;
    sums[2] += diff;
  } else if constexpr (KIND == kForwardKL) {
    if (c.lp != kNegInf) sums[0] += __expf(c.lp) * (c.lp - c.lq);
  } else if constexpr (KIND == kReverseKL) {
    if (c.lq != kNegInf) sums[0] += __expf(c.lq) * (c.lq - c.lp);
  } else if constexpr (KIND == kSoftCE) {
    if (c.lp != kNegInf) sums[0] -= __expf(c.lp) * c.lq;
  } else if constexpr (KIND == kJSD) {
    const float lm = logaddexp(c.lp + k.log_beta, c.lq + k.log_1m_beta);
    const float qg = c.lq != kNegInf ? __expf(c.lq) * (1.f - k.beta) * (c.lq - lm) : 0.f;
    const float pf = c.lp != kNegInf ? __expf(c.lp) * k.beta * (c.lp - lm) : 0.f;
    sums[0] += qg + pf;
    sums[1] += qg;
    sums[2] += pf;
  } else {  // tvd, compared in log space (same sign as p − q, no exp rounding)
    const float p = __expf(c.lp), q = __expf(c.lq);
    if (c.lp > c.lq) {
      sums[0] += p - q;
      sums[2] += p;
      sums[5] += q;
    } else if (c.lp < c.lq) {
      sums[1] += q - p;
      sums[3] += p;
      sums[6] += q;
    } else {
      sums[4] += p;
      sums[7] += q;
    }
  }
}

// After the block reduction: tvd's D is the side of the smaller mass (Σ_{p>q} p vs Σ_{p<q} q).
template <int KIND>
__device__ __forceinline__ void finish_sums(float (&sums)[kSums]) {
  if constexpr (KIND == kTVD) sums[0] = sums[2] <= sums[6] ? sums[0] : sums[1];
}

// tvd: ½ sign(p − q) of a column.
__device__ __forceinline__ float tvd_sign(const Column& c) { return c.lp > c.lq ? 0.5f : (c.lp < c.lq ? -0.5f : 0.f); }

// g − Σ w g for a distribution w from its sums split by the sign of g (w₊, w₋, w₀): positive terms
// only, so nothing cancels.
__device__ __forceinline__ float tvd_centered(float g, float w_plus, float w_minus, float w_zero) {
  return g > 0.f ? w_minus + 0.5f * w_zero : (g < 0.f ? -(w_plus + 0.5f * w_zero) : 0.5f * (w_minus - w_plus));
}

// dD/du_s (u = student / T), or dD/ds for mse.
template <int KIND>
__device__ __forceinline__ float divergence_grad_student(const Column& c, const DivergenceConsts& k,
                                                         const float (&sums)[kSums]) {
  if constexpr (KIND == kMSE) {
    const float diff = (isfinite(c.s) && isfinite(c.t)) ? c.s - c.t : 0.f;
    return 2.f * diff * k.inv_vocab;
  } else if constexpr (KIND == kForwardKL || KIND == kSoftCE) {
    return __expf(c.lq) - __expf(c.lp);  // q − p
  } else if constexpr (KIND == kReverseKL) {
    return c.lq != kNegInf ? __expf(c.lq) * (c.lq - c.lp - sums[0]) : 0.f;  // q (log q − log p − D)
  } else if constexpr (KIND == kJSD) {
    if (c.lq == kNegInf) return 0.f;
    const float lm = logaddexp(c.lp + k.log_beta, c.lq + k.log_1m_beta);
    return __expf(c.lq) * ((1.f - k.beta) * (c.lq - lm) - sums[1]);  // q (G − Σ q G)
  } else {
    return -__expf(c.lq) * tvd_centered(tvd_sign(c), sums[5], sums[6], sums[7]);  // q (Σ q g − g)
  }
}

// dD/du_t (u = teacher / T), or dD/dt for mse.
template <int KIND>
__device__ __forceinline__ float divergence_grad_teacher(const Column& c, const DivergenceConsts& k,
                                                         const float (&sums)[kSums]) {
  if constexpr (KIND == kMSE) {
    const float diff = (isfinite(c.s) && isfinite(c.t)) ? c.s - c.t : 0.f;
    return -2.f * diff * k.inv_vocab;
  } else if constexpr (KIND == kForwardKL) {
    return c.lp != kNegInf ? __expf(c.lp) * (c.lp - c.lq - sums[0]) : 0.f;  // p (log p − log q − D)
  } else if constexpr (KIND == kSoftCE) {
    return c.lp != kNegInf ? __expf(c.lp) * (-c.lq - sums[0]) : 0.f;  // p (−log q − D)
  } else if constexpr (KIND == kReverseKL) {
    return __expf(c.lp) - __expf(c.lq);  // p − q
  } else if constexpr (KIND == kJSD) {
    if (c.lp == kNegInf) return 0.f;
    const float lm = logaddexp(c.lp + k.log_beta, c.lq + k.log_1m_beta);
    return __expf(c.lp) * (k.beta * (c.lp - lm) - sums[2]);  // p (F − Σ p F)
  } else {
    return __expf(c.lp) * tvd_centered(tvd_sign(c), sums[2], sums[3], sums[4]);  // p (g − Σ p g)
  }
}

// Non-finite inputs are never hidden: only −inf means a masked column (the column tests above,
// lp != −inf, are true for NaN too). A kernel counts the NaN and +inf logits of a row in a pass
// that reads every input; a non-zero count makes the row's loss and gradients NaN (poison).
__device__ __forceinline__ float nonfinite(float x) { return (isnan(x) || x == INFINITY) ? 1.f : 0.f; }
__device__ __forceinline__ float poison(float count) { return count > 0.f ? NAN : 0.f; }

// Host-side constants of a KDLossOptions.
inline DivergenceConsts divergence_consts(const KDLossOptions& o, int64_t vocab) {
  DivergenceConsts k;
  k.beta = o.jsd_beta;
  k.log_beta = o.divergence == kJSD ? logf(o.jsd_beta) : 0.f;
  k.log_1m_beta = o.divergence == kJSD ? log1pf(-o.jsd_beta) : 0.f;
  k.inv_vocab = 1.f / static_cast<float>(vocab);
  return k;
}

}  // namespace kdengine
