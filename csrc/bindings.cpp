// kdengine._C: the only torch-facing file of the CUDA extension.
//
// Each binding checks its tensors (device, dtype, unit stride of the last dimension, shapes;
// ValueError in Python when one is wrong), allocates the outputs and calls an `extern "C"`
// launcher of csrc/*.cu (declared in launchers.h). The CUDA stream comes from Python as an int
// (torch.cuda.current_stream().cuda_stream) and the device guard too
// (`with torch.cuda.device(t.device)`), so no c10/cuda or CUDA header is included here. The
// Python side, with the argument conventions, is kdengine/ops/_cuda.py.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "launchers.h"

namespace {

using at::Tensor;
using std::optional;

#define CHECK_CUDA(x) TORCH_CHECK_VALUE((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK_VALUE((x).device() == (y).device(), #x " is on ", (x).device(), " but " #y " is on ", (y).device())
#define CHECK_DIM(x, n) TORCH_CHECK_VALUE((x).dim() == (n), #x " must be " #n "-D, got shape ", (x).sizes())
// Kernels index the last dimension with unit stride (other strides are passed to the launchers).
#define CHECK_COLUMNS(x)                                                                 \
  TORCH_CHECK_VALUE((x).size(-1) <= 1 || (x).stride(-1) == 1,                           \
                    #x " must have unit stride in its last dimension, got strides ", (x).strides())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DTYPE(x, dtype) \
  TORCH_CHECK_VALUE((x).scalar_type() == (dtype), #x " must be ", (dtype), ", got ", (x).scalar_type())
#define CHECK_LAUNCH(status, what) TORCH_CHECK((status) == nullptr, what " CUDA launch failed: ", (status))

int dtype_code(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kdengine::kFloat32;
    case at::kBFloat16:
      return kdengine::kBFloat16;
    case at::kHalf:
      return kdengine::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// Grid x is the row count.
void check_rows(int64_t n_rows) {
  TORCH_CHECK_VALUE(n_rows < (int64_t{1} << 31), "at most 2^31 - 1 rows per call, got ", n_rows);
}

kdengine::KDLossOptions loss_options(int64_t divergence, double temperature, double jsd_beta, double kd_scale,
                                     double hard_weight, int64_t ignore_index) {
  TORCH_CHECK_VALUE(divergence >= kdengine::kForwardKL && divergence <= kdengine::kMSE,
                    "divergence code must be in [0, 5], got ", divergence);
  TORCH_CHECK_VALUE(temperature > 0.0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(divergence != kdengine::kJSD || (jsd_beta > 0.0 && jsd_beta < 1.0),
                    "jsd_beta must be in (0, 1) for jsd (0 and 1 arrive as forward/reverse KL), got ", jsd_beta);
  kdengine::KDLossOptions o;
  o.divergence = static_cast<int>(divergence);
  o.temperature = static_cast<float>(temperature);
  o.jsd_beta = static_cast<float>(jsd_beta);
  o.kd_scale = static_cast<float>(kd_scale);
  o.hard_weight = static_cast<float>(hard_weight);
  o.ignore_index = ignore_index;
  return o;
}

// labels [N] int64 and row_weights [N] fp32 (both optional, contiguous).
void check_row_inputs(const Tensor& ref, int64_t n_rows, const optional<Tensor>& labels,
                      const optional<Tensor>& row_weights) {
  if (labels) {
    CHECK_SAME_DEVICE(*labels, ref);
    CHECK_DTYPE(*labels, at::kLong);
    CHECK_CONTIGUOUS(*labels);
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == n_rows, "labels must have shape [", n_rows,
                      "], got ", labels->sizes());
  }
  if (row_weights) {
    CHECK_SAME_DEVICE(*row_weights, ref);
    CHECK_DTYPE(*row_weights, at::kFloat);
    CHECK_CONTIGUOUS(*row_weights);
    TORCH_CHECK_VALUE(row_weights->dim() == 1 && row_weights->size(0) == n_rows,
                      "row_weights must have shape [", n_rows, "], got ", row_weights->sizes());
  }
}

// experts [K, N, V] (K <= 16) and the fusion options; fills everything but the outputs.
kdengine::FusionArgs fusion_args(const Tensor& experts, int64_t weighting, int64_t space, double sharpness,
                                 const optional<Tensor>& weights) {
  CHECK_CUDA(experts);
  CHECK_DIM(experts, 3);
  CHECK_COLUMNS(experts);
  const int64_t K = experts.size(0), N = experts.size(1);
  TORCH_CHECK_VALUE(K >= 1 && K <= kdengine::kMaxExperts, "the CUDA fusion kernels take 1 <= K <= ",
                    kdengine::kMaxExperts, " experts, got K=", K);
  TORCH_CHECK_VALUE(weighting >= kdengine::kUniform && weighting <= kdengine::kConfidence,
                    "weighting code must be in [0, 2], got ", weighting);
  TORCH_CHECK_VALUE(space == kdengine::kLogitSpace || space == kdengine::kProbSpace,
                    "space code must be 0 (logit) or 1 (prob), got ", space);
  TORCH_CHECK_VALUE(sharpness > 0.0, "sharpness must be > 0, got ", sharpness);
  kdengine::FusionArgs f{};
  f.experts = experts.data_ptr();
  f.expert_stride = experts.stride(0);
  f.row_stride = experts.stride(1);
  f.num_experts = static_cast<int>(K);
  f.weighting = static_cast<int>(weighting);
  f.space = static_cast<int>(space);
  f.sharpness = static_cast<float>(sharpness);
  if (weights) {
    CHECK_SAME_DEVICE(*weights, experts);
    CHECK_DTYPE(*weights, at::kFloat);
    CHECK_CONTIGUOUS(*weights);
    const bool per_row = weights->dim() == 2;
    TORCH_CHECK_VALUE((weights->dim() == 1 && weights->size(0) == K) ||
                          (per_row && weights->size(0) == N && weights->size(1) == K),
                      "weights must have shape [", K, "] or [", N, ", ", K, "], got ", weights->sizes());
    f.weights = weights->data_ptr<float>();
    f.weights_row_stride = per_row ? K : 0;
  }
  return f;
}

// The student-side launcher arguments of both losses (KDLossRowsArgs, FusedExpertsKDArgs), checked.
template <typename Args>
void fill_student_rows(Args& a, const Tensor& student, const optional<Tensor>& labels,
                       const optional<Tensor>& row_weights, int64_t N, int64_t V, kdengine::KDLossOptions options) {
  check_rows(N);
  TORCH_CHECK_VALUE(V >= 1 || N == 0, "the vocabulary must not be empty");
  check_row_inputs(student, N, labels, row_weights);
  a.student = student.data_ptr();
  a.student_row_stride = student.stride(0);
  a.labels = labels ? labels->data_ptr<int64_t>() : nullptr;
  a.row_weights = row_weights ? row_weights->data_ptr<float>() : nullptr;
  a.n_rows = N;
  a.vocab = V;
  a.options = options;
}

// student / teacher [N, V] CUDA logits, unit column stride, of one dtype or with one side fp32; the
// kd_loss launcher arguments every mode shares.
kdengine::KDLossRowsArgs kd_loss_args(const Tensor& student, const Tensor& teacher, const optional<Tensor>& labels,
                                      const optional<Tensor>& row_weights, int64_t divergence, double temperature,
                                      double jsd_beta, double kd_scale, double hard_weight, int64_t ignore_index) {
  CHECK_CUDA(student);
  CHECK_SAME_DEVICE(teacher, student);
  CHECK_DIM(student, 2);
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher must have the student's shape ",
                    student.sizes(), ", got ", teacher.sizes());
  CHECK_COLUMNS(student);
  CHECK_COLUMNS(teacher);
  kdengine::KDLossRowsArgs a{};
  a.student_dtype = dtype_code(student, "student");
  a.teacher_dtype = dtype_code(teacher, "teacher");
  TORCH_CHECK_VALUE(a.student_dtype == a.teacher_dtype || a.student_dtype == kdengine::kFloat32 ||
                        a.teacher_dtype == kdengine::kFloat32,
                    "student and teacher must share a dtype or one of them be float32, got ", student.scalar_type(),
                    " and ", teacher.scalar_type());
  const int64_t N = student.size(0), V = student.size(1);
  fill_student_rows(a, student, labels, row_weights, N, V,
                    loss_options(divergence, temperature, jsd_beta, kd_scale, hard_weight, ignore_index));
  a.teacher = teacher.data_ptr();
  a.teacher_row_stride = teacher.stride(0);
  return a;
}

std::tuple<Tensor, Tensor> kd_loss_forward(const Tensor& student, const Tensor& teacher,
                                           const optional<Tensor>& labels, const optional<Tensor>& row_weights,
                                           int64_t divergence, double temperature, double jsd_beta, double kd_scale,
                                           double hard_weight, int64_t ignore_index, int64_t stream) {
  kdengine::KDLossRowsArgs a = kd_loss_args(student, teacher, labels, row_weights, divergence, temperature,
                                            jsd_beta, kd_scale, hard_weight, ignore_index);
  Tensor row_loss = at::empty({a.n_rows}, student.options().dtype(at::kFloat));
  Tensor stats = at::zeros({a.n_rows, kdengine::kRowStats}, student.options().dtype(at::kFloat));
  a.mode = kdengine::kForwardStats;
  a.stats = stats.data_ptr<float>();
  a.row_loss = row_loss.data_ptr<float>();
  CHECK_LAUNCH(kdengine_kd_loss_rows(&a, as_stream(stream)), "kd_loss forward");
  return {row_loss, stats};
}

std::tuple<optional<Tensor>, optional<Tensor>> kd_loss_backward(
    const Tensor& student, const Tensor& teacher, const optional<Tensor>& labels,
    const optional<Tensor>& row_weights, const Tensor& stats, const Tensor& scale, int64_t divergence,
    double temperature, double jsd_beta, double kd_scale, double hard_weight, int64_t ignore_index,
    bool need_grad_student, bool need_grad_teacher, optional<at::ScalarType> grad_student_dtype,
    optional<at::ScalarType> grad_teacher_dtype, int64_t stream) {
  kdengine::KDLossRowsArgs a = kd_loss_args(student, teacher, labels, row_weights, divergence, temperature,
                                            jsd_beta, kd_scale, hard_weight, ignore_index);
  const int64_t N = a.n_rows, V = a.vocab;
  CHECK_SAME_DEVICE(stats, student);
  CHECK_DTYPE(stats, at::kFloat);
  CHECK_CONTIGUOUS(stats);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == kdengine::kRowStats,
                    "stats must have shape [", N, ", ", kdengine::kRowStats, "], got ", stats.sizes());
  CHECK_SAME_DEVICE(scale, student);
  CHECK_DTYPE(scale, at::kFloat);
  CHECK_CONTIGUOUS(scale);
  TORCH_CHECK_VALUE(scale.numel() == 1 || (scale.dim() == 1 && scale.size(0) == N),
                    "scale must be 0-d or have shape [", N, "], got ", scale.sizes());
  optional<Tensor> grad_s, grad_t;
  // Each gradient in the dtype asked for (default: its logits'), written by the kernel directly.
  if (need_grad_student) {
    grad_s = at::empty({N, V}, student.options().dtype(grad_student_dtype.value_or(student.scalar_type())));
    a.grad_student_dtype = dtype_code(*grad_s, "grad_student_dtype");
  }
  if (need_grad_teacher) {
    grad_t = at::empty({N, V}, teacher.options().dtype(grad_teacher_dtype.value_or(teacher.scalar_type())));
    a.grad_teacher_dtype = dtype_code(*grad_t, "grad_teacher_dtype");
  }
  if (!need_grad_student && !need_grad_teacher) return {grad_s, grad_t};
  a.mode = kdengine::kBackwardFromStats;
  a.stats = stats.data_ptr<float>();
  a.grad_scale = scale.data_ptr<float>();
  a.grad_scale_stride = scale.dim() == 1 ? 1 : 0;
  a.grad_student = grad_s ? grad_s->data_ptr() : nullptr;
  a.grad_teacher = grad_t ? grad_t->data_ptr() : nullptr;
  CHECK_LAUNCH(kdengine_kd_loss_rows(&a, as_stream(stream)), "kd_loss backward");
  return {grad_s, grad_t};
}

std::tuple<Tensor, Tensor, Tensor> fuse_experts_forward(const Tensor& experts, double temperature,
                                                        int64_t weighting, int64_t space, double sharpness,
                                                        const optional<Tensor>& weights, int64_t stream) {
  kdengine::FuseExpertsArgs a{};
  a.fusion = fusion_args(experts, weighting, space, sharpness, weights);
  const int dtype = dtype_code(experts, "experts");
  TORCH_CHECK_VALUE(temperature > 0.0, "temperature must be > 0, got ", temperature);
  const int64_t K = experts.size(0), N = experts.size(1), V = experts.size(2);
  check_rows(N);
  TORCH_CHECK_VALUE(V >= 1 || N == 0, "the vocabulary must not be empty");
  const auto f32 = experts.options().dtype(at::kFloat);
  Tensor log_probs = at::empty({N, V}, f32), alpha = at::empty({N, K}, f32), entropy = at::empty({N, K}, f32);
  a.fusion.alpha = alpha.data_ptr<float>();
  a.fusion.entropy = entropy.data_ptr<float>();
  a.temperature = static_cast<float>(temperature);
  a.log_probs = log_probs.data_ptr<float>();
  a.n_rows = N;
  a.vocab = V;
  CHECK_LAUNCH(kdengine_fuse_experts(&a, dtype, as_stream(stream)), "fuse_experts");
  return {log_probs, alpha, entropy};
}

// student [N, V] and experts [K, N, V] of one dtype; the fused-loss launcher arguments both modes share.
kdengine::FusedExpertsKDArgs fused_kd_args(const Tensor& student, const Tensor& experts,
                                           const optional<Tensor>& labels, const optional<Tensor>& row_weights,
                                           int64_t divergence, double temperature, double jsd_beta, double kd_scale,
                                           double hard_weight, int64_t ignore_index, int64_t weighting, int64_t space,
                                           double sharpness, const optional<Tensor>& weights, int* dtype) {
  kdengine::FusedExpertsKDArgs a{};
  a.fusion = fusion_args(experts, weighting, space, sharpness, weights);
  CHECK_SAME_DEVICE(student, experts);
  CHECK_DIM(student, 2);
  const int64_t N = experts.size(1), V = experts.size(2);
  TORCH_CHECK_VALUE(student.size(0) == N && student.size(1) == V, "student must have shape [", N, ", ", V,
                    "] to match experts ", experts.sizes(), ", got ", student.sizes());
  TORCH_CHECK_VALUE(student.scalar_type() == experts.scalar_type(), "student and experts must share a dtype, got ",
                    student.scalar_type(), " and ", experts.scalar_type());
  CHECK_COLUMNS(student);
  *dtype = dtype_code(student, "student");
  fill_student_rows(a, student, labels, row_weights, N, V,
                    loss_options(divergence, temperature, jsd_beta, kd_scale, hard_weight, ignore_index));
  return a;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_experts_kd_forward(
    const Tensor& student, const Tensor& experts, const optional<Tensor>& labels,
    const optional<Tensor>& row_weights, int64_t divergence, double temperature, double jsd_beta, double kd_scale,
    double hard_weight, int64_t ignore_index, int64_t weighting, int64_t space, double sharpness,
    const optional<Tensor>& weights, int64_t stream) {
  int dtype = 0;
  kdengine::FusedExpertsKDArgs a = fused_kd_args(student, experts, labels, row_weights, divergence, temperature,
                                                 jsd_beta, kd_scale, hard_weight, ignore_index, weighting, space,
                                                 sharpness, weights, &dtype);
  const int64_t K = experts.size(0), N = a.n_rows;
  const auto f32 = student.options().dtype(at::kFloat);
  Tensor row_loss = at::empty({N}, f32), alpha = at::empty({N, K}, f32), entropy = at::empty({N, K}, f32);
  Tensor stats = at::zeros({N, kdengine::kFusedRowStats}, f32);
  a.fusion.alpha = alpha.data_ptr<float>();
  a.fusion.entropy = entropy.data_ptr<float>();
  a.mode = kdengine::kForwardStats;
  a.stats = stats.data_ptr<float>();
  a.row_loss = row_loss.data_ptr<float>();
  CHECK_LAUNCH(kdengine_fused_experts_kd_rows(&a, dtype, as_stream(stream)), "fused_experts_kd_loss forward");
  return {row_loss, alpha, entropy, stats};
}

std::tuple<optional<Tensor>, optional<Tensor>> fused_experts_kd_backward(
    const Tensor& student, const Tensor& experts, const optional<Tensor>& labels,
    const optional<Tensor>& row_weights, const Tensor& alpha, const Tensor& stats, const Tensor& scale,
    int64_t divergence, double temperature, double jsd_beta, double kd_scale, double hard_weight,
    int64_t ignore_index, int64_t space, bool need_grad_student, bool need_grad_experts, int64_t stream) {
  int dtype = 0;
  kdengine::FusedExpertsKDArgs a = fused_kd_args(student, experts, labels, row_weights, divergence, temperature,
                                                 jsd_beta, kd_scale, hard_weight, ignore_index, kdengine::kUniform,
                                                 space, 1.0, std::nullopt, &dtype);
  const int64_t K = experts.size(0), N = a.n_rows, V = a.vocab;
  for (const Tensor* t : {&alpha, &stats, &scale}) {
    CHECK_SAME_DEVICE(*t, student);
    CHECK_DTYPE(*t, at::kFloat);
    CHECK_CONTIGUOUS(*t);
  }
  TORCH_CHECK_VALUE(alpha.dim() == 2 && alpha.size(0) == N && alpha.size(1) == K, "alpha must have shape [", N,
                    ", ", K, "], got ", alpha.sizes());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == kdengine::kFusedRowStats,
                    "stats must have shape [", N, ", ", kdengine::kFusedRowStats, "], got ", stats.sizes());
  TORCH_CHECK_VALUE(scale.numel() == 1 || (scale.dim() == 1 && scale.size(0) == N),
                    "scale must be 0-d or have shape [", N, "], got ", scale.sizes());
  optional<Tensor> grad_s, grad_e;
  if (need_grad_student) grad_s = at::empty({N, V}, student.options());
  if (need_grad_experts) grad_e = at::empty({K, N, V}, experts.options());
  if (!need_grad_student && !need_grad_experts) return {grad_s, grad_e};
  a.fusion.alpha = const_cast<float*>(alpha.data_ptr<float>());  // read-only in this mode
  a.mode = kdengine::kBackwardFromStats;
  a.stats = const_cast<float*>(stats.data_ptr<float>());
  a.grad_scale = scale.data_ptr<float>();
  a.grad_scale_stride = scale.dim() == 1 ? 1 : 0;
  a.grad_student = grad_s ? grad_s->data_ptr() : nullptr;
  a.grad_experts = grad_e ? grad_e->data_ptr() : nullptr;
  CHECK_LAUNCH(kdengine_fused_experts_kd_rows(&a, dtype, as_stream(stream)), "fused_experts_kd_loss backward");
  return {grad_s, grad_e};
}

// Rows per example: K (experts None), 1 (experts [B]) or k (experts [B, k]).
int64_t experts_per_example(const optional<Tensor>& experts, const Tensor& ref, int64_t batch) {
  if (!experts) return 1;
  CHECK_SAME_DEVICE(*experts, ref);
  CHECK_DTYPE(*experts, at::kLong);
  CHECK_CONTIGUOUS(*experts);
  TORCH_CHECK_VALUE((experts->dim() == 1 || experts->dim() == 2) && experts->size(0) == batch &&
                        experts->numel() > 0,
                    "experts must have shape [", batch, "] or [", batch, ", k >= 1], got ", experts->sizes());
  return experts->dim() == 1 ? 1 : experts->size(1);
}

void check_mask(const Tensor& attention_mask, const Tensor& ref, int64_t batch, int64_t length) {
  CHECK_SAME_DEVICE(attention_mask, ref);
  CHECK_DTYPE(attention_mask, at::kLong);
  CHECK_CONTIGUOUS(attention_mask);
  TORCH_CHECK_VALUE(attention_mask.dim() == 2 && attention_mask.size(0) == batch && attention_mask.size(1) == length,
                    "attention_mask must have shape [", batch, ", ", length, "], got ", attention_mask.sizes());
}

void check_placement(int64_t placement) {
  TORCH_CHECK_VALUE(placement == kdengine::kPrepend || placement == kdengine::kAppend,
                    "placement code must be 0 (prepend) or 1 (append), got ", placement);
}

std::tuple<Tensor, Tensor> expert_batch_embed_forward(const Tensor& input_ids, const Tensor& weight,
                                                      const Tensor& prompts, const Tensor& attention_mask,
                                                      const optional<Tensor>& experts, int64_t placement,
                                                      int64_t stream) {
  CHECK_CUDA(input_ids);
  CHECK_DTYPE(input_ids, at::kLong);
  CHECK_CONTIGUOUS(input_ids);
  CHECK_DIM(input_ids, 2);
  CHECK_SAME_DEVICE(weight, input_ids);
  CHECK_SAME_DEVICE(prompts, input_ids);
  CHECK_DIM(weight, 2);
  CHECK_COLUMNS(weight);
  CHECK_DIM(prompts, 3);
  CHECK_CONTIGUOUS(prompts);
  TORCH_CHECK_VALUE(prompts.scalar_type() == weight.scalar_type(), "prompts must have the weight's dtype ",
                    weight.scalar_type(), " (cast them first), got ", prompts.scalar_type());
  TORCH_CHECK_VALUE(prompts.size(2) == weight.size(1), "prompts must be [K, P, H=", weight.size(1), "], got ",
                    prompts.sizes());
  check_placement(placement);
  const int dtype = dtype_code(weight, "weight");
  const int64_t B = input_ids.size(0), L = input_ids.size(1), H = weight.size(1);
  const int64_t K = prompts.size(0), P = prompts.size(1);
  check_mask(attention_mask, input_ids, B, L);
  const int64_t per_example = experts_per_example(experts, input_ids, B);
  const int64_t R = experts ? B * per_example : K * B;
  Tensor lengths;
  if (placement == kdengine::kAppend) lengths = attention_mask.sum(1);

  Tensor embeds = at::empty({R, P + L, H}, weight.options());
  Tensor mask = at::empty({R, P + L}, attention_mask.options());
  kdengine::ExpertBatchEmbedArgs a{};
  a.input_ids = input_ids.data_ptr<int64_t>();
  a.weight = weight.data_ptr();
  a.weight_row_stride = weight.stride(0);
  a.prompts = prompts.data_ptr();
  a.attention_mask = attention_mask.data_ptr<int64_t>();
  a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  a.experts = experts ? experts->data_ptr<int64_t>() : nullptr;
  a.experts_per_example = per_example;
  a.embeds = embeds.data_ptr();
  a.mask = mask.data_ptr<int64_t>();
  a.batch = B;
  a.length = L;
  a.hidden = H;
  a.num_experts = K;
  a.prompt_len = P;
  a.rows = R;
  a.placement = static_cast<int>(placement);
  CHECK_LAUNCH(kdengine_expert_batch_embed(&a, dtype, as_stream(stream)), "expert_batch_embed");
  return {embeds, mask};
}

std::tuple<Tensor, optional<Tensor>> expert_batch_embed_backward(
    const Tensor& grad_embeds, const Tensor& input_ids, const Tensor& attention_mask,
    const optional<Tensor>& experts, int64_t num_experts, int64_t placement, bool weight_requires_grad,
    int64_t vocab, int64_t stream) {
  CHECK_CUDA(grad_embeds);
  CHECK_DIM(grad_embeds, 3);
  CHECK_COLUMNS(grad_embeds);
  CHECK_SAME_DEVICE(input_ids, grad_embeds);
  CHECK_DTYPE(input_ids, at::kLong);
  CHECK_CONTIGUOUS(input_ids);
  CHECK_DIM(input_ids, 2);
  check_placement(placement);
  const int dtype = dtype_code(grad_embeds, "grad_embeds");
  const int64_t B = input_ids.size(0), L = input_ids.size(1);
  const int64_t R = grad_embeds.size(0), H = grad_embeds.size(2), P = grad_embeds.size(1) - L;
  check_mask(attention_mask, grad_embeds, B, L);
  const int64_t per_example = experts_per_example(experts, grad_embeds, B);
  TORCH_CHECK_VALUE(num_experts >= 1 && P >= 1, "need K >= 1 experts and P >= 1 prompt positions, got K=",
                    num_experts, ", P=", P);
  TORCH_CHECK_VALUE(R == (experts ? B * per_example : num_experts * B), "grad_embeds has ", R,
                    " rows, which does not match the batch layout");
  Tensor lengths;
  if (placement == kdengine::kAppend) lengths = attention_mask.sum(1);

  const auto f32 = grad_embeds.options().dtype(at::kFloat);
  Tensor grad_prompts = at::empty({num_experts, P, H}, f32);
  optional<Tensor> grad_weight;
  Tensor sorted_ids, order;
  if (weight_requires_grad) {
    grad_weight = at::zeros({vocab, H}, f32);
    std::tie(sorted_ids, order) = at::sort(input_ids.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  }
  kdengine::ExpertBatchEmbedBackwardArgs a{};
  a.grad_embeds = grad_embeds.data_ptr();
  a.grad_row_stride = grad_embeds.stride(0);
  a.grad_pos_stride = grad_embeds.stride(1);
  a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  a.experts = experts ? experts->data_ptr<int64_t>() : nullptr;
  a.experts_per_example = per_example;
  a.grad_prompts = grad_prompts.data_ptr<float>();
  a.sorted_ids = weight_requires_grad ? sorted_ids.data_ptr<int64_t>() : nullptr;
  a.order = weight_requires_grad ? order.data_ptr<int64_t>() : nullptr;
  a.grad_weight = grad_weight ? grad_weight->data_ptr<float>() : nullptr;
  a.batch = B;
  a.length = L;
  a.hidden = H;
  a.num_experts = num_experts;
  a.prompt_len = P;
  a.rows = R;
  a.placement = static_cast<int>(placement);
  CHECK_LAUNCH(kdengine_expert_batch_embed_backward(&a, dtype, as_stream(stream)), "expert_batch_embed backward");
  return {grad_prompts, grad_weight};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kdengine CUDA kernels (csrc/); called through kdengine.ops._cuda";
  m.def("kd_loss_forward", &kd_loss_forward, "kd_loss forward: (row_loss, stats)", py::arg("student"),
        py::arg("teacher"), py::arg("labels"), py::arg("row_weights"), py::arg("divergence"), py::arg("temperature"),
        py::arg("jsd_beta"), py::arg("kd_scale"), py::arg("hard_weight"), py::arg("ignore_index"), py::arg("stream"));
  m.def("kd_loss_backward", &kd_loss_backward, "kd_loss backward: (grad_student, grad_teacher)",
        py::arg("student"), py::arg("teacher"), py::arg("labels"), py::arg("row_weights"), py::arg("stats"),
        py::arg("scale"), py::arg("divergence"), py::arg("temperature"), py::arg("jsd_beta"), py::arg("kd_scale"),
        py::arg("hard_weight"), py::arg("ignore_index"), py::arg("need_grad_student"), py::arg("need_grad_teacher"),
        py::arg("grad_student_dtype"), py::arg("grad_teacher_dtype"), py::arg("stream"));
  m.def("fuse_experts_forward", &fuse_experts_forward, "fused teacher: (log_probs, alpha, entropy)",
        py::arg("experts"), py::arg("temperature"), py::arg("weighting"), py::arg("space"), py::arg("sharpness"),
        py::arg("weights"), py::arg("stream"));
  m.def("fused_experts_kd_forward", &fused_experts_kd_forward,
        "fused_experts_kd_loss forward: (row_loss, alpha, entropy, stats)", py::arg("student"), py::arg("experts"),
        py::arg("labels"), py::arg("row_weights"), py::arg("divergence"), py::arg("temperature"), py::arg("jsd_beta"),
        py::arg("kd_scale"), py::arg("hard_weight"), py::arg("ignore_index"), py::arg("weighting"), py::arg("space"),
        py::arg("sharpness"), py::arg("weights"), py::arg("stream"));
  m.def("fused_experts_kd_backward", &fused_experts_kd_backward,
        "fused_experts_kd_loss backward: (grad_student, grad_experts)", py::arg("student"), py::arg("experts"),
        py::arg("labels"), py::arg("row_weights"), py::arg("alpha"), py::arg("stats"), py::arg("scale"),
        py::arg("divergence"), py::arg("temperature"), py::arg("jsd_beta"), py::arg("kd_scale"),
        py::arg("hard_weight"), py::arg("ignore_index"), py::arg("space"), py::arg("need_grad_student"),
        py::arg("need_grad_experts"), py::arg("stream"));
  m.def("expert_batch_embed_forward", &expert_batch_embed_forward, "batched prompt input: (embeds, mask)",
        py::arg("input_ids"), py::arg("weight"), py::arg("prompts"), py::arg("attention_mask"), py::arg("experts"),
        py::arg("placement"), py::arg("stream"));
  m.def("expert_batch_embed_backward", &expert_batch_embed_backward, "(grad_prompts fp32, grad_weight fp32 | None)",
        py::arg("grad_embeds"), py::arg("input_ids"), py::arg("attention_mask"), py::arg("experts"),
        py::arg("num_experts"), py::arg("placement"), py::arg("weight_requires_grad"), py::arg("vocab"),
        py::arg("stream"));
}
