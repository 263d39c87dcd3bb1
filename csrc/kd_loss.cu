// kd_loss, recompute-in-backward (kdengine/ops/kd_loss.py): the forward launch writes the row
// losses and per-row statistics only; the backward launch reads the logits again and writes the
// gradients already multiplied by dL/d(row_loss), in fp32, rounded once into the input dtype.
//
// One thread block per row. Traffic per row, in passes over [V] of the input dtype:
//   forward  forward_kl / soft_ce / reverse_kl: 2 (student and teacher read once: log-sum-exps
//            and D in one online pass, kl_forward_row); jsd / tvd: 4 (teacher log-sum-exp,
//            student log-sum-exp, then the row sums); mse: 2 (+1 with a hard label).
//   backward 2 reads + 1 write per gradient asked for (kd_loss_row, kBackwardFromStats).
// Nothing [N, V]-sized is allocated besides the gradients themselves.
#include "kd_row.cuh"

namespace kdengine {
namespace {

// The teacher of kd_loss: plain logits, p = softmax(t / T).
template <typename T, int KIND>
struct LogitTeacher {
  static constexpr int N = Vec<T>::n;
  const T* row;
  T* grad;            // contiguous row or nullptr
  int64_t vocab;
  float inv_t;
  bool wants_grad;
  bool grad_needs_sums = false;
  LogSumExp lse;      // of t / T; unused by mse

  __device__ void zero_grads() {
    if (grad != nullptr) zero_row(grad, vocab);
  }

  __device__ void prepare() {
    if (KIND == kMSE) return;
    float st[2] = {kNegInf, 0.f};
    const bool vec = aligned16(row);
    for (int64_t c = threadIdx.x; c * N < vocab; c += blockDim.x) {
      float t[N];
      load_chunk<T, N>(row, c * N, vocab, vec, t);
#pragma unroll
      for (int k = 0; k < N; ++k) softmax_push(st[0], st[1], t[k] * inv_t);
    }
    block_allreduce(st, SoftmaxMergeOp());
    lse = LogSumExp{st[0], logf(st[1])};
  }

  __device__ void save(float* out) const {
    out[0] = lse.m;
    out[1] = lse.log_d;
  }
  __device__ void restore(const float* saved) { lse = LogSumExp{saved[0], saved[1]}; }

  __device__ void columns(int64_t start, float (&lp)[N], float (&t)[N]) const {
    load_chunk<T, N>(row, start, vocab, aligned16(row), t);
#pragma unroll
    for (int k = 0; k < N; ++k) lp[k] = lse.log_prob(t[k] * inv_t);  // −inf stays −inf
  }

