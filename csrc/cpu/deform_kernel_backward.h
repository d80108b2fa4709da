// Backward kernels of the depthwise CPU operators (deform_kernel2d, deform_kernel_conv2d with
// weight [C, 1, Sh, Sw]). The host code chooses among them (see the table at the top of
// deform_kernel_cpu.cpp, the one translation unit that includes this file):
//   * backward_params_*: pass 1 of the two-sweep backward, gradients of rotation, offset and
//     weight over chunks of output rows (pass 2, the input gradient, is in
//     deform_kernel_input_grad.h);
//   * backward_image_group_*: the single sweep per (image, rotation group), every gradient at
//     once (generic dtypes here, float32 in explicit vectors).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "bilinear.h"
#include "cpu/tap_sampling.h"
#include "cpu/vectorize.h"
#include "geometry.h"

namespace dk_detectron2 {
namespace cpu {
namespace {  // internal linkage: one translation unit includes this

template <typename scalar_t>
struct DKGrads {
  const scalar_t* grad_output;  // [B, Ho, Wo, C]
  scalar_t* grad_rotation;      // [B, G*Kh*Kw*2, Ho, Wo]
  scalar_t* grad_offset;        // [B, Kh*Kw*2, Ho, Wo] or nullptr
};

// ------------------------------------------------------------------------------------------------
// One tap over one rotation group's channels (any dtype)
// ------------------------------------------------------------------------------------------------
// The per-corner sums of a tap, from which the chain rule through the corner weights gives the
// rotation gradient (d, scope corners) and the offset gradient (e, image corners):
//   d_j = sum_c tv[c] * W[scope corner j, c],  tv = grad_out * image value
//   e_j = sum_c u[c] * x[image corner j, c],   u = grad_out * sampled kernel
template <typename acc_t>
struct CornerSums {
  acc_t d[4];
  acc_t e[4];
};

// Rows a task reads and writes in place of a corner outside the grid (corner_rows): C zeros and
// C scratch accumulators of its own.
template <typename scalar_t>
struct OutsideRows {
  using acc_t = at::opmath_type<scalar_t>;
  explicit OutsideRows(int64_t C) : zeros_(C, scalar_t(0)), scratch_(C) {}
  const scalar_t* zeros() const { return zeros_.data(); }
  acc_t* scratch() { return scratch_.data(); }

