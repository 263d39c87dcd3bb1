// Device basics shared by every kernel of kdengine._C (nvcc only): dtype dispatch, launch status,
// threads per row, element conversion and 16-byte row IO. Every kernel accumulates in fp32,
// whatever the input dtype.
#pragma once

#include "launchers.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

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

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// out[k] = row[start + k] as fp32 for k < N; columns past n_cols read as `fill`. A full chunk of
// a 16-byte aligned row is one vector load (chunks start at multiples of N elements).
template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t start, int64_t n_cols, bool vec_ok,
                                           float (&out)[N], float fill = kNegInf) {
  static_assert(N * sizeof(T) == 16, "a chunk is one 16-byte vector");
  if (vec_ok && start + N <= n_cols) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + start);
    const T* e = reinterpret_cast<const T*>(&raw);
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
  static_assert(N * sizeof(T) == 16, "a chunk is one 16-byte vector");
  if (vec_ok && start + N <= n_cols) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < N; ++k) e[k] = from_float<T>(vals[k]);
    *reinterpret_cast<uint4*>(row + start) = raw;
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

}  // namespace kdengine
