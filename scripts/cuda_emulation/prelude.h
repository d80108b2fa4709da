// Host emulation of the CUDA execution model, enough to run dk_detectron2's kernels on the CPU.
//
// Every CUDA thread is a fiber (ucontext) of the calling OS thread. A block's fibers run one after
// another, each until its next __syncthreads (or its end), and the emulator switches between the
// blocks in flight at every barrier, so the threads of several blocks interleave. The order is a
// schedule: 0 runs blocks and threads in index order, 1 in reverse order (and the thread order
// flips at every barrier), any other value shuffles them with that seed. A kernel that misses a
// barrier, or whose result depends on the order of blocks or threads, gives a different (usually
// wrong) result under another schedule. Launches obey the real limits (block <= 1024 threads,
// grid y/z <= 65535, dynamic shared memory <= 48 KiB unless opted in with cudaFuncSetAttribute),
// and each block's shared memory is its own heap allocation of exactly the requested size, so
// AddressSanitizer sees an overrun of shared memory like one of global memory.
#pragma once
#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define DK_EMU_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = int;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
namespace c10 {
namespace cuda {
struct OptionalCUDAGuard {
  template <class T>
  explicit OptionalCUDAGuard(T) {}
};
inline int getCurrentCUDAStream() { return 0; }
}  // namespace cuda
}  // namespace c10

namespace emu {

// Limits of the devices dk_detectron2 targets (compute capability 7.5 to 9.0).
constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr unsigned int kMaxBlockZ = 64;
constexpr unsigned int kMaxGridX = 2147483647u;
constexpr unsigned int kMaxGridYZ = 65535;
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kMaxOptInSharedBytes = 227 * 1024;  // sm_90
constexpr size_t kFiberStackBytes = 256 * 1024;

inline dim3 threadIdx_, blockIdx_, blockDim_, gridDim_;
inline unsigned char* shared_ = nullptr;  // the running block's dynamic shared memory
inline long launches = 0;
inline int64_t schedule = 0;        // see the file comment
inline int64_t blocks_in_flight = 3;
inline std::map<const void*, size_t>& opt_in() {
  static std::map<const void*, size_t> sizes;
  return sizes;
}

struct Fiber {
  ucontext_t context;
  void* stack = nullptr;
  unsigned int thread = 0;
  bool done = false, waiting = false;
  void* fake_stack = nullptr;
};

inline ucontext_t scheduler_context;
inline Fiber* running = nullptr;
inline const void* scheduler_stack_bottom = nullptr;
inline size_t scheduler_stack_size = 0;
inline std::function<void()> body;  // the kernel call of the current launch

inline void to_scheduler(bool exiting) {
#ifdef DK_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &running->fake_stack, scheduler_stack_bottom,
                                 scheduler_stack_size);
#endif
  Fiber* self = running;
  swapcontext(&self->context, &scheduler_context);
#ifdef DK_EMU_ASAN
  __sanitizer_finish_switch_fiber(self->fake_stack, &scheduler_stack_bottom,
                                  &scheduler_stack_size);
#endif
  (void)exiting;
}

inline void fiber_main() {
#ifdef DK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack_bottom, &scheduler_stack_size);
#endif
  body();
  running->done = true;
  to_scheduler(true);
}

inline void resume(Fiber& fiber) {
  running = &fiber;
#ifdef DK_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, fiber.stack, kFiberStackBytes);
#endif
  swapcontext(&scheduler_context, &fiber.context);
#ifdef DK_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  running = nullptr;
}

