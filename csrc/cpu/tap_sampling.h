// One tap of one output position: where it reads in the scope and in the image. Shared by the
// depthwise kernels (deform_kernel_cpu.cpp) and the scope-space path (scope_space_cpu.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bilinear.h"
#include "cpu/vectorize.h"
#include "geometry.h"

namespace dk_detectron2 {
namespace cpu {

template <typename scalar_t>
struct DKTensors {
  DKGeometry g;
  const scalar_t* input;     // [B, H, W, C_in] (channels-last)
  const scalar_t* offset;    // [B, Kh*Kw*2, Ho, Wo], or nullptr for integer image taps
  const scalar_t* rotation;  // [B, G*Kh*Kw*2, Ho, Wo]
  const scalar_t* weight;    // depthwise: [Sh*Sw, C] (transposed); scope space: unused
};

// Where one tap of one output position reads, in the scope and in the image.
template <typename acc_t>
struct TapSample {
  BilinearCorners<acc_t> scope;  // corners in the Sh x Sw scope
  BilinearCorners<acc_t> image;  // corners in the H x W image (offset path)
  int64_t pixel;                 // integer image tap (no-offset path), -1 if outside
};

// Fills `tap`; returns false when the tap contributes nothing (outside the scope or the image).
template <typename scalar_t, typename acc_t, bool kOffset>
DK_ALWAYS_INLINE bool sample_tap(const DKTensors<scalar_t>& t, int64_t b, int64_t oy, int64_t ox,
                                 int64_t group, int64_t kh, int64_t kw, TapSample<acc_t>& tap) {
  const DKGeometry& g = t.g;
  const int64_t plane = g.out_height * g.out_width;
  const int64_t pos = oy * g.out_width + ox;
  const int64_t k = kh * g.kernel_w + kw;
  const scalar_t* rot = t.rotation + (b * g.rotation_groups * g.taps() * 2 +
                                      (group * g.taps() + k) * 2) * plane + pos;
  const acc_t sy = scope_base<acc_t>(kh, g.kernel_h, g.scope_h) + static_cast<acc_t>(rot[0]);
  const acc_t sx = scope_base<acc_t>(kw, g.kernel_w, g.scope_w) + static_cast<acc_t>(rot[plane]);
  if (!bilinear_in_range(sy, sx, g.scope_h, g.scope_w)) return false;
  bilinear_corners(sy, sx, g.scope_h, g.scope_w, tap.scope);
  const int64_t iy = oy * g.stride_h - g.pad_h + kh * g.dilation_h;
  const int64_t ix = ox * g.stride_w - g.pad_w + kw * g.dilation_w;
  if (kOffset) {
    const scalar_t* off = t.offset + (b * g.taps() * 2 + k * 2) * plane + pos;
    const acc_t y = static_cast<acc_t>(iy) + static_cast<acc_t>(off[0]);
    const acc_t x = static_cast<acc_t>(ix) + static_cast<acc_t>(off[plane]);
    if (!bilinear_in_range(y, x, g.height, g.width)) return false;
    bilinear_corners(y, x, g.height, g.width, tap.image);
    tap.pixel = 0;
    return true;
  }
  if (iy < 0 || iy >= g.height || ix < 0 || ix >= g.width) return false;
  tap.pixel = iy * g.width + ix;
  return true;
}

}  // namespace cpu
}  // namespace dk_detectron2

