// Host emulation of the CUDA execution model, good enough to run dk_detectron2's kernels on the
// CPU: each block runs with one std::thread per CUDA thread and a std::barrier for __syncthreads.
#pragma once
#include <barrier>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = int;
namespace c10 { namespace cuda {
struct OptionalCUDAGuard {
  template <class T>
  explicit OptionalCUDAGuard(T) {}
};
inline int getCurrentCUDAStream() { return 0; }
}}  // namespace c10::cuda

namespace emu {
inline thread_local dim3 threadIdx_, blockIdx_;
inline dim3 blockDim_, gridDim_;
inline thread_local std::barrier<>* barrier_ = nullptr;
inline std::mutex atomic_mutex;
alignas(16) inline unsigned char shared_bytes[1 << 16];
inline long launches = 0;

struct Launcher {
  dim3 grid, block;
  size_t shared;
  Launcher(dim3 g, dim3 b, size_t s, int) : grid(g), block(b), shared(s) {}
  Launcher(unsigned int g, unsigned int b, size_t s, int) : grid(g), block(b), shared(s) {}
  Launcher(dim3 g, int b, size_t s, int) : grid(g), block(b), shared(s) {}
  Launcher(unsigned int g, int b, size_t s, int) : grid(g), block(b), shared(s) {}
  template <class F, class... Args>
  void operator()(F f, Args... args) {
    if (shared > sizeof(shared_bytes)) throw std::runtime_error("too much shared memory");
    if (grid.x == 0 || grid.y == 0 || block.x == 0 || block.x > 1024)
      throw std::runtime_error("bad launch configuration");
    ++launches;
    blockDim_ = block;
    gridDim_ = grid;
    for (unsigned int by = 0; by < grid.y; ++by) {
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(block.x);
        std::vector<std::thread> threads;
        for (unsigned int tx = 0; tx < block.x; ++tx) {
          threads.emplace_back([&, tx] {
            threadIdx_ = dim3(tx);
            blockIdx_ = dim3(bx, by);
            barrier_ = &bar;
            f(args...);
          });
        }
        for (auto& t : threads) t.join();
      }
    }
  }
};
}  // namespace emu

#define threadIdx emu::threadIdx_
#define blockIdx emu::blockIdx_
#define blockDim emu::blockDim_
#define gridDim emu::gridDim_
#define dk_shared_bytes emu::shared_bytes
inline void __syncthreads() { emu::barrier_->arrive_and_wait(); }
template <class T>
inline T atomicAdd(T* address, T value) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  T old = *address;
  *address = old + value;
  return old;
}
