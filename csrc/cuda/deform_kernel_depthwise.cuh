// CUDA kernels of the depthwise Deformable Kernel operators (weight [C, 1, Sh, Sw]).
//
// One template parameter, kOffset, covers both operators:
//   * false: deform_kernel2d, the input is read at the integer tap (y*s - p + kh*d, x*s - p + kw*d);
//   * true:  deform_kernel_conv2d, the input is read bilinearly at that point plus the offset.
// Both read the scope weight[c, 0] bilinearly at (kh + r_y + (Sh-Kh)/2, kw + r_x + (Sw-Kw)/2)
// with the rule of csrc/bilinear.h (bilinear_corners / base_grid_position), as the CPU kernels do.
//
// Non-finite values: a tap whose image point or scope point reads nothing (outside the image or
// the scope, or a non-finite coordinate) is skipped, gradients included, and a corner outside the
// grid is never addressed (its weight 0 would turn an inf or NaN at pixel 0 or scope cell 0 into
// NaN). So a non-finite value reaches only the outputs and gradients of the taps that read it.
//
// Tensors as the kernels see them (the host code in deform_kernel_cuda.cu prepares them):
//   input, grad_input      [B, C, H, W]   contiguous in `channels_last` ? NHWC : NCHW
//   output, grad_output    [B, C, Ho, Wo] same memory format as input
//   offset, grad_offset    [B, T*2, Ho, Wo] NCHW-contiguous (T = Kh*Kw taps)
//   rotation, grad_rotation[B, G*T*2, Ho, Wo] NCHW-contiguous
//   weight, grad_weight    [C, 1, Sh, Sw] contiguous
// Values are accumulated in acc_t = at::opmath_type<scalar_t> (float for half and bfloat16).
// Every index into a tensor is int64_t.
//
// Grouped/full weights ([C_out, C_in/groups, Sh, Sw]) take the scope-space GEMM path instead
// (csrc/cuda/scope_space_cuda.cu).
#pragma once

#include <ATen/OpMathType.h>

#include "../bilinear.h"
#include "cuda_utils.cuh"

namespace dk_detectron2 {
namespace cuda {

// Geometry of one call as the kernels need it (a plain struct passed by value).
struct DKShape {
  int64_t batch, channels, height, width, out_height, out_width;
  int64_t kernel_h, kernel_w, scope_h, scope_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t rotation_groups;
  int64_t channels_per_rotation_group;  // channel c uses rotation group c / this
  bool channels_last;                   // memory format of input/output/grad_output/grad_input

  __host__ __device__ int64_t taps() const { return kernel_h * kernel_w; }
  __host__ __device__ int64_t plane() const { return height * width; }
  __host__ __device__ int64_t positions() const { return out_height * out_width; }
  __host__ __device__ int64_t scope_cells() const { return scope_h * scope_w; }
};

// Number of image corners a tap reads: one integer cell, or four bilinear corners.
template <bool kOffset>
struct ImageCorners {
  static constexpr int kCount = kOffset ? 4 : 1;
};

// Where tap (kh, kw) of output position (y, x) (s = y * Wo + x) reads the image of batch b; false
// when it reads nothing (the tap is then skipped). For the integer tap only corner 0 is filled.
template <bool kOffset, typename scalar_t, typename acc_t>
__device__ __forceinline__ bool image_corners(const scalar_t* __restrict__ offset,
                                              const DKShape& k, int64_t b, int64_t kh,
                                              int64_t kw, int64_t y, int64_t x, int64_t s,
                                              BilinearCorners<acc_t>& corners) {
  const int64_t iy = y * k.stride_h - k.pad_h + kh * k.dilation_h;
  const int64_t ix = x * k.stride_w - k.pad_w + kw * k.dilation_w;
  if constexpr (kOffset) {
    const int64_t positions = k.positions();
    const int64_t tap = kh * k.kernel_w + kw;
    const scalar_t* o = offset + (b * k.taps() * 2 + tap * 2) * positions + s;
    const acc_t py = static_cast<acc_t>(iy) + static_cast<acc_t>(o[0]);
    const acc_t px = static_cast<acc_t>(ix) + static_cast<acc_t>(o[positions]);
    bilinear_corners(py, px, k.height, k.width, corners);
    return bilinear_in_range(py, px, k.height, k.width);
  } else {
    const bool inside = iy >= 0 && iy < k.height && ix >= 0 && ix < k.width;
    corners.index[0] = inside ? iy * k.width + ix : 0;
    corners.weight[0] = inside ? acc_t(1) : acc_t(0);
    corners.dweight_dy[0] = acc_t(0);
    corners.dweight_dx[0] = acc_t(0);
    corners.inside[0] = inside;
    return inside;
  }
}

// Where tap (kh, kw) of output position s reads the scope, for rotation group g of batch b;
// false when it reads nothing (the tap is then skipped).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool scope_corners(const scalar_t* __restrict__ rotation,
                                              const DKShape& k, int64_t b, int64_t g,
                                              int64_t kh, int64_t kw, int64_t s,
                                              BilinearCorners<acc_t>& corners) {
  const int64_t positions = k.positions();
  const int64_t tap = kh * k.kernel_w + kw;
  const int64_t channel = (g * k.taps() + tap) * 2;
  const scalar_t* r = rotation + (b * k.rotation_groups * k.taps() * 2 + channel) * positions + s;
  const acc_t sy =
      base_grid_position<acc_t>(kh, k.kernel_h, k.scope_h) + static_cast<acc_t>(r[0]);
  const acc_t sx =
      base_grid_position<acc_t>(kw, k.kernel_w, k.scope_w) + static_cast<acc_t>(r[positions]);
  bilinear_corners(sy, sx, k.scope_h, k.scope_w, corners);
  return bilinear_in_range(sy, sx, k.scope_h, k.scope_w);
}

// sum_i weight[i] * table[index[i] * stride] over the corners inside the grid (the others are
// never addressed).
template <int kCount, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t read_corners(const scalar_t* __restrict__ table,
                                              const BilinearCorners<acc_t>& corners) {
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < kCount; ++i) {
    if (corners.inside[i]) sum += corners.weight[i] * static_cast<acc_t>(table[corners.index[i]]);
  }
  return sum;
}