 private:
  std::vector<scalar_t> zeros_;
  std::vector<acc_t> scratch_;
};

// Channels [c0, c0 + n) of one sampled tap: adds a_j * tv to the weight gradient of each scope
// corner and, when kInputGrad (the single sweep), the input gradient u (or b_j * u per image
// corner) to image_grad; returns the corner sums. image, grad_weight and image_grad are [cells, C]
// tables at channel 0, gout is the position's grad_output at channel c0. Unless kInside (every
// corner of the tap is inside its grid), corners outside the grid read and write `outside` and
// their sums are returned as 0 (inside_dot's rule), so the callers take corner_dot of the sums.
template <bool kOffset, bool kInputGrad, bool kInside, typename scalar_t, typename acc_t>
DK_ALWAYS_INLINE CornerSums<acc_t> backward_tap_rows(const TapSample<acc_t>& tap,
                                                     const scalar_t* weight,
                                                     const scalar_t* image,
                                                     const scalar_t* gout,
                                                     acc_t* grad_weight, acc_t* image_grad,
                                                     int64_t C, int64_t c0, int64_t n,
                                                     OutsideRows<scalar_t>& outside) {
  const BilinearCorners<acc_t>& s = tap.scope;
  const auto w = tap_corner_rows<kInside>(weight, s, C, c0, outside.zeros());
  const auto gw = tap_corner_rows<kInside>(grad_weight, s, C, c0, outside.scratch());
  const acc_t a0 = s.weight[0], a1 = s.weight[1], a2 = s.weight[2], a3 = s.weight[3];
  acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
  CornerSums<acc_t> sums{};
  if constexpr (kOffset) {
    const BilinearCorners<acc_t>& m = tap.image;
    const auto x = tap_corner_rows<kInside>(image, m, C, c0, outside.zeros());
    const auto gx = kInputGrad ? tap_corner_rows<kInside>(image_grad, m, C, c0, outside.scratch())
                               : std::array<acc_t*, 4>{};
    const acc_t b0 = m.weight[0], b1 = m.weight[1], b2 = m.weight[2], b3 = m.weight[3];
    acc_t e0 = 0, e1 = 0, e2 = 0, e3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3, e0, e1, e2, e3)
    for (int64_t c = 0; c < n; ++c) {
      const acc_t v0 = x[0][c], v1 = x[1][c], v2 = x[2][c], v3 = x[3][c];
      const acc_t k0 = w[0][c], k1 = w[1][c], k2 = w[2][c], k3 = w[3][c];
      const acc_t go = gout[c];
      const acc_t tv = go * (b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3);
      const acc_t u = go * (a0 * k0 + a1 * k1 + a2 * k2 + a3 * k3);
      gw[0][c] += a0 * tv;
      gw[1][c] += a1 * tv;
      gw[2][c] += a2 * tv;
      gw[3][c] += a3 * tv;
      d0 += tv * k0;
      d1 += tv * k1;
      d2 += tv * k2;
      d3 += tv * k3;
      e0 += u * v0;
      e1 += u * v1;
      e2 += u * v2;
      e3 += u * v3;
      if constexpr (kInputGrad) {
        gx[0][c] += b0 * u;
        gx[1][c] += b1 * u;
        gx[2][c] += b2 * u;
        gx[3][c] += b3 * u;
      }
    }
    sums.e[0] = e0, sums.e[1] = e1, sums.e[2] = e2, sums.e[3] = e3;
    if constexpr (!kInside) {
      for_corners([&](auto j) { sums.e[j] = m.inside[j] ? sums.e[j] : acc_t(0); });
    }
  } else {
    const scalar_t* x = image + tap.pixel * C + c0;
    acc_t* gx = kInputGrad ? image_grad + tap.pixel * C + c0 : nullptr;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int64_t c = 0; c < n; ++c) {
      const acc_t k0 = w[0][c], k1 = w[1][c], k2 = w[2][c], k3 = w[3][c];
      const acc_t go = gout[c];
      const acc_t tv = go * acc_t(x[c]);
      gw[0][c] += a0 * tv;
      gw[1][c] += a1 * tv;
      gw[2][c] += a2 * tv;
      gw[3][c] += a3 * tv;
      d0 += tv * k0;
      d1 += tv * k1;
      d2 += tv * k2;
      d3 += tv * k3;
      if constexpr (kInputGrad) gx[c] += go * (a0 * k0 + a1 * k1 + a2 * k2 + a3 * k3);
    }
  }
  sums.d[0] = d0, sums.d[1] = d1, sums.d[2] = d2, sums.d[3] = d3;
  if constexpr (!kInside) {
    for_corners([&](auto j) { sums.d[j] = s.inside[j] ? sums.d[j] : acc_t(0); });
  }
  return sums;
}

// backward_tap_rows, branching once per tap: the common tap, all of whose corners are inside,
// addresses them directly; the others go through corner_rows' zeros and scratch rows.
template <bool kOffset, bool kInputGrad, typename scalar_t, typename acc_t>
DK_ALWAYS_INLINE CornerSums<acc_t> backward_tap_channels(const TapSample<acc_t>& tap,
                                                         const scalar_t* weight,
                                                         const scalar_t* image,
                                                         const scalar_t* gout,
                                                         acc_t* grad_weight, acc_t* image_grad,
                                                         int64_t C, int64_t c0, int64_t n,
                                                         OutsideRows<scalar_t>& outside) {
  const bool inside = all_inside(tap.scope) && (!kOffset || all_inside(tap.image));
  return with_inside(inside, [&](auto k) DK_ALWAYS_INLINE_LAMBDA {
    return backward_tap_rows<kOffset, kInputGrad, decltype(k)::value>(
        tap, weight, image, gout, grad_weight, image_grad, C, c0, n, outside);
  });
}

// The rotation gradient of a tap (y, x) from its corner sums (those of corners outside the scope
// already 0, see backward_tap_rows), stored at grot[0] and grot[plane].
template <typename scalar_t, typename acc_t>
DK_ALWAYS_INLINE void store_rotation_grad(const BilinearCorners<acc_t>& s,
                                          const CornerSums<acc_t>& sums, scalar_t* grot,
                                          int64_t plane) {
  const acc_t(&d)[4] = sums.d;
  grot[0] = static_cast<scalar_t>(corner_dot(s.dweight_dy, d[0], d[1], d[2], d[3]));
  grot[plane] = static_cast<scalar_t>(corner_dot(s.dweight_dx, d[0], d[1], d[2], d[3]));
}

// ------------------------------------------------------------------------------------------------
// Pass 1: gradients of rotation, offset and weight (a sweep over output positions)
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, bool kOffset>
DK_ALWAYS_INLINE void backward_params_rows(const DKTensors<scalar_t>& t, const DKGrads<scalar_t>& d,
                                           at::opmath_type<scalar_t>* grad_weight,
                                           int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKGeometry& g = t.g;
  const int64_t C = g.out_channels;
  const int64_t Cg = C / g.rotation_groups;
  const int64_t plane = g.out_height * g.out_width;
  TapSample<acc_t> tap;
  OutsideRows<scalar_t> outside(C);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.out_height, oy = row % g.out_height;
    const scalar_t* image = t.input + b * g.height * g.width * C;
    for (int64_t ox = 0; ox < g.out_width; ++ox) {
      const int64_t pos = oy * g.out_width + ox;
      const scalar_t* gout = d.grad_output + (row * g.out_width + ox) * C;
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t k = kh * g.kernel_w + kw;
          acc_t grad_oy = 0, grad_ox = 0;  // offset gradient, summed over rotation groups
          for (int64_t group = 0; group < g.rotation_groups; ++group) {
            const int64_t c0 = group * Cg;
            scalar_t* grot = d.grad_rotation +
                             (b * g.rotation_groups * g.taps() * 2 + (group * g.taps() + k) * 2) *
                                 plane + pos;
            if (!sample_tap<scalar_t, acc_t, kOffset>(t, b, oy, ox, group, kh, kw, tap)) {
              grot[0] = grot[plane] = scalar_t(0);
              continue;
            }
            const CornerSums<acc_t> sums = backward_tap_channels<kOffset, false>(
                tap, t.weight, image, gout + c0, grad_weight, static_cast<acc_t*>(nullptr), C,
                c0, Cg, outside);
            if constexpr (kOffset) {
              const acc_t(&e)[4] = sums.e;
              grad_oy += corner_dot(tap.image.dweight_dy, e[0], e[1], e[2], e[3]);
              grad_ox += corner_dot(tap.image.dweight_dx, e[0], e[1], e[2], e[3]);
            }
            store_rotation_grad(tap.scope, sums, grot, plane);
          }
          if (kOffset) {
            scalar_t* goff = d.grad_offset + (b * g.taps() * 2 + k * 2) * plane + pos;
            goff[0] = static_cast<scalar_t>(grad_oy);
            goff[plane] = static_cast<scalar_t>(grad_ox);
          }
        }
      }
    }
  }
}

