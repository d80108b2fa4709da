// Pass 2 of the two-sweep backward of the depthwise CPU operators: the input gradient, once
// pass 1 (deform_kernel_backward.h) has the gradients of rotation, offset and weight.
//   * backward_input_gather_*: deform_kernel2d's, gathered per input pixel (no write conflicts
//     between rows, so row blocks run in parallel);
//   * backward_input_scatter_*: deform_kernel_conv2d's, scattered per (image, channel block), as
//     its taps also move in the image.
// deform_kernel_cpu.cpp, the only file that includes this one, chooses between the passes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "bilinear.h"
#include "cpu/deform_kernel_backward.h"  // OutsideRows
#include "cpu/tap_sampling.h"
#include "cpu/vectorize.h"
#include "geometry.h"

namespace dk_detectron2 {
namespace cpu {
namespace {  // internal linkage: one translation unit includes this

// ------------------------------------------------------------------------------------------------
// Pass 2a: input gradient of deform_kernel2d, gathered per input pixel
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
DK_ALWAYS_INLINE void backward_input_gather_rows(const DKTensors<scalar_t>& t,
                                                 const scalar_t* grad_output, scalar_t* grad_input,
                                                 int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKGeometry& g = t.g;
  const int64_t C = g.out_channels;
  const int64_t Cg = C / g.rotation_groups;
  std::vector<acc_t> acc_buffer(C);
  acc_t* acc = acc_buffer.data();
  const std::vector<scalar_t> zeros(C, scalar_t(0));
  TapSample<acc_t> tap;
  // The input pixel -> (output position, tap) inversion below has a twin in the CUDA gather
  // (csrc/cuda/deform_kernel_depthwise.cuh): the same arithmetic, kept in each because one runs
  // in OpenMP row blocks over a channels-last buffer, the other one thread per input position
  // and channel chunk.
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.height, iy = row % g.height;
    for (int64_t ix = 0; ix < g.width; ++ix) {
      std::fill(acc, acc + C, acc_t(0));
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        const int64_t ny = iy + g.pad_h - kh * g.dilation_h;
        if (ny < 0 || ny % g.stride_h != 0) continue;
        const int64_t oy = ny / g.stride_h;
        if (oy >= g.out_height) continue;
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t nx = ix + g.pad_w - kw * g.dilation_w;
          if (nx < 0 || nx % g.stride_w != 0) continue;
          const int64_t ox = nx / g.stride_w;
          if (ox >= g.out_width) continue;
          const scalar_t* gout = grad_output + ((b * g.out_height + oy) * g.out_width + ox) * C;
          for (int64_t group = 0; group < g.rotation_groups; ++group) {
            if (!sample_tap<scalar_t, acc_t, false>(t, b, oy, ox, group, kh, kw, tap)) continue;
            const int64_t c0 = group * Cg;
            const BilinearCorners<acc_t>& s = tap.scope;
            with_inside(all_inside(s), [&](auto inside) DK_ALWAYS_INLINE_LAMBDA {
              const auto w =
                  tap_corner_rows<decltype(inside)::value>(t.weight, s, C, c0, zeros.data());
              const acc_t a0 = s.weight[0], a1 = s.weight[1], a2 = s.weight[2],
                          a3 = s.weight[3];
              acc_t* dst = acc + c0;
              const scalar_t* go = gout + c0;
              DK_SIMD
              for (int64_t c = 0; c < Cg; ++c) {
                dst[c] += acc_t(go[c]) * (a0 * acc_t(w[0][c]) + a1 * acc_t(w[1][c]) +
                                          a2 * acc_t(w[2][c]) + a3 * acc_t(w[3][c]));
              }
            });
          }
        }
      }
      scalar_t* out = grad_input + (row * g.width + ix) * C;
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

DK_CPU_CLONES void backward_input_gather_rows_f32(const DKTensors<float>& t, const float* gout,
                                                  float* gin, int64_t begin, int64_t end) {
  backward_input_gather_rows<float>(t, gout, gin, begin, end);
}

template <typename scalar_t>
void backward_input_gather_dispatch(const DKTensors<scalar_t>& t, const scalar_t* gout,
                                    scalar_t* gin, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    backward_input_gather_rows_f32(t, gout, gin, begin, end);
  } else {
    backward_input_gather_rows<scalar_t>(t, gout, gin, begin, end);
  }
}

// ------------------------------------------------------------------------------------------------
// Pass 2b: input gradient of deform_kernel_conv2d, scattered per (image, channel block)
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
DK_ALWAYS_INLINE void backward_input_scatter(const DKTensors<scalar_t>& t,
                                             const scalar_t* grad_output,
                                             at::opmath_type<scalar_t>* grad_input, int64_t b,
                                             int64_t group, int64_t cbegin, int64_t cend) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKGeometry& g = t.g;
  const int64_t C = g.out_channels;
  const int64_t n = cend - cbegin;
  acc_t* image_grad = grad_input + b * g.height * g.width * C + cbegin;
  OutsideRows<scalar_t> outside(C);
  TapSample<acc_t> tap;
  for (int64_t oy = 0; oy < g.out_height; ++oy) {
    for (int64_t ox = 0; ox < g.out_width; ++ox) {
      const scalar_t* go = grad_output + ((b * g.out_height + oy) * g.out_width + ox) * C + cbegin;
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          if (!sample_tap<scalar_t, acc_t, true>(t, b, oy, ox, group, kh, kw, tap)) continue;
          const BilinearCorners<acc_t>& s = tap.scope;
          const BilinearCorners<acc_t>& m = tap.image;
          with_inside(all_inside(s) && all_inside(m), [&](auto inside) DK_ALWAYS_INLINE_LAMBDA {
            constexpr bool kInside = decltype(inside)::value;
            const auto w = tap_corner_rows<kInside>(t.weight, s, C, cbegin, outside.zeros());
            const acc_t a0 = s.weight[0], a1 = s.weight[1], a2 = s.weight[2], a3 = s.weight[3];
            const auto x = tap_corner_rows<kInside>(image_grad, m, C, 0, outside.scratch());
            const acc_t b0 = m.weight[0], b1 = m.weight[1], b2 = m.weight[2], b3 = m.weight[3];
            DK_SIMD
            for (int64_t c = 0; c < n; ++c) {
              const acc_t u = acc_t(go[c]) * (a0 * acc_t(w[0][c]) + a1 * acc_t(w[1][c]) +
                                              a2 * acc_t(w[2][c]) + a3 * acc_t(w[3][c]));
              x[0][c] += b0 * u;
              x[1][c] += b1 * u;
              x[2][c] += b2 * u;
              x[3][c] += b3 * u;
            }
          });
        }
      }
    }
  }
}

DK_CPU_CLONES void backward_input_scatter_f32(const DKTensors<float>& t, const float* gout,
                                              float* gin, int64_t b, int64_t group,
                                              int64_t cbegin, int64_t cend) {
  backward_input_scatter<float>(t, gout, gin, b, group, cbegin, cend);
}

template <typename scalar_t>
void backward_input_scatter_dispatch(const DKTensors<scalar_t>& t, const scalar_t* gout,
                                     at::opmath_type<scalar_t>* gin, int64_t b, int64_t group,
                                     int64_t cbegin, int64_t cend) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    backward_input_scatter_f32(t, gout, gin, b, group, cbegin, cend);
  } else {
    backward_input_scatter<scalar_t>(t, gout, gin, b, group, cbegin, cend);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace dk_detectron2
