// CPU emulation of the part of the CUDA runtime that csrc/ uses, so that the real kernels build as
// plain C++ and run on CPU tensors in CI (tests/test_csrc_emulated.py; built by
// tests/cuda_emulator/build.py). Test harness only: never part of kdengine.
//
// Emulated, with CUDA's meaning:
//   * Launches. build.py rewrites `kernel<<<grid, block, smem, stream>>>(args)` into
//     `kdemu::launch(kernel, kdemu::LaunchConfig(grid, block, smem, stream), args)`. Blocks run one
//     after another on the launching thread; the threads of a block are fibers (ucontext, own
//     stacks) switched at every barrier and shuffle, so barriers, early returns and warp shuffles
//     behave as on the GPU. Every launch is synchronous.
//   * threadIdx / blockIdx / blockDim / gridDim, 1-D blocks of 1..1024 threads, grids up to
//     2^31 − 1 × 65535 × 65535 blocks.
//   * __syncthreads(): a barrier of the block's live threads (threads that returned count as
//     arrived, as on sm_70+). The last thread to arrive goes on at once.
//   * __shfl_xor_sync / __shfl_down_sync (width 32) over the lanes of a warp (a warp barrier and an
//     exchange slot per lane). The mask is not checked: every live lane of the warp must take part.
//   * __shared__ variables: function-local statics, one copy for the threads of a block (blocks
//     run one at a time). Unlike a GPU, their contents carry over from the previous block instead
//     of being undefined.
//   * Launch errors through cudaGetLastError / cudaGetErrorString, which the launchers of csrc/
//     check: an invalid configuration (empty grid, more than 1024 threads, ...), and a deadlock
//     (every live thread waits on a barrier that cannot complete: a divergent __syncthreads or
//     shuffle) as cudaErrorLaunchFailure, described on stderr.
//   * bf16 / fp16 storage with round-to-nearest-even conversions (cuda_bf16.h, cuda_fp16.h).
// Not emulated:
//   * The fast intrinsics __expf / __logf are the exact expf / logf (on the GPU they are ~2 ulp
//     approximations): this checks the kernels' math and indexing, not the GPU's last bits.
//   * Timing, occupancy, coalescing, bank conflicts: the emulator says nothing about speed.
//   * The memory model: threads interleave only at barriers and shuffles, in a fixed order that
//     lets the lowest-numbered runnable thread (highest in odd blocks) run ahead as far as the
//     barriers allow. A race where a thread overtakes a missing barrier therefore shows up every
//     time; a race that needs a finer interleaving does not.
//   * Streams (ignored), dynamic shared memory and 2-D/3-D blocks (cudaErrorNotSupported), atomics,
//     __shfl_sync / __shfl_up_sync, sub-warp widths and the rest of the runtime API (absent: code
//     using them does not compile here).
// Linux (glibc ucontext) only. A thread that overflows its 128 KiB stack aborts with a message.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// Codes as in the CUDA runtime.
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (emulator: deadlocked barrier, see stderr)";
    case cudaErrorNotSupported:
      return "operation not supported (by the CPU emulator of tests/cuda_emulator)";
  }
  return "unknown error";
}

// Fast intrinsics: exact here (see the header comment).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }

inline thread_local dim3 threadIdx(0, 0, 0);
inline thread_local dim3 blockIdx(0, 0, 0);
inline thread_local dim3 blockDim(1, 1, 1);
inline thread_local dim3 gridDim(1, 1, 1);

namespace kdemu {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr std::size_t kStackBytes = 128 * 1024;  // per emulated thread
constexpr std::uint64_t kStackCanary = 0x6B64656D75737461ull;

// The error of the last launch on this host thread (cudaGetLastError reads and clears it).
inline thread_local cudaError_t last_error = cudaSuccess;

// A barrier of a block's threads: all of them (__syncthreads) or one warp's, threads
// [first, last]. Threads that returned from the kernel leave it (drop): nobody waits for them.
struct Barrier {
  unsigned expected = 0;
  unsigned first = 0, last = 0;
  unsigned arrived = 0;
  std::uint64_t phase = 0;
};

// One emulated thread: a fiber with its own stack, resumed by the block's scheduler.
struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  bool done = false;
  const Barrier* waiting = nullptr;  // the barrier it waits on, or nullptr when runnable
  std::uint64_t waiting_phase = 0;

