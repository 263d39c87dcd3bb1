// expert_batch_embed: the K-expert batched prompt input (kdengine/reference/expert_batch_embed.py).
//
// Rows r of R, each with P + L positions, for example b(r) and expert e(r):
//   experts == nullptr   R = K·B, r = e·B + b (expert-major)
//   experts [B, k]       R = B·k, r = b·k + j, e = experts[r]   (k = 1 for experts [B])
// With n the prompt's insert offset (0 for prepend, n_b = Σ attention_mask[b] for append):
//   t < n          token t         mask attention_mask[b, t]
//   n <= t < n+P   prompt slot t−n  mask 1
//   t >= n+P       token t−P       mask attention_mask[b, t−P]
// Forward: one warp per output position copies the H-wide source row (16-byte vectors when
// aligned). Backward, deterministic (fixed order, no atomics):
//   grad_prompts[e, p] = Σ over rows r using e, in increasing r, of grad[r, n + p]   (one block per (e, p))
//   grad_weight[id]    = Σ over the token slots of id in (stable) sorted order, then over the rows
//                        of the slot's example, of grad[r, position of the token]   (one block per id)
#include "device.cuh"

namespace kdengine {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kBackwardThreads = 128;

struct RowMap {
  const int64_t* experts;
  int64_t experts_per_example, batch;

  __device__ __forceinline__ int64_t example(int64_t r) const {
    return experts == nullptr ? r % batch : r / experts_per_example;
  }
  __device__ __forceinline__ int64_t expert(int64_t r) const {
    return experts == nullptr ? r / batch : experts[r];
  }
  // Rows of example b: r = first + i · step for i < count.
  __device__ __forceinline__ void rows_of(int64_t b, int64_t num_experts, int64_t& first, int64_t& step,
                                          int64_t& count) const {
    if (experts == nullptr) {
      first = b;
      step = batch;
      count = num_experts;
    } else {
      first = b * experts_per_example;
      step = 1;
      count = experts_per_example;
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) expert_batch_embed_kernel(const ExpertBatchEmbedArgs a) {
  constexpr int N = Vec<T>::n;
  const int64_t width = a.prompt_len + a.length;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (pos >= a.rows * width) return;
  const int64_t r = pos / width, t = pos % width;
  const RowMap map{a.experts, a.experts_per_example, a.batch};
  const int64_t b = map.example(r);
  const int64_t insert = a.placement == kAppend ? a.lengths[b] : 0;

  const T* src;
  int64_t mask;
  if (t >= insert && t < insert + a.prompt_len) {
    src = static_cast<const T*>(a.prompts) + (map.expert(r) * a.prompt_len + (t - insert)) * a.hidden;
    mask = 1;
  } else {
    const int64_t l = t < insert ? t : t - a.prompt_len;
    src = static_cast<const T*>(a.weight) + a.input_ids[b * a.length + l] * a.weight_row_stride;
    mask = a.attention_mask[b * a.length + l];
  }
  T* dst = static_cast<T*>(a.embeds) + pos * a.hidden;
  if (lane == 0) a.mask[pos] = mask;

  const int64_t H = a.hidden;
  int64_t h0 = 0;
  if (aligned16(src) && aligned16(dst)) {
    const int64_t n_vec = H / N;
    for (int64_t v = lane; v < n_vec; v += 32)
      reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(src)[v];
    h0 = n_vec * N;
  }
  for (int64_t h = h0 + lane; h < H; h += 32) dst[h] = src[h];
}

// grad_prompts[e, p, h] for h in this block's column slice: grid (K·P, ceil(H / threads)).
template <typename T>
__global__ void __launch_bounds__(kBackwardThreads) grad_prompts_kernel(const ExpertBatchEmbedBackwardArgs a) {
  const int64_t e = blockIdx.x / a.prompt_len, p = blockIdx.x % a.prompt_len;
  const int64_t h = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (h >= a.hidden) return;
  const RowMap map{a.experts, a.experts_per_example, a.batch};
  const T* grad = static_cast<const T*>(a.grad_embeds);
  float acc = 0.f;
  // Rows using expert e, in increasing r (expert-major rows: one contiguous block of B rows).
  const int64_t r_begin = a.experts == nullptr ? e * a.batch : 0;
  const int64_t r_end = a.experts == nullptr ? r_begin + a.batch : a.rows;
  for (int64_t r = r_begin; r < r_end; ++r) {
    if (a.experts != nullptr && a.experts[r] != e) continue;
    const int64_t insert = a.placement == kAppend ? a.lengths[map.example(r)] : 0;
    acc += to_float(grad[r * a.grad_row_stride + (insert + p) * a.grad_pos_stride + h]);
  }
  a.grad_prompts[(e * a.prompt_len + p) * a.hidden + h] = acc;
}

// grad_weight[id, h]: grid (B·L, ceil(H / threads)); the block of the first sorted slot of each
// id sums its whole segment, the others exit.
template <typename T>
__global__ void __launch_bounds__(kBackwardThreads) grad_weight_kernel(const ExpertBatchEmbedBackwardArgs a) {
  const int64_t j = blockIdx.x, n_slots = a.batch * a.length;
  const int64_t h = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t id = a.sorted_ids[j];
  if (h >= a.hidden || (j > 0 && a.sorted_ids[j - 1] == id)) return;
  const RowMap map{a.experts, a.experts_per_example, a.batch};
  const T* grad = static_cast<const T*>(a.grad_embeds);
  float acc = 0.f;
  for (int64_t jj = j; jj < n_slots && a.sorted_ids[jj] == id; ++jj) {
    const int64_t slot = a.order[jj], b = slot / a.length, l = slot % a.length;
    const int64_t insert = a.placement == kAppend ? a.lengths[b] : 0;
    const int64_t t = l < insert ? l : l + a.prompt_len;  // prepend: insert = 0, so t = P + l
    int64_t first, step, count;
    map.rows_of(b, a.num_experts, first, step, count);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = first + i * step;
      acc += to_float(grad[r * a.grad_row_stride + t * a.grad_pos_stride + h]);
    }
  }
  a.grad_weight[id * a.hidden + h] = acc;
}

unsigned column_blocks(int64_t hidden) {
  return static_cast<unsigned>((hidden + kBackwardThreads - 1) / kBackwardThreads);
}

}  // namespace
}  // namespace kdengine

