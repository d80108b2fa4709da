// One tap of one output position: where it reads in the scope and in the image. Shared by the
// depthwise kernels (deform_kernel_forward.h, deform_kernel_backward.h,
// deform_kernel_input_grad.h) and the scope-space path (scope_space_cpu.cpp).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>

#include "bilinear.h"
#include "cpu/vectorize.h"
#include "geometry.h"

namespace dk_detectron2 {
namespace cpu {

template <typename scalar_t>
struct DKTensors {
  DKGeometry g;
  const scalar_t* input;     // [B, H, W, C_in] (channels-last); [B, C_in, H, W] if nchw
  const scalar_t* offset;    // [B, Kh*Kw*2, Ho, Wo], or nullptr for integer image taps
  const scalar_t* rotation;  // [B, G*Kh*Kw*2, Ho, Wo]
  const scalar_t* weight;    // depthwise: [Sh*Sw, C] (transposed); scope space: unused
  const scalar_t* scope;     // depthwise: [(Sh+2)*(Sw+2), C], see padded_scope(); else unused
  // The depthwise forward's input and output are NCHW: it stages them a few rows at a time
  // (nchw_staging.h) instead of reading `input` directly.
  bool nchw = false;
};

// The row kernels read the depthwise scope transposed and inside a ring of zero cells,
// [(Sh+3)*(Sw+2), C] (padded_scope_cells): scope cell (y, x) is padded cell (y+1, x+1). The four
// corners of a sample that reads anything (-1 < y < Sh, -1 < x < Sw) are then always cells at
// fixed distances from the first, and a corner outside the scope reads zero without a test. One
// more zero row at the bottom gives a tap that reads nothing a 2 x 2 block of zero cells only
// (padded_dead_cell): it never addresses scope cell 0 (see the rule below).
inline int64_t padded_scope_cells(int64_t Sh, int64_t Sw) { return (Sh + 3) * (Sw + 2); }

// The padded cell whose 2 x 2 block holds zeros only: (Sh+1, 0), the bottom ring row.
inline int64_t padded_dead_cell(int64_t Sh, int64_t Sw) { return (Sh + 1) * (Sw + 2); }

inline at::Tensor padded_scope(const at::Tensor& transposed, int64_t Sh, int64_t Sw) {
  const int64_t C = transposed.size(1);
  return at::constant_pad_nd(transposed.reshape({Sh, Sw, C}), {0, 0, 1, 1, 1, 2})
      .reshape({padded_scope_cells(Sh, Sw), C})
      .contiguous();
}

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
  const acc_t sy =
      base_grid_position<acc_t>(kh, g.kernel_h, g.scope_h) + static_cast<acc_t>(rot[0]);
  const acc_t sx =
      base_grid_position<acc_t>(kw, g.kernel_w, g.scope_w) + static_cast<acc_t>(rot[plane]);
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
// Entry [k * Wo + ox]. In the scope (padded_scope()): `cell` is the padded cell of the first
// corner (y0, x0) times cell_stride (the weight's row stride, so the channel loops add it to a
// pointer as is); the other corners are `right`, `below` and `below + right` further. `weights`
// holds the four bilinear weights of entry e at [4e, 4e + 4) (one array, so the channel loops
// need one register for them, not four), (1-ly)(1-lx), (1-ly)lx, ly(1-lx), ly*lx, with no zeroing of
// corners outside the scope (they read the zero ring), so their derivatives follow from them:
// d/dy = {-(w0+w2), -(w1+w3), w0+w2, w1+w3}, d/dx = {-(w0+w1), w0+w1, -(w2+w3), w2+w3}. A tap that
// reads nothing has all weights 0, the zero block padded_dead_cell() and pixel -1 (a row of
// zeros), so it reads zeros only, whatever scope cell 0 and pixel 0 hold. Integer image
// taps (deform_kernel2d) fill `pixel`; bilinear image reads (deform_kernel_conv2d) fill the
// `image_*` corners instead (weights and derivatives 0 and pixel -1 for a corner outside the
// image). Pixels are int32: callers check H * W < 2^31 and padded_scope_cells() * cell_stride < 2^31.
template <typename acc_t>
struct RowTaps {
  std::vector<int32_t> cell;
  std::vector<acc_t> weights;
  int64_t right = 0, below = 0;  // distances of corners (y0, x0+1) and (y0+1, x0) from `cell`
  std::vector<int32_t> pixel;
  std::vector<int32_t> image_pixel[4];
  std::vector<acc_t> image_weight[4], image_dy[4], image_dx[4];

