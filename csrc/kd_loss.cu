// kd_loss rows primitive: temperature softmax of student and teacher fused with the divergence,
// row losses and the gradients of Σ row_loss · grad_scale in one launch (kdengine/ops/kd_loss.py).
//
// One thread block per row. Per row: teacher log-sum-exp (online max + rescaled sum), student
// log-sum-exp (and at T = 1 for the hard label), then one pass for the divergence sums (writing
// the gradients in that same pass when they need no row sum, e.g. forward KL's q − p), and a
// third pass for the gradients that do. Nothing [N, V]-sized in fp32 is allocated.
#include "common.cuh"

namespace kdengine {
namespace {

// The teacher of kd_loss: plain logits, p = softmax(t / T).
template <typename T, int KIND>
struct LogitTeacher {
  static constexpr int N = Vec<T>::n;
  static constexpr int grad_stages = 1;
  const T* row;
  T* grad;            // contiguous row or nullptr
  int64_t vocab;
  float inv_t;
  bool wants_grad;
  bool grad_needs_sums = false;
  float lse = 0.f;    // log Σ exp(t / T); unused by mse

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
    lse = st[0] + logf(st[1]);
  }

  __device__ void columns(int64_t start, float (&lp)[N], float (&t)[N]) const {
    load_chunk<T, N>(row, start, vocab, aligned16(row), t);
#pragma unroll
    for (int k = 0; k < N; ++k) lp[k] = t[k] * inv_t - lse;  // −inf stays −inf
  }

  __device__ void grad_columns(int, int64_t start, const float (&)[N], const float (&g)[N], const float (&)[3]) {
    store_chunk<T, N>(grad, start, vocab, aligned16(grad), g);
  }

  __device__ void between_stages() {}
};

template <typename T, int KIND>
__global__ void __launch_bounds__(kMaxThreads) kd_loss_rows_kernel(const KDLossRowsArgs a, const DivergenceConsts consts) {
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
  r.grad_scale = *a.grad_scale;
  r.row_loss = a.row_loss + n;

  LogitTeacher<T, KIND> teacher;
  teacher.row = static_cast<const T*>(a.teacher) + n * a.teacher_row_stride;
  teacher.grad = a.grad_teacher != nullptr ? static_cast<T*>(a.grad_teacher) + n * V : nullptr;
  teacher.vocab = V;
  teacher.inv_t = 1.f / a.options.temperature;
  teacher.wants_grad = a.grad_teacher != nullptr;
  kd_loss_row<T, KIND>(r, teacher);
}

}  // namespace
}  // namespace kdengine

extern "C" const char* kdengine_kd_loss_rows(const kdengine::KDLossRowsArgs* args, int dtype, void* stream) {
  using namespace kdengine;
  const KDLossRowsArgs a = *args;
  if (a.n_rows == 0) return nullptr;
  if (a.vocab <= 0) return launch_status(cudaErrorInvalidValue);
  const DivergenceConsts consts = divergence_consts(a.options, a.vocab);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = KDENGINE_DISPATCH_DTYPE(dtype, [&] {
    const int threads = row_threads((a.vocab + Vec<scalar_t>::n - 1) / Vec<scalar_t>::n);
    return KDENGINE_DISPATCH_DIVERGENCE(a.options.divergence, [&] {
      kd_loss_rows_kernel<scalar_t, KIND><<<static_cast<unsigned>(a.n_rows), threads, 0, s>>>(a, consts);
      return cudaGetLastError();
    });
  });
  return launch_status(err);
}