DK_CPU_CLONES void backward_params_rows_f32(const DKTensors<float>& t, const DKGrads<float>& d,
                                            float* gw, int64_t begin, int64_t end) {
  backward_params_rows<float, false>(t, d, gw, begin, end);
}
DK_CPU_CLONES void backward_params_rows_offset_f32(const DKTensors<float>& t,
                                                   const DKGrads<float>& d, float* gw,
                                                   int64_t begin, int64_t end) {
  backward_params_rows<float, true>(t, d, gw, begin, end);
}

template <typename scalar_t, bool kOffset>
void backward_params_dispatch(const DKTensors<scalar_t>& t, const DKGrads<scalar_t>& d,
                              at::opmath_type<scalar_t>* gw, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (kOffset) {
      backward_params_rows_offset_f32(t, d, gw, begin, end);
    } else {
      backward_params_rows_f32(t, d, gw, begin, end);
    }
  } else {
    backward_params_rows<scalar_t, kOffset>(t, d, gw, begin, end);
  }
}

// ------------------------------------------------------------------------------------------------
// The single sweep per (image, rotation group): every gradient at once
// ------------------------------------------------------------------------------------------------
// Used when there are enough (image, group) tasks to keep every thread busy. A task owns its
// image's channels of one rotation group, so it scatters the input gradient without conflicts,
// and it keeps its own weight-gradient partial [Sh*Sw, C] (and, with several rotation groups, its
// own offset-gradient buffer): each tap's corners are computed once for all four gradients.
template <typename scalar_t, bool kOffset>
DK_ALWAYS_INLINE void backward_image_group(const DKTensors<scalar_t>& t,
                                           const scalar_t* grad_output, int64_t b, int64_t group,
                                           at::opmath_type<scalar_t>* grad_weight,
                                           at::opmath_type<scalar_t>* grad_input,
                                           scalar_t* grad_rotation,
                                           at::opmath_type<scalar_t>* grad_offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKGeometry& g = t.g;
  const int64_t C = g.out_channels, Cg = C / g.rotation_groups, c0 = group * Cg;
  const int64_t plane = g.out_height * g.out_width;
  const scalar_t* image = t.input + b * g.height * g.width * C;
  acc_t* image_grad = grad_input + b * g.height * g.width * C;
  TapSample<acc_t> tap;
  OutsideRows<scalar_t> outside(C);
  for (int64_t oy = 0; oy < g.out_height; ++oy) {
    for (int64_t ox = 0; ox < g.out_width; ++ox) {
      const int64_t pos = oy * g.out_width + ox;
      const scalar_t* gout = grad_output + (b * plane + pos) * C + c0;
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t k = kh * g.kernel_w + kw;
          scalar_t* grot = grad_rotation +
                           (b * g.rotation_groups * g.taps() * 2 + (group * g.taps() + k) * 2) *
                               plane + pos;
          if (!sample_tap<scalar_t, acc_t, kOffset>(t, b, oy, ox, group, kh, kw, tap)) {
            grot[0] = grot[plane] = scalar_t(0);
            continue;
          }
          const CornerSums<acc_t> sums = backward_tap_channels<kOffset, true>(
              tap, t.weight, image, gout, grad_weight, image_grad, C, c0, Cg, outside);
          if constexpr (kOffset) {
            const acc_t(&e)[4] = sums.e;
            acc_t* goff = grad_offset + (b * g.taps() * 2 + k * 2) * plane + pos;
            goff[0] += corner_dot(tap.image.dweight_dy, e[0], e[1], e[2], e[3]);
            goff[plane] += corner_dot(tap.image.dweight_dx, e[0], e[1], e[2], e[3]);
          }
          store_rotation_grad(tap.scope, sums, grot, plane);
        }
      }
    }
  }
}

