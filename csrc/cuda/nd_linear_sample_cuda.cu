// CUDA implementation of nd_linear_sample, the global Deformable Kernel's sampler, and its
// backward: input [M, Sh, Sw], coord [P, 2] (y, x) -> output [P, M] with
// out[p, m] = bilinear(input[m], coord[p, 0], coord[p, 1]) under the rule of csrc/bilinear.h.
// All tensors are made contiguous; values are accumulated in at::opmath_type<scalar_t>.
// A corner outside the grid is never addressed (corners.inside): an inf or NaN in cell 0 reaches
// only the points that really read it, and a non-finite gradient of a point reading nothing
// reaches no cell.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../bilinear.h"
#include "cuda_utils.cuh"

namespace dk_detectron2 {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void coord_corners(const scalar_t* __restrict__ coord, int64_t p,
                                              int64_t height, int64_t width,
                                              BilinearCorners<acc_t>& corners) {
  bilinear_corners(static_cast<acc_t>(coord[2 * p]), static_cast<acc_t>(coord[2 * p + 1]),
                   height, width, corners);
}

// One thread per output element (p, m), m fastest (the output's memory order).
template <typename scalar_t>
__global__ void nd_linear_sample_forward_kernel(const scalar_t* __restrict__ input,
                                                const scalar_t* __restrict__ coord,
                                                scalar_t* __restrict__ output, int64_t points,
                                                int64_t maps, int64_t height, int64_t width) {
  using acc_t = at::opmath_type<scalar_t>;
  DK_CUDA_KERNEL_LOOP(n, points * maps) {
    const int64_t m = n % maps;
    const int64_t p = n / maps;
    BilinearCorners<acc_t> corners;
    coord_corners(coord, p, height, width, corners);
    const scalar_t* plane = input + m * height * width;
    acc_t sum = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (corners.inside[i]) sum += corners.weight[i] * static_cast<acc_t>(plane[corners.index[i]]);
    }
    output[n] = static_cast<scalar_t>(sum);
  }
}

// grad_input: one thread per (p, m), scattering into an acc_t buffer [M, Sh, Sw] with atomics.
template <typename scalar_t>
__global__ void nd_linear_sample_grad_input_kernel(const scalar_t* __restrict__ grad_output,
                                                   const scalar_t* __restrict__ coord,
                                                   at::opmath_type<scalar_t>* __restrict__ grad_input,
                                                   int64_t points, int64_t maps, int64_t height,
                                                   int64_t width) {
  using acc_t = at::opmath_type<scalar_t>;
  DK_CUDA_KERNEL_LOOP(n, points * maps) {
    const int64_t m = n % maps;
    const int64_t p = n / maps;
    const acc_t go = static_cast<acc_t>(grad_output[n]);
    BilinearCorners<acc_t> corners;
    coord_corners(coord, p, height, width, corners);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (!corners.inside[i]) continue;  // outside the grid: nothing was read
      atomicAdd(grad_input + m * height * width + corners.index[i], go * corners.weight[i]);
    }
  }
}

// grad_coord: one thread per point, summing over the M maps (deterministic, no atomics).
template <typename scalar_t>
__global__ void nd_linear_sample_grad_coord_kernel(const scalar_t* __restrict__ grad_output,
                                                   const scalar_t* __restrict__ input,
                                                   const scalar_t* __restrict__ coord,
                                                   scalar_t* __restrict__ grad_coord,
                                                   int64_t points, int64_t maps, int64_t height,
                                                   int64_t width) {
  using acc_t = at::opmath_type<scalar_t>;
  DK_CUDA_KERNEL_LOOP(p, points) {
    BilinearCorners<acc_t> corners;
    coord_corners(coord, p, height, width, corners);
    // A point that reads nothing has zero gradient, whatever its grad_output holds.
    const bool reads = corners.inside[0] || corners.inside[1] || corners.inside[2] ||
                       corners.inside[3];
    acc_t grad_y = 0, grad_x = 0;
    for (int64_t m = 0; reads && m < maps; ++m) {
      const scalar_t* plane = input + m * height * width;
      acc_t dvalue_dy = 0, dvalue_dx = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (!corners.inside[i]) continue;
        const acc_t v = static_cast<acc_t>(plane[corners.index[i]]);
        dvalue_dy += corners.dweight_dy[i] * v;
        dvalue_dx += corners.dweight_dx[i] * v;
      }
      const acc_t go = static_cast<acc_t>(grad_output[p * maps + m]);
      grad_y += go * dvalue_dy;
      grad_x += go * dvalue_dx;
    }
    grad_coord[2 * p] = static_cast<scalar_t>(grad_y);
    grad_coord[2 * p + 1] = static_cast<scalar_t>(grad_x);
  }
}