namespace dk_detectron2 {
namespace cpu {

// The corners of every tap of one output row and rotation group, computed branch-free over the
// row (32-bit lanes and selects only, so the loop vectorises) before the channel loops use them.
// Entry [k * Wo + ox]. Scope corners: `index` holds scope cell * cell_stride (the weight's row
// stride, so the channel loops add it to a pointer as is), `weight` the bilinear weight, and,
// for the backward, `dy`/`dx` the weight's derivatives with respect to the sample point. A tap
// that reads nothing has all weights and derivatives 0, valid indices and pixel -1 (so it reads
// a row of zeros). Integer image taps (deform_kernel2d) fill `pixel`; bilinear image reads
// (deform_kernel_conv2d) fill the `image_*` corners instead, with pixel -1 for a corner outside
// the image. Pixels are int32: callers check H * W < 2^31 and Sh * Sw * cell_stride < 2^31.
template <typename acc_t>
struct RowTaps {
  std::vector<int32_t> index[4];
  std::vector<acc_t> weight[4], dy[4], dx[4];
  std::vector<int32_t> pixel;
  std::vector<int32_t> image_pixel[4];
  std::vector<acc_t> image_weight[4], image_dy[4], image_dx[4];

  void resize(int64_t n, bool offset = false, bool derivatives = false) {
    for (int j = 0; j < 4; ++j) {
      index[j].resize(n);
      weight[j].resize(n);
      dy[j].resize(derivatives ? n : 0);
      dx[j].resize(derivatives ? n : 0);
      image_pixel[j].resize(offset ? n : 0);
      image_weight[j].resize(offset ? n : 0);
      image_dy[j].resize(offset && derivatives ? n : 0);
      image_dx[j].resize(offset && derivatives ? n : 0);
    }
    pixel.resize(offset ? 0 : n);
  }
};

// One axis of a bilinear sample at coordinate s on a grid of `size` lines: the lines below and
// above (clamped into the grid, so always safe to read), whether each is inside the grid (0/1),
// their weights and the weights' derivatives with respect to s. A line outside the grid, or any
// line of a sample that reads nothing (`inside` false), has weight and derivative 0. Selects,
// min/max and int32 flags only: GCC vectorises this (not loops with one bool mask per corner,
// nor bool flags combined with `&` and then selected on).
template <typename acc_t>
struct AxisCorners {
  int32_t lo, hi, in_lo, in_hi;
  acc_t w_lo, w_hi, d_lo, d_hi;
};

template <typename acc_t>
DK_ALWAYS_INLINE AxisCorners<acc_t> axis_corners(acc_t s, bool inside, int32_t size) {
  s = inside ? s : acc_t(0);  // keeps NaN and infinity away from the integer conversion
  const acc_t f = std::floor(s);
  const int32_t i0 = static_cast<int32_t>(f);
  const acc_t l = s - f;
  const int32_t live = inside ? 1 : 0;
  AxisCorners<acc_t> a;
  a.in_lo = live & (i0 >= 0 ? 1 : 0);
  a.in_hi = live & (i0 + 1 < size ? 1 : 0);
  a.w_lo = a.in_lo ? acc_t(1) - l : acc_t(0);
  a.w_hi = a.in_hi ? l : acc_t(0);
  a.d_lo = a.in_lo ? acc_t(-1) : acc_t(0);
  a.d_hi = a.in_hi ? acc_t(1) : acc_t(0);
  a.lo = std::max(i0, 0);
  a.hi = std::min(i0 + 1, size - 1);
  return a;
}

// Which of a row's arrays one vectorised loop over the row fills. One loop per group of arrays:
// GCC does not vectorise a loop body that fills all of them at once.
enum class RowPass { kScope, kScopeDerivatives, kImage, kImageDerivatives };

// One pass over output row oy, tap (kh, kw): recomputes the tap's sample points (cheap, vector
// code) and stores the pass's arrays at entries [at, at + Wo).
template <RowPass kPass, bool kOffset, typename scalar_t, typename acc_t>
DK_ALWAYS_INLINE void sample_row_pass(const DKTensors<scalar_t>& t, int64_t b, int64_t oy,
                                      int64_t group, int64_t kh, int64_t kw, int32_t cell_stride,
                                      RowTaps<acc_t>& taps) {
  const DKGeometry& g = t.g;
  const int64_t Wo = g.out_width, plane = g.out_height * Wo, k = kh * g.kernel_w + kw;
  const int32_t Sh = static_cast<int32_t>(g.scope_h), Sw = static_cast<int32_t>(g.scope_w);
  const int32_t height = static_cast<int32_t>(g.height), width = static_cast<int32_t>(g.width);
  const int32_t stride_w = static_cast<int32_t>(g.stride_w);
  const int64_t iy = oy * g.stride_h - g.pad_h + kh * g.dilation_h;
  const bool row_inside = iy >= 0 && iy < g.height;
  const int32_t row_start = static_cast<int32_t>(row_inside ? iy * g.width : 0);
  const scalar_t* ry = t.rotation +
                       (b * g.rotation_groups * g.taps() * 2 + (group * g.taps() + k) * 2) *
                           plane + oy * Wo;
  const scalar_t* rx = ry + plane;
  const scalar_t* oy_off =
      kOffset ? t.offset + (b * g.taps() * 2 + k * 2) * plane + oy * Wo : ry;
  const scalar_t* ox_off = oy_off + plane;
  const acc_t base_y = scope_base<acc_t>(kh, g.kernel_h, g.scope_h);
  const acc_t base_x = scope_base<acc_t>(kw, g.kernel_w, g.scope_w);
  const acc_t image_y = static_cast<acc_t>(iy);
  const int32_t ix0 = static_cast<int32_t>(kw * g.dilation_w - g.pad_w);
  constexpr bool kImage = kPass == RowPass::kImage || kPass == RowPass::kImageDerivatives;
  constexpr bool kDerivatives =
      kPass == RowPass::kScopeDerivatives || kPass == RowPass::kImageDerivatives;
  // The pass's four corner arrays (index and weight, or the two derivatives) and the pixels.
  const int64_t at = k * Wo;
  int32_t* __restrict i0 = (kImage ? taps.image_pixel : taps.index)[0].data() + at;
  int32_t* __restrict i1 = (kImage ? taps.image_pixel : taps.index)[1].data() + at;
  int32_t* __restrict i2 = (kImage ? taps.image_pixel : taps.index)[2].data() + at;
  int32_t* __restrict i3 = (kImage ? taps.image_pixel : taps.index)[3].data() + at;
  std::vector<acc_t>* first = kImage ? (kDerivatives ? taps.image_dy : taps.image_weight)
                                     : (kDerivatives ? taps.dy : taps.weight);
  std::vector<acc_t>* second = kImage ? taps.image_dx : taps.dx;
  acc_t* __restrict a0 = first[0].data() + at;
  acc_t* __restrict a1 = first[1].data() + at;
  acc_t* __restrict a2 = first[2].data() + at;
  acc_t* __restrict a3 = first[3].data() + at;
  acc_t* __restrict b0 = kDerivatives ? second[0].data() + at : nullptr;
  acc_t* __restrict b1 = kDerivatives ? second[1].data() + at : nullptr;
  acc_t* __restrict b2 = kDerivatives ? second[2].data() + at : nullptr;
  acc_t* __restrict b3 = kDerivatives ? second[3].data() + at : nullptr;
  int32_t* __restrict pixel = kOffset ? nullptr : taps.pixel.data() + at;
  DK_SIMD
  for (int32_t ox = 0; ox < static_cast<int32_t>(Wo); ++ox) {
    const int32_t ix = ox * stride_w + ix0;
    const acc_t sy = base_y + acc_t(ry[ox]);
    const acc_t sx = base_x + acc_t(rx[ox]);
    // `&` instead of `&&`: no short-circuit branches in the loop body.
    bool inside = (sy > acc_t(-1)) & (sy < acc_t(Sh)) & (sx > acc_t(-1)) & (sx < acc_t(Sw));
    acc_t y = acc_t(0), x = acc_t(0);
    if (kOffset) {
      y = image_y + acc_t(oy_off[ox]);
      x = acc_t(ix) + acc_t(ox_off[ox]);
      inside = inside & (y > acc_t(-1)) & (y < acc_t(height)) & (x > acc_t(-1)) &
               (x < acc_t(width));
    } else {
      inside = inside & row_inside & (ix >= 0) & (ix < width);
    }
    // Corner j = 2 * (row below?) + (column right?), the order of bilinear.h.
    const AxisCorners<acc_t> Y = kImage ? axis_corners(y, inside, height)
                                        : axis_corners(sy, inside, Sh);
    const AxisCorners<acc_t> X = kImage ? axis_corners(x, inside, width)
                                        : axis_corners(sx, inside, Sw);
    if (kDerivatives) {
      a0[ox] = Y.d_lo * X.w_lo;
      a1[ox] = Y.d_lo * X.w_hi;
      a2[ox] = Y.d_hi * X.w_lo;
      a3[ox] = Y.d_hi * X.w_hi;
      b0[ox] = Y.w_lo * X.d_lo;
      b1[ox] = Y.w_lo * X.d_hi;
      b2[ox] = Y.w_hi * X.d_lo;
      b3[ox] = Y.w_hi * X.d_hi;
    } else if (kImage) {
      // Image pixels; -1 for a corner outside the image (it reads the zeros row).
      const int32_t top = Y.lo * width, bottom = Y.hi * width;
      i0[ox] = (Y.in_lo & X.in_lo) ? top + X.lo : -1;
      i1[ox] = (Y.in_lo & X.in_hi) ? top + X.hi : -1;
      i2[ox] = (Y.in_hi & X.in_lo) ? bottom + X.lo : -1;
      i3[ox] = (Y.in_hi & X.in_hi) ? bottom + X.hi : -1;
    } else {
      // Scope cells, premultiplied by the weight's row stride.
      const int32_t top = Y.lo * Sw, bottom = Y.hi * Sw;
      i0[ox] = (top + X.lo) * cell_stride;
      i1[ox] = (top + X.hi) * cell_stride;
      i2[ox] = (bottom + X.lo) * cell_stride;
      i3[ox] = (bottom + X.hi) * cell_stride;
      if (!kOffset) pixel[ox] = inside ? row_start + ix : -1;
    }
    if (!kDerivatives) {
      a0[ox] = Y.w_lo * X.w_lo;
      a1[ox] = Y.w_lo * X.w_hi;
      a2[ox] = Y.w_hi * X.w_lo;
      a3[ox] = Y.w_hi * X.w_hi;
    }
  }
}

// Fills `taps` for output row oy of image b and rotation group `group`. kOffset: the image is
// read bilinearly at the tap plus its offset (deform_kernel_conv2d); kDerivatives: also the
// corner weights' derivatives, for the backward.
template <bool kOffset = false, bool kDerivatives = false, typename scalar_t, typename acc_t>
DK_ALWAYS_INLINE void sample_row(const DKTensors<scalar_t>& t, int64_t b, int64_t oy, int64_t group,
                                 int32_t cell_stride, RowTaps<acc_t>& taps) {
  for (int64_t kh = 0; kh < t.g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < t.g.kernel_w; ++kw) {
      sample_row_pass<RowPass::kScope, kOffset>(t, b, oy, group, kh, kw, cell_stride, taps);
      if (kDerivatives) {
        sample_row_pass<RowPass::kScopeDerivatives, kOffset>(t, b, oy, group, kh, kw,
                                                             cell_stride, taps);
      }
      if (kOffset) {
        sample_row_pass<RowPass::kImage, kOffset>(t, b, oy, group, kh, kw, cell_stride, taps);
      }
      if (kOffset && kDerivatives) {
        sample_row_pass<RowPass::kImageDerivatives, kOffset>(t, b, oy, group, kh, kw,
                                                             cell_stride, taps);
      }
    }
  }
}

}  // namespace cpu
}  // namespace dk_detectron2
