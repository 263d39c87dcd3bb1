// Block-wide reductions (fixed order: deterministic) and the online softmax / entropy updates,
// nvcc only. Each row is reduced by one thread block.
#pragma once

#include "device.cuh"

namespace kdengine {

// ---------------------------------------------------------------------------------------------
// Block-wide all-reduce of NV floats with a combine operator (warp shuffles, then one warp).
// Every thread gets the result. Fixed order: deterministic.
// ---------------------------------------------------------------------------------------------
struct SumOp {
  template <int NV>
  __device__ __forceinline__ void operator()(float (&a)[NV], const float (&b)[NV]) const {
#pragma unroll
    for (int i = 0; i < NV; ++i) a[i] += b[i];
  }
};

// Online-softmax states (m, d) stored as pairs: d = Σ exp(x − m) over the columns seen.
struct SoftmaxMergeOp {
  template <int NV>
  __device__ __forceinline__ void operator()(float (&a)[NV], const float (&b)[NV]) const {
#pragma unroll
    for (int i = 0; i < NV; i += 2) {
      const float m = fmaxf(a[i], b[i]);
      if (m == kNegInf) continue;  // both empty (or fully masked): stay (−inf, 0)
      a[i + 1] = a[i + 1] * __expf(a[i] - m) + b[i + 1] * __expf(b[i] - m);
      a[i] = m;
    }
  }
};

// Entropy states (m, d, w) stored as triples: w = Σ exp(x − m)·(x − m), so that
// H = log d − w / d with no large-magnitude cancellation. Rescaling to a new max m':
// w' = exp(m − m')·(w + (m − m')·d).
struct EntropyMergeOp {
  template <int NV>
  __device__ __forceinline__ void operator()(float (&a)[NV], const float (&b)[NV]) const {
#pragma unroll
    for (int i = 0; i < NV; i += 3) {
      const float m = fmaxf(a[i], b[i]);
      if (m == kNegInf) continue;
      float d = 0.f, w = 0.f;
      if (a[i] != kNegInf) {
        const float s = __expf(a[i] - m);
        d += a[i + 1] * s;
        w += s * (a[i + 2] + (a[i] - m) * a[i + 1]);
      }
      if (b[i] != kNegInf) {
        const float s = __expf(b[i] - m);
        d += b[i + 1] * s;
        w += s * (b[i + 2] + (b[i] - m) * b[i + 1]);
      }
      a[i] = m;
      a[i + 1] = d;
      a[i + 2] = w;
    }
  }
};

template <int NV, typename Op>
__device__ __forceinline__ void block_allreduce(float (&v)[NV], Op op) {
  __shared__ float partial[32][NV];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    float other[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) other[i] = __shfl_xor_sync(0xffffffffu, v[i], offset);
    op(v, other);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) partial[warp][i] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] = partial[lane < n_warps ? lane : 0][i];
    // Lanes past n_warps repeat warp 0's partial; only lanes < n_warps are combined below.
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      float other[NV];
#pragma unroll
      for (int i = 0; i < NV; ++i) other[i] = __shfl_down_sync(0xffffffffu, v[i], offset);
      if (lane + offset < n_warps) op(v, other);
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < NV; ++i) partial[0][i] = v[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = partial[0][i];
  __syncthreads();  // partial is reused by the next call
}

// ---------------------------------------------------------------------------------------------
// Online softmax / entropy updates (one value at a time; −inf values are skipped, so a masked
// column never produces NaN).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void softmax_push(float& m, float& d, float x) {
  if (x == kNegInf) return;
  if (x > m) {
    d = d * __expf(m - x) + 1.f;  // m = −inf: d = 0
    m = x;
  } else {
    d += __expf(x - m);
  }
}

__device__ __forceinline__ void entropy_push(float& m, float& d, float& w, float x) {
  if (x == kNegInf) return;
  if (x > m) {
    if (m != kNegInf) {
      const float s = __expf(m - x);
      w = s * (w + (m - x) * d);
      d *= s;
    }
    d += 1.f;  // the new max contributes exp(0)·0 to w
    m = x;
  } else {
    const float e = __expf(x - m);
    d += e;
    w += e * (x - m);
  }
}

// A log-sum-exp kept as the running max m and log d, d = Σ exp(u − m): a log-probability is
// (u − m) − log d. Summing m + log d first would round it to the fp32 spacing at |u| (~2e-6 at
// |u| = 20), which is the whole log-probability of the top column of a peaked row; a divergence
// of ~1e-6 between two peaked rows would be lost in it.
struct LogSumExp {
  float m, log_d;  // no initialisers: it lives in __shared__ structs
  __device__ __forceinline__ float log_prob(float u) const { return (u - m) - log_d; }
  __device__ __forceinline__ float value() const { return m + log_d; }
};

// log(exp(a) + exp(b)); −inf when both are −inf.
__device__ __forceinline__ float logaddexp(float a, float b) {
  const float m = fmaxf(a, b);
  if (m == kNegInf) return kNegInf;
  return m + log1pf(__expf(-fabsf(a - b)));
}

// acc ← acc + w·value over an online softmax (m, d) of the weights' logits x: when x raises the
// running max, everything accumulated so far is rescaled by exp(m − x) (the same rescaling as d).
// A −inf weight logit (masked column) contributes nothing.
__device__ __forceinline__ void weighted_push(float& m, float& d, float& acc, float x, float value) {
  if (x == kNegInf) return;
  if (x > m) {
    const float f = m == kNegInf ? 0.f : __expf(m - x);
    d = d * f + 1.f;
    acc = acc * f + value;
    m = x;
  } else {
    const float e = __expf(x - m);
    d += e;
    acc += e * value;
  }
}

// Merges states [m_s, d_s, m_t, d_t, m_1, d_1, acc] whose acc is weighted by the pair at W (0: the
// student, reverse_kl; 2: the teacher, forward_kl / soft_ce).
template <int W>
struct KLMergeOp {
  template <int NV>
  __device__ __forceinline__ void operator()(float (&a)[NV], const float (&b)[NV]) const {
    const float m = fmaxf(a[W], b[W]);
    if (m != kNegInf) {
      const float fa = a[W] == kNegInf ? 0.f : __expf(a[W] - m), fb = b[W] == kNegInf ? 0.f : __expf(b[W] - m);
      a[6] = a[6] * fa + b[6] * fb;
    }
    float pairs[6] = {a[0], a[1], a[2], a[3], a[4], a[5]};
    const float other[6] = {b[0], b[1], b[2], b[3], b[4], b[5]};
    SoftmaxMergeOp()(pairs, other);
#pragma unroll
    for (int i = 0; i < 6; ++i) a[i] = pairs[i];
  }
};

}  // namespace kdengine
