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

// The scope corners of every tap of one output row and rotation group, computed branch-free over
// the row (32-bit lanes and selects only, so the loop vectorises) before the channel loops use them.
// Integer image taps only. Entry [k * Wo + ox]; `index` holds scope cell * cell_stride (the
// weight's row stride, so the channel loops add it to a pointer as is); a tap that reads nothing
// has all weights 0, valid indices and pixel -1. Pixels are int32: callers check H * W < 2^31
// and Sh * Sw * cell_stride < 2^31.
template <typename acc_t>
struct RowTaps {
  std::vector<int32_t> index[4];
  std::vector<acc_t> weight[4];
  std::vector<int32_t> pixel;

  void resize(int64_t n) {
    for (int j = 0; j < 4; ++j) {
      index[j].resize(n);
      weight[j].resize(n);
    }
    pixel.resize(n);
  }
};

template <typename scalar_t, typename acc_t>
DK_ALWAYS_INLINE void sample_row(const DKTensors<scalar_t>& t, int64_t b, int64_t oy, int64_t group,
                                 int32_t cell_stride, RowTaps<acc_t>& taps) {
  const DKGeometry& g = t.g;
  const int64_t Wo = g.out_width, plane = g.out_height * Wo;
  const int32_t Sh = static_cast<int32_t>(g.scope_h), Sw = static_cast<int32_t>(g.scope_w);
  const int32_t width = static_cast<int32_t>(g.width);
  const int32_t stride_w = static_cast<int32_t>(g.stride_w);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    const int64_t iy = oy * g.stride_h - g.pad_h + kh * g.dilation_h;
    const bool row_inside = iy >= 0 && iy < g.height;
    const int32_t row_start = static_cast<int32_t>(row_inside ? iy * g.width : 0);
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t k = kh * g.kernel_w + kw;
      const scalar_t* ry = t.rotation +
                           (b * g.rotation_groups * g.taps() * 2 + (group * g.taps() + k) * 2) *
                               plane + oy * Wo;
      const scalar_t* rx = ry + plane;
      const acc_t base_y = scope_base<acc_t>(kh, g.kernel_h, g.scope_h);
      const acc_t base_x = scope_base<acc_t>(kw, g.kernel_w, g.scope_w);
      const int32_t ix0 = static_cast<int32_t>(kw * g.dilation_w - g.pad_w);
      int32_t* __restrict i0 = taps.index[0].data() + k * Wo;
      int32_t* __restrict i1 = taps.index[1].data() + k * Wo;
      int32_t* __restrict i2 = taps.index[2].data() + k * Wo;
      int32_t* __restrict i3 = taps.index[3].data() + k * Wo;
      acc_t* __restrict w0 = taps.weight[0].data() + k * Wo;
      acc_t* __restrict w1 = taps.weight[1].data() + k * Wo;
      acc_t* __restrict w2 = taps.weight[2].data() + k * Wo;
      acc_t* __restrict w3 = taps.weight[3].data() + k * Wo;
      int32_t* __restrict pixel = taps.pixel.data() + k * Wo;
      DK_SIMD
      for (int32_t ox = 0; ox < static_cast<int32_t>(Wo); ++ox) {
        const int32_t ix = ox * stride_w + ix0;
        acc_t sy = base_y + acc_t(ry[ox]);
        acc_t sx = base_x + acc_t(rx[ox]);
        // `&` instead of `&&`: no short-circuit branches in the loop body.
        const bool inside = row_inside & (ix >= 0) & (ix < width) & (sy > acc_t(-1)) &
                            (sy < acc_t(Sh)) & (sx > acc_t(-1)) & (sx < acc_t(Sw));
        sy = inside ? sy : acc_t(0);  // keeps NaN and infinity away from the integer conversion
        sx = inside ? sx : acc_t(0);
        const acc_t fy = std::floor(sy), fx = std::floor(sx);
        const int32_t y0 = static_cast<int32_t>(fy), x0 = static_cast<int32_t>(fx);
        const acc_t ly = sy - fy, lx = sx - fx;
        // Per-axis corner weights (zero for a corner outside the scope) and clamped cell indices:
        // products and min/max rather than one mask per corner, which GCC fails to vectorise.
        const acc_t wy0 = (inside & (y0 >= 0)) ? acc_t(1) - ly : acc_t(0);
        const acc_t wy1 = (inside & (y0 + 1 < Sh)) ? ly : acc_t(0);
        const acc_t wx0 = (x0 >= 0) ? acc_t(1) - lx : acc_t(0);
        const acc_t wx1 = (x0 + 1 < Sw) ? lx : acc_t(0);
        const int32_t top = std::max(y0, 0) * Sw, bottom = std::min(y0 + 1, Sh - 1) * Sw;
        const int32_t left = std::max(x0, 0), right = std::min(x0 + 1, Sw - 1);
        i0[ox] = (top + left) * cell_stride;
        i1[ox] = (top + right) * cell_stride;
        i2[ox] = (bottom + left) * cell_stride;
        i3[ox] = (bottom + right) * cell_stride;
        w0[ox] = wy0 * wx0;
        w1[ox] = wy0 * wx1;
        w2[ox] = wy1 * wx0;
        w3[ox] = wy1 * wx1;
        pixel[ox] = inside ? row_start + ix : -1;
      }
    }
  }
}

}  // namespace cpu
}  // namespace dk_detectron2