// ------------------------------------------------------------------------------------------------
// Forward: one thread per (b, rotation group, chunk of kChannelsPerThread channels of that group,
// output position), positions fastest. The image and scope corners of each tap are computed once
// per thread and shared by the chunk's channels, whose sums stay in registers. Consecutive threads
// touch consecutive positions (coalesced in NCHW); in channels-last each thread reads and writes
// kChannelsPerThread consecutive values.
// ------------------------------------------------------------------------------------------------
constexpr int kChannelsPerThread = 8;

template <typename scalar_t, bool kOffset>
__global__ void dk_forward_kernel(const scalar_t* __restrict__ input,
                                  const scalar_t* __restrict__ offset,
                                  const scalar_t* __restrict__ rotation,
                                  const scalar_t* __restrict__ weight,
                                  scalar_t* __restrict__ output, const DKShape k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = k.positions();
  const int64_t group_channels = k.channels_per_rotation_group;
  const int64_t chunks = (group_channels + kChannelsPerThread - 1) / kChannelsPerThread;
  const int64_t total = k.batch * k.rotation_groups * chunks * positions;
  DK_CUDA_KERNEL_LOOP(n, total) {
    const int64_t s = n % positions;
    const int64_t chunk = (n / positions) % chunks;
    const int64_t g = (n / (positions * chunks)) % k.rotation_groups;
    const int64_t b = n / (positions * chunks * k.rotation_groups);
    const int64_t y = s / k.out_width;
    const int64_t x = s - y * k.out_width;
    const int64_t c_begin = g * group_channels + chunk * kChannelsPerThread;
    const int channels_here =
        static_cast<int>(min_int64(kChannelsPerThread, (g + 1) * group_channels - c_begin));
    acc_t sum[kChannelsPerThread];
#pragma unroll
    for (int j = 0; j < kChannelsPerThread; ++j) sum[j] = acc_t(0);
    for (int64_t kh = 0; kh < k.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < k.kernel_w; ++kw) {
        BilinearCorners<acc_t> img;
        if (!image_corners<kOffset>(offset, k, b, kh, kw, y, x, s, img)) continue;
        BilinearCorners<acc_t> sc;
        if (!scope_corners(rotation, k, b, g, kh, kw, s, sc)) continue;
#pragma unroll
        for (int j = 0; j < kChannelsPerThread; ++j) {
          if (j >= channels_here) break;
          const int64_t c = c_begin + j;
          acc_t value = 0;
#pragma unroll
          for (int i = 0; i < ImageCorners<kOffset>::kCount; ++i) {
            if (!img.inside[i]) continue;
            const int64_t at = image_offset(b, c, img.index[i], k.channels, k.plane(),
                                            k.channels_last);
            value += img.weight[i] * static_cast<acc_t>(input[at]);
          }
          const acc_t kernel = read_corners<4>(weight + c * k.scope_cells(), sc);
          sum[j] += value * kernel;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kChannelsPerThread; ++j) {
      if (j >= channels_here) break;
      const int64_t at = image_offset(b, c_begin + j, s, k.channels, positions, k.channels_last);
      output[at] = static_cast<scalar_t>(sum[j]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// grad_input of deform_kernel2d (integer taps): a gather, no atomics, deterministic. One thread per
// (b, rotation group, chunk of kChannelsPerThread channels, input position), as in the forward:
// it sums the taps that read this input position, computing each tap's scope corners once for
// the chunk's channels.
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void dk_grad_input_gather_kernel(const scalar_t* __restrict__ grad_output,
                                            const scalar_t* __restrict__ rotation,
                                            const scalar_t* __restrict__ weight,
                                            scalar_t* __restrict__ grad_input, const DKShape k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = k.positions();
  const int64_t plane = k.plane();
  const int64_t group_channels = k.channels_per_rotation_group;
  const int64_t chunks = (group_channels + kChannelsPerThread - 1) / kChannelsPerThread;
  const int64_t total = k.batch * k.rotation_groups * chunks * plane;
  DK_CUDA_KERNEL_LOOP(n, total) {
    const int64_t is = n % plane;
    const int64_t chunk = (n / plane) % chunks;
    const int64_t g = (n / (plane * chunks)) % k.rotation_groups;
    const int64_t b = n / (plane * chunks * k.rotation_groups);
    const int64_t iy = is / k.width;
    const int64_t ix = is - iy * k.width;
    const int64_t c_begin = g * group_channels + chunk * kChannelsPerThread;
    const int channels_here =
        static_cast<int>(min_int64(kChannelsPerThread, (g + 1) * group_channels - c_begin));
    acc_t sum[kChannelsPerThread];
#pragma unroll
    for (int j = 0; j < kChannelsPerThread; ++j) sum[j] = acc_t(0);
    for (int64_t kh = 0; kh < k.kernel_h; ++kh) {
      // Output row y reads input row iy through tap kh when y * stride = iy + pad - kh * dilation.
      const int64_t ty = iy + k.pad_h - kh * k.dilation_h;
      if (ty < 0 || ty % k.stride_h != 0) continue;
      const int64_t y = ty / k.stride_h;
      if (y >= k.out_height) continue;
      for (int64_t kw = 0; kw < k.kernel_w; ++kw) {
        const int64_t tx = ix + k.pad_w - kw * k.dilation_w;
        if (tx < 0 || tx % k.stride_w != 0) continue;
        const int64_t x = tx / k.stride_w;
        if (x >= k.out_width) continue;
        const int64_t s = y * k.out_width + x;
        BilinearCorners<acc_t> sc;
        if (!scope_corners(rotation, k, b, g, kh, kw, s, sc)) continue;
#pragma unroll
        for (int j = 0; j < kChannelsPerThread; ++j) {
          if (j >= channels_here) break;
          const int64_t c = c_begin + j;
          const acc_t kernel = read_corners<4>(weight + c * k.scope_cells(), sc);
          const int64_t at = image_offset(b, c, s, k.channels, positions, k.channels_last);
          sum[j] += kernel * static_cast<acc_t>(grad_output[at]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kChannelsPerThread; ++j) {
      if (j >= channels_here) break;
      const int64_t at = image_offset(b, c_begin + j, is, k.channels, plane, k.channels_last);
      grad_input[at] = static_cast<scalar_t>(sum[j]);  // grad_input has input's memory format
    }
  }
}

// ------------------------------------------------------------------------------------------------
// grad_input of deform_kernel_conv2d (bilinear image reads): a scatter with atomics into an
// acc_t buffer laid out like the input, one thread per output element.
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void dk_grad_input_scatter_kernel(const scalar_t* __restrict__ grad_output,
                                             const scalar_t* __restrict__ offset,
                                             const scalar_t* __restrict__ rotation,
                                             const scalar_t* __restrict__ weight,
                                             at::opmath_type<scalar_t>* __restrict__ grad_input,
                                             const DKShape k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = k.positions();
  const int64_t total = k.batch * k.channels * positions;
  DK_CUDA_KERNEL_LOOP(n, total) {
    const ImageIndex o = image_index(n, k.channels, positions, k.channels_last);
    const acc_t go = static_cast<acc_t>(grad_output[n]);
    const int64_t y = o.s / k.out_width;
    const int64_t x = o.s - y * k.out_width;
    const int64_t g = o.c / k.channels_per_rotation_group;
    const scalar_t* scope = weight + o.c * k.scope_cells();
    for (int64_t kh = 0; kh < k.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < k.kernel_w; ++kw) {
        BilinearCorners<acc_t> img;
        if (!image_corners<true>(offset, k, o.b, kh, kw, y, x, o.s, img)) continue;
        BilinearCorners<acc_t> sc;
        if (!scope_corners(rotation, k, o.b, g, kh, kw, o.s, sc)) continue;
        const acc_t grad_value = go * read_corners<4>(scope, sc);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (!img.inside[i]) continue;  // outside the image: nothing was read
          const int64_t at = image_offset(o.b, o.c, img.index[i], k.channels, k.plane(),
                                          k.channels_last);
          atomicAdd(grad_input + at, grad_value * img.weight[i]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// grad_rotation (and grad_offset when kOffset): one thread per (b, tap, position), looping
// over the rotation groups and, inside a group, over its channels. The image corners of the tap
// are computed once per thread and the scope corners once per group. No atomics.
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, bool kOffset>
__global__ void dk_grad_rotation_offset_kernel(const scalar_t* __restrict__ grad_output,
                                               const scalar_t* __restrict__ input,
                                               const scalar_t* __restrict__ offset,
                                               const scalar_t* __restrict__ rotation,
                                               const scalar_t* __restrict__ weight,
                                               scalar_t* __restrict__ grad_offset,
                                               scalar_t* __restrict__ grad_rotation,
                                               const DKShape k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = k.positions();
  const int64_t taps = k.taps();
  const int64_t total = k.batch * taps * positions;
  DK_CUDA_KERNEL_LOOP(n, total) {
    const int64_t s = n % positions;
    const int64_t tap = (n / positions) % taps;
    const int64_t b = n / (positions * taps);
    const int64_t kh = tap / k.kernel_w;
    const int64_t kw = tap - kh * k.kernel_w;
    const int64_t y = s / k.out_width;
    const int64_t x = s - y * k.out_width;
    BilinearCorners<acc_t> img;
    const bool reads_image = image_corners<kOffset>(offset, k, b, kh, kw, y, x, s, img);
    acc_t grad_offset_y = 0, grad_offset_x = 0;
    for (int64_t g = 0; g < k.rotation_groups; ++g) {
      BilinearCorners<acc_t> sc;
      // A skipped tap (nothing read in the image or the scope) has zero gradients.
      const bool reads = reads_image && scope_corners(rotation, k, b, g, kh, kw, s, sc);
      acc_t grad_rotation_y = 0, grad_rotation_x = 0;
      const int64_t c_begin = g * k.channels_per_rotation_group;
      const int64_t c_end = reads ? c_begin + k.channels_per_rotation_group : c_begin;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const acc_t go = static_cast<acc_t>(
            grad_output[image_offset(b, c, s, k.channels, positions, k.channels_last)]);
        acc_t value = 0, dvalue_dy = 0, dvalue_dx = 0;
#pragma unroll
        for (int i = 0; i < ImageCorners<kOffset>::kCount; ++i) {
          if (!img.inside[i]) continue;
          const acc_t v = static_cast<acc_t>(
              input[image_offset(b, c, img.index[i], k.channels, k.plane(), k.channels_last)]);
          value += img.weight[i] * v;
          if constexpr (kOffset) {
            dvalue_dy += img.dweight_dy[i] * v;
            dvalue_dx += img.dweight_dx[i] * v;
          }
        }
        const scalar_t* scope = weight + c * k.scope_cells();
        acc_t kernel = 0, dkernel_dy = 0, dkernel_dx = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (!sc.inside[i]) continue;
          const acc_t w = static_cast<acc_t>(scope[sc.index[i]]);
          kernel += sc.weight[i] * w;
          dkernel_dy += sc.dweight_dy[i] * w;
          dkernel_dx += sc.dweight_dx[i] * w;
        }
        const acc_t go_value = go * value;
        grad_rotation_y += go_value * dkernel_dy;
        grad_rotation_x += go_value * dkernel_dx;
        if constexpr (kOffset) {
          const acc_t go_kernel = go * kernel;
          grad_offset_y += go_kernel * dvalue_dy;
          grad_offset_x += go_kernel * dvalue_dx;
        }
      }
      const int64_t r = (b * k.rotation_groups * taps * 2 + (g * taps + tap) * 2) * positions + s;
      grad_rotation[r] = static_cast<scalar_t>(grad_rotation_y);
      grad_rotation[r + positions] = static_cast<scalar_t>(grad_rotation_x);
    }
    if constexpr (kOffset) {
      const int64_t o = (b * taps * 2 + tap * 2) * positions + s;
      grad_offset[o] = static_cast<scalar_t>(grad_offset_y);
      grad_offset[o + positions] = static_cast<scalar_t>(grad_offset_x);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// grad_weight, stage 1: block (c, chunk) reduces the scope gradient of channel c over one chunk
// of the (b, position) pairs into partial[chunk, c, :]. Each thread accumulates into its own
// column of a shared-memory array [cells_per_pass, blockDim.x] (no atomics, no bank conflicts),
// then the block sums the columns with a tree. Scopes with more cells than fit in shared memory
// take several passes over the chunk, each owning a range of cells. blockDim.x: a power of two.
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, bool kOffset>
__global__ void dk_grad_weight_partial_kernel(const scalar_t* __restrict__ grad_output,
                                              const scalar_t* __restrict__ input,
                                              const scalar_t* __restrict__ offset,
                                              const scalar_t* __restrict__ rotation,
                                              at::opmath_type<scalar_t>* __restrict__ partial,
                                              const DKShape k, int64_t items_per_chunk,
                                              int64_t cells_per_pass) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char dk_shared_bytes[];
  acc_t* columns = reinterpret_cast<acc_t*>(dk_shared_bytes);

  const int64_t c = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t threads = blockDim.x;
  const int64_t t = threadIdx.x;
  const int64_t positions = k.positions();
  const int64_t cells = k.scope_cells();
  const int64_t begin = chunk * items_per_chunk;
  const int64_t end = min_int64(k.batch * positions, begin + items_per_chunk);
  const int64_t g = c / k.channels_per_rotation_group;
  acc_t* mine = columns + t;  // cell j of this thread: mine[j * threads]

  for (int64_t first_cell = 0; first_cell < cells; first_cell += cells_per_pass) {
    const int64_t pass_cells = min_int64(cells_per_pass, cells - first_cell);
    for (int64_t j = 0; j < pass_cells; ++j) mine[j * threads] = acc_t(0);
    for (int64_t item = begin + t; item < end; item += threads) {
      const int64_t b = item / positions;
      const int64_t s = item - b * positions;
      const int64_t y = s / k.out_width;
      const int64_t x = s - y * k.out_width;
      const acc_t go = static_cast<acc_t>(
          grad_output[image_offset(b, c, s, k.channels, positions, k.channels_last)]);
      for (int64_t kh = 0; kh < k.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < k.kernel_w; ++kw) {
          BilinearCorners<acc_t> img;
          if (!image_corners<kOffset>(offset, k, b, kh, kw, y, x, s, img)) continue;
          acc_t value = 0;
#pragma unroll
          for (int i = 0; i < ImageCorners<kOffset>::kCount; ++i) {
            if (!img.inside[i]) continue;
            const int64_t at = image_offset(b, c, img.index[i], k.channels, k.plane(),
                                            k.channels_last);
            value += img.weight[i] * static_cast<acc_t>(input[at]);
          }
          const acc_t go_value = go * value;
          if (go_value == acc_t(0)) continue;  // bilinear weights are finite: adds exact zeros
          BilinearCorners<acc_t> sc;
          if (!scope_corners(rotation, k, b, g, kh, kw, s, sc)) continue;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (!sc.inside[i]) continue;  // no gradient for a cell the tap did not read
            const int64_t j = sc.index[i] - first_cell;
            if (j >= 0 && j < pass_cells) mine[j * threads] += go_value * sc.weight[i];
          }
        }
      }
    }
    __syncthreads();
    for (int64_t stride = threads / 2; stride > 0; stride /= 2) {
      if (t < stride) {
        for (int64_t j = 0; j < pass_cells; ++j) {
          columns[j * threads + t] += columns[j * threads + t + stride];
        }
      }
      __syncthreads();
    }
    for (int64_t j = t; j < pass_cells; j += threads) {
      partial[(chunk * k.channels + c) * cells + first_cell + j] = columns[j * threads];
    }
    __syncthreads();  // the next pass overwrites the columns
  }
}

// grad_weight, stage 2: sums the chunks, one thread per weight element (deterministic).
template <typename scalar_t>
__global__ void dk_grad_weight_reduce_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                             scalar_t* __restrict__ grad_weight,
                                             int64_t num_chunks, int64_t weight_numel) {
  using acc_t = at::opmath_type<scalar_t>;
  DK_CUDA_KERNEL_LOOP(n, weight_numel) {
    acc_t sum = 0;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) sum += partial[chunk * weight_numel + n];
    grad_weight[n] = static_cast<scalar_t>(sum);
  }
}

}  // namespace cuda
}  // namespace dk_detectron2