// float32: the same sweep, row by row. The corners of a whole row's taps and their derivatives
// come from sample_row; each (position, tap) then runs over its group's channels in 16-float
// vectors (the last one partial), keeping in registers the per-corner sums
//   d_j = sum_c tv[c] * W[scope corner j, c],  tv = grad_out * image value  (rotation gradient)
//   e_j = sum_c u[c] * x[image corner j, c],   u = grad_out * sampled kernel (offset gradient)
// which are reduced across lanes once per tap in a fixed order, so results do not depend on
// anything but the inputs. The weight and input gradients are read-modify-writes of the task's
// own rows; a corner outside the image reads the zeros row and writes a scratch row. A tap that
// reads nothing (padded_dead_cell) is skipped: its zeros times an infinite grad_output would be
// NaN.
template <bool kOffset>
struct BackwardTap {
  TapReads<float, float, kOffset> r;
  const float* go;               // grad_output of the position, channel 0
  float* gw[4];                  // weight-gradient rows of the scope corners
  float* gx[kOffset ? 4 : 1];    // input-gradient rows of the image corner(s) (or scratch)
};

template <typename V>
struct TapSums {
  V d[4], e[4];
};

template <typename V, bool kOffset, typename Lanes>
DK_ALWAYS_INLINE void backward_tap_vector(const BackwardTap<kOffset>& p, int64_t c, Lanes lanes,
                                          TapSums<V>& s) {
  constexpr int kImageCorners = kOffset ? 4 : 1;
  V w[4], x[kImageCorners];
  for_corners([&](auto j) { w[j] = lanes.load(p.r.w[j] + c); });
  const V go = lanes.load(p.go + c);
  V value;
  if constexpr (kOffset) {
    for_corners([&](auto j) { x[j] = lanes.load(p.r.x[j] + c); });
    value = p.r.b[0] * x[0] + p.r.b[1] * x[1] + p.r.b[2] * x[2] + p.r.b[3] * x[3];
  } else {
    value = x[0] = lanes.load(p.r.x[0] + c);
  }
  const V tv = go * value;
  const V u = go * (p.r.a[0] * w[0] + p.r.a[1] * w[1] + p.r.a[2] * w[2] + p.r.a[3] * w[3]);
  for_corners([&](auto j) {
    s.d[j] += tv * w[j];
    lanes.store(p.gw[j] + c, lanes.load(p.gw[j] + c) + p.r.a[j] * tv);
  });
  if constexpr (kOffset) {
    for_corners([&](auto j) {
      s.e[j] += u * x[j];
      lanes.store(p.gx[j] + c, lanes.load(p.gx[j] + c) + p.r.b[j] * u);
    });
  } else {
    lanes.store(p.gx[0] + c, lanes.load(p.gx[0] + c) + u);
  }
}


