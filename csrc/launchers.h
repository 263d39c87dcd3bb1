// The launcher interface of kdengine._C (plain C++, also read by bindings.cpp). Each .cu file
// exposes `extern "C"` launchers that take raw pointers, sizes, row strides (in elements), dtype
// codes (an argument, or fields of the args struct) and a cudaStream_t passed as `void*`. They
// return nullptr on success, or the CUDA error string of the failed launch (cudaGetLastError is
// checked after every launch). bindings.cpp, the only torch-facing file, checks the tensors,
// allocates the outputs and calls these launchers, so it needs no CUDA header at all.
//
// The device side is split by concern, each header including the one before it:
//   device.cuh      dtype dispatch, launch status, element conversion, vector row IO and
//                   gradient rows of a run-time dtype
//   reduce.cuh      block-wide reductions, online softmax / entropy, LogSumExp
//   divergence.cuh  the divergence math per column (the one CUDA divergence core)
//   kd_row.cuh      the row driver of the distillation loss (kd_loss.cu, fuse_experts.cu)
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

// The two launches of a loss (recompute-in-backward), run by the row driver kd_loss_row.
enum RowMode : int {
  kForwardStats = 1,       // row loss and the row statistics, no gradient
  kBackwardFromStats = 2,  // the gradients, re-reading the logits, from the statistics
};

// Per-row statistics written by the forward and read by the backward (fp32): the student's
// log-sum-exp at T (m, log d) and at T = 1 (hard label), the divergence row sums (see
// divergence_terms), the row's poison (NaN when it holds a NaN or +inf logit, else 0), then the
// teacher's own from kTeacherStats on: kd_loss's teacher log-sum-exp (m, log d); fused experts'
// fused log-sum-exp (logit space) and every expert's.
constexpr int kSums = 8;
constexpr int kPoisonStat = 3 + kSums;
constexpr int kTeacherStats = kPoisonStat + 1;
constexpr int kRowStats = kTeacherStats + 2;
constexpr int kFusedRowStats = kTeacherStats + 2 + 2 * kMaxExperts;

// kd_loss, recompute-in-backward. Inputs [N, V] with unit column stride, each in its own dtype
// (the same on both sides, or one side fp32). The forward (mode kForwardStats) writes row_loss and
// stats; the backward (kBackwardFromStats) reads the logits and stats again and writes contiguous
// [N, V] gradients, each in its own dtype: those of Σ_n grad_scale[n · grad_scale_stride] ·
// row_loss[n], computed in fp32 and rounded once.
struct KDLossRowsArgs {
  const void* student;        // [N, V] logits
  int64_t student_row_stride;
  int student_dtype;          // DType
  const void* teacher;        // [N, V] logits
  int64_t teacher_row_stride;
  int teacher_dtype;          // DType: student_dtype, or either of them kFloat32
  const int64_t* labels;      // [N] or nullptr
  const float* row_weights;   // [N] or nullptr
  int mode;                   // RowMode: kForwardStats or kBackwardFromStats
  float* stats;               // [N, kRowStats] fp32: written by the forward, read by the backward
  const float* grad_scale;    // backward: dL/d(row_loss), read on the device (no host sync)
  int64_t grad_scale_stride;  // 0 (one value for every row) or 1 ([N])
  float* row_loss;            // [N] out (forward)
  void* grad_student;         // [N, V] out or nullptr (backward)
  int grad_student_dtype;     // DType of grad_student
  void* grad_teacher;         // [N, V] out or nullptr (backward)
  int grad_teacher_dtype;     // DType of grad_teacher
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

// fused_experts_kd_loss, recompute-in-backward: kd_loss against the fused teacher. The forward
// (kForwardStats) writes row_loss, fusion.alpha / fusion.entropy and stats; the backward
// (kBackwardFromStats) reads α (fusion.alpha) and stats and writes the gradients of
// Σ_n grad_scale[n · grad_scale_stride] · row_loss[n] to the student (contiguous [N, V]) and to
// every expert (contiguous [K, N, V]), α constant.
struct FusedExpertsKDArgs {
  FusionArgs fusion;
  const void* student;        // [N, V] logits, same dtype as the experts
  int64_t student_row_stride;
  const int64_t* labels;
  const float* row_weights;
  int mode;                   // RowMode
  float* stats;               // [N, kFusedRowStats] fp32
  const float* grad_scale;    // backward: dL/d(row_loss)
  int64_t grad_scale_stride;  // 0 or 1
  float* row_loss;            // [N] out (forward)
  void* grad_student;         // out or nullptr (backward)
  void* grad_experts;         // out or nullptr (backward)
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
const char* kdengine_kd_loss_rows(const kdengine::KDLossRowsArgs* args, void* stream);
const char* kdengine_fuse_experts(const kdengine::FuseExpertsArgs* args, int dtype, void* stream);
const char* kdengine_fused_experts_kd_rows(const kdengine::FusedExpertsKDArgs* args, int dtype, void* stream);
const char* kdengine_expert_batch_embed(const kdengine::ExpertBatchEmbedArgs* args, int dtype, void* stream);
const char* kdengine_expert_batch_embed_backward(const kdengine::ExpertBatchEmbedBackwardArgs* args, int dtype,
                                                 void* stream);
}
