// fuse_experts / fused_experts_kd_loss: uncertainty-weighted fusion of K expert logit rows
// (kdengine/reference/fuse_experts.py), alone or fused with the kd_loss rows primitive.
//
// One thread block per row. Pass 1 walks each expert row once and keeps, online, its max m,
// d = Σ exp(u − m) and w = Σ exp(u − m)(u − m) (u = z / T): lse_k = m + log d, the entropy
// H_k = log d − w / d and the top probability 1 / d. These give α (uniform, softmax(−H / sharpness),
// confidence, or the given weights). The fused teacher is then recomputed per column from the K
// rows, never stored:
//   logit space  z̄ = Σ_{α_k>0} α_k z_k,           log p̄ = z̄ / T − lse(z̄ / T)  (one more online pass)
//   prob space   log p̄ = log Σ_{α_k>0} exp(log α_k + u_k − lse_k)              (online over k)
// and the loss is kd_loss(student, teacher = T · log p̄) through the shared row driver. Expert
// gradients (α constant), with g = dL/dt of that teacher:
//   logit space  dL/dz_k = α_k (g − p̄ Σ g)           (Σ g = 0 except for mse)
//   prob space   r = T g,  dL/dz_k,i = (α_k / T)(exp(log p_k,i − log p̄_i) r_i − p_k,i S_k),
//                S_k = Σ_j exp(log p_k,j − log p̄_j) r_j   (a second stage: S needs a row sum)
// The ratio p_k / p̄ ≤ 1 / α_k is computed from log-probs, so no division by a tiny p̄. For tvd
// the prob-space gradient is c · α_k p_k (g − Σ_j p_k,j g_j), g = ½ sign(p̄ − q), c = dL/dD / T,
// with Σ p_k g from p_k's sums split by the sign of g (tvd_centered: no cancellation when expert k
// is peaked).
//
// Recompute-in-backward, as kd_loss.cu: the forward launch writes row losses, α, entropies and the
// row statistics; the backward launch reads the logits again. Traffic per row, in passes over [V]
// of the input dtype (K experts, student gradient only; each expert gradient adds one write):
//   forward  logit space, forward/reverse KL and soft CE: K + 1 with α known before the row is read
//            (uniform or given weights: the experts' statistics ride along kl_forward_row's one read,
//            the merged pass), 2K + 1 with entropy / confidence weights (expert_statistics first:
//            α needs every expert's whole-row entropy); other divergences 3K + 2 (logit: + the fused
//            log-sum-exp pass) or 2K + 2 (prob).
//   backward K + 1 reads + 1 write (prob space expert gradients: one more read of the experts).
// At K = 4, logit forward KL, forward + backward: 11 (uniform / given weights) or 15 (entropy).
#include "kd_row.cuh"

