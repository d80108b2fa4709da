// CPU kernels of nd_linear_sample: bilinear samples of M scopes [M, Sh, Sw] at P points [P, 2].
//
// The scopes are read transposed ([Sh*Sw, M]) so the loop over M is contiguous; each point's four
// corners are computed once and shared by all M scopes. The input gradient is split over blocks of
// M (each task owns its scopes and visits the points in order), so it needs no atomics and is
// deterministic.
//
// The rule of bilinear.h: a corner outside the grid is never addressed (cell 0 with weight 0 would
// turn an inf there into NaN, 0 * inf): the forward reads a row of zeros in its place, the
// backward skips it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "bilinear.h"

namespace dk_detectron2 {
namespace {

void check_inputs(const at::Tensor& input, const at::Tensor& coord) {
  TORCH_CHECK(input.dim() == 3, "input must be [M, Sh, Sw], got ", input.sizes());
  TORCH_CHECK(coord.dim() == 2 && coord.size(1) == 2, "coord must be [P, 2], got ", coord.sizes());
  TORCH_CHECK(input.scalar_type() == coord.scalar_type(), "input and coord must share a dtype");
}

at::Tensor nd_linear_sample_cpu(const at::Tensor& input, const at::Tensor& coord) {
  check_inputs(input, coord);
  const int64_t M = input.size(0), H = input.size(1), W = input.size(2), P = coord.size(0);
  at::Tensor out = at::empty({P, M}, input.options());
  if (P == 0 || M == 0) return out;
  const at::Tensor scopes = input.reshape({M, H * W}).t().contiguous();  // [H*W, M]
  const at::Tensor points = coord.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "nd_linear_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = scopes.data_ptr<scalar_t>();
    const scalar_t* pts = points.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
      const std::vector<scalar_t> zeros(M, scalar_t(0));
      const auto row = [&](const BilinearCorners<acc_t>& c, int j) {
        return c.inside[j] ? src + c.index[j] * M : zeros.data();
      };
      BilinearCorners<acc_t> c;
      for (int64_t p = begin; p < end; ++p) {
        bilinear_corners(acc_t(pts[2 * p]), acc_t(pts[2 * p + 1]), H, W, c);
        const scalar_t* r0 = row(c, 0);
        const scalar_t* r1 = row(c, 1);
        const scalar_t* r2 = row(c, 2);
        const scalar_t* r3 = row(c, 3);
        for (int64_t m = 0; m < M; ++m) {
          dst[p * M + m] = static_cast<scalar_t>(c.weight[0] * acc_t(r0[m]) + c.weight[1] * acc_t(r1[m]) +
                                                 c.weight[2] * acc_t(r2[m]) + c.weight[3] * acc_t(r3[m]));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> nd_linear_sample_backward_cpu(const at::Tensor& grad_output,
                                                                 const at::Tensor& input,
                                                                 const at::Tensor& coord) {
  check_inputs(input, coord);
  const int64_t M = input.size(0), H = input.size(1), W = input.size(2), P = coord.size(0);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({P, M}), "grad_output must be [P, M], got ",
              grad_output.sizes());
  at::Tensor grad_input = at::zeros({M, H, W}, input.options());
  at::Tensor grad_coord = at::zeros({P, 2}, coord.options());
  if (P == 0 || M == 0) return {grad_input, grad_coord};
  const at::Tensor scopes = input.reshape({M, H * W}).t().contiguous();  // [H*W, M]
  const at::Tensor points = coord.contiguous();
  const at::Tensor grad = grad_output.to(input.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "nd_linear_sample_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = scopes.data_ptr<scalar_t>();
    const scalar_t* pts = points.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    // Coordinate gradient: one point per iteration, reduced over the M scopes.
    scalar_t* gc = grad_coord.data_ptr<scalar_t>();
    at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
      BilinearCorners<acc_t> c;
      for (int64_t p = begin; p < end; ++p) {
        bilinear_corners(acc_t(pts[2 * p]), acc_t(pts[2 * p + 1]), H, W, c);
        acc_t gy = 0, gx = 0;
        for (int j = 0; j < 4; ++j) {
          if (!c.inside[j]) continue;
          const scalar_t* row = src + c.index[j] * M;
          acc_t dot = 0;
          for (int64_t m = 0; m < M; ++m) dot += acc_t(g[p * M + m]) * acc_t(row[m]);
          gy += c.dweight_dy[j] * dot;
          gx += c.dweight_dx[j] * dot;
        }
        gc[2 * p] = static_cast<scalar_t>(gy);
        gc[2 * p + 1] = static_cast<scalar_t>(gx);
      }
    });
    // Input gradient: each task owns a block of scopes and visits every point in order.
    at::Tensor accumulator = at::zeros({H * W, M}, input.options().dtype(
                                                       c10::CppTypeToScalarType<acc_t>::value));
    acc_t* acc = accumulator.data_ptr<acc_t>();
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      BilinearCorners<acc_t> c;
      for (int64_t p = 0; p < P; ++p) {
        bilinear_corners(acc_t(pts[2 * p]), acc_t(pts[2 * p + 1]), H, W, c);
        for (int j = 0; j < 4; ++j) {
          if (!c.inside[j]) continue;
          acc_t* row = acc + c.index[j] * M;
          const acc_t w = c.weight[j];
          for (int64_t m = begin; m < end; ++m) row[m] += w * acc_t(g[p * M + m]);
        }
      }
    });
    grad_input.copy_(accumulator.t().reshape({M, H, W}));
  });
  return {grad_input, grad_coord};
}

}  // namespace

TORCH_LIBRARY_IMPL(dk_detectron2, CPU, m) {
  m.impl("nd_linear_sample", &nd_linear_sample_cpu);
  m.impl("_nd_linear_sample_backward", &nd_linear_sample_backward_cpu);
}

}  // namespace dk_detectron2
