// Self-test of the emulator's CUDA semantics (built by build.py's build_selftest, run and checked by
// tests/test_csrc_emulated.py::test_emulator_semantics). Prints one "name: values" line per check.
#include <cstdio>

#include <cuda_runtime.h>

// 48 threads: one full warp and a partial one (lanes 0..15 of warp 1).
__global__ void shuffles(float* xor_out, float* down_out) {
  const float v = static_cast<float>(threadIdx.x);
  xor_out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 1);
  down_out[threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 4);  // lanes 28..31: their own value
}

// Half of the threads return before the second barrier: they count as arrived. Every block sums
// its shared buffer after the barriers (a block's shared memory is its own while it runs).
__global__ void early_exit(float* out) {
  __shared__ float buf[64];
  buf[threadIdx.x] = static_cast<float>(blockIdx.x * 100 + threadIdx.x);
  __syncthreads();
  if (threadIdx.x >= 32) return;
  buf[threadIdx.x] += buf[threadIdx.x + 32];
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int i = 0; i < 32; ++i) total += buf[i];
    out[blockIdx.x] = total;
  }
}

// Thread 0 waits at __syncthreads while its warp-mates wait in a shuffle that needs thread 0.
__global__ void deadlock(float* out) {
  if (threadIdx.x == 0) __syncthreads();
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

int main() {
  float xor_out[48], down_out[48];
  shuffles<<<1, 48, 0, nullptr>>>(xor_out, down_out);
  std::printf("launch: %d\n", static_cast<int>(cudaGetLastError()));
  std::printf("xor:");
  for (float v : xor_out) std::printf(" %g", v);
  std::printf("\ndown:");
  for (float v : down_out) std::printf(" %g", v);

  float sums[3];
  early_exit<<<3, 64, 0, nullptr>>>(sums);
  std::printf("\nearly_exit: %d %g %g %g\n", static_cast<int>(cudaGetLastError()), sums[0], sums[1], sums[2]);

  early_exit<<<1, 2048, 0, nullptr>>>(sums);
  const cudaError_t too_many = cudaGetLastError();
  std::printf("too_many_threads: %d %s\n", static_cast<int>(too_many), cudaGetErrorString(too_many));

  float out[64];
  deadlock<<<1, 64, 0, nullptr>>>(out);
  std::printf("deadlock: %d\n", static_cast<int>(cudaGetLastError()));
  std::printf("after: %d\n", static_cast<int>(cudaGetLastError()));
  return 0;
}
