// Grouped and full Deformable Kernels on CUDA: "im2col into scope space" + cuBLAS GEMM.
//
// The same decomposition as csrc/cpu/scope_space_cpu.cpp: for the output channels [o0, o1) that
// share convolution group q and rotation group g,
//   out[p, o] = sum_{s, c} U_qg[p, s, c] * W[o, c, s],
//   U_qg[p, s, c] = sum_k beta(k, s; rotation_g(p)) * read(x[q's channel c], tap k of p).
// U is built tile by tile over rows p of [B*Ho*Wo] (float accumulation, one thread per (row,
// channel), so every column entry has one writer); the GEMMs go through cuBLAS with float32
// accumulation AND a float32 result for half types (mm_opmath), so no partial sum is rounded to
// half before it reaches the float32 accumulators. The backward adjoint reduces each (row, tap)'s
// rotation/offset gradient over channels in one thread, and scatters the input gradient with
// atomics (nondeterministic: reported to torch.use_deterministic_algorithms).
//
// Non-finite values: a tap that reads nothing in the image or the scope is skipped, and a corner
// outside the grid is never addressed (no pixel 0 / cell 0 read or written with weight 0), as in
// the depthwise kernels. The GEMMs multiply every scope cell, so a non-finite weight still reaches
// every output of its output channel, as on the CPU (and in any convolution).
#include "scope_space_cuda.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <vector>

#include "bilinear.h"
#include "cuda_utils.cuh"