namespace kdengine {
namespace {

// Per-row expert statistics in shared memory.
struct ExpertStats {
  float alpha[kMaxExperts];
  float log_alpha[kMaxExperts];  // −inf where α_k <= 0 (and for NaN weights): the expert is dropped
  LogSumExp lse[kMaxExperts];    // of z_k / T
  float bad;                     // number of NaN / +inf logits in the row's experts (forward)
};

// α is known before the row is read: given weights, or uniform.
__device__ __forceinline__ bool known_alpha(const FusionArgs& f) {
  return f.weights != nullptr || f.weighting == kUniform;
}

// α of row n into stats and alpha[n, :] (thread 0). entropy / top (per expert: H_k, max_c p_k,c) are
// read by the entropy and confidence weightings only.
__device__ void set_mixture(const FusionArgs& f, int64_t n, const float* entropy, const float* top,
                            ExpertStats& stats) {
  const int K = f.num_experts;
  float total = 0.f, hmax = kNegInf;
  if (!known_alpha(f) && f.weighting == kEntropy)
    for (int e = 0; e < K; ++e) hmax = fmaxf(hmax, -entropy[e] / f.sharpness);
  for (int e = 0; e < K; ++e) {
    float a;
    if (f.weights != nullptr) {
      a = f.weights[n * f.weights_row_stride + e];  // normalised by the caller
    } else if (f.weighting == kUniform) {
      a = 1.f / K;
    } else if (f.weighting == kEntropy) {
      a = __expf(-entropy[e] / f.sharpness - hmax);  // softmax_k(−H_k / sharpness), normalised below
    } else {
      a = top[e];  // confidence, normalised below
    }
    stats.alpha[e] = a;
    total += a;
  }
  const bool normalise = !known_alpha(f);
  for (int e = 0; e < K; ++e) {
    if (normalise) stats.alpha[e] /= total;
    stats.log_alpha[e] = stats.alpha[e] > 0.f ? logf(stats.alpha[e]) : kNegInf;
    f.alpha[n * K + e] = stats.alpha[e];
  }
}

// Pass 1 and α for row n; writes alpha[n, :] and entropy[n, :]. Block-wide.
template <typename T>
__device__ void expert_statistics(const FusionArgs& f, const T* row0, int64_t V, float inv_t, int64_t n,
                                  ExpertStats& stats) {
  constexpr int N = Vec<T>::n;
  __shared__ float entropy[kMaxExperts], top[kMaxExperts];
  float bad[1] = {0.f};
  for (int e = 0; e < f.num_experts; ++e) {
    const T* row = row0 + e * f.expert_stride;
    const bool vec = aligned16(row);
    float st[3] = {kNegInf, 0.f, 0.f};  // (m, d, w)
    for (int64_t c = threadIdx.x; c * N < V; c += blockDim.x) {
      float z[N];
      load_chunk<T, N>(row, c * N, V, vec, z);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (c * N + k < V) bad[0] += nonfinite(z[k]);
        entropy_push(st[0], st[1], st[2], z[k] * inv_t);
      }
    }
    block_allreduce(st, EntropyMergeOp());
    if (threadIdx.x == 0) {
      const float log_d = logf(st[1]);
      stats.lse[e] = LogSumExp{st[0], log_d};
      entropy[e] = log_d - st[2] / st[1];
      top[e] = 1.f / st[1];  // max_c p_k,c = exp(m − lse) = 1 / d
    }
  }
  block_allreduce(bad, SumOp());
  if (threadIdx.x == 0) stats.bad = bad[0];
  __syncthreads();
  if (threadIdx.x == 0) {
    set_mixture(f, n, entropy, top, stats);
    for (int e = 0; e < f.num_experts; ++e) f.entropy[n * f.num_experts + e] = entropy[e];
  }
  __syncthreads();
}

// The fused teacher of one row (the Teacher policy of kd_loss_row, see kd_row.cuh).
template <typename T, int KIND, int SPACE>
struct FusedTeacher {
  static constexpr int N = Vec<T>::n;
  static constexpr int grad_stages = SPACE == kProbSpace ? 2 : 1;
  static constexpr bool raw_columns = false;  // its experts are counted by expert_statistics (or the
                                              // merged pass)
  const T* row0;                 // expert 0's row n; expert e at row0 + e · expert_stride
  int64_t expert_stride;
  int num_experts;
  int64_t vocab;
  float temperature, inv_t;
  ExpertStats* stats;            // shared
  T* grad0;                      // grad_experts[0, n, :] or nullptr; expert e at + e · grad_expert_stride
  int64_t grad_expert_stride;
  bool wants_grad;
  float mse_coef;                // grad_scale · row_weight · kd_scale (mse's Σ g)
  float nan_row;                 // backward: the row's poison, added to every expert gradient
  float inv_vocab;
  LogSumExp fused_lse;           // logit space: of z̄ / T
  float* partial_s;              // prob space: shared [3 · kMaxExperts], the block sums S_k (tvd:
                                 // Σ p_k over p̄ > q, p̄ < q, p̄ = q)
  float s_acc[KIND == kTVD ? 3 * kMaxExperts : kMaxExperts];  // prob space: this thread's part
  // The merged pass (forward, logit space, forward/reverse KL and soft CE, α known before the row is
  // read): every expert's statistics ride along kl_forward_row's one read of the row instead of a
  // pass of their own (expert_statistics): per expert (m, d, w) of this thread's columns, the NaN /
  // +inf count, and where the entropies go.
  bool merged;
  float merged_st[3 * kMaxExperts];
  float merged_bad;
  float* entropy_out;            // entropy[n, :]

  // z̄ = Σ_{α_k>0} α_k z_k for a chunk (−inf where the experts are −inf).
  __device__ void mix_logits(int64_t start, float (&zbar)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) zbar[k] = 0.f;
    for (int e = 0; e < num_experts; ++e) {
      const float a = stats->alpha[e];
      if (!(a > 0.f)) continue;
      const T* row = row0 + e * expert_stride;
      float z[N];
      load_chunk<T, N>(row, start, vocab, aligned16(row), z);
#pragma unroll
      for (int k = 0; k < N; ++k) zbar[k] += a * z[k];
    }
  }