  __device__ void grad_columns(int, int64_t start, const float (&)[N], const float (&)[N], const float (&g)[N],
                               const float (&)[kSums]) {
    store_chunk<T, N>(grad, start, vocab, aligned16(grad), g);
  }
};

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

// The forward of forward_kl / soft_ce / reverse_kl in one read of both rows: online log-sum-exps
// of u_s = s/T, u_t = t/T (and s at T = 1 for a hard label when T != 1) and, relative to the
// running max of the weights' logits,
//   forward_kl  acc = Σ e_t (u_t − u_s):  D = acc / d_t − lse_t + lse_s
//   soft_ce     acc = Σ e_t u_s:          D = lse_s − acc / d_t
//   reverse_kl  acc = Σ e_s (u_s − u_t):  D = acc / d_s − lse_s + lse_t
// Writes the row loss and the statistics the backward (kBackwardFromStats) reads.
template <typename T, int KIND>
__device__ void kl_forward_row(const KDRow<T>& r, const T* teacher_row) {
  constexpr int N = Vec<T>::n;
  constexpr int W = KIND == kReverseKL ? 0 : 2;
  const int64_t V = r.vocab;
  const KDLossOptions& o = r.options;
  if (r.has_label && r.label == o.ignore_index) {
    if (threadIdx.x == 0) *r.row_loss = 0.f;
    return;
  }
  const float inv_t = 1.f / o.temperature;
  const bool hard = r.has_label && o.hard_weight != 0.f;
  const bool own_t1 = hard && o.temperature != 1.f;
  const bool vec_s = aligned16(r.student), vec_t = aligned16(teacher_row);
  float st[7] = {kNegInf, 0.f, kNegInf, 0.f, kNegInf, 0.f, 0.f};
  for (int64_t c = threadIdx.x; c * N < V; c += blockDim.x) {
    float s[N], t[N];
    load_chunk<T, N>(r.student, c * N, V, vec_s, s);
    load_chunk<T, N>(teacher_row, c * N, V, vec_t, t);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float us = s[k] * inv_t, ut = t[k] * inv_t;
      if constexpr (KIND == kReverseKL) {
        weighted_push(st[0], st[1], st[6], us, us - ut);
        softmax_push(st[2], st[3], ut);
      } else {
        softmax_push(st[0], st[1], us);
        weighted_push(st[2], st[3], st[6], ut, KIND == kForwardKL ? ut - us : us);
      }
      if (own_t1) softmax_push(st[4], st[5], s[k]);
    }
  }
  block_allreduce(st, KLMergeOp<W>());
  if (threadIdx.x != 0) return;
  const LogSumExp lse_s{st[0], logf(st[1])}, lse_t{st[2], logf(st[3])};
  float d;
  if constexpr (KIND == kForwardKL) {
    d = st[6] / st[3] + (lse_s.m - lse_t.m) + (lse_s.log_d - lse_t.log_d);
  } else if constexpr (KIND == kSoftCE) {
    d = lse_s.value() - st[6] / st[3];
  } else {
    d = st[6] / st[1] + (lse_t.m - lse_s.m) + (lse_t.log_d - lse_s.log_d);
  }
  const float lse_hard = own_t1 ? st[4] + logf(st[5]) : lse_s.value();
  int64_t label;
  bool bad_label;
  const float ce = hard_label_ce(r, lse_hard, hard, label, bad_label);
  *r.row_loss = r.row_weight * (o.kd_scale * d + o.hard_weight * ce);
  r.stats[0] = lse_s.m;
  r.stats[1] = lse_s.log_d;
  r.stats[2] = lse_hard;
  r.stats[3] = lse_t.m;
  r.stats[4] = lse_t.log_d;
  r.stats[5] = d;  // sums[0] = D: the only row sum of the KL family's gradients
  for (int i = 1; i < kSums; ++i) r.stats[5 + i] = 0.f;
}

template <typename T, int KIND, int MODE>
__global__ void __launch_bounds__(kMaxThreads) kd_loss_kernel(const KDLossRowsArgs a, const DivergenceConsts consts) {
  const int64_t n = blockIdx.x;
  const int64_t V = a.vocab;
  KDRow<T> r;
  r.student = static_cast<const T*>(a.student) + n * a.student_row_stride;
  r.grad_student = a.grad_student != nullptr ? static_cast<T*>(a.grad_student) + n * V : nullptr;
  r.vocab = V;
  r.options = a.options;
  r.consts = consts;
  r.has_label = a.labels != nullptr;
  r.label = r.has_label ? a.labels[n] : 0;
  r.row_weight = a.row_weights != nullptr ? a.row_weights[n] : 1.f;
  r.grad_scale = MODE == kBackwardFromStats ? a.grad_scale[n * a.grad_scale_stride] : 0.f;
  r.row_loss = a.row_loss + n;
  r.stats = a.stats + n * kRowStats;
  const T* teacher_row = static_cast<const T*>(a.teacher) + n * a.teacher_row_stride;
  if constexpr (MODE == kForwardStats && (KIND == kForwardKL || KIND == kSoftCE || KIND == kReverseKL)) {
    kl_forward_row<T, KIND>(r, teacher_row);
  } else {
    LogitTeacher<T, KIND> teacher;
    teacher.row = teacher_row;
    teacher.grad = a.grad_teacher != nullptr ? static_cast<T*>(a.grad_teacher) + n * V : nullptr;
    teacher.vocab = V;
    teacher.inv_t = 1.f / a.options.temperature;
    teacher.wants_grad = a.grad_teacher != nullptr;
    kd_loss_row<T, KIND, MODE>(r, teacher);
  }
}

}  // namespace
}  // namespace kdengine

extern "C" const char* kdengine_kd_loss_rows(const kdengine::KDLossRowsArgs* args, int dtype, void* stream) {
  using namespace kdengine;
  const KDLossRowsArgs a = *args;
  if (a.n_rows == 0) return nullptr;
  if (a.vocab <= 0 || (a.mode != kForwardStats && a.mode != kBackwardFromStats))
    return launch_status(cudaErrorInvalidValue);
  const DivergenceConsts consts = divergence_consts(a.options, a.vocab);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = KDENGINE_DISPATCH_DTYPE(dtype, [&] {
    const int threads = row_threads((a.vocab + Vec<scalar_t>::n - 1) / Vec<scalar_t>::n);
    const unsigned grid = static_cast<unsigned>(a.n_rows);
    return KDENGINE_DISPATCH_DIVERGENCE(a.options.divergence, [&] {
      if (a.mode == kForwardStats) {
        kd_loss_kernel<scalar_t, KIND, kForwardStats><<<grid, threads, 0, s>>>(a, consts);
      } else {
        kd_loss_kernel<scalar_t, KIND, kBackwardFromStats><<<grid, threads, 0, s>>>(a, consts);
      }
      return cudaGetLastError();
    });
  });
  return launch_status(err);
}