extern "C" const char* kdengine_expert_batch_embed(const kdengine::ExpertBatchEmbedArgs* args, int dtype,
                                                   void* stream) {
  using namespace kdengine;
  const ExpertBatchEmbedArgs a = *args;
  const int64_t positions = a.rows * (a.prompt_len + a.length);
  if (positions == 0 || a.hidden == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>((positions + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const cudaError_t err = KDENGINE_DISPATCH_DTYPE(dtype, [&] {
    expert_batch_embed_kernel<scalar_t><<<grid, 32 * kWarpsPerBlock, 0, s>>>(a);
    return cudaGetLastError();
  });
  return launch_status(err);
}

extern "C" const char* kdengine_expert_batch_embed_backward(const kdengine::ExpertBatchEmbedBackwardArgs* args,
                                                            int dtype, void* stream) {
  using namespace kdengine;
  const ExpertBatchEmbedBackwardArgs a = *args;
  if (a.hidden == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = KDENGINE_DISPATCH_DTYPE(dtype, [&] {
    const dim3 prompts_grid(static_cast<unsigned>(a.num_experts * a.prompt_len), column_blocks(a.hidden));
    grad_prompts_kernel<scalar_t><<<prompts_grid, kBackwardThreads, 0, s>>>(a);
    cudaError_t e = cudaGetLastError();
    const int64_t n_slots = a.batch * a.length;
    if (e == cudaSuccess && a.grad_weight != nullptr && n_slots > 0) {
      const dim3 weight_grid(static_cast<unsigned>(n_slots), column_blocks(a.hidden));
      grad_weight_kernel<scalar_t><<<weight_grid, kBackwardThreads, 0, s>>>(a);
      e = cudaGetLastError();
    }
    return e;
  });
  return launch_status(err);
}
