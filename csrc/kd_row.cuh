// The row driver of the distillation loss (nvcc only), shared by kd_loss.cu (plain teacher logits)
// and fuse_experts.cu (a fusion of K experts).
#pragma once

#include "divergence.cuh"

namespace kdengine {

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
