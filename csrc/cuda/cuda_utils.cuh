// Small helpers shared by the CUDA kernels of dk_detectron2: launch sizes, grid-stride loops and
// the addressing of [B, C, H, W] tensors stored either NCHW-contiguous or channels-last.
//
// The host code makes every image-like tensor (input, output, grad_output, grad_input)
// contiguous in ONE memory format, the input's (channels-last in, channels-last out), so a kernel
// only needs that format's flag to address element (b, c, spatial index) and to order its threads
// so that neighbouring threads touch neighbouring memory.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace dk_detectron2 {
namespace cuda {

constexpr int kThreadsPerBlock = 256;
// Grid-stride loops make any grid size correct; this cap only bounds the launch.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline unsigned int blocks_for(int64_t work_items, int threads = kThreadsPerBlock) {
  const int64_t blocks = (work_items + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks, kMaxBlocks)));
}

// for (int64_t i = first; i < n; i += stride) over the whole grid, 64-bit safe.
#define DK_CUDA_KERNEL_LOOP(i, n)                                                         \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

__host__ __device__ __forceinline__ int64_t min_int64(int64_t a, int64_t b) { return a < b ? a : b; }

// Offset of element (b, c, s) of a [B, C, plane] tensor (plane = H * W, s = y * W + x) stored
// NCHW-contiguous or channels-last-contiguous.
__host__ __device__ __forceinline__ int64_t image_offset(int64_t b, int64_t c, int64_t s,
                                                         int64_t channels, int64_t plane,
                                                         bool channels_last) {
  return channels_last ? (b * plane + s) * channels + c : (b * channels + c) * plane + s;
}

// Inverse of image_offset: the element that thread `index` handles, in memory order, so that
// consecutive threads read and write consecutive addresses in both layouts.
struct ImageIndex {
  int64_t b, c, s;
};

__host__ __device__ __forceinline__ ImageIndex image_index(int64_t index, int64_t channels,
                                                           int64_t plane, bool channels_last) {
  ImageIndex i;
  if (channels_last) {
    i.c = index % channels;
    index /= channels;
    i.s = index % plane;
    i.b = index / plane;
  } else {
    i.s = index % plane;
    index /= plane;
    i.c = index % channels;
    i.b = index / channels;
  }
  return i;
}

}  // namespace cuda
}  // namespace dk_detectron2
