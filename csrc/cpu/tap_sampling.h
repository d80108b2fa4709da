// One tap of one output position: where it reads in the scope and in the image. Shared by the
// depthwise kernels (deform_kernel_cpu.cpp) and the scope-space path (scope_space_cpu.cpp).
#pragma once

#include <cstdint>

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
