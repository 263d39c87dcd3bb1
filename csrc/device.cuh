// Device basics shared by every kernel of kdengine._C (nvcc only): dtype dispatch, launch status,
// threads per row, element conversion, vector row IO and gradient rows of a run-time dtype. Every
// kernel accumulates in fp32, whatever the input dtype.
#pragma once

#include "launchers.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

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

// Runs BODY with `student_t` / `teacher_t` bound to the C++ types of a supported pair of dtype codes:
// the same dtype on both sides, or one side fp32 (7 pairs; bf16 against fp16 is refused).
#define KDENGINE_DISPATCH_DTYPE_PAIR(S, T, ...)                                                         \
  [&]() -> cudaError_t {                                                                                \
    if ((S) == (T))                                                                                     \
      return KDENGINE_DISPATCH_DTYPE(S, [&] { using student_t = scalar_t; using teacher_t = scalar_t; return __VA_ARGS__(); }); \
    if ((S) == ::kdengine::kFloat32)                                                                    \
      return KDENGINE_DISPATCH_DTYPE(T, [&] { using student_t = float; using teacher_t = scalar_t; return __VA_ARGS__(); });    \
    if ((T) == ::kdengine::kFloat32)                                                                    \
      return KDENGINE_DISPATCH_DTYPE(S, [&] { using student_t = scalar_t; using teacher_t = float; return __VA_ARGS__(); });    \
    return cudaErrorInvalidValue;                                                                       \
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

// Columns per chunk when a student of type S is read next to a teacher of type T: one 16-byte
// vector of the wider type (4 for a mixed fp32 / half pair, whose half side is then an 8-byte load).
template <typename S, typename T>
__host__ __device__ constexpr int pair_width() {
  return 16 / (sizeof(S) > sizeof(T) ? sizeof(S) : sizeof(T));
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// A chunk of N elements of T as machine words: one 8-byte word or 16-byte words (up to two: fp32
// gradients of bf16 chunks). Chunks start at multiples of N elements, so in a 16-byte aligned row
// every word is aligned.
template <typename T, int N>
struct ChunkWords {
  static constexpr int bytes = N * static_cast<int>(sizeof(T));
  static_assert(bytes == 8 || bytes == 16 || bytes == 32, "a chunk is 8, 16 or 32 bytes");
  using word = typename std::conditional<bytes == 8, uint2, uint4>::type;
  static constexpr int count = bytes == 8 ? 1 : bytes / 16;
};

// out[k] = row[start + k] as fp32 for k < N; columns past n_cols read as `fill`. A full chunk of
// a 16-byte aligned row is vector loads.
template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t start, int64_t n_cols, bool vec_ok,
                                           float (&out)[N], float fill = kNegInf) {
  using W = ChunkWords<T, N>;
  if (vec_ok && start + N <= n_cols) {
    typename W::word raw[W::count];
#pragma unroll
    for (int i = 0; i < W::count; ++i) raw[i] = reinterpret_cast<const typename W::word*>(row + start)[i];
    const T* e = reinterpret_cast<const T*>(raw);
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
  using W = ChunkWords<T, N>;
  if (vec_ok && start + N <= n_cols) {
    typename W::word raw[W::count];
    T* e = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int k = 0; k < N; ++k) e[k] = from_float<T>(vals[k]);
#pragma unroll
    for (int i = 0; i < W::count; ++i) reinterpret_cast<typename W::word*>(row + start)[i] = raw[i];
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

// The dtype code of an element type.
template <typename T>
__host__ __device__ constexpr int dtype_of() {
  return std::is_same<T, float>::value ? kFloat32 : (std::is_same<T, __nv_bfloat16>::value ? kBFloat16 : kFloat16);
}

// A gradient row whose dtype is chosen at run time (the caller's, not the logits'): the kernels
// are templated on the logit types only, and each store picks its conversion with a switch that
// is uniform over the block (no divergence, no extra instantiations of the kernels).
struct GradRow {
  void* row;  // contiguous row, or nullptr: not asked for
  int dtype;  // DType

  __device__ __forceinline__ explicit operator bool() const { return row != nullptr; }

  template <int N>
  __device__ __forceinline__ void store(int64_t start, int64_t n_cols, const float (&vals)[N]) const {
    switch (dtype) {
      case kFloat32: store_typed<float>(start, n_cols, vals); break;
      case kBFloat16: store_typed<__nv_bfloat16>(start, n_cols, vals); break;
      default: store_typed<__half>(start, n_cols, vals); break;
    }
  }

  __device__ __forceinline__ void zero(int64_t n_cols) const {
    switch (dtype) {
      case kFloat32: zero_row(static_cast<float*>(row), n_cols); break;
      case kBFloat16: zero_row(static_cast<__nv_bfloat16*>(row), n_cols); break;
      default: zero_row(static_cast<__half*>(row), n_cols); break;
    }
  }

  template <typename G, int N>
  __device__ __forceinline__ void store_typed(int64_t start, int64_t n_cols, const float (&vals)[N]) const {
    G* out = static_cast<G*>(row);
    store_chunk<G, N>(out, start, n_cols, aligned16(out), vals);
  }
};

// Row n of a contiguous [N, V] gradient of dtype `dtype` at `base` (nullptr stays nullptr).
inline __device__ GradRow grad_row(void* base, int dtype, int64_t n, int64_t vocab) {
  if (base == nullptr) return GradRow{nullptr, dtype};
  const int64_t bytes = dtype == kFloat32 ? 4 : 2;
  return GradRow{static_cast<char*>(base) + n * vocab * bytes, dtype};
}

}  // namespace kdengine
