// Shared by every file of kdengine._C.
//
// Part 1 (plain C++, also read by bindings.cpp): the launcher interface. Each .cu file exposes
// `extern "C"` launchers that take raw pointers, sizes, row strides (in elements), a dtype code
// and a cudaStream_t passed as `void*`. They return nullptr on success, or the CUDA error string
// of the failed launch (cudaGetLastError is checked after every launch). bindings.cpp, the only
// torch-facing file, checks the tensors, allocates the outputs and calls these launchers, so it
// needs no CUDA header at all.
//
// Part 2 (only under nvcc): device helpers. Every kernel accumulates in fp32, whatever the input
// dtype, and reduces each row with one thread block in a fixed order (deterministic).
#pragma once

#include <cstdint>

namespace kdengine {

// Element type of a float tensor (bindings map torch dtypes to these codes).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The divergence actually computed (jsd with beta 0 / 1 arrives as forward / reverse KL).
enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kSoftCE = 2, kJSD = 3, kTVD = 4, kMSE = 5 };

// How the K experts are weighted when no explicit weights are given.
enum Weighting : int { kUniform = 0, kEntropy = 1, kConfidence = 2 };

// Where the experts are fused: z̄ = Σ α_k z_k ("logit") or p̄ = Σ α_k p_k ("prob").
enum FusionSpace : int { kLogitSpace = 0, kProbSpace = 1 };

// Where an expert's prompt goes in its row.
enum Placement : int { kPrepend = 0, kAppend = 1 };

constexpr int kMaxExperts = 16;

// Per-row options of the distillation loss (kdengine.ops.kd_loss.KDLossSpec, resolved).
struct KDLossOptions {
  int divergence;         // Divergence
  float temperature;      // T > 0 (ignored by mse)
  float jsd_beta;         // β in (0, 1) for jsd
  float kd_scale;         // kd_weight · T² (t2_scale) or kd_weight
  float hard_weight;      // weight of CE(student at T=1, label); 0 disables it
  int64_t ignore_index;   // rows whose label equals it contribute 0
};

// How the row driver kd_loss_row runs (one launch each).
enum RowMode : int {
  kGradInForward = 0,      // fused experts: row loss and the gradients of Σ row_loss · grad_scale
  kForwardStats = 1,       // kd_loss forward: row loss and the row statistics, no gradient
  kBackwardFromStats = 2,  // kd_loss backward: one pass writing the gradients from the statistics
};

// Divergence row sums (see divergence_terms) and the per-row statistics of kd_loss: the student's
// log-sum-exp at T (m, log d), its log-sum-exp at T = 1 (hard label), the teacher's (m, log d),
// then the sums.
constexpr int kSums = 8;
constexpr int kRowStats = 5 + kSums;

// kd_loss, recompute-in-backward. Inputs [N, V] with unit column stride. The forward
// (mode kForwardStats) writes row_loss and stats; the backward (kBackwardFromStats) reads the
// logits and stats again and writes contiguous [N, V] gradients in the input dtype: those of
// Σ_n grad_scale[n · grad_scale_stride] · row_loss[n], computed in fp32 and rounded once.
struct KDLossRowsArgs {
  const void* student;        // [N, V] logits
  int64_t student_row_stride;
  const void* teacher;        // [N, V] logits, same dtype
  int64_t teacher_row_stride;
  const int64_t* labels;      // [N] or nullptr
  const float* row_weights;   // [N] or nullptr
  int mode;                   // RowMode: kForwardStats or kBackwardFromStats
  float* stats;               // [N, kRowStats] fp32: written by the forward, read by the backward
  const float* grad_scale;    // backward: dL/d(row_loss), read on the device (no host sync)
  int64_t grad_scale_stride;  // 0 (one value for every row) or 1 ([N])
  float* row_loss;            // [N] out (forward)
  void* grad_student;         // [N, V] out or nullptr (backward)
  void* grad_teacher;         // [N, V] out or nullptr (backward)
  int64_t n_rows;
  int64_t vocab;
  KDLossOptions options;
};

// Fusion of K expert rows. experts[k, n, :] lives at experts + k·expert_stride + n·row_stride.
struct FusionArgs {
  const void* experts;        // [K, N, V] logits
  int64_t expert_stride;
  int64_t row_stride;
  int num_experts;            // 1 <= K <= kMaxExperts
  int weighting;              // Weighting (unused when weights != nullptr)
  int space;                  // FusionSpace
  float sharpness;            // > 0, entropy weighting: α = softmax(−H / sharpness)
  const float* weights;       // normalised [K] (weights_row_stride 0) or [N, K], or nullptr
  int64_t weights_row_stride;
  float* alpha;               // [N, K] out
  float* entropy;             // [N, K] out (nats)
};