namespace dk_detectron2 {
namespace cuda {
namespace {

using Segment = ChannelSegment;

// Where tap k of row r (a global output position) reads; false when it reads nothing (the tap
// is skipped). Corners outside the grid have inside false: callers never address them.
template <typename scalar_t, typename acc_t, bool kOffset>
__device__ __forceinline__ bool tap_corners(const DKGeometry& g, const scalar_t* rotation,
                                            const scalar_t* offset, int64_t r, int64_t group,
                                            int64_t k, BilinearCorners<acc_t>& scope,
                                            BilinearCorners<acc_t>& image, int64_t& pixel) {
  const int64_t plane = g.out_height * g.out_width;
  const int64_t b = r / plane, pos = r % plane;
  const int64_t oy = pos / g.out_width, ox = pos % g.out_width;
  const int64_t kh = k / g.kernel_w, kw = k % g.kernel_w;
  const scalar_t* rot =
      rotation + (b * g.rotation_groups * g.taps() * 2 + (group * g.taps() + k) * 2) * plane + pos;
  const acc_t sy =
      base_grid_position<acc_t>(kh, g.kernel_h, g.scope_h) + static_cast<acc_t>(rot[0]);
  const acc_t sx =
      base_grid_position<acc_t>(kw, g.kernel_w, g.scope_w) + static_cast<acc_t>(rot[plane]);
  if (!bilinear_in_range(sy, sx, g.scope_h, g.scope_w)) return false;
  bilinear_corners(sy, sx, g.scope_h, g.scope_w, scope);
  const int64_t iy = oy * g.stride_h - g.pad_h + kh * g.dilation_h;
  const int64_t ix = ox * g.stride_w - g.pad_w + kw * g.dilation_w;
  if (kOffset) {
    const scalar_t* off = offset + (b * g.taps() * 2 + k * 2) * plane + pos;
    const acc_t y = static_cast<acc_t>(iy) + static_cast<acc_t>(off[0]);
    const acc_t x = static_cast<acc_t>(ix) + static_cast<acc_t>(off[plane]);
    if (!bilinear_in_range(y, x, g.height, g.width)) return false;
    bilinear_corners(y, x, g.height, g.width, image);
    pixel = 0;
    return true;
  }
  if (iy < 0 || iy >= g.height || ix < 0 || ix >= g.width) return false;
  pixel = iy * g.width + ix;
  return true;
}

// cols[(r - r0), s * Cq + c] for rows [r0, r1); one thread per (row, c).
template <typename scalar_t, bool kOffset>
__global__ void build_columns_kernel(DKGeometry g, const scalar_t* input, const scalar_t* offset,
                                     const scalar_t* rotation, int64_t r0, int64_t r1, int64_t q,
                                     int64_t group, at::opmath_type<scalar_t>* cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cin = g.in_channels, Cq = Cin / g.groups, depth = g.scope_cells() * Cq;
  const int64_t plane_in = g.height * g.width;
  DK_CUDA_KERNEL_LOOP(index, (r1 - r0) * Cq) {
    const int64_t c = index % Cq, r = r0 + index / Cq;
    const int64_t b = r / (g.out_height * g.out_width);
    const scalar_t* image = input + b * plane_in * Cin + q * Cq + c;
    acc_t* row = cols + (r - r0) * depth + c;
    BilinearCorners<acc_t> scope, img;
    int64_t pixel;
    for (int64_t k = 0; k < g.taps(); ++k) {
      if (!tap_corners<scalar_t, acc_t, kOffset>(g, rotation, offset, r, group, k, scope, img,
                                                 pixel)) {
        continue;
      }
      acc_t v = 0;
      if (kOffset) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (img.inside[j]) v += img.weight[j] * acc_t(image[img.index[j] * Cin]);
        }
      } else {
        v = acc_t(image[pixel * Cin]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (scope.inside[j]) row[scope.index[j] * Cq] += scope.weight[j] * v;
      }
    }
  }
}

// Rotation (and offset) gradient of each (row, tap): one thread reduces over the group's
// channels (each (row, tap) has one writer per segment; segments run one after another).
template <typename scalar_t, bool kOffset>
__global__ void columns_backward_params_kernel(DKGeometry g, const scalar_t* input,
                                               const scalar_t* offset, const scalar_t* rotation,
                                               int64_t r0, int64_t r1, int64_t q, int64_t group,
                                               const at::opmath_type<scalar_t>* grad_cols,
                                               at::opmath_type<scalar_t>* grad_rotation,
                                               at::opmath_type<scalar_t>* grad_offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cin = g.in_channels, Cq = Cin / g.groups, depth = g.scope_cells() * Cq;
  const int64_t plane = g.out_height * g.out_width, plane_in = g.height * g.width;
  DK_CUDA_KERNEL_LOOP(item, (r1 - r0) * g.taps()) {
    const int64_t r = r0 + item / g.taps(), k = item % g.taps();
    BilinearCorners<acc_t> scope, img;
    int64_t pixel;
    if (!tap_corners<scalar_t, acc_t, kOffset>(g, rotation, offset, r, group, k, scope, img,
                                               pixel)) {
      continue;
    }
    const int64_t b = r / plane, pos = r % plane;
    const scalar_t* image = input + b * plane_in * Cin + q * Cq;
    const acc_t* gc = grad_cols + (r - r0) * depth;
    acc_t d[4] = {0, 0, 0, 0}, e[4] = {0, 0, 0, 0};
    for (int64_t c = 0; c < Cq; ++c) {
      acc_t x[4] = {0, 0, 0, 0}, v = 0;
      if (kOffset) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (!img.inside[j]) continue;
          x[j] = acc_t(image[img.index[j] * Cin + c]);
          v += img.weight[j] * x[j];
        }
      } else {
        v = acc_t(image[pixel * Cin + c]);
      }
      acc_t grad_value = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (!scope.inside[j]) continue;
        const acc_t h = gc[scope.index[j] * Cq + c];
        d[j] += h * v;
        grad_value += scope.weight[j] * h;
      }
      if (kOffset) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (img.inside[j]) e[j] += grad_value * x[j];
        }
      }
    }
    acc_t* grot = grad_rotation +
                  (b * g.rotation_groups * g.taps() * 2 + (group * g.taps() + k) * 2) * plane +
                  pos;
    acc_t gy = 0, gx = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (!scope.inside[j]) continue;
      gy += scope.dweight_dy[j] * d[j];
      gx += scope.dweight_dx[j] * d[j];
    }
    grot[0] += gy;
    grot[plane] += gx;
    if (kOffset) {
      acc_t oy = 0, ox = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (!img.inside[j]) continue;
        oy += img.dweight_dy[j] * e[j];
        ox += img.dweight_dx[j] * e[j];
      }
      acc_t* goff = grad_offset + (b * g.taps() * 2 + k * 2) * plane + pos;
      goff[0] += oy;
      goff[plane] += ox;
    }
  }
}