template <typename V, bool kOffset>
DK_ALWAYS_INLINE void backward_image_group_vectors(const DKTensors<float>& t,
                                                  const float* grad_output, int64_t b,
                                                  int64_t group, float* grad_weight,
                                                  float* grad_input, float* grad_rotation,
                                                  float* grad_offset) {
  const DKGeometry& g = t.g;
  const int64_t C = g.out_channels, Cg = C / g.rotation_groups, c0 = group * Cg, c_end = c0 + Cg;
  const int64_t Wo = g.out_width, plane = g.out_height * Wo, taps = g.taps();
  const float* image = t.input + b * g.height * g.width * C;
  float* image_grad = grad_input + b * g.height * g.width * C;
  RowTaps<float> row;
  row.resize(taps * Wo, kOffset, true);
  const std::vector<float> zeros(C, 0.f);
  std::vector<float> scratch(C);
  const auto grad_row = [&](int32_t pixel) {
    return pixel >= 0 ? image_grad + int64_t(pixel) * C : scratch.data();
  };
  const int32_t dead_cell =
      static_cast<int32_t>(padded_dead_cell(g.scope_h, g.scope_w) * C);
  // deform_kernel2d: a tap's rotation sums wait here for the next tap's, to be reduced together.
  float* pending = nullptr;
  V pending_y = {}, pending_x = {};
  constexpr int64_t L = lanes_of<V>();
  for (int64_t oy = 0; oy < g.out_height; ++oy) {
    sample_row<kOffset, true>(t, b, oy, group, static_cast<int32_t>(C), row);
    for (int64_t ox = 0; ox < Wo; ++ox) {
      const int64_t pos = oy * Wo + ox;
      for (int64_t k = 0; k < taps; ++k) {
        const int64_t e = k * Wo + ox;
        float* grot = grad_rotation +
                      (b * g.rotation_groups * taps * 2 + (group * taps + k) * 2) * plane + pos;
        if (row.cell[e] == dead_cell) {
          grot[0] = grot[plane] = 0.f;
          continue;
        }
        BackwardTap<kOffset> p;
        p.r = tap_reads<float, float, kOffset>(row, e, image, t.scope, C, zeros.data());
        p.go = grad_output + (b * plane + pos) * C;
        p.gw[0] = grad_weight + row.cell[e];
        p.gw[1] = p.gw[0] + row.right;
        p.gw[2] = p.gw[0] + row.below;
        p.gw[3] = p.gw[2] + row.right;
        if constexpr (kOffset) {
          for_corners([&](auto j) { p.gx[j] = grad_row(row.image_pixel[j][e]); });
        } else {
          p.gx[0] = grad_row(row.pixel[e]);
        }
        TapSums<V> s;
        for_corners([&](auto j) { s.d[j] = s.e[j] = V{}; });
        int64_t c = c0;
        for (; c + L <= c_end; c += L) backward_tap_vector<V>(p, c, FullLanes<V>{}, s);
        if (c < c_end) {
          backward_tap_vector<V>(p, c, PartialLanes<V>{static_cast<int>(c_end - c)}, s);
        }
        // Chain rule through the corner weights, still per lane; then one reduction. The scope
        // weights' derivatives follow from the weights (RowTaps).
        const float* a = p.r.a;
        V rot_y = (a[0] + a[2]) * (s.d[2] - s.d[0]) + (a[1] + a[3]) * (s.d[3] - s.d[1]);
        V rot_x = (a[0] + a[1]) * (s.d[1] - s.d[0]) + (a[2] + a[3]) * (s.d[3] - s.d[2]);
        V off_y = {}, off_x = {};
        if constexpr (kOffset) {
          for_corners([&](auto j) {
            off_y += row.image_dy[j][e] * s.e[j];
            off_x += row.image_dx[j][e] * s.e[j];
          });
        }
        if constexpr (kOffset) {
          const f32x4 sums = lane_sums(rot_y, rot_x, off_y, off_x);
          grot[0] = sums[0];
          grot[plane] = sums[1];
          float* goff = grad_offset + (b * taps * 2 + k * 2) * plane + pos;
          goff[0] += sums[2];
          goff[plane] += sums[3];
        } else if (pending != nullptr) {
          // Two taps' rotation sums in one reduction (the same fixed order for every tap).
          const f32x4 sums = lane_sums(pending_y, pending_x, rot_y, rot_x);
          pending[0] = sums[0];
          pending[plane] = sums[1];
          grot[0] = sums[2];
          grot[plane] = sums[3];
          pending = nullptr;
        } else {
          pending = grot;
          pending_y = rot_y;
          pending_x = rot_x;
        }
      }
      if (pending != nullptr) {
        const f32x4 sums = lane_sums(pending_y, pending_x, V{}, V{});
        pending[0] = sums[0];
        pending[plane] = sums[1];
        pending = nullptr;
      }
    }
  }
}