  void resize(int64_t n, bool offset = false, bool derivatives = false) {
    cell.resize(n);
    weights.resize(4 * n);
    for (int j = 0; j < 4; ++j) {
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
enum class RowPass { kScope, kImage, kImageDerivatives };

// Runs body(ox) for ox in [0, Wo) so that GCC vectorises it without a scalar remainder: in
// blocks of exactly 16 (one AVX-512 vector), the last block shifted back to end at Wo (it redoes
// a few entries; every body here writes entry ox only, so that is harmless). Rows shorter than 16
// run one plain loop.
template <typename Body>
DK_ALWAYS_INLINE void for_row_blocks(int64_t Wo, Body&& body) {
  // 64-bit counters: Python's -fwrapv makes 32-bit index arithmetic wrap, and GCC then turns the
  // row's contiguous loads and stores into gathers and scatters.
  if (Wo < 16) {
    DK_SIMD
    for (int64_t ox = 0; ox < Wo; ++ox) body(ox);
    return;
  }
  for (int64_t start = 0; start < Wo; start += 16) {
    const int64_t first = std::min<int64_t>(start, Wo - 16);
    DK_SIMD
    for (int64_t i = 0; i < 16; ++i) body(first + i);
  }
}

// One pass over output row oy, tap (kh, kw): recomputes the tap's sample points (cheap, vector
// code) and stores the pass's arrays at entries [at, at + Wo). Integer taps' pixels count from
// image row first_row (the first row of a staged band, cpu::ChannelsLastBand; 0 otherwise).
template <RowPass kPass, bool kOffset, typename scalar_t, typename acc_t>
DK_ALWAYS_INLINE void sample_row_pass(const DKTensors<scalar_t>& t, int64_t b, int64_t oy,
                                      int64_t group, int64_t kh, int64_t kw, int32_t cell_stride,
                                      int64_t first_row, RowTaps<acc_t>& taps) {
  const DKGeometry& g = t.g;
  const int64_t Wo = g.out_width, plane = g.out_height * Wo, k = kh * g.kernel_w + kw;
  const int32_t Sh = static_cast<int32_t>(g.scope_h), Sw = static_cast<int32_t>(g.scope_w);
  const int32_t padded_w = Sw + 2;
  const int32_t dead_cell = static_cast<int32_t>(padded_dead_cell(Sh, Sw)) * cell_stride;
  const int32_t height = static_cast<int32_t>(g.height), width = static_cast<int32_t>(g.width);
  const int32_t stride_w = static_cast<int32_t>(g.stride_w);
  const int64_t iy = oy * g.stride_h - g.pad_h + kh * g.dilation_h;
  const bool row_inside = iy >= 0 && iy < g.height;
  const int32_t row_start = static_cast<int32_t>(row_inside ? (iy - first_row) * g.width : 0);
  const scalar_t* ry = t.rotation +
                       (b * g.rotation_groups * g.taps() * 2 + (group * g.taps() + k) * 2) *
                           plane + oy * Wo;
  const scalar_t* rx = ry + plane;
  const scalar_t* oy_off =
      kOffset ? t.offset + (b * g.taps() * 2 + k * 2) * plane + oy * Wo : ry;
  const scalar_t* ox_off = oy_off + plane;
  const acc_t base_y = base_grid_position<acc_t>(kh, g.kernel_h, g.scope_h);
  const acc_t base_x = base_grid_position<acc_t>(kw, g.kernel_w, g.scope_w);
  const acc_t image_y = static_cast<acc_t>(iy);
  const int32_t ix0 = static_cast<int32_t>(kw * g.dilation_w - g.pad_w);
  constexpr bool kImage = kPass == RowPass::kImage || kPass == RowPass::kImageDerivatives;
  constexpr bool kDerivatives = kPass == RowPass::kImageDerivatives;
  const int64_t at = k * Wo;
  int32_t* __restrict cell = taps.cell.data() + at;
  int32_t* __restrict i0 = kImage ? taps.image_pixel[0].data() + at : nullptr;
  int32_t* __restrict i1 = kImage ? taps.image_pixel[1].data() + at : nullptr;
  int32_t* __restrict i2 = kImage ? taps.image_pixel[2].data() + at : nullptr;
  int32_t* __restrict i3 = kImage ? taps.image_pixel[3].data() + at : nullptr;
  std::vector<acc_t>* first = kDerivatives ? taps.image_dy : taps.image_weight;
  acc_t* __restrict a0 = kImage ? first[0].data() + at : nullptr;
  acc_t* __restrict a1 = kImage ? first[1].data() + at : nullptr;
  acc_t* __restrict a2 = kImage ? first[2].data() + at : nullptr;
  acc_t* __restrict a3 = kImage ? first[3].data() + at : nullptr;
  acc_t* __restrict scope_weights = taps.weights.data() + 4 * at;
  acc_t* __restrict b0 = kDerivatives ? taps.image_dx[0].data() + at : nullptr;
  acc_t* __restrict b1 = kDerivatives ? taps.image_dx[1].data() + at : nullptr;
  acc_t* __restrict b2 = kDerivatives ? taps.image_dx[2].data() + at : nullptr;
  acc_t* __restrict b3 = kDerivatives ? taps.image_dx[3].data() + at : nullptr;
  int32_t* __restrict pixel = kOffset ? nullptr : taps.pixel.data() + at;
  for_row_blocks(Wo, [=](int64_t ox) DK_ALWAYS_INLINE_LAMBDA {
    const int32_t ix = static_cast<int32_t>(ox) * stride_w + ix0;
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
    if constexpr (kImage) {
      // Corner j = 2 * (row below?) + (column right?), the order of bilinear.h.
      const AxisCorners<acc_t> Y = axis_corners(y, inside, height);
      const AxisCorners<acc_t> X = axis_corners(x, inside, width);
      if (kDerivatives) {
        a0[ox] = Y.d_lo * X.w_lo;
        a1[ox] = Y.d_lo * X.w_hi;
        a2[ox] = Y.d_hi * X.w_lo;
        a3[ox] = Y.d_hi * X.w_hi;
        b0[ox] = Y.w_lo * X.d_lo;
        b1[ox] = Y.w_lo * X.d_hi;
        b2[ox] = Y.w_hi * X.d_lo;
        b3[ox] = Y.w_hi * X.d_hi;
      } else {
        // Image pixels; -1 for a corner outside the image (it reads the zeros row).
        const int32_t top = Y.lo * width, bottom = Y.hi * width;
        i0[ox] = (Y.in_lo & X.in_lo) ? top + X.lo : -1;
        i1[ox] = (Y.in_lo & X.in_hi) ? top + X.hi : -1;
        i2[ox] = (Y.in_hi & X.in_lo) ? bottom + X.lo : -1;
        i3[ox] = (Y.in_hi & X.in_hi) ? bottom + X.hi : -1;
        a0[ox] = Y.w_lo * X.w_lo;
        a1[ox] = Y.w_lo * X.w_hi;
        a2[ox] = Y.w_hi * X.w_lo;
        a3[ox] = Y.w_hi * X.w_hi;
      }
    } else {
      // The scope: -1 < s < S puts floor(s) + 1 in [0, S], a valid padded cell.
      const acc_t cy = inside ? sy : acc_t(0), cx = inside ? sx : acc_t(0);
      const acc_t fy = std::floor(cy), fx = std::floor(cx);
      const acc_t ly = cy - fy, lx = cx - fx;
      const int32_t first_cell = (static_cast<int32_t>(fy) + 1) * padded_w +
                                 static_cast<int32_t>(fx) + 1;
      cell[ox] = inside ? first_cell * cell_stride : dead_cell;
      const acc_t hy = inside ? acc_t(1) - ly : acc_t(0);
      const acc_t vy = inside ? ly : acc_t(0);
      scope_weights[4 * ox + 0] = hy * (acc_t(1) - lx);
      scope_weights[4 * ox + 1] = hy * lx;
      scope_weights[4 * ox + 2] = vy * (acc_t(1) - lx);
      scope_weights[4 * ox + 3] = vy * lx;
      if (!kOffset) pixel[ox] = inside ? row_start + ix : -1;
    }
  });
}

// Fills `taps` for output row oy of image b and rotation group `group`. kOffset: the image is
// read bilinearly at the tap plus its offset (deform_kernel_conv2d); kDerivatives: also the image
// corner weights' derivatives, for the backward. Integer taps' pixels count from image row
// first_row (see sample_row_pass).
template <bool kOffset = false, bool kDerivatives = false, typename scalar_t, typename acc_t>
DK_ALWAYS_INLINE void sample_row(const DKTensors<scalar_t>& t, int64_t b, int64_t oy, int64_t group,
                                 int32_t cell_stride, RowTaps<acc_t>& taps,
                                 int64_t first_row = 0) {
  taps.right = cell_stride;
  taps.below = int64_t(cell_stride) * (t.g.scope_w + 2);
  for (int64_t kh = 0; kh < t.g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < t.g.kernel_w; ++kw) {
      sample_row_pass<RowPass::kScope, kOffset>(t, b, oy, group, kh, kw, cell_stride, first_row,
                                                taps);
      if (kOffset) {
        sample_row_pass<RowPass::kImage, kOffset>(t, b, oy, group, kh, kw, cell_stride,
                                                  first_row, taps);
      }
      if (kOffset && kDerivatives) {
        sample_row_pass<RowPass::kImageDerivatives, kOffset>(t, b, oy, group, kh, kw,
                                                             cell_stride, first_row, taps);
      }
    }
  }
}

// Cache lines that the next output row reads first, requested a few at a time while the current
// row runs, so the misses overlap its work. Without this, the row sampler's G*Kh*Kw*2 rotation
// rows (72 for G 4, K 3: more concurrent streams than the hardware prefetcher follows) and, with
// several rotation groups, the input (read one group's channels at a time, a strided pattern) miss
// to memory on every first touch. Requesting all lines at once would stall on the line-fill
// buffers instead.
class NextRowPrefetch {
 public:
  // Collects the lines of output row oy of image b: its rotation rows of groups
  // [group_begin, group_end), its offset rows for deform_kernel_conv2d, and the input rows of its
  // taps that output row oy - 1 of the same image did not read (all of them for oy 0); no input
  // rows when the input is staged (t.nchw: the band is written just before it is read).
  template <typename scalar_t>
  void collect(const DKTensors<scalar_t>& t, int64_t b, int64_t oy, int64_t group_begin,
               int64_t group_end, int64_t requests) {
    const DKGeometry& g = t.g;
    const int64_t Wo = g.out_width, plane = g.out_height * Wo, taps2 = g.taps() * 2;
    lines_.clear();
    next_ = 0;
    const scalar_t* rot = t.rotation + (b * g.rotation_groups + group_begin) * taps2 * plane;
    for (int64_t ch = 0; ch < (group_end - group_begin) * taps2; ++ch) {
      add(rot + ch * plane + oy * Wo, Wo * sizeof(scalar_t));
    }
    if (t.offset != nullptr) {
      for (int64_t ch = 0; ch < taps2; ++ch) {
        add(t.offset + (b * taps2 + ch) * plane + oy * Wo, Wo * sizeof(scalar_t));
      }
    }
    const int64_t row_bytes = g.width * g.in_channels * sizeof(scalar_t);
    const scalar_t* image = t.input + b * g.height * g.width * g.in_channels;
    const int64_t first = oy * g.stride_h - g.pad_h, previous = first - g.stride_h;
    for (int64_t kh = 0; kh < (t.nchw ? 0 : g.kernel_h); ++kh) {
      const int64_t iy = first + kh * g.dilation_h;
      if (iy < 0 || iy >= g.height) continue;
      const int64_t from_previous = iy - previous;
      const bool read_before = oy > 0 && from_previous % g.dilation_h == 0 &&
                               from_previous / g.dilation_h < g.kernel_h;
      if (!read_before) add(image + iy * g.width * g.in_channels, row_bytes);
    }
    per_request_ = (lines_.size() + requests - 1) / std::max<int64_t>(requests, 1);
  }

  // Requests the next share of the lines (one call per unit of the current row's work).
  DK_ALWAYS_INLINE void request() {
    const size_t end = std::min(lines_.size(), next_ + per_request_);
    for (; next_ < end; ++next_) __builtin_prefetch(lines_[next_]);
  }

 private:
  void add(const void* p, int64_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (int64_t i = 0; i < bytes; i += 64) lines_.push_back(c + i);
  }
  std::vector<const char*> lines_;
  size_t next_ = 0, per_request_ = 0;
};

// Calls f(J) for the corners J = 0..3 as compile-time constants. Per-corner arrays indexed this
// way stay in registers (GCC scalarises small arrays before it unrolls loops, so an array indexed
// by a loop counter lives on the stack).
template <typename F>
DK_ALWAYS_INLINE void for_corners(F&& f) {
  f(std::integral_constant<int, 0>{});
  f(std::integral_constant<int, 1>{});
  f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 3>{});
}

// The image row of `pixel`, or the zeros row for a pixel outside the image (-1).
template <typename scalar_t>
DK_ALWAYS_INLINE const scalar_t* pixel_row(const scalar_t* image, int32_t pixel, int64_t C,
                                           const scalar_t* zeros) {
  return pixel >= 0 ? image + int64_t(pixel) * C : zeros;
}

// What one tap entry of a RowTaps row reads: the padded-scope rows (padded_scope) and weights of
// its 4 scope corners, and its image rows (1 for an integer tap, 4 bilinear corners with their
// weights for kOffset), at channel 0.
template <typename scalar_t, typename acc_t, bool kOffset>
struct TapReads {
  const scalar_t* w[4];
  acc_t a[4];
  const scalar_t* x[kOffset ? 4 : 1];
  acc_t b[4];
};

template <typename scalar_t, typename acc_t, bool kOffset>
DK_ALWAYS_INLINE TapReads<scalar_t, acc_t, kOffset> tap_reads(const RowTaps<acc_t>& row,
                                                              int64_t e, const scalar_t* image,
                                                              const scalar_t* scope, int64_t C,
                                                              const scalar_t* zeros) {
  TapReads<scalar_t, acc_t, kOffset> r;
  r.w[0] = scope + row.cell[e];
  r.w[1] = r.w[0] + row.right;
  r.w[2] = r.w[0] + row.below;
  r.w[3] = r.w[2] + row.right;
  for_corners([&](auto j) { r.a[j] = row.weights[4 * e + j]; });
  if constexpr (kOffset) {
    for_corners([&](auto j) {
      r.x[j] = pixel_row(image, row.image_pixel[j][e], C, zeros);
      r.b[j] = row.image_weight[j][e];
    });
  } else {
    r.x[0] = pixel_row(image, row.pixel[e], C, zeros);
  }
  return r;
}

// The rule of bilinear.h for the loops over BilinearCorners: a corner outside the grid (inside
// false) is never addressed, not even with weight 0, since 0 * inf is NaN. Its row in a table is
// replaced by `outside`, a row of C zeros for a read (it adds w * 0 = 0) or a scratch row for a
// write (what lands there is dropped): one select per corner and tap, none in the channel loops.
// The chain rule through the corner weights (inside_dot) leaves such corners out likewise.
//
// The rows of the four bilinear corners `s` in a [cells, C] table (the transposed weight or its
// gradient, an image or its gradient, scope-space columns), at channel c0.
template <typename T, typename acc_t>
DK_ALWAYS_INLINE std::array<T*, 4> corner_rows(T* table, const BilinearCorners<acc_t>& s,
                                               int64_t C, int64_t c0, T* outside) {
  // One initialiser, no loop: GCC keeps the four pointers in registers (see for_corners).
  const auto row = [&](int j) DK_ALWAYS_INLINE_LAMBDA {
    return (s.inside[j] ? table + s.index[j] * C : outside) + c0;
  };
  return {row(0), row(1), row(2), row(3)};
}

// The same rows when all four corners are inside the grid (all_inside): no selects. The kernels
// branch once per tap on all_inside (the common case) and run their channel loops over these rows,
// else over corner_rows' (see with_inside).
template <typename T, typename acc_t>
DK_ALWAYS_INLINE std::array<T*, 4> corner_rows_inside(T* table, const BilinearCorners<acc_t>& s,
                                                      int64_t C, int64_t c0) {
  return {table + s.index[0] * C + c0, table + s.index[1] * C + c0, table + s.index[2] * C + c0,
          table + s.index[3] * C + c0};
}

// True when the four corners of `s` are cells of the grid (one 32-bit compare of the flags).
template <typename acc_t>
DK_ALWAYS_INLINE bool all_inside(const BilinearCorners<acc_t>& s) {
  static_assert(sizeof(s.inside) == sizeof(uint32_t) && sizeof(bool) == 1);
  uint32_t flags;
  __builtin_memcpy(&flags, s.inside, sizeof(flags));
  return flags == 0x01010101u;
}

// corner_rows_inside when kInside (the caller has checked all_inside), else corner_rows.
template <bool kInside, typename T, typename acc_t>
DK_ALWAYS_INLINE std::array<T*, 4> tap_corner_rows(T* table, const BilinearCorners<acc_t>& s,
                                                   int64_t C, int64_t c0, T* outside) {
  if constexpr (kInside) {
    return corner_rows_inside(table, s, C, c0);
  } else {
    return corner_rows(table, s, C, c0, outside);
  }
}

// f(std::true_type) when `inside`, else f(std::false_type): one branch per tap, outside the
// channel loops, between a copy of them that addresses every corner directly and the careful one.
template <typename F>
DK_ALWAYS_INLINE decltype(auto) with_inside(bool inside, F&& f) {
  if (inside) return f(std::true_type{});
  return f(std::false_type{});
}

// with_inside with the careful copy out of line, for kernels compiled for one instruction set
// only (not in target_clones, whose copies must keep their own careful loops): the common copy
// stays small enough for GCC to inline bilinear_corners into the tap loop around it.
template <typename F>
__attribute__((noinline)) void outside_grid_tap(F& f) {
  f(std::false_type{});
}

template <typename F>
DK_ALWAYS_INLINE void with_inside_out_of_line(bool inside, F&& f) {
  if (__builtin_expect(inside, true)) {
    f(std::true_type{});
  } else {
    outside_grid_tap(f);
  }
}

// The four bilinear weights of `s` as a local value: the channel loops below keep them in
// registers instead of reading them through a pointer that their own stores might alias.
template <typename acc_t>
DK_ALWAYS_INLINE std::array<acc_t, 4> corner_weights(const BilinearCorners<acc_t>& s) {
  return {s.weight[0], s.weight[1], s.weight[2], s.weight[3]};
}

// Channel c read bilinearly from the four corner rows (corner_rows): sum_j w[j] * rows[j][c],
// in corner order.
template <typename acc_t, typename T>
DK_ALWAYS_INLINE acc_t corner_read(const std::array<T*, 4>& rows, const std::array<acc_t, 4>& w,
                                   int64_t c) {
  return w[0] * acc_t(rows[0][c]) + w[1] * acc_t(rows[1][c]) + w[2] * acc_t(rows[2][c]) +
         w[3] * acc_t(rows[3][c]);
}

// The adjoint of corner_read: rows[j][c] += w[j] * v for the four corners.
template <typename acc_t>
DK_ALWAYS_INLINE void corner_spread(const std::array<acc_t*, 4>& rows,
                                    const std::array<acc_t, 4>& w, int64_t c, acc_t v) {
  rows[0][c] += w[0] * v;
  rows[1][c] += w[1] * v;
  rows[2][c] += w[2] * v;
  rows[3][c] += w[3] * v;
}

// sums[j] += rows[j][c] * factor for the four corners (per-corner dot products over channels).
template <typename acc_t, typename T>
DK_ALWAYS_INLINE void corner_accumulate(std::array<acc_t, 4>& sums, const std::array<T*, 4>& rows,
                                        int64_t c, acc_t factor) {
  sums[0] += acc_t(rows[0][c]) * factor;
  sums[1] += acc_t(rows[1][c]) * factor;
  sums[2] += acc_t(rows[2][c]) * factor;
  sums[3] += acc_t(rows[3][c]) * factor;
}

// sum_j coefficient[j] * v_j over the four corners, in corner order (the chain rule through the
// corner weights: coefficient = dweight_dy or dweight_dx).
template <typename acc_t>
DK_ALWAYS_INLINE acc_t corner_dot(const acc_t (&coefficient)[4], acc_t v0, acc_t v1, acc_t v2,
                                  acc_t v3) {
  return coefficient[0] * v0 + coefficient[1] * v1 + coefficient[2] * v2 + coefficient[3] * v3;
}

template <typename acc_t>
DK_ALWAYS_INLINE acc_t corner_dot(const acc_t (&coefficient)[4], const std::array<acc_t, 4>& v) {
  return corner_dot(coefficient, v[0], v[1], v[2], v[3]);
}

// corner_dot over the corners inside the grid: a corner outside has coefficient 0, but its sum v_j
// may be NaN (a zeros row times an infinite gradient), so it is selected away, not multiplied.
template <typename acc_t>
DK_ALWAYS_INLINE acc_t inside_dot(const BilinearCorners<acc_t>& s, const acc_t (&coefficient)[4],
                                  acc_t v0, acc_t v1, acc_t v2, acc_t v3) {
  return corner_dot(coefficient, s.inside[0] ? v0 : acc_t(0), s.inside[1] ? v1 : acc_t(0),
                    s.inside[2] ? v2 : acc_t(0), s.inside[3] ? v3 : acc_t(0));
}

template <typename acc_t>
DK_ALWAYS_INLINE acc_t inside_dot(const BilinearCorners<acc_t>& s, const acc_t (&coefficient)[4],
                                  const std::array<acc_t, 4>& v) {
  return inside_dot(s, coefficient, v[0], v[1], v[2], v[3]);
}

// inside_dot when kInside (every corner inside: corner_dot, no selects), else inside_dot.
template <bool kInside, typename acc_t>
DK_ALWAYS_INLINE acc_t tap_dot(const BilinearCorners<acc_t>& s, const acc_t (&coefficient)[4],
                               const std::array<acc_t, 4>& v) {
  if constexpr (kInside) {
    return corner_dot(coefficient, v);
  } else {
    return inside_dot(s, coefficient, v);
  }
}

}  // namespace cpu
}  // namespace dk_detectron2