  bool runnable() const { return !done && (waiting == nullptr || waiting->phase != waiting_phase); }
};

// The running block: its fibers, barriers and shuffle exchange slots, and the scheduling order.
//
// The scheduler always resumes the runnable thread of lowest rank, so a thread runs ahead of the
// others as far as the barriers let it: a missing barrier between a write and another thread's
// read (or the reuse of a shared buffer) gives a wrong result every time rather than sometimes.
// Rank is the thread index in even blocks and its reverse in odd blocks, so that either side of
// such a race gets to run ahead.
struct Block {
  explicit Block(unsigned n_threads)
      : fibers(n_threads),
        warps((n_threads + kWarpSize - 1) / kWarpSize),
        exchange(warps.size() * kWarpSize),
        stacks(new char[static_cast<std::size_t>(n_threads) * kStackBytes]) {
    for (unsigned t = 0; t < n_threads; ++t) fibers[t].stack = stacks.get() + t * kStackBytes;
  }

  unsigned size() const { return static_cast<unsigned>(fibers.size()); }
  unsigned thread_of(unsigned rank) const { return reversed ? size() - 1 - rank : rank; }

  // Fresh barriers and fibers for the next block; `entry` runs the kernel in fiber `threadIdx.x`.
  void reset(void (*entry)(), bool reverse_order) {
    const unsigned n = size();
    reversed = reverse_order;
    next_rank = 0;
    sync = Barrier{n, 0, n - 1};
    for (unsigned w = 0; w < warps.size(); ++w) {
      const unsigned first = w * kWarpSize, last = std::min(n, first + kWarpSize) - 1;
      warps[w] = Barrier{last - first + 1, first, last};
    }
    for (Fiber& f : fibers) {
      f.done = false;
      f.waiting = nullptr;
      std::memcpy(f.stack, &kStackCanary, sizeof kStackCanary);  // stacks grow down: overflow hits it
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &scheduler;
      makecontext(&f.context, entry, 0);
    }
  }

  // A phase of `b` is over: its waiting threads are runnable again.
  void complete(Barrier& b) {
    b.arrived = 0;
    ++b.phase;
    next_rank = std::min(next_rank, reversed ? size() - 1 - b.last : b.first);
  }

  void drop(Barrier& b) {
    --b.expected;
    if (b.arrived > 0 && b.arrived == b.expected) complete(b);
  }

  std::vector<Fiber> fibers;
  Barrier sync;                         // __syncthreads
  std::vector<Barrier> warps;           // one per warp: the shuffles
  std::vector<std::uint64_t> exchange;  // one slot per lane: the shuffled values
  std::unique_ptr<char[]> stacks;
  ucontext_t scheduler;
  std::function<void()> kernel;         // the kernel call with this launch's arguments
  bool reversed = false;
  unsigned next_rank = 0;               // no thread of lower rank is runnable
};

inline thread_local Block* current_block = nullptr;

// Waits (yielding to the scheduler) until every live member of `b` has arrived. The last to
// arrive completes the barrier and goes on at once, as on the GPU.
inline void arrive_and_wait(Barrier& b) {
  Block& block = *current_block;
  if (++b.arrived == b.expected) {
    block.complete(b);
    return;
  }
  Fiber& self = block.fibers[threadIdx.x];
  self.waiting = &b;
  self.waiting_phase = b.phase;
  swapcontext(&self.context, &block.scheduler);
  self.waiting = nullptr;
}

// Value of lane `src_lane` of the calling warp (own value when `valid` is false), all lanes at once.
template <typename T>
T shuffle(T value, unsigned src_lane, bool valid) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= sizeof(std::uint64_t),
                "the emulated shuffles move trivially copyable values of at most 8 bytes");
  Block& block = *current_block;
  const unsigned warp = threadIdx.x / kWarpSize, src = warp * kWarpSize + src_lane;
  std::memcpy(&block.exchange[threadIdx.x], &value, sizeof(T));
  arrive_and_wait(block.warps[warp]);  // every lane has published its value
  T out = value;
  if (valid && src < blockDim.x) std::memcpy(&out, &block.exchange[src], sizeof(T));
  arrive_and_wait(block.warps[warp]);  // every lane has read before the slots are reused
  return out;
}