#define DK_BACKWARD_IMAGE_GROUP_PARAMS                                                    \
  (const DKTensors<float>& t, const float* gout, int64_t b, int64_t group, float* gw, float* gin, \
   float* grot, float* goff)
DK_DEFINE_NATIVE_WIDTH(backward_image_group_f32, DK_BACKWARD_IMAGE_GROUP_PARAMS,
                       (t, gout, b, group, gw, gin, grot, goff), backward_image_group_vectors,
                       false)
DK_DEFINE_NATIVE_WIDTH(backward_image_group_offset_f32, DK_BACKWARD_IMAGE_GROUP_PARAMS,
                       (t, gout, b, group, gw, gin, grot, goff), backward_image_group_vectors,
                       true)
#undef DK_BACKWARD_IMAGE_GROUP_PARAMS

template <typename scalar_t, bool kOffset>
void backward_image_group_dispatch(const DKTensors<scalar_t>& t, const scalar_t* gout, int64_t b,
                                   int64_t group, at::opmath_type<scalar_t>* gw,
                                   at::opmath_type<scalar_t>* gin, scalar_t* grot,
                                   at::opmath_type<scalar_t>* goff) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (kOffset) {
      backward_image_group_offset_f32(t, gout, b, group, gw, gin, grot, goff);
    } else {
      backward_image_group_f32(t, gout, b, group, gw, gin, grot, goff);
    }
  } else {
    backward_image_group<scalar_t, kOffset>(t, gout, b, group, gw, gin, grot, goff);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace dk_detectron2