  __device__ float bad_logits() const { return stats->bad; }

  __device__ void zero_grads() {
    if (grad0 == nullptr) return;
    for (int e = 0; e < num_experts; ++e) zero_row(grad0 + e * grad_expert_stride, vocab);
  }

  // Statistics kept between the launches: the fused log-sum-exp, then every expert's (m, log d).
  __device__ void save(float* out) const {
    out[0] = fused_lse.m;
    out[1] = fused_lse.log_d;
    for (int e = 0; e < num_experts; ++e) {
      out[2 + 2 * e] = stats->lse[e].m;
      out[3 + 2 * e] = stats->lse[e].log_d;
    }
  }
  // The experts' part is restored into the shared ExpertStats by restore_expert_statistics.
  __device__ void restore(const float* saved) { fused_lse = LogSumExp{saved[0], saved[1]}; }
  __device__ void set_lse(LogSumExp l) { fused_lse = l; }

  // u = z̄ / T of a chunk (kl_forward_row, logit space); the merged pass reads every expert (α = 0
  // too: its entropy is an output) and pushes its columns into the expert's online statistics.
  __device__ void scaled_logits(int64_t start, float (&u)[N]) {
    if (!merged) {
      mix_logits(start, u);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) u[k] = 0.f;
      for (int e = 0; e < num_experts; ++e) {
        const float a = stats->alpha[e];
        const T* row = row0 + e * expert_stride;
        float z[N];
        load_chunk<T, N>(row, start, vocab, aligned16(row), z);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          if (start + k < vocab) merged_bad += nonfinite(z[k]);
          entropy_push(merged_st[3 * e], merged_st[3 * e + 1], merged_st[3 * e + 2], z[k] * inv_t);
          if (a > 0.f) u[k] += a * z[k];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < N; ++k) u[k] *= inv_t;
  }

  // After kl_forward_row's pass (block-wide): the merged pass's per-expert log-sum-exps, entropies
  // and NaN / +inf count, as expert_statistics would have given them.
  __device__ void after_pass() {
    if (!merged) return;
    block_allreduce(merged_st, EntropyMergeOp());
    float bad[1] = {merged_bad};
    block_allreduce(bad, SumOp());
    if (threadIdx.x == 0) {
      for (int e = 0; e < num_experts; ++e) {
        const float log_d = logf(merged_st[3 * e + 1]);
        stats->lse[e] = LogSumExp{merged_st[3 * e], log_d};
        entropy_out[e] = log_d - merged_st[3 * e + 2] / merged_st[3 * e + 1];
      }
      stats->bad = bad[0];
    }
    __syncthreads();
  }