// fuse_experts: fused teacher log-probabilities only.
struct FuseExpertsArgs {
  FusionArgs fusion;
  float temperature;
  float* log_probs;           // [N, V] fp32 out
  int64_t n_rows;
  int64_t vocab;
};

// fused_experts_kd_loss rows: kd_loss against the fused teacher, with gradients to the student
// (contiguous [N, V]) and to every expert (contiguous [K, N, V]).
struct FusedExpertsKDArgs {
  FusionArgs fusion;
  const void* student;        // [N, V] logits, same dtype as the experts
  int64_t student_row_stride;
  const int64_t* labels;
  const float* row_weights;
  const float* grad_scale;
  float* row_loss;
  void* grad_student;
  void* grad_experts;
  int64_t n_rows;
  int64_t vocab;
  KDLossOptions options;
};

// expert_batch_embed forward: R rows of P + L positions, H wide.
struct ExpertBatchEmbedArgs {
  const int64_t* input_ids;       // [B, L] contiguous
  const void* weight;             // [Vocab, H] unit column stride
  int64_t weight_row_stride;
  const void* prompts;            // [K, P, H] contiguous, weight dtype
  const int64_t* attention_mask;  // [B, L] contiguous 0/1
  const int64_t* lengths;         // [B] real tokens n_b = Σ attention_mask[b] (append), or nullptr
  const int64_t* experts;         // [B] or [B, k] contiguous, or nullptr (all K, expert-major)
  int64_t experts_per_example;    // k (1 for [B]; ignored when experts == nullptr)
  void* embeds;                   // [R, P + L, H] out, weight dtype
  int64_t* mask;                  // [R, P + L] out
  int64_t batch, length, hidden, num_experts, prompt_len, rows;
  int placement;                  // Placement
};

// expert_batch_embed backward. grad_embeds[r, t, :] lives at grad + r·stride_row + t·stride_pos.
struct ExpertBatchEmbedBackwardArgs {
  const void* grad_embeds;        // [R, P + L, H] unit last stride, weight dtype
  int64_t grad_row_stride;
  int64_t grad_pos_stride;
  const int64_t* lengths;         // as in the forward
  const int64_t* experts;         // as in the forward
  int64_t experts_per_example;
  float* grad_prompts;            // [K, P, H] fp32 out
  // Weight gradient (grad_weight == nullptr: not asked). The B·L token slots sorted by id
  // (stable): sorted_ids[j] is the id of slot order[j] = b·L + l.
  const int64_t* sorted_ids;
  const int64_t* order;
  float* grad_weight;             // [Vocab, H] fp32 out, zero-filled by the caller
  int64_t batch, length, hidden, num_experts, prompt_len, rows;
  int placement;
};

}  // namespace kdengine

extern "C" {
const char* kdengine_kd_loss_rows(const kdengine::KDLossRowsArgs* args, int dtype, void* stream);
const char* kdengine_fuse_experts(const kdengine::FuseExpertsArgs* args, int dtype, void* stream);
const char* kdengine_fused_experts_kd_rows(const kdengine::FusedExpertsKDArgs* args, int dtype, void* stream);
const char* kdengine_expert_batch_embed(const kdengine::ExpertBatchEmbedArgs* args, int dtype, void* stream);
const char* kdengine_expert_batch_embed_backward(const kdengine::ExpertBatchEmbedBackwardArgs* args, int dtype,
                                                 void* stream);
}

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

