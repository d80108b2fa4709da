// NCHW tensors for the channels-last row kernels, a few rows at a time.
//
// The depthwise kernels read and write channels-last rows ([W, C]: a pixel's channels contiguous).
// An NCHW input is not converted as a whole (a second copy of the input, and a slow one): each
// thread transposes the input rows its next output rows read into a small band, and writes each
// output row it computes straight into the NCHW output through a one-row buffer. Extra memory:
// one band and one output row per thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/ATen.h>

#include "cpu/vectorize.h"

namespace dk_detectron2 {
namespace cpu {

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols. float32 goes in 4x4
// tiles (4 vector loads, 8 shuffles, 4 vector stores), the edges and other dtypes one by one.
template <typename scalar_t>
DK_ALWAYS_INLINE void transpose_rows(const scalar_t* src, int64_t src_stride, int64_t rows,
                                     int64_t cols, scalar_t* dst, int64_t dst_stride) {
  int64_t i0 = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    typedef FloatVector<4> f32x4;
    for (; i0 + 4 <= rows; i0 += 4) {
      int64_t j0 = 0;
      for (; j0 + 4 <= cols; j0 += 4) {
        const float* s = src + i0 * src_stride + j0;
        const f32x4 r0 = load_vector<f32x4>(s), r1 = load_vector<f32x4>(s + src_stride);
        const f32x4 r2 = load_vector<f32x4>(s + 2 * src_stride);
        const f32x4 r3 = load_vector<f32x4>(s + 3 * src_stride);
        const f32x4 t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5);
        const f32x4 t1 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5);
        const f32x4 t2 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
        const f32x4 t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
        float* d = dst + j0 * dst_stride + i0;
        store_vector(d, __builtin_shufflevector(t0, t1, 0, 1, 4, 5));
        store_vector(d + dst_stride, __builtin_shufflevector(t0, t1, 2, 3, 6, 7));
        store_vector(d + 2 * dst_stride, __builtin_shufflevector(t2, t3, 0, 1, 4, 5));
        store_vector(d + 3 * dst_stride, __builtin_shufflevector(t2, t3, 2, 3, 6, 7));
      }
      for (int64_t i = i0; i < i0 + 4; ++i) {
        for (int64_t j = j0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
      }
    }
  }
  for (int64_t i = i0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
  }
}

// Rows [first, first + count) of one image of an NCHW tensor [B, C, H, W], held channels-last
// ([count, W, C]) in storage for at most `capacity` rows, which the owner allocates (so that
// allocation shows in memory profiles).
template <typename scalar_t>
class ChannelsLastBand {
 public:
  ChannelsLastBand(const scalar_t* nchw, int64_t channels, int64_t height, int64_t width,
                   scalar_t* storage, int64_t capacity)
      : nchw_(nchw), C_(channels), H_(height), W_(width), data_(storage), capacity_(capacity) {}

  // Makes rows [lo, hi) of image b resident (clipped to the image); rows already resident at the
  // end of the band move to its front instead of being transposed again.
  void cover(int64_t b, int64_t lo, int64_t hi) {
    clip(lo, hi);
    TORCH_CHECK(hi - lo <= capacity_, "ChannelsLastBand: ", hi - lo, " rows exceed capacity ",
                capacity_);
    const int64_t row = W_ * C_;
    int64_t kept = 0;
    if (b == image_ && lo >= first_ && lo < first_ + count_) {
      if (hi <= first_ + count_) return;
      kept = first_ + count_ - lo;
      std::memmove(data_, data_ + (lo - first_) * row, kept * row * sizeof(scalar_t));
    }
    const scalar_t* plane = nchw_ + b * C_ * H_ * W_;
    for (int64_t y = lo + kept; y < hi; ++y) {
      transpose_rows(plane + y * W_, H_ * W_, C_, W_, data_ + (y - lo) * row, C_);
    }
    image_ = b;
    first_ = lo;
    count_ = hi - lo;
  }

  // Whether rows [lo, hi) of image b (clipped to the image) are resident.
  bool holds(int64_t b, int64_t lo, int64_t hi) const {
    clip(lo, hi);
    return b == image_ && lo >= first_ && hi <= first_ + count_;
  }

  // Row `first()` of the band, channels-last; row y is at rows() + (y - first()) * W * C.
  const scalar_t* rows() const { return data_; }
  int64_t first() const { return first_; }

 private:
  void clip(int64_t& lo, int64_t& hi) const {
    lo = std::min<int64_t>(std::max<int64_t>(lo, 0), H_);
    hi = std::max<int64_t>(std::min<int64_t>(hi, H_), lo);
  }

  const scalar_t* nchw_;
  int64_t C_, H_, W_;
  scalar_t* data_;
  int64_t capacity_;
  int64_t image_ = -1, first_ = 0, count_ = 0;
};

// Output row oy of image b, computed channels-last into `row` ([Wo, C]), stored into the NCHW
// output [B, C, Ho, Wo].
template <typename scalar_t>
DK_ALWAYS_INLINE void store_row_nchw(const scalar_t* row, int64_t C, int64_t Ho, int64_t Wo,
                                     int64_t b, int64_t oy, scalar_t* out) {
  transpose_rows(row, C, Wo, C, out + b * C * Ho * Wo + oy * Wo, Ho * Wo);
}

}  // namespace cpu
}  // namespace dk_detectron2
