// Forward kernels of the depthwise CPU operators (deform_kernel2d, deform_kernel_conv2d with
// weight [C, 1, Sh, Sw]). The host code, the layouts and the choice of path are in
// deform_kernel_cpu.cpp, which is the only file that includes this one.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/nchw_staging.h"
#include "cpu/tap_sampling.h"
#include "cpu/vectorize.h"
#include "geometry.h"

namespace dk_detectron2 {
namespace cpu {
namespace {  // internal linkage: one translation unit includes this

// The corners of every tap of a whole row are computed first, vectorised over the row
// (sample_row, weight offsets premultiplied by the weight's row stride). Then each
// position's channels go in blocks whose accumulators stay in registers across all taps, so an
// integer tap costs 4 weight loads, 1 input load and 5 multiply-adds per vector (a bilinear image
// read, kOffset, 4 input loads and 4 multiply-adds more) and nothing is stored until the position
// is done. A tap or image corner outside the image reads a row of zeros (its coefficients are
// zero too), so the channel loops have no branches.
template <typename acc_t>
struct ForwardTaps {
  const RowTaps<acc_t>& row;
  int64_t taps, Wo, C;
  const void* zeros;  // C zeros of the input's dtype
};

// Generic channel loop (any dtype, any width): accumulates in acc_t, then stores.
template <bool kOffset, typename scalar_t, typename acc_t>
DK_ALWAYS_INLINE void forward_position_channels(const scalar_t* image, const scalar_t* weight,
                                                const ForwardTaps<acc_t>& f, int64_t ox,
                                                int64_t c0, int64_t width, acc_t* acc,
                                                scalar_t* dst) {
  std::fill(acc, acc + width, acc_t(0));
  const scalar_t* zeros = static_cast<const scalar_t*>(f.zeros);
  for (int64_t k = 0; k < f.taps; ++k) {
    const auto r = tap_reads<scalar_t, acc_t, kOffset>(f.row, k * f.Wo + ox, image, weight, f.C,
                                                       zeros);
    const scalar_t *w0 = r.w[0] + c0, *w1 = r.w[1] + c0, *w2 = r.w[2] + c0, *w3 = r.w[3] + c0;
    const acc_t a0 = r.a[0], a1 = r.a[1], a2 = r.a[2], a3 = r.a[3];
    if constexpr (kOffset) {
      const scalar_t *x0 = r.x[0] + c0, *x1 = r.x[1] + c0, *x2 = r.x[2] + c0, *x3 = r.x[3] + c0;
      const acc_t b0 = r.b[0], b1 = r.b[1], b2 = r.b[2], b3 = r.b[3];
      DK_SIMD
      for (int64_t c = 0; c < width; ++c) {
        const acc_t v = b0 * acc_t(x0[c]) + b1 * acc_t(x1[c]) + b2 * acc_t(x2[c]) +
                        b3 * acc_t(x3[c]);
        acc[c] += v * (a0 * acc_t(w0[c]) + a1 * acc_t(w1[c]) + a2 * acc_t(w2[c]) +
                       a3 * acc_t(w3[c]));
      }
    } else {
      const scalar_t* x = r.x[0] + c0;
      DK_SIMD
      for (int64_t c = 0; c < width; ++c) {
        acc[c] += acc_t(x[c]) * (a0 * acc_t(w0[c]) + a1 * acc_t(w1[c]) + a2 * acc_t(w2[c]) +
                                 a3 * acc_t(w3[c]));
      }
    }
  }
  for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
}

// The image read of a tap at channels [c, c + lanes): bilinear with kOffset, else one pixel.
template <typename V, bool kOffset>
DK_ALWAYS_INLINE V tap_value(const TapReads<float, float, kOffset>& r, int64_t c) {
  if constexpr (kOffset) {
    return r.b[0] * load_vector<V>(r.x[0] + c) + r.b[1] * load_vector<V>(r.x[1] + c) +
           r.b[2] * load_vector<V>(r.x[2] + c) + r.b[3] * load_vector<V>(r.x[3] + c);
  } else {
    return load_vector<V>(r.x[0] + c);
  }
}

// Makes p opaque to the optimiser (an empty asm that "may change" it), so it stays one register.
template <typename T>
DK_ALWAYS_INLINE void keep_in_register(T*& p) {
#if defined(__GNUC__)
  asm("" : "+r"(p));
#endif
}

// float32: kVectors float vectors V with their accumulators in registers. V is the native vector
// of the instruction set each copy is compiled for (FloatVector, DK_DEFINE_NATIVE_WIDTH):
// 16 floats with AVX-512, 8 with AVX2, 4 otherwise.
template <typename V, int kVectors, bool kOffset>
DK_ALWAYS_INLINE void forward_position_vectors(const float* image, const float* weight,
                                              const ForwardTaps<float>& f, int64_t ox, int64_t c0,
                                              float* dst) {
  constexpr int64_t L = lanes_of<V>();
  V acc[kVectors];
  for (int j = 0; j < kVectors; ++j) acc[j] = V{};
  const float* zeros = static_cast<const float*>(f.zeros);
  const int64_t taps = f.taps, Wo = f.Wo, C = f.C, right = f.row.right, below = f.row.below;
  for (int64_t k = 0; k < taps; ++k) {
    if constexpr (!kOffset) {
      // Integer taps: read the row tables directly (no TapReads temporaries).
      const int64_t e = k * Wo + ox;
      const float* x = pixel_row(image, f.row.pixel[e], C, zeros) + c0;
      // One pointer per corner, so every load below is pointer + constant. Left to itself GCC
      // re-expresses them as one base plus loop-invariant offsets per vector, which do not fit in
      // the registers and go to the stack; keep_in_register stops that.
      const float* w0 = weight + f.row.cell[e] + c0;
      const float* w1 = w0 + right;
      const float* w2 = w0 + below;
      const float* w3 = w2 + right;
      keep_in_register(x);
      keep_in_register(w0);
      keep_in_register(w1);
      keep_in_register(w2);
      keep_in_register(w3);
      const float* a = f.row.weights.data() + 4 * e;
      const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
      for (int j = 0; j < kVectors; ++j) {
        const int64_t c = L * j;
        const V w = a0 * load_vector<V>(w0 + c) + a1 * load_vector<V>(w1 + c) +
                    a2 * load_vector<V>(w2 + c) + a3 * load_vector<V>(w3 + c);
        acc[j] += load_vector<V>(x + c) * w;
      }
      continue;
    }
    const auto r = tap_reads<float, float, kOffset>(f.row, k * f.Wo + ox, image, weight, f.C,
                                                    zeros);
    for (int j = 0; j < kVectors; ++j) {
      const int64_t c = c0 + L * j;
      const V w = r.a[0] * load_vector<V>(r.w[0] + c) + r.a[1] * load_vector<V>(r.w[1] + c) +
                  r.a[2] * load_vector<V>(r.w[2] + c) + r.a[3] * load_vector<V>(r.w[3] + c);
      acc[j] += tap_value<V>(r, c) * w;
    }
  }
  for (int j = 0; j < kVectors; ++j) store_vector(dst + L * j, acc[j]);
}

// One output position, channels [c0, c_end) of one rotation group: float32 in blocks of 4, 2
// and 1 vectors V (64, 32 and 16 channels with AVX-512); other dtypes and the last channels that
// fill no vector in the generic loop.
template <typename V, bool kOffset, typename scalar_t, typename acc_t>
DK_ALWAYS_INLINE void forward_position(const scalar_t* image, const scalar_t* weight,
                                       const ForwardTaps<acc_t>& f, int64_t ox, int64_t c0,
                                       int64_t c_end, acc_t* acc, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    constexpr int64_t L = lanes_of<V>();
    for (; c0 + 4 * L <= c_end; c0 += 4 * L) {
      forward_position_vectors<V, 4, kOffset>(image, weight, f, ox, c0, dst + c0);
    }
    if (c0 + 2 * L <= c_end) {
      forward_position_vectors<V, 2, kOffset>(image, weight, f, ox, c0, dst + c0);
      c0 += 2 * L;
    }
    if (c0 + L <= c_end) {
      forward_position_vectors<V, 1, kOffset>(image, weight, f, ox, c0, dst + c0);
      c0 += L;
    }
  }
  if (c0 < c_end) {
    forward_position_channels<kOffset>(image, weight, f, ox, c0, c_end - c0, acc, dst + c0);
  }
}

// Rows of the band an NCHW forward stages per thread (ChannelsLastBand), and how many
// output rows one filling serves: about 128 KB of rows (it stays in L2), at most a quarter of the
// image (so small images do not copy most of the input), never fewer than one output row reads.
struct BandPlan {
  int64_t rows, output_rows;
  int64_t span;  // input rows one output row reads: (Kh - 1) * dilation + 1
};

inline BandPlan plan_band(const DKGeometry& g, bool offset, int64_t element_bytes) {
  const int64_t span = (g.kernel_h - 1) * g.dilation_h + 1;
  if (offset) return {g.height, g.out_height, span};  // DK+DCN taps land anywhere in the image
  const int64_t row_bytes = std::max<int64_t>(1, g.width * g.in_channels * element_bytes);
  const int64_t budget =
      std::max<int64_t>(span, std::min<int64_t>((int64_t(128) << 10) / row_bytes, g.height / 4));
  const int64_t output_rows = std::max<int64_t>(1, (budget - span) / g.stride_h + 1);
  return {std::min<int64_t>(g.height, (output_rows - 1) * g.stride_h + span), output_rows, span};
}

// V: the float vector of the float32 kernels (unused for other dtypes). Output rows
// [begin, end) of the B * Ho rows; channels-last in and out, or NCHW (t.nchw) staged through a
// band of input rows and a one-row output buffer (nchw_staging.h).
template <typename scalar_t, bool kOffset, typename V = FloatVector<4>>
DK_ALWAYS_INLINE void forward_rows(const DKTensors<scalar_t>& t, scalar_t* out, int64_t begin,
                                   int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKGeometry& g = t.g;
  const int64_t C = g.out_channels, Cg = C / g.rotation_groups, Wo = g.out_width;
  RowTaps<acc_t> row_taps;
  row_taps.resize(g.taps() * Wo, kOffset);
  const std::vector<scalar_t> zeros(C, scalar_t(0));
  std::vector<acc_t> acc(Cg);
  const ForwardTaps<acc_t> f{row_taps, g.taps(), Wo, C, zeros.data()};
  NextRowPrefetch next_row;
  // NCHW staging; a tensor, so memory profiles see it.
  const BandPlan plan = t.nchw ? plan_band(g, kOffset, sizeof(scalar_t)) : BandPlan{0, 0, 0};
  const at::Tensor staging =
      t.nchw ? at::empty({(plan.rows * g.width + Wo) * C},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value))
             : at::Tensor();
  scalar_t* const band_storage = t.nchw ? staging.data_ptr<scalar_t>() : nullptr;
  scalar_t* const row_buffer = t.nchw ? band_storage + plan.rows * g.width * C : nullptr;
  ChannelsLastBand<scalar_t> band(t.input, C, g.height, g.width, band_storage, plan.rows);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.out_height, oy = row % g.out_height;
    const scalar_t* image = t.input + b * g.height * g.width * C;
    int64_t first_row = 0;
    if (t.nchw) {
      const int64_t lo = oy * g.stride_h - g.pad_h;
      if (kOffset) {
        band.cover(b, 0, g.height);
      } else if (!band.holds(b, lo, lo + plan.span)) {
        const int64_t last = std::min({g.out_height, oy + plan.output_rows, oy + end - row}) - 1;
        band.cover(b, lo, last * g.stride_h - g.pad_h + plan.span);
      }
      image = band.rows();
      first_row = band.first();
    }
    if (row + 1 < end) {
      next_row.collect(t, (row + 1) / g.out_height, (row + 1) % g.out_height, 0,
                       g.rotation_groups, g.rotation_groups * Wo);
    }
    scalar_t* const dst = t.nchw ? row_buffer : out + row * Wo * C;
    for (int64_t group = 0; group < g.rotation_groups; ++group) {
      sample_row<kOffset>(t, b, oy, group, static_cast<int32_t>(C), row_taps, first_row);
      for (int64_t ox = 0; ox < Wo; ++ox) {
        next_row.request();
        forward_position<V, kOffset>(image, t.scope, f, ox, group * Cg, (group + 1) * Cg,
                                     acc.data(), dst + ox * C);
      }
    }
    if (t.nchw) store_row_nchw(row_buffer, C, g.out_height, Wo, b, oy, out);
  }
}

template <typename V, bool kOffset>
DK_ALWAYS_INLINE void forward_rows_vectors(const DKTensors<float>& t, float* out, int64_t begin,
                                           int64_t end) {
  forward_rows<float, kOffset, V>(t, out, begin, end);
}
DK_DEFINE_NATIVE_WIDTH(forward_rows_f32,
                       (const DKTensors<float>& t, float* out, int64_t begin, int64_t end),
                       (t, out, begin, end), forward_rows_vectors, false)
DK_DEFINE_NATIVE_WIDTH(forward_rows_offset_f32,
                       (const DKTensors<float>& t, float* out, int64_t begin, int64_t end),
                       (t, out, begin, end), forward_rows_vectors, true)

template <typename scalar_t, bool kOffset>
void forward_dispatch(const DKTensors<scalar_t>& t, scalar_t* out, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (kOffset) {
      forward_rows_offset_f32(t, out, begin, end);
    } else {
      forward_rows_f32(t, out, begin, end);
    }
  } else {
    forward_rows<scalar_t, kOffset>(t, out, begin, end);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace dk_detectron2