// Body of every fiber: run the kernel, then leave the block's barriers (uc_link resumes the scheduler).
inline void fiber_entry() {
  Block& block = *current_block;
  const unsigned t = threadIdx.x;
  block.kernel();
  block.fibers[t].done = true;
  block.drop(block.warps[t / kWarpSize]);
  block.drop(block.sync);
}

// Runs the fibers of the current block until all returned. Returns false on a deadlock (every
// live thread waits on a barrier that cannot complete), after describing it on stderr.
inline bool run_block(Block& block) {
  const unsigned n = block.size();
  for (unsigned live = n; live > 0;) {
    unsigned rank = block.next_rank;
    while (rank < n && !block.fibers[block.thread_of(rank)].runnable()) ++rank;
    if (rank == n) {
      std::fprintf(stderr, "kdemu: deadlock in block (%u, %u, %u): %u live threads all wait on a barrier "
                   "that cannot complete (divergent __syncthreads or warp shuffle)\n",
                   blockIdx.x, blockIdx.y, blockIdx.z, live);
      return false;
    }
    block.next_rank = rank;  // the thread resumed now blocks or returns before the next pick
    const unsigned t = block.thread_of(rank);
    Fiber& f = block.fibers[t];
    threadIdx = dim3(t, 0, 0);
    swapcontext(&block.scheduler, &f.context);
    std::uint64_t canary;
    std::memcpy(&canary, f.stack, sizeof canary);
    if (canary != kStackCanary) {
      std::fprintf(stderr, "kdemu: thread %u of block %u overflowed its %zu-byte emulated stack\n", t,
                   blockIdx.x, kStackBytes);
      std::abort();
    }
    if (f.done) --live;
  }
  return true;
}

struct LaunchConfig {
  LaunchConfig(dim3 g, dim3 b, std::size_t smem = 0, cudaStream_t s = nullptr)
      : grid(g), block(b), shared_bytes(smem), stream(s) {}
  dim3 grid, block;
  std::size_t shared_bytes;
  cudaStream_t stream;
};

inline cudaError_t check_config(const LaunchConfig& c) {
  const dim3 g = c.grid, b = c.block;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7FFFFFFFu || g.y > 65535u || g.z > 65535u)
    return cudaErrorInvalidConfiguration;
  if (b.x == 0 || b.y == 0 || b.z == 0 || static_cast<unsigned long long>(b.x) * b.y * b.z > kMaxBlockThreads)
    return cudaErrorInvalidConfiguration;
  if (b.y != 1 || b.z != 1 || c.shared_bytes != 0) return cudaErrorNotSupported;
  return cudaSuccess;
}

// Runs `kernel` over the grid, block after block. The arguments are converted to the kernel's
// parameter types once and every thread gets its own copies, as a CUDA launch does.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  const cudaError_t status = check_config(config);
  if (status != cudaSuccess) {
    last_error = status;
    return;
  }
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  Block block(config.block.x);
  block.kernel = [&] { std::apply(kernel, params); };
  current_block = &block;
  blockDim = config.block;
  gridDim = config.grid;
  bool ok = true;
  for (unsigned bz = 0; ok && bz < config.grid.z; ++bz)
    for (unsigned by = 0; ok && by < config.grid.y; ++by)
      for (unsigned bx = 0; ok && bx < config.grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        block.reset(&fiber_entry, (bx + by + bz) % 2 == 1);
        ok = run_block(block);
      }
  current_block = nullptr;
  if (!ok) last_error = cudaErrorLaunchFailure;
}

}  // namespace kdemu

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = kdemu::last_error;
  kdemu::last_error = cudaSuccess;
  return err;
}

inline void __syncthreads() { kdemu::arrive_and_wait(kdemu::current_block->sync); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T var, int lane_mask) {
  const unsigned src = (threadIdx.x % kdemu::kWarpSize) ^ static_cast<unsigned>(lane_mask);
  return kdemu::shuffle(var, src, src < kdemu::kWarpSize);
}

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T var, unsigned delta) {
  const unsigned src = threadIdx.x % kdemu::kWarpSize + delta;
  return kdemu::shuffle(var, src, src < kdemu::kWarpSize);
}