// Input gradient: one thread per (row, c), atomics into the float accumulator [B, H, W, C_in].
template <typename scalar_t, bool kOffset>
__global__ void columns_backward_input_kernel(DKGeometry g, const scalar_t* offset,
                                              const scalar_t* rotation, int64_t r0, int64_t r1,
                                              int64_t q, int64_t group,
                                              const at::opmath_type<scalar_t>* grad_cols,
                                              at::opmath_type<scalar_t>* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cin = g.in_channels, Cq = Cin / g.groups, depth = g.scope_cells() * Cq;
  const int64_t plane = g.out_height * g.out_width, plane_in = g.height * g.width;
  DK_CUDA_KERNEL_LOOP(index, (r1 - r0) * Cq) {
    const int64_t c = index % Cq, r = r0 + index / Cq;
    const int64_t b = r / plane;
    acc_t* image_grad = grad_input + b * plane_in * Cin + q * Cq + c;
    const acc_t* gc = grad_cols + (r - r0) * depth + c;
    BilinearCorners<acc_t> scope, img;
    int64_t pixel;
    for (int64_t k = 0; k < g.taps(); ++k) {
      if (!tap_corners<scalar_t, acc_t, kOffset>(g, rotation, offset, r, group, k, scope, img,
                                                 pixel)) {
        continue;
      }
      acc_t grad_value = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (scope.inside[j]) grad_value += scope.weight[j] * gc[scope.index[j] * Cq];
      }
      if (kOffset) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (img.inside[j]) {
            atomicAdd(image_grad + img.index[j] * Cin, img.weight[j] * grad_value);
          }
        }
      } else {
        atomicAdd(image_grad + pixel * Cin, grad_value);
      }
    }
  }
}

int64_t tile_rows(const DKGeometry& g) {
  const int64_t depth = g.scope_cells() * (g.in_channels / g.groups);
  const int64_t budget = (int64_t(64) << 20) / 4;  // about 64 MiB of float columns per tile
  return std::max<int64_t>(256, budget / std::max<int64_t>(depth, 1));
}

// a @ b in at::opmath_type: half and bfloat16 operands give a float32 product (cuBLAS accumulates
// and writes in float32), float and double stay as they are.
at::Tensor mm_opmath(const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType acc = at::toOpMathType(a.scalar_type());
  if (acc == a.scalar_type()) return at::mm(a, b);
  return at::mm(a, b, acc);
}