namespace kdengine {

constexpr float kNegInf = -INFINITY;
constexpr int kMaxThreads = 512;

// Runs BODY with `scalar_t` bound to the C++ type of dtype code DTYPE.
#define KDENGINE_DISPATCH_DTYPE(DTYPE, ...)                 \
  [&]() -> cudaError_t {                                    \
    switch (DTYPE) {                                        \
      case ::kdengine::kFloat32: {                          \
        using scalar_t = float;                             \
        return __VA_ARGS__();                               \
      }                                                     \
      case ::kdengine::kBFloat16: {                         \
        using scalar_t = __nv_bfloat16;                     \
        return __VA_ARGS__();                               \
      }                                                     \
      case ::kdengine::kFloat16: {                          \
        using scalar_t = __half;                            \
        return __VA_ARGS__();                               \
      }                                                     \
      default:                                              \
        return cudaErrorInvalidValue;                       \
    }                                                       \
  }()

// Runs BODY with `constexpr int KIND` bound to the divergence code DIV.
#define KDENGINE_DISPATCH_DIVERGENCE(DIV, ...)                                      \
  [&]() -> cudaError_t {                                                            \
    switch (DIV) {                                                                  \
      case ::kdengine::kForwardKL: { constexpr int KIND = ::kdengine::kForwardKL; return __VA_ARGS__(); } \
      case ::kdengine::kReverseKL: { constexpr int KIND = ::kdengine::kReverseKL; return __VA_ARGS__(); } \
      case ::kdengine::kSoftCE: { constexpr int KIND = ::kdengine::kSoftCE; return __VA_ARGS__(); }       \
      case ::kdengine::kJSD: { constexpr int KIND = ::kdengine::kJSD; return __VA_ARGS__(); }             \
      case ::kdengine::kTVD: { constexpr int KIND = ::kdengine::kTVD; return __VA_ARGS__(); }             \
      case ::kdengine::kMSE: { constexpr int KIND = ::kdengine::kMSE; return __VA_ARGS__(); }             \
      default: return cudaErrorInvalidValue;                                        \
    }                                                                               \
  }()

// nullptr on success, else the message of the launch error.
inline const char* launch_status(cudaError_t err) {
  if (err == cudaSuccess) err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Threads per row block: enough 16-byte chunks per thread to hide latency, at most kMaxThreads.
inline int row_threads(int64_t n_chunks) {
  int threads = 64;
  while (threads < kMaxThreads && threads < n_chunks) threads *= 2;
  return threads;
}

// ---------------------------------------------------------------------------------------------
// Element conversion and 16-byte chunk IO
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Elements per 16-byte vector: 4 fp32, 8 bf16/fp16.
template <typename T>
struct Vec {
  static constexpr int n = 16 / sizeof(T);
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// out[k] = row[start + k] as fp32 for k < N; columns past n_cols read as `fill`. A full chunk of
// a 16-byte aligned row is one vector load (chunks start at multiples of N elements).
template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t start, int64_t n_cols, bool vec_ok,
                                           float (&out)[N], float fill = kNegInf) {
  static_assert(N * sizeof(T) == 16, "a chunk is one 16-byte vector");
  if (vec_ok && start + N <= n_cols) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + start);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_float(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = start + k < n_cols ? to_float(row[start + k]) : fill;
  }
}

// row[start + k] = vals[k] (rounded to T) for the columns below n_cols.
template <typename T, int N>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, int64_t start, int64_t n_cols, bool vec_ok,
                                            const float (&vals)[N]) {
  static_assert(N * sizeof(T) == 16, "a chunk is one 16-byte vector");
  if (vec_ok && start + N <= n_cols) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < N; ++k) e[k] = from_float<T>(vals[k]);
    *reinterpret_cast<uint4*>(row + start) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (start + k < n_cols) row[start + k] = from_float<T>(vals[k]);
  }
}

// Zeros in columns [0, n_cols) of a row (gradients of ignored rows).
template <typename T>
__device__ __forceinline__ void zero_row(T* __restrict__ row, int64_t n_cols) {
  constexpr int N = Vec<T>::n;
  float zeros[N];
#pragma unroll
  for (int k = 0; k < N; ++k) zeros[k] = 0.f;
  const bool vec_ok = aligned16(row);
  for (int64_t c = threadIdx.x; c * N < n_cols; c += blockDim.x) store_chunk<T, N>(row, c * N, n_cols, vec_ok, zeros);
}

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
//   mse: sums[2] = Σ (s − t) over finite columns
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