  __device__ void prepare() {
    if constexpr (SPACE == kLogitSpace) {
      float st[2] = {kNegInf, 0.f};
      for (int64_t c = threadIdx.x; c * N < vocab; c += blockDim.x) {
        float zbar[N];
        mix_logits(c * N, zbar);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          if (c * N + k < vocab) softmax_push(st[0], st[1], zbar[k] * inv_t);
        }
      }
      block_allreduce(st, SoftmaxMergeOp());
      fused_lse = LogSumExp{st[0], logf(st[1])};
    }
  }

  // log p̄ of a chunk and the teacher logits t = T · log p̄.
  __device__ void columns(int64_t start, float (&lp)[N], float (&t)[N]) const {
    if constexpr (SPACE == kLogitSpace) {
      mix_logits(start, lp);
#pragma unroll
      for (int k = 0; k < N; ++k) lp[k] = fused_lse.log_prob(lp[k] * inv_t);
    } else {
      float m[N], d[N];  // online log-sum-exp over the experts, per column
#pragma unroll
      for (int k = 0; k < N; ++k) {
        m[k] = kNegInf;
        d[k] = 0.f;
      }
      for (int e = 0; e < num_experts; ++e) {
        const float la = stats->log_alpha[e];
        if (la == kNegInf) continue;
        const T* row = row0 + e * expert_stride;
        float z[N];
        load_chunk<T, N>(row, start, vocab, aligned16(row), z);
#pragma unroll
        for (int k = 0; k < N; ++k) softmax_push(m[k], d[k], la + stats->lse[e].log_prob(z[k] * inv_t));
      }
#pragma unroll
      for (int k = 0; k < N; ++k) lp[k] = m[k] == kNegInf ? kNegInf : m[k] + logf(d[k]);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) t[k] = temperature * lp[k];
  }

  __device__ void grad_columns(int stage, int64_t start, const float (&lq)[N], const float (&lp)[N],
                               const float (&g)[N], const float (&sums)[kSums]) {
    if constexpr (SPACE == kLogitSpace) {
      // dL/dz̄ = g − p̄ Σ_j g_j; for mse Σ_j g_j = −2 · mse_coef / V · Σ (s − t).
      const float g_sum = KIND == kMSE ? -2.f * mse_coef * inv_vocab * sums[2] : 0.f;
      float gz[N];
#pragma unroll
      for (int k = 0; k < N; ++k) gz[k] = KIND == kMSE ? g[k] - __expf(lp[k]) * g_sum : g[k];
      for (int e = 0; e < num_experts; ++e) {
        const float a = stats->alpha[e];
        float out[N];
#pragma unroll
        for (int k = 0; k < N; ++k) out[k] = (a > 0.f ? a * gz[k] : 0.f) + nan_row;
        T* grow = grad0 + e * grad_expert_stride;
        store_chunk<T, N>(grow, start, vocab, aligned16(grow), out);
      }
    } else {
      prob_grad_columns(stage, start, lq, lp, g);
    }
  }

  // Prob space. Stage 0 accumulates S_k; stage 1 writes dL/dz_k with the block sums S_k.
  __device__ void prob_grad_columns(int stage, int64_t start, const float (&lq)[N], const float (&lp)[N],
                                    const float (&g)[N]) {
    for (int e = 0; e < num_experts; ++e) {
      const float la = stats->log_alpha[e];
      float out[N];
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = 0.f;
      if (la != kNegInf) {
        const T* row = row0 + e * expert_stride;
        float z[N];
        load_chunk<T, N>(row, start, vocab, aligned16(row), z);
        const float scale = stats->alpha[e] * inv_t;
        float chunk_s = 0.f;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float lpk = stats->lse[e].log_prob(z[k] * inv_t);
          const bool live = start + k < vocab && lpk != kNegInf;
          const float ratio = live ? __expf(lpk - lp[k]) : 0.f;  // p_k / p̄ <= 1 / α_k
          const float r = temperature * g[k];                    // dL/d log p̄
          if constexpr (KIND == kTVD) {
            const float sign = tvd_sign(Column{lq[k], lp[k], 0.f, 0.f});
            const float pk = live ? __expf(lpk) : 0.f;
            if (stage == 0) {
              s_acc[(sign > 0.f ? 0 : sign < 0.f ? 1 : 2) * kMaxExperts + e] += pk;
            } else {
              // partial_s = [plus | minus | zero] × kMaxExperts; mse_coef · inv_t = dL/dD / T
              out[k] = stats->alpha[e] * mse_coef * inv_t * pk *
                       tvd_centered(sign, partial_s[e], partial_s[kMaxExperts + e], partial_s[2 * kMaxExperts + e]);
            }
          } else if (stage == 0) {
            chunk_s += ratio * r;
          } else if (live) {
            out[k] = scale * (ratio * r - __expf(lpk) * partial_s[e]);
          }
        }
        s_acc[e] += chunk_s;
      }
      if (stage == 1) {
#pragma unroll
        for (int k = 0; k < N; ++k) out[k] += nan_row;
        T* grow = grad0 + e * grad_expert_stride;
        store_chunk<T, N>(grow, start, vocab, aligned16(grow), out);
      }
    }
  }

  __device__ void between_stages() {
    constexpr int kAcc = (KIND == kTVD ? 3 : 1) * kMaxExperts;
    block_allreduce(s_acc, SumOp());
    if (threadIdx.x == 0) {
      for (int e = 0; e < kAcc; ++e) partial_s[e] = s_acc[e];
    }
    __syncthreads();
  }
};

template <typename T, int KIND, int SPACE>
__device__ void init_teacher(FusedTeacher<T, KIND, SPACE>& t, const FusionArgs& f, int64_t n, int64_t N_rows,
                             int64_t V, float temperature, ExpertStats& stats) {
  t.row0 = static_cast<const T*>(f.experts) + n * f.row_stride;
  t.expert_stride = f.expert_stride;
  t.num_experts = f.num_experts;
  t.vocab = V;
  t.temperature = temperature;
  t.inv_t = 1.f / temperature;
  t.stats = &stats;
  t.grad0 = nullptr;
  t.grad_expert_stride = N_rows * V;
  t.wants_grad = false;
  t.mse_coef = 0.f;
  t.nan_row = 0.f;
  t.inv_vocab = 1.f / static_cast<float>(V);
  t.fused_lse = LogSumExp{0.f, 0.f};
  t.partial_s = nullptr;
#pragma unroll
  for (int e = 0; e < (KIND == kTVD ? 3 : 1) * kMaxExperts; ++e) t.s_acc[e] = 0.f;
  t.merged = false;
  for (int e = 0; e < kMaxExperts; ++e) {
    t.merged_st[3 * e] = kNegInf;
    t.merged_st[3 * e + 1] = 0.f;
    t.merged_st[3 * e + 2] = 0.f;
  }
  t.merged_bad = 0.f;
  t.entropy_out = f.entropy != nullptr ? f.entropy + n * f.num_experts : nullptr;
}

