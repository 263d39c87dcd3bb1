// The row driver of the distillation loss (nvcc only), shared by kd_loss.cu (plain teacher logits)
// and fuse_experts.cu (a fusion of K experts).
#pragma once

#include "divergence.cuh"

namespace kdengine {

// ---------------------------------------------------------------------------------------------
// One row of the distillation loss, run by a whole thread block (kdengine/ops/kd_loss.py), in two
// launches (recompute-in-backward). The teacher side is a policy so that the same driver serves
// plain teacher logits (kd_loss.cu) and a fusion of K experts (fuse_experts.cu). MODE (RowMode):
//   kForwardStats       row loss + the row statistics (passes: teacher.prepare, student
//                       log-sum-exps, then the divergence sums)
//   kBackwardFromStats  the gradients of Σ grad_scale · row_loss from the statistics: one pass
//                       (two when the teacher's gradient needs a row sum of its own, grad_stages 2)
// A Teacher provides:
//   static constexpr int N;                               columns per chunk (the driver reads the
//                                                         student in chunks of the same width)
//   bool wants_grad;                                      gradient w.r.t. the teacher asked for
//   static constexpr int grad_stages;                     1, or 2 when its gradient needs a row
//                                                         sum of the first stage (prob fusion)
//   void zero_grads();                                    ignored row: zero its gradients
//   void prepare();                                       block-wide teacher statistics (forward)
//   void save(float*) / void restore(const float*);       its statistics at stats + kTeacherStats
//   void columns(start, float (&lp)[N], float (&t)[N]);   log p at T and the teacher logits t
//   void grad_columns(stage, start, lq, lp, g, sums);     g = dL/dt of the chunk (row scale in)
//   void between_stages();                                block-wide, after stage 0
//   static constexpr bool raw_columns;                    columns()/scaled_logits() return the
//                                                         input logits (the driver counts their
//                                                         NaN / +inf), else:
//   float bad_logits() const;                             its own count of NaN / +inf logits
//                                                         (block-uniform, forward)
// and, for kl_forward_row, scaled_logits(start, float (&u)[N]) (u = t / T), after_pass() (block-wide,
// once the row has been read) and set_lse(LogSumExp).
// ---------------------------------------------------------------------------------------------
template <typename T>  // the student's element type
struct KDRow {
  const T* student;          // row of [N, V] logits, unit column stride
  GradRow grad_student;      // its gradient row, in the dtype asked for (device.cuh), or null
  int64_t vocab;
  KDLossOptions options;
  DivergenceConsts consts;
  bool has_label;
  int64_t label;
  float row_weight;
  float grad_scale;          // backward: dL/d(row_loss)
  float* row_loss;           // &row_loss[n] (forward)
  float* stats;              // &stats[n, 0]
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

// Row statistics of the forward (thread 0): student log-sum-exps, the sums, the poison, then the
// teacher's.
template <typename T, typename Teacher>
__device__ __forceinline__ void save_row_stats(const KDRow<T>& r, const Teacher& teacher, LogSumExp lse_q,
                                               float lse_hard, const float (&sums)[kSums], float nan_row) {
  r.stats[0] = lse_q.m;
  r.stats[1] = lse_q.log_d;
  r.stats[2] = lse_hard;
  for (int i = 0; i < kSums; ++i) r.stats[3 + i] = sums[i];
  r.stats[kPoisonStat] = nan_row;
  teacher.save(r.stats + kTeacherStats);
}

// The row's poison (divergence.cuh) from this thread's count of NaN / +inf logits. Block-wide.
template <typename Teacher>
__device__ __forceinline__ float row_poison(float count, const Teacher& teacher) {
  float bad[1] = {count};
  block_allreduce(bad, SumOp());
  if constexpr (!Teacher::raw_columns) bad[0] += teacher.bad_logits();
  return poison(bad[0]);
}

template <typename T, int KIND, int MODE, typename Teacher>
__device__ void kd_loss_row(const KDRow<T>& r, Teacher& teacher) {
  constexpr int N = Teacher::N;
  const int64_t V = r.vocab;
  const KDLossOptions& o = r.options;
  if (r.has_label && r.label == o.ignore_index) {
    if constexpr (MODE == kBackwardFromStats) {
      if (r.grad_student) r.grad_student.zero(V);
      teacher.zero_grads();
    } else {
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
#pragma unroll
    for (int i = 0; i < kSums; ++i) sums[i] = r.stats[3 + i];
    teacher.restore(r.stats + kTeacherStats);
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

  if constexpr (MODE == kForwardStats) {
    // Pass 2: the row sums (D and the auxiliary sums), and the count of NaN / +inf logits.
    float bad = 0.f;
    for (int64_t c = threadIdx.x; c * N < V; c += blockDim.x) {
      float s[N], lp[N], t[N];
      load_chunk<T, N>(r.student, c * N, V, vec_s, s);
      teacher.columns(c * N, lp, t);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (c * N + k < V) {
          bad += nonfinite(s[k]) + (Teacher::raw_columns ? nonfinite(t[k]) : 0.f);
          divergence_terms<KIND>(Column{lse_q.log_prob(s[k] * inv_t), lp[k], s[k], t[k]}, r.consts, sums);
        }
      }
    }
    block_allreduce(sums, SumOp());
    finish_sums<KIND>(sums);
    const float nan_row = row_poison(bad, teacher);
    if (threadIdx.x == 0) {
      *r.row_loss = r.row_weight * (o.kd_scale * sums[0] + o.hard_weight * ce) + nan_row;
      save_row_stats(r, teacher, lse_q, lse_hard, sums, nan_row);
    }
  } else {
    const bool need_gs = static_cast<bool>(r.grad_student), need_gt = teacher.wants_grad;
    // dL/dlogit = dL/d(row_loss) · row_weight · kd_scale · (1/T unless mse) · dD/du  (+ hard term).
    const float c_row = r.grad_scale * r.row_weight;
    const float coef = c_row * o.kd_scale * (KIND == kMSE ? 1.f : inv_t);
    const float c_hard = c_row * o.hard_weight;
    const float nan_row = r.stats[kPoisonStat];  // NaN gradients for a row with a NaN / +inf logit
    auto grad_pass = [&](int stage) {
      for (int64_t c = threadIdx.x; c * N < V; c += blockDim.x) {
        const int64_t start = c * N;
        float s[N], lp[N], t[N], gs[N], gt[N], lq[N];
        load_chunk<T, N>(r.student, start, V, vec_s, s);
        teacher.columns(start, lp, t);
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
            gs[k] += nan_row;
            gt[k] = coef * divergence_grad_teacher<KIND>(col, r.consts, sums) + nan_row;
          }
        }
        if (need_gs && stage == 0) r.grad_student.store(start, V, gs);
        if (need_gt) teacher.grad_columns(stage, start, lq, lp, gt, sums);
      }
    };
    grad_pass(0);
    if constexpr (Teacher::grad_stages == 2) {
      if (need_gt) {
        teacher.between_stages();
        grad_pass(1);
      }
    }
  }
}

// The forward of forward_kl / soft_ce / reverse_kl in one read of both rows (kForwardStats; the
// backward is kd_loss_row's): online log-sum-exps of u_s = s/T, u_t = t/T (teacher.scaled_logits;
// and s at T = 1 for a hard label when T != 1) and, relative to the running max of the weights' logits,
//   forward_kl  acc = Σ e_t (u_t − u_s):  D = acc / d_t − lse_t + lse_s
//   soft_ce     acc = Σ e_t u_s:          D = lse_s − acc / d_t
//   reverse_kl  acc = Σ e_s (u_s − u_t):  D = acc / d_s − lse_s + lse_t
// Writes the row loss and the same statistics as kd_loss_row's forward.
template <typename T, int KIND, typename Teacher>
__device__ void kl_forward_row(const KDRow<T>& r, Teacher& teacher) {
  constexpr int N = Teacher::N;
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
  const bool vec_s = aligned16(r.student);
  float st[7] = {kNegInf, 0.f, kNegInf, 0.f, kNegInf, 0.f, 0.f};
  float bad = 0.f;  // NaN / +inf logits (divergence.cuh)
  for (int64_t c = threadIdx.x; c * N < V; c += blockDim.x) {
    float s[N], ut[N];
    load_chunk<T, N>(r.student, c * N, V, vec_s, s);
    teacher.scaled_logits(c * N, ut);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (c * N + k < V) bad += nonfinite(s[k]) + (Teacher::raw_columns ? nonfinite(ut[k]) : 0.f);
      const float us = s[k] * inv_t;
      if constexpr (KIND == kReverseKL) {
        weighted_push(st[0], st[1], st[6], us, us - ut[k]);
        softmax_push(st[2], st[3], ut[k]);
      } else {
        softmax_push(st[0], st[1], us);
        weighted_push(st[2], st[3], st[6], ut[k], KIND == kForwardKL ? ut[k] - us : us);
      }
      if (own_t1) softmax_push(st[4], st[5], s[k]);
    }
  }
  teacher.after_pass();
  block_allreduce(st, KLMergeOp<W>());
  const float nan_row = row_poison(bad, teacher);
  if (threadIdx.x != 0) return;
  const LogSumExp lse_s{st[0], logf(st[1])}, lse_t{st[2], logf(st[3])};
  float sums[kSums] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // sums[0] = D: the KL family's only row sum
  if constexpr (KIND == kForwardKL) {
    sums[0] = st[6] / st[3] + (lse_s.m - lse_t.m) + (lse_s.log_d - lse_t.log_d);
  } else if constexpr (KIND == kSoftCE) {
    sums[0] = lse_s.value() - st[6] / st[3];
  } else {
    sums[0] = st[6] / st[1] + (lse_t.m - lse_s.m) + (lse_t.log_d - lse_s.log_d);
  }
  const float lse_hard = own_t1 ? st[4] + logf(st[5]) : lse_s.value();
  int64_t label;
  bool bad_label;
  const float ce = hard_label_ce(r, lse_hard, hard, label, bad_label);
  *r.row_loss = r.row_weight * (o.kd_scale * sums[0] + o.hard_weight * ce) + nan_row;
  teacher.set_lse(lse_t);
  save_row_stats(r, teacher, lse_s, lse_hard, sums, nan_row);
}

}  // namespace kdengine