// Stacks are mapped once and reused by every launch.
inline std::vector<void*>& stack_pool() {
  static std::vector<void*> pool;
  return pool;
}
inline void* stack_at(size_t i) {
  auto& pool = stack_pool();
  while (pool.size() <= i) {
    void* p = mmap(nullptr, kFiberStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulator: cannot map a fiber stack");
    pool.push_back(p);
  }
  return pool[i];
}

struct Block {
  dim3 index;
  std::unique_ptr<unsigned char[]> shared;
  std::vector<Fiber> fibers;
  std::vector<unsigned int> order;  // thread order of the current phase
};

inline dim3 unflatten(uint64_t i, dim3 extent) {
  return dim3(static_cast<unsigned int>(i % extent.x),
              static_cast<unsigned int>((i / extent.x) % extent.y),
              static_cast<unsigned int>(i / (uint64_t(extent.x) * extent.y)));
}

inline void fail(const std::string& what) { throw std::runtime_error("emulated launch: " + what); }

struct Launcher {
  dim3 grid, block;
  size_t shared;
  template <class G, class B>
  Launcher(G g, B b, size_t s, int) : grid(to_dim3(g)), block(to_dim3(b)), shared(s) {}
  template <class D>
  static dim3 to_dim3(D d) {
    if constexpr (std::is_same_v<D, dim3>) {
      return d;
    } else {
      if (d < 0 || static_cast<uint64_t>(d) > 0xffffffffull) fail("launch dimension out of range");
      return dim3(static_cast<unsigned int>(d));
    }
  }

  void check(const void* kernel) const {
    std::ostringstream why;
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) why << "empty grid";
    if (threads == 0) why << "empty block";
    if (threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > kMaxBlockZ)
      why << "block of " << block.x << "x" << block.y << "x" << block.z << " threads (max 1024)";
    if (grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ)
      why << "grid " << grid.x << "x" << grid.y << "x" << grid.z << " (y and z at most 65535)";
    auto it = opt_in().find(kernel);
    const size_t allowed = it == opt_in().end() ? kDefaultSharedBytes : it->second;
    if (shared > allowed)
      why << shared << " bytes of dynamic shared memory (allowed " << allowed
          << "; more than 48 KiB needs cudaFuncSetAttribute)";
    if (!why.str().empty()) fail(why.str());
  }

  std::vector<uint64_t> block_order(uint64_t blocks) const {
    std::vector<uint64_t> order(blocks);
    std::iota(order.begin(), order.end(), 0);
    if (schedule == 1) std::reverse(order.begin(), order.end());
    if (schedule > 1) {
      std::shuffle(order.begin(), order.end(), std::mt19937_64(schedule + launches));
    }
    return order;
  }

  void thread_order(Block& b, uint64_t phase) const {
    std::iota(b.order.begin(), b.order.end(), 0u);
    if (schedule == 1 && phase % 2 == 0) std::reverse(b.order.begin(), b.order.end());
    if (schedule > 1) {
      std::shuffle(b.order.begin(), b.order.end(),
                   std::mt19937_64(schedule * 7919 + phase + launches * 104729));
    }
  }

  template <class F, class... Args>
  void operator()(F f, Args... args) {
    check(reinterpret_cast<const void*>(f));
    ++launches;
    blockDim_ = block;
    gridDim_ = grid;
    body = [&] { f(args...); };
    const unsigned int threads = block.x * block.y * block.z;
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    const std::vector<uint64_t> order = block_order(blocks);
    const uint64_t wave = static_cast<uint64_t>(std::max<int64_t>(1, blocks_in_flight));
    for (uint64_t first = 0; first < blocks; first += wave) {
      std::vector<Block> live(std::min(wave, blocks - first));
      size_t stack = 0;
      for (size_t i = 0; i < live.size(); ++i) {
        Block& b = live[i];
        b.index = unflatten(order[first + i], grid);
        b.shared.reset(shared ? new unsigned char[shared] : nullptr);
        b.fibers.resize(threads);
        b.order.resize(threads);
        for (unsigned int t = 0; t < threads; ++t) {
          Fiber& fb = b.fibers[t];
          fb.thread = t;
          fb.stack = stack_at(stack++);
          getcontext(&fb.context);
          fb.context.uc_stack.ss_sp = fb.stack;
          fb.context.uc_stack.ss_size = kFiberStackBytes;
          fb.context.uc_link = nullptr;
          makecontext(&fb.context, fiber_main, 0);
        }
      }
      run_wave(live);
    }
    body = nullptr;
  }

  // Phases end at barriers; every live block advances one phase per round.
  void run_wave(std::vector<Block>& live) const {
    for (uint64_t phase = 0;; ++phase) {
      bool any = false;
      for (Block& b : live) {
        thread_order(b, phase);
        unsigned int waiting = 0, done = 0;
        for (unsigned int t : b.order) {
          Fiber& fb = b.fibers[t];
          if (fb.done) {
            ++done;
            continue;
          }
          fb.waiting = false;
          threadIdx_ = unflatten(t, block);
          blockIdx_ = b.index;
          shared_ = b.shared.get();
          resume(fb);
          if (fb.done) ++done; else ++waiting;
        }
        if (waiting > 0 && done > 0) {
          fail(std::to_string(done) + " threads of a block exited while " +
               std::to_string(waiting) + " wait at __syncthreads (barrier divergence)");
        }
        any = any || waiting > 0;
      }
      if (!any) return;
    }
  }
};

}  // namespace emu

#define threadIdx emu::threadIdx_
#define blockIdx emu::blockIdx_
#define blockDim emu::blockDim_
#define gridDim emu::gridDim_
#define dk_shared_bytes emu::shared_
inline void __syncthreads() {
  emu::running->waiting = true;
  emu::to_scheduler(false);
}
template <class T>
inline T atomicAdd(T* address, T value) {  // fibers switch only at barriers: already atomic
  T old = *address;
  *address = old + value;
  return old;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > emu::kMaxOptInSharedBytes) {
    emu::fail("cudaFuncSetAttribute: at most 227 KiB of dynamic shared memory");
  }
  emu::opt_in()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