// Whether the gradients asked for need the row sums of pass 2 (else they are written in pass 2).
__host__ __device__ constexpr bool grads_need_sums(int kind, bool grad_student, bool grad_teacher) {
  return (grad_student && (kind == kReverseKL || kind == kJSD || kind == kTVD)) ||
         (grad_teacher && (kind == kForwardKL || kind == kSoftCE || kind == kJSD || kind == kTVD));
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

// Host-side constants of a KDLossOptions.
inline DivergenceConsts divergence_consts(const KDLossOptions& o, int64_t vocab) {
  DivergenceConsts k;
  k.beta = o.jsd_beta;
  k.log_beta = o.divergence == kJSD ? logf(o.jsd_beta) : 0.f;
  k.log_1m_beta = o.divergence == kJSD ? log1pf(-o.jsd_beta) : 0.f;
  k.inv_vocab = 1.f / static_cast<float>(vocab);
  return k;
}

// ---------------------------------------------------------------------------------------------
// One row of the distillation loss, run by a whole thread block (kdengine/ops/kd_loss.py). The
// teacher side is a policy so that the same driver serves plain teacher logits (kd_loss.cu) and a
// fusion of K experts (fuse_experts.cu). MODE (RowMode) picks what one launch does:
//   kGradInForward      loss + gradients of Σ row_loss · grad_scale (fused experts)
//   kForwardStats       loss + the row statistics (kd_loss forward)
//   kBackwardFromStats  gradients of Σ grad_scale · row_loss from the statistics, one pass
// A Teacher provides:
//   bool wants_grad;                                      gradient w.r.t. the teacher asked for
//   bool grad_needs_sums;                                 its gradient needs the final row sums
//   static constexpr int grad_stages;                     (kGradInForward) 1, or 2 when its gradient
//                                                         needs a row sum of the first stage
//   void zero_grads();                                    ignored row: zero its gradients
//   void prepare();                                       block-wide teacher statistics
//   void columns(start, float (&lp)[N], float (&t)[N]);   log p at T and the teacher logits t
//   void grad_columns(stage, start, lq, lp, g, sums);     g = dL/dt of the chunk (row scale in)
//   void between_stages();                                (kGradInForward) block-wide, after stage 0
// and, for kForwardStats / kBackwardFromStats, void save(float*) / void restore(const float*): its
// two statistics (the teacher's LogSumExp) as kept in the row statistics.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct KDRow {
  const T* student;          // row of [N, V] logits, unit column stride
  T* grad_student;           // contiguous row or nullptr
  int64_t vocab;
  KDLossOptions options;
  DivergenceConsts consts;
  bool has_label;
  int64_t label;
  float row_weight;
  float grad_scale;          // dL/d(row_loss) (kBackwardFromStats) or d(reduced)/d(Σ row_loss)
  float* row_loss;           // &row_loss[n] (not written by kBackwardFromStats)
  float* stats;              // &stats[n, 0] (kForwardStats / kBackwardFromStats)
};

// The hard-label target of a row: −1 without one; CE = lse − s[label] is NaN (and so is the
// student gradient) for a label outside [0, V) that is not ignore_index: never a finite loss.
template <typename T>
__device__ __forceinline__ float hard_label_ce(const KDRow<T>& r, float lse_hard, bool hard, int64_t& label,
                                               bool& bad_label) {
  label = -1;
  bad_label = false;
  if (!hard) return 0.f;
  if (r.label >= 0 && r.label < r.vocab) {
    label = r.label;
    return lse_hard - to_float(r.student[label]);
  }
  bad_label = true;
  return NAN;
}