template <typename scalar_t>
void launch_build(const DKGeometry& g, const at::Tensor& input, const at::Tensor& offset,
                  const at::Tensor& rotation, int64_t r0, int64_t r1, const Segment& seg,
                  at::Tensor& cols) {
  using acc_t = at::opmath_type<scalar_t>;
  auto stream = c10::cuda::getCurrentCUDAStream();
  cols.zero_();
  const int64_t work = (r1 - r0) * (g.in_channels / g.groups);
  if (offset.defined()) {
    build_columns_kernel<scalar_t, true><<<blocks_for(work), kThreadsPerBlock, 0, stream>>>(
        g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
        rotation.data_ptr<scalar_t>(), r0, r1, seg.q, seg.g, cols.data_ptr<acc_t>());
  } else {
    build_columns_kernel<scalar_t, false><<<blocks_for(work), kThreadsPerBlock, 0, stream>>>(
        g, input.data_ptr<scalar_t>(), nullptr, rotation.data_ptr<scalar_t>(), r0, r1, seg.q,
        seg.g, cols.data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor scope_space_forward_cuda(const DKGeometry& g, const at::Tensor& input_any,
                                    const at::Tensor& offset, const at::Tensor& rotation,
                                    const at::Tensor& weight) {
  c10::cuda::OptionalCUDAGuard guard(input_any.device());
  const at::Tensor input = input_any.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_height, g.out_width},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t rows = g.batch * g.positions();
  if (rows == 0 || g.out_channels == 0) return out;
  // An empty image (H or W = 0, an output of padding only) reads zero everywhere; the kernels
  // must not even address its zero-byte storage.
  if (input.numel() == 0) return out.zero_();
  at::Tensor out_rows = out.permute({0, 2, 3, 1}).view({rows, g.out_channels});
  const at::Tensor w = weight_as_columns(weight);
  const int64_t tile = std::min(rows, tile_rows(g));
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor cols = at::empty({tile, w.size(1)}, input.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "scope_space_forward_cuda", [&] {
    for (int64_t r0 = 0; r0 < rows; r0 += tile) {
      const int64_t r1 = std::min(rows, r0 + tile);
      at::Tensor tile_cols = cols.narrow(0, 0, r1 - r0);
      for (const Segment& seg : channel_segments(g)) {
        launch_build<scalar_t>(g, input, offset, rotation, r0, r1, seg, tile_cols);
        const int64_t n = seg.o1 - seg.o0;
        out_rows.narrow(0, r0, r1 - r0)
            .narrow(1, seg.o0, n)
            .copy_(mm_opmath(tile_cols.to(input.scalar_type()), w.narrow(0, seg.o0, n).t()));
      }
    }
  });
  return out;
}

std::vector<at::Tensor> scope_space_backward_cuda(const DKGeometry& g,
                                                  const at::Tensor& grad_output,
                                                  const at::Tensor& input_any,
                                                  const at::Tensor& offset,
                                                  const at::Tensor& rotation,
                                                  const at::Tensor& weight) {
  c10::cuda::OptionalCUDAGuard guard(input_any.device());
  const at::Tensor input = input_any.contiguous(at::MemoryFormat::ChannelsLast);
  const bool has_offset = offset.defined();
  const int64_t rows = g.batch * g.positions();
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const auto acc_options = input.options().dtype(acc_type);
  at::Tensor grad_input =
      at::empty(input.sizes(), acc_options.memory_format(at::MemoryFormat::ChannelsLast)).zero_();
  at::Tensor grad_rotation = at::zeros(rotation.sizes(), acc_options);
  at::Tensor grad_offset = has_offset ? at::zeros(offset.sizes(), acc_options) : at::Tensor();
  const at::Tensor w = weight_as_columns(weight);
  at::Tensor grad_w = at::zeros(w.sizes(), acc_options);
  if (rows > 0 && g.out_channels > 0 && input.numel() > 0) {
    at::globalContext().alertNotDeterministic(
        "dk_detectron2 grouped/full Deformable Kernel backward (CUDA, grad_input)");
    const at::Tensor gout_rows = grad_output.to(input.scalar_type())
                                     .contiguous(at::MemoryFormat::ChannelsLast)
                                     .permute({0, 2, 3, 1})
                                     .reshape({rows, g.out_channels});
    const int64_t tile = std::min(rows, tile_rows(g));
    at::Tensor cols = at::empty({tile, w.size(1)}, acc_options);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "scope_space_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* off = has_offset ? offset.data_ptr<scalar_t>() : nullptr;
      acc_t* goff = has_offset ? grad_offset.data_ptr<acc_t>() : nullptr;
      for (int64_t r0 = 0; r0 < rows; r0 += tile) {
        const int64_t r1 = std::min(rows, r0 + tile);
        at::Tensor tile_cols = cols.narrow(0, 0, r1 - r0);
        for (const Segment& seg : channel_segments(g)) {
          const int64_t n = seg.o1 - seg.o0;
          launch_build<scalar_t>(g, input, offset, rotation, r0, r1, seg, tile_cols);
          const at::Tensor gout = gout_rows.narrow(0, r0, r1 - r0).narrow(1, seg.o0, n);
          const at::Tensor cols_in = tile_cols.to(input.scalar_type());
          grad_w.narrow(0, seg.o0, n).add_(mm_opmath(gout.t(), cols_in));
          const at::Tensor grad_cols = mm_opmath(gout, w.narrow(0, seg.o0, n)).contiguous();
          const int64_t items = (r1 - r0) * g.taps();  // (row, tap) pairs
          const int64_t work = (r1 - r0) * (g.in_channels / g.groups);
          if (has_offset) {
            columns_backward_params_kernel<scalar_t, true>
                <<<blocks_for(items), kThreadsPerBlock, 0, stream>>>(
                    g, input.data_ptr<scalar_t>(), off, rotation.data_ptr<scalar_t>(), r0, r1,
                    seg.q, seg.g, grad_cols.data_ptr<acc_t>(), grad_rotation.data_ptr<acc_t>(),
                    goff);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            columns_backward_input_kernel<scalar_t, true>
                <<<blocks_for(work), kThreadsPerBlock, 0, stream>>>(
                    g, off, rotation.data_ptr<scalar_t>(), r0, r1, seg.q, seg.g,
                    grad_cols.data_ptr<acc_t>(), grad_input.data_ptr<acc_t>());
          } else {
            columns_backward_params_kernel<scalar_t, false>
                <<<blocks_for(items), kThreadsPerBlock, 0, stream>>>(
                    g, input.data_ptr<scalar_t>(), nullptr, rotation.data_ptr<scalar_t>(), r0,
                    r1, seg.q, seg.g, grad_cols.data_ptr<acc_t>(),
                    grad_rotation.data_ptr<acc_t>(), nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            columns_backward_input_kernel<scalar_t, false>
                <<<blocks_for(work), kThreadsPerBlock, 0, stream>>>(
                    g, nullptr, rotation.data_ptr<scalar_t>(), r0, r1, seg.q, seg.g,
                    grad_cols.data_ptr<acc_t>(), grad_input.data_ptr<acc_t>());
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  }
  return scope_space_gradients(grad_input, grad_offset, grad_rotation, grad_w, input, offset,
                               rotation, weight);
}

}  // namespace cuda
}  // namespace dk_detectron2