void check_arguments(const char* op, const at::Tensor& input, const at::Tensor& coord) {
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got ", input.device());
  TORCH_CHECK(input.dim() == 3, op, ": input must be 3-D [M, Sh, Sw], got ", input.sizes());
  TORCH_CHECK(coord.dim() == 2 && coord.size(1) == 2, op, ": coord must be [P, 2], got ",
              coord.sizes());
  TORCH_CHECK(coord.device() == input.device(), op, ": coord must be on the device of input (",
              input.device(), "), got ", coord.device());
  TORCH_CHECK(coord.scalar_type() == input.scalar_type(), op,
              ": coord must have the dtype of input (", input.scalar_type(), "), got ",
              coord.scalar_type());
}

at::Tensor nd_linear_sample_cuda(const at::Tensor& input_in, const at::Tensor& coord_in) {
  check_arguments("nd_linear_sample", input_in, coord_in);
  c10::cuda::OptionalCUDAGuard device_guard(input_in.device());
  const at::Tensor input = input_in.contiguous();
  const at::Tensor coord = coord_in.contiguous();
  const int64_t points = coord.size(0), maps = input.size(0);
  const int64_t height = input.size(1), width = input.size(2);
  at::Tensor output = at::empty({points, maps}, input.options());
  if (output.numel() == 0) return output;
  if (input.numel() == 0) return output.zero_();  // an empty scope reads zero everywhere
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "nd_linear_sample_cuda", [&] {
        nd_linear_sample_forward_kernel<scalar_t>
            <<<blocks_for(output.numel()), kThreadsPerBlock, 0, stream>>>(
                input.const_data_ptr<scalar_t>(), coord.const_data_ptr<scalar_t>(),
                output.mutable_data_ptr<scalar_t>(), points, maps, height, width);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor> nd_linear_sample_backward_cuda(const at::Tensor& grad_output_in,
                                                                  const at::Tensor& input_in,
                                                                  const at::Tensor& coord_in) {
  check_arguments("_nd_linear_sample_backward", input_in, coord_in);
  const int64_t points = coord_in.size(0), maps = input_in.size(0);
  TORCH_CHECK(grad_output_in.dim() == 2 && grad_output_in.size(0) == points &&
                  grad_output_in.size(1) == maps,
              "_nd_linear_sample_backward: grad_output must be [P, M] = [", points, ", ", maps,
              "], got ", grad_output_in.sizes());
  TORCH_CHECK(grad_output_in.device() == input_in.device() &&
                  grad_output_in.scalar_type() == input_in.scalar_type(),
              "_nd_linear_sample_backward: grad_output must have the device and dtype of input");
  c10::cuda::OptionalCUDAGuard device_guard(input_in.device());
  const at::Tensor input = input_in.contiguous();
  const at::Tensor coord = coord_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  const int64_t height = input.size(1), width = input.size(2);
  if (grad_output.numel() == 0 || input.numel() == 0) {
    return {at::zeros_like(input), at::zeros_like(coord)};
  }
  // grad_input is scattered with atomics: the order of its float additions varies.
  at::globalContext().alertNotDeterministic(
      "dk_detectron2 nd_linear_sample backward (CUDA, grad_input)");
  at::Tensor grad_coord = at::empty_like(coord);
  at::Tensor accumulator =
      at::zeros(input.sizes(), input.options().dtype(at::toOpMathType(input.scalar_type())));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "nd_linear_sample_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        nd_linear_sample_grad_input_kernel<scalar_t>
            <<<blocks_for(grad_output.numel()), kThreadsPerBlock, 0, stream>>>(
                grad_output.const_data_ptr<scalar_t>(), coord.const_data_ptr<scalar_t>(),
                accumulator.mutable_data_ptr<acc_t>(), points, maps, height, width);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        nd_linear_sample_grad_coord_kernel<scalar_t>
            <<<blocks_for(points), kThreadsPerBlock, 0, stream>>>(
                grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                coord.const_data_ptr<scalar_t>(), grad_coord.mutable_data_ptr<scalar_t>(), points,
                maps, height, width);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  at::Tensor grad_input = accumulator.scalar_type() == input.scalar_type()
                              ? accumulator
                              : accumulator.to(input.scalar_type());
  return {grad_input, grad_coord};
}

}  // namespace
}  // namespace cuda
}  // namespace dk_detectron2

TORCH_LIBRARY_IMPL(dk_detectron2, CUDA, m) {
  using namespace dk_detectron2::cuda;
  m.impl("nd_linear_sample", &nd_linear_sample_cuda);
  m.impl("_nd_linear_sample_backward", &nd_linear_sample_backward_cuda);
}