// Backward: α from the forward's output and the experts' log-sum-exps from the row statistics
// (what expert_statistics computed in the forward). Block-wide.
__device__ void restore_expert_statistics(const FusionArgs& f, const float* saved, int64_t n, ExpertStats& stats) {
  if (threadIdx.x == 0) {
    for (int e = 0; e < f.num_experts; ++e) {
      const float a = f.alpha[n * f.num_experts + e];
      stats.alpha[e] = a;
      stats.log_alpha[e] = a > 0.f ? logf(a) : kNegInf;
      stats.lse[e] = LogSumExp{saved[2 * e], saved[2 * e + 1]};
    }
  }
  __syncthreads();
}

template <typename T, int SPACE>
__global__ void __launch_bounds__(kMaxThreads) fuse_experts_kernel(const FuseExpertsArgs a) {
  constexpr int N = Vec<T>::n;
  __shared__ ExpertStats stats;
  const int64_t n = blockIdx.x, V = a.vocab;
  const float inv_t = 1.f / a.temperature;
  const T* row0 = static_cast<const T*>(a.fusion.experts) + n * a.fusion.row_stride;
  expert_statistics<T>(a.fusion, row0, V, inv_t, n, stats);

  FusedTeacher<T, kForwardKL, SPACE> teacher;
  init_teacher(teacher, a.fusion, n, a.n_rows, V, a.temperature, stats);
  teacher.prepare();
  const float nan_row = poison(stats.bad);  // a NaN / +inf logit in any expert: a NaN row
  float* out = a.log_probs + n * V;
  const bool vec_out = (V & 3) == 0 && aligned16(a.log_probs);
  for (int64_t c = threadIdx.x; c * N < V; c += blockDim.x) {
    float lp[N], t[N];
    teacher.columns(c * N, lp, t);
    if (vec_out && c * N + N <= V) {
#pragma unroll
      for (int k = 0; k < N; k += 4)
        *reinterpret_cast<float4*>(out + c * N + k) =
            make_float4(lp[k] + nan_row, lp[k + 1] + nan_row, lp[k + 2] + nan_row, lp[k + 3] + nan_row);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k)
        if (c * N + k < V) out[c * N + k] = lp[k] + nan_row;
    }
  }
}

template <typename T, int KIND, int SPACE, int MODE>
__global__ void __launch_bounds__(kMaxThreads) fused_experts_kd_kernel(const FusedExpertsKDArgs a,
                                                                         const DivergenceConsts consts) {
  __shared__ ExpertStats stats;
  __shared__ float partial_s[3 * kMaxExperts];
  const int64_t n = blockIdx.x, V = a.vocab;
  const float temperature = a.options.temperature;
  const T* row0 = static_cast<const T*>(a.fusion.experts) + n * a.fusion.row_stride;
  float* row_stats = a.stats + n * kFusedRowStats;
  // Logit space, forward/reverse KL and soft CE: log-sum-exps and D in one read of the row
  // (kl_forward_row); with α known before the row is read, the experts' statistics join that read.
  constexpr bool kOnePass = MODE == kForwardStats && SPACE == kLogitSpace &&
                            (KIND == kForwardKL || KIND == kSoftCE || KIND == kReverseKL);
  const bool ignored = a.labels != nullptr && a.labels[n] == a.options.ignore_index;
  const bool merged = kOnePass && known_alpha(a.fusion) && !ignored;
  if constexpr (MODE == kForwardStats) {
    if (merged) {
      if (threadIdx.x == 0) set_mixture(a.fusion, n, nullptr, nullptr, stats);
      __syncthreads();
    } else {
      expert_statistics<T>(a.fusion, row0, V, 1.f / temperature, n, stats);
    }
  } else {
    restore_expert_statistics(a.fusion, row_stats + kTeacherStats + 2, n, stats);
  }

  KDRow<T> r;
  r.student = static_cast<const T*>(a.student) + n * a.student_row_stride;
  r.grad_student = grad_row(a.grad_student, dtype_of<T>(), n, V);
  r.vocab = V;
  r.options = a.options;
  r.consts = consts;
  r.has_label = a.labels != nullptr;
  r.label = r.has_label ? a.labels[n] : 0;
  r.row_weight = a.row_weights != nullptr ? a.row_weights[n] : 1.f;
  r.grad_scale = MODE == kBackwardFromStats ? a.grad_scale[n * a.grad_scale_stride] : 0.f;
  r.row_loss = a.row_loss + n;
  r.stats = row_stats;

  FusedTeacher<T, KIND, SPACE> teacher;
  init_teacher(teacher, a.fusion, n, a.n_rows, V, temperature, stats);
  if (MODE == kBackwardFromStats && a.grad_experts != nullptr) {
    teacher.grad0 = static_cast<T*>(a.grad_experts) + n * V;
    teacher.wants_grad = true;
    teacher.mse_coef = r.grad_scale * r.row_weight * a.options.kd_scale;
    teacher.nan_row = row_stats[kPoisonStat];
    teacher.partial_s = partial_s;
  }
  teacher.merged = merged;
  if constexpr (kOnePass) {
    kl_forward_row<T, KIND>(r, teacher);
  } else {
    kd_loss_row<T, KIND, MODE>(r, teacher);
  }
}

