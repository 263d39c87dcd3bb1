// kd_loss, recompute-in-backward (kdengine/ops/kd_loss.py): the forward launch writes the row
// losses and per-row statistics only; the backward launch reads the logits again and writes the
// gradients already multiplied by dL/d(row_loss), in fp32, rounded once into the dtype asked for.
//
// Dtypes. The student and teacher logits are read in their own dtypes: the same dtype on both
// sides, or one side fp32 (linear_kd_loss's fp32 chunk logits against bf16 teacher logits: no
// fp32 copy of the teacher). The kernels are templated on that pair (7 pairs × 6 divergences × 2
// modes); a chunk is one 16-byte vector of the wider type. Each gradient is written in a dtype
// chosen at run time (GradRow, device.cuh: a block-uniform switch per store), by default its
// logits' and for linear_kd_loss the hidden states' (bf16 gradients of fp32 logits, written
// directly): templating on the gradient types as well would multiply the instantiations by 9 for
// a branch that costs nothing next to the memory traffic.
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

// The teacher of kd_loss: plain logits of type T next to a student of type S, p = softmax(t / T).
template <typename S, typename T, int KIND>
struct LogitTeacher {
  static constexpr int N = pair_width<S, T>();
  static constexpr int grad_stages = 1;
  static constexpr bool raw_columns = true;  // the driver counts its NaN / +inf logits
  const T* row;
  GradRow grad;       // its gradient row, in the dtype asked for, or null
  int64_t vocab;
  float inv_t;
  bool wants_grad;
  LogSumExp lse;      // of t / T; unused by mse

  __device__ void zero_grads() {
    if (grad) grad.zero(vocab);
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
  __device__ void set_lse(LogSumExp l) { lse = l; }
  __device__ void after_pass() {}

  // u = t / T of a chunk (kl_forward_row).
  __device__ void scaled_logits(int64_t start, float (&u)[N]) const {
    load_chunk<T, N>(row, start, vocab, aligned16(row), u);
#pragma unroll
    for (int k = 0; k < N; ++k) u[k] *= inv_t;
  }

  __device__ void columns(int64_t start, float (&lp)[N], float (&t)[N]) const {
    load_chunk<T, N>(row, start, vocab, aligned16(row), t);
#pragma unroll
    for (int k = 0; k < N; ++k) lp[k] = lse.log_prob(t[k] * inv_t);  // −inf stays −inf
  }

  __device__ void grad_columns(int, int64_t start, const float (&)[N], const float (&)[N], const float (&g)[N],
                               const float (&)[kSums]) {
    grad.store(start, vocab, g);
  }
};

template <typename S, typename T, int KIND, int MODE>
__global__ void __launch_bounds__(kMaxThreads) kd_loss_kernel(const KDLossRowsArgs a, const DivergenceConsts consts) {
  const int64_t n = blockIdx.x;
  const int64_t V = a.vocab;
  KDRow<S> r;
  r.student = static_cast<const S*>(a.student) + n * a.student_row_stride;
  r.grad_student = grad_row(a.grad_student, a.grad_student_dtype, n, V);
  r.vocab = V;
  r.options = a.options;
  r.consts = consts;
  r.has_label = a.labels != nullptr;
  r.label = r.has_label ? a.labels[n] : 0;
  r.row_weight = a.row_weights != nullptr ? a.row_weights[n] : 1.f;
  r.grad_scale = MODE == kBackwardFromStats ? a.grad_scale[n * a.grad_scale_stride] : 0.f;
  r.row_loss = a.row_loss + n;
  r.stats = a.stats + n * kRowStats;
  LogitTeacher<S, T, KIND> teacher;
  teacher.row = static_cast<const T*>(a.teacher) + n * a.teacher_row_stride;
  teacher.grad = grad_row(a.grad_teacher, a.grad_teacher_dtype, n, V);
  teacher.vocab = V;
  teacher.inv_t = 1.f / a.options.temperature;
  teacher.wants_grad = a.grad_teacher != nullptr;
  if constexpr (MODE == kForwardStats && (KIND == kForwardKL || KIND == kSoftCE || KIND == kReverseKL)) {
    kl_forward_row<S, KIND>(r, teacher);
  } else {
    kd_loss_row<S, KIND, MODE>(r, teacher);
  }
}

}  // namespace
}  // namespace kdengine

extern "C" const char* kdengine_kd_loss_rows(const kdengine::KDLossRowsArgs* args, void* stream) {
  using namespace kdengine;
  const KDLossRowsArgs a = *args;
  if (a.n_rows == 0) return nullptr;
  if (a.vocab <= 0 || (a.mode != kForwardStats && a.mode != kBackwardFromStats))
    return launch_status(cudaErrorInvalidValue);
  const DivergenceConsts consts = divergence_consts(a.options, a.vocab);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = KDENGINE_DISPATCH_DTYPE_PAIR(a.student_dtype, a.teacher_dtype, [&] {
    constexpr int width = pair_width<student_t, teacher_t>();
    const int threads = row_threads((a.vocab + width - 1) / width);
    const unsigned grid = static_cast<unsigned>(a.n_rows);
    return KDENGINE_DISPATCH_DIVERGENCE(a.options.divergence, [&] {
      if (a.mode == kForwardStats) {
        kd_loss_kernel<student_t, teacher_t, KIND, kForwardStats><<<grid, threads, 0, s>>>(a, consts);
      } else {
        kd_loss_kernel<student_t, teacher_t, KIND, kBackwardFromStats><<<grid, threads, 0, s>>>(a, consts);
      }
      return cudaGetLastError();
    });
  });
  return launch_status(err);
}