template <typename T, int KIND, int MODE, typename Teacher>
__device__ void kd_loss_row(const KDRow<T>& r, Teacher& teacher) {
  constexpr int N = Vec<T>::n;
  const int64_t V = r.vocab;
  const KDLossOptions& o = r.options;
  if (r.has_label && r.label == o.ignore_index) {
    if constexpr (MODE != kForwardStats) {
      if (r.grad_student != nullptr) zero_row(r.grad_student, V);
      teacher.zero_grads();
    }
    if constexpr (MODE != kBackwardFromStats) {
      if (threadIdx.x == 0) *r.row_loss = 0.f;
    }
    return;
  }

  const float inv_t = 1.f / o.temperature;
  const bool hard = r.has_label && o.hard_weight != 0.f;
  // At T = 1 the hard-label log-sum-exp is the student's one.
  const bool hard_shares_lse = KIND != kMSE && o.temperature == 1.f;
  const bool vec_s = aligned16(r.student);
  LogSumExp lse_q{0.f, 0.f};  // unused by mse
  float lse_hard;
  float sums[kSums];
#pragma unroll
  for (int i = 0; i < kSums; ++i) sums[i] = 0.f;
  if constexpr (MODE == kBackwardFromStats) {
    lse_q = LogSumExp{r.stats[0], r.stats[1]};
    lse_hard = r.stats[2];
    teacher.restore(r.stats + 3);
#pragma unroll
    for (int i = 0; i < kSums; ++i) sums[i] = r.stats[5 + i];
  } else {
    teacher.prepare();
    // Pass 1: student log-sum-exp at T (st[0..1]) and at T = 1 for the hard label (st[2..3]).
    float st[4] = {kNegInf, 0.f, kNegInf, 0.f};
    if (KIND != kMSE || hard) {
      for (int64_t c = threadIdx.x; c * N < V; c += blockDim.x) {
        float s[N];
        load_chunk<T, N>(r.student, c * N, V, vec_s, s);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          if (KIND != kMSE) softmax_push(st[0], st[1], s[k] * inv_t);
          if (hard && !hard_shares_lse) softmax_push(st[2], st[3], s[k]);
        }
      }
      block_allreduce(st, SoftmaxMergeOp());
    }
    if (KIND != kMSE) lse_q = LogSumExp{st[0], logf(st[1])};
    lse_hard = hard_shares_lse ? lse_q.value() : st[2] + logf(st[3]);
  }
  int64_t label;
  bool bad_label;
  const float ce = hard_label_ce(r, lse_hard, hard, label, bad_label);

  const bool need_gs = MODE != kForwardStats && r.grad_student != nullptr;
  const bool need_gt = MODE != kForwardStats && teacher.wants_grad;
  const bool late_grads = grads_need_sums(KIND, need_gs, need_gt) || (need_gt && teacher.grad_needs_sums);
  // dL/dlogit = grad_scale · row_weight · kd_scale · (1/T unless mse) · dD/du  (+ hard term).
  const float c_row = r.grad_scale * r.row_weight;
  const float coef = c_row * o.kd_scale * (KIND == kMSE ? 1.f : inv_t);
  const float c_hard = c_row * o.hard_weight;
  const bool vec_gs = need_gs && aligned16(r.grad_student);

  // Gradients of one chunk; the student's are stored only at stage 0.
  auto grad_chunk = [&](int stage, int64_t start, const float (&s)[N], const float (&lp)[N], const float (&t)[N]) {
    float gs[N], gt[N], lq[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      gs[k] = 0.f;
      gt[k] = 0.f;
      lq[k] = lse_q.log_prob(s[k] * inv_t);
      if (start + k < V) {
        const Column col{lq[k], lp[k], s[k], t[k]};
        gs[k] = coef * divergence_grad_student<KIND>(col, r.consts, sums);
        if (hard) gs[k] += c_hard * (__expf(s[k] - lse_hard) - (start + k == label ? 1.f : 0.f));
        if (bad_label) gs[k] = NAN;
        gt[k] = coef * divergence_grad_teacher<KIND>(col, r.consts, sums);
      }
    }
    if (need_gs && stage == 0) store_chunk<T, N>(r.grad_student, start, V, vec_gs, gs);
    if (need_gt) teacher.grad_columns(stage, start, lq, lp, gt, sums);
  };
  auto grad_pass = [&](int stage) {
    for (int64_t c = threadIdx.x; c * N < V; c += blockDim.x) {
      float s[N], lp[N], t[N];
      load_chunk<T, N>(r.student, c * N, V, vec_s, s);
      teacher.columns(c * N, lp, t);
      grad_chunk(stage, c * N, s, lp, t);
    }
  };
  if constexpr (MODE == kBackwardFromStats) {
    grad_pass(0);
  } else {
    // Pass 2: the row sums (D and the auxiliary sums); the gradients too when they need no sum.
    for (int64_t c = threadIdx.x; c * N < V; c += blockDim.x) {
      float s[N], lp[N], t[N];
      load_chunk<T, N>(r.student, c * N, V, vec_s, s);
      teacher.columns(c * N, lp, t);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (c * N + k < V) {
          divergence_terms<KIND>(Column{lse_q.log_prob(s[k] * inv_t), lp[k], s[k], t[k]}, r.consts, sums);
        }
      }
      if (!late_grads && (need_gs || need_gt)) grad_chunk(0, c * N, s, lp, t);
    }
    block_allreduce(sums, SumOp());
    finish_sums<KIND>(sums);
    if (threadIdx.x == 0) *r.row_loss = r.row_weight * (o.kd_scale * sums[0] + o.hard_weight * ce);
    if constexpr (MODE == kForwardStats) {
      if (threadIdx.x == 0) {
        r.stats[0] = lse_q.m;
        r.stats[1] = lse_q.log_d;
        r.stats[2] = lse_hard;
        teacher.save(r.stats + 3);
        for (int i = 0; i < kSums; ++i) r.stats[5 + i] = sums[i];
      }
    } else {
      // Pass 3 (when the gradients need the row sums), then the teacher's second stage if any.
      if (late_grads) grad_pass(0);
      if (need_gt && Teacher::grad_stages == 2) {
        teacher.between_stages();
        grad_pass(1);
      }
    }
  }
}

}  // namespace kdengine

#endif  // __CUDACC__