// Threads per row: the K-expert passes do K loads per chunk, so use the row width.
int fusion_threads(int64_t vocab, int vec) { return row_threads((vocab + vec - 1) / vec); }

}  // namespace
}  // namespace kdengine

extern "C" const char* kdengine_fuse_experts(const kdengine::FuseExpertsArgs* args, int dtype, void* stream) {
  using namespace kdengine;
  const FuseExpertsArgs a = *args;
  if (a.n_rows == 0) return nullptr;
  if (a.vocab <= 0 || a.fusion.num_experts < 1 || a.fusion.num_experts > kMaxExperts)
    return launch_status(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = KDENGINE_DISPATCH_DTYPE(dtype, [&] {
    const int threads = fusion_threads(a.vocab, Vec<scalar_t>::n);
    const unsigned grid = static_cast<unsigned>(a.n_rows);
    if (a.fusion.space == kLogitSpace) {
      fuse_experts_kernel<scalar_t, kLogitSpace><<<grid, threads, 0, s>>>(a);
    } else {
      fuse_experts_kernel<scalar_t, kProbSpace><<<grid, threads, 0, s>>>(a);
    }
    return cudaGetLastError();
  });
  return launch_status(err);
}

extern "C" const char* kdengine_fused_experts_kd_rows(const kdengine::FusedExpertsKDArgs* args, int dtype,
                                                      void* stream) {
  using namespace kdengine;
  const FusedExpertsKDArgs a = *args;
  if (a.n_rows == 0) return nullptr;
  if (a.vocab <= 0 || a.fusion.num_experts < 1 || a.fusion.num_experts > kMaxExperts)
    return launch_status(cudaErrorInvalidValue);
  const DivergenceConsts consts = divergence_consts(a.options, a.vocab);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = KDENGINE_DISPATCH_DTYPE(dtype, [&] {
    const int threads = fusion_threads(a.vocab, Vec<scalar_t>::n);
    const unsigned grid = static_cast<unsigned>(a.n_rows);
    return KDENGINE_DISPATCH_DIVERGENCE(a.options.divergence, [&] {
      const bool logit = a.fusion.space == kLogitSpace;
      if (a.mode == kForwardStats && logit) {
        fused_experts_kd_kernel<scalar_t, KIND, kLogitSpace, kForwardStats><<<grid, threads, 0, s>>>(a, consts);
      } else if (a.mode == kForwardStats) {
        fused_experts_kd_kernel<scalar_t, KIND, kProbSpace, kForwardStats><<<grid, threads, 0, s>>>(a, consts);
      } else if (logit) {
        fused_experts_kd_kernel<scalar_t, KIND, kLogitSpace, kBackwardFromStats><<<grid, threads, 0, s>>>(a, consts);
      } else {
        fused_experts_kd_kernel<scalar_t, KIND, kProbSpace, kBackwardFromStats><<<grid, threads, 0, s>>>(a, consts);
      }
      return cudaGetLastError();
    });
  });
  return launch_status(err);
}
