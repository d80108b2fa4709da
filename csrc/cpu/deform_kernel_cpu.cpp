// CPU kernels of deform_kernel2d and deform_kernel_conv2d (depthwise weights).
//
// Layout: the kernels work channels-last. The input is read as [B, H, W, C], the output and its
// gradient as [B, Ho, Wo, C], the weight as its transpose [Sh*Sw, C], while rotation and offset
// stay NCHW (a position's taps are a few scattered scalars). The innermost loop runs over the
// contiguous channels of one rotation group, so it vectorises, and the bilinear corners of a tap
// (in the scope and, for DK+DCN, in the image) are computed once per (position, rotation group)
// and reused across that group's channels. An NCHW input is not converted as a whole: the forward
// stages bands of its rows and writes NCHW output rows (cpu::ChannelsLastBand), the single-sweep
// backward stages one image at a time (backward_staged_images).
//
// Parallelism and determinism: forward and the rotation/offset/weight gradients split the output
// rows into a fixed number of chunks (independent of the thread count); the weight gradient keeps
// one [Sh*Sw, C] partial per chunk, summed in chunk order at the end, so results are bitwise
// reproducible. The input gradient of deform_kernel2d is a gather (each input pixel sums the
// taps that read it); for deform_kernel_conv2d, whose taps land anywhere, each task owns a block
// of channels of one image and scatters into it. No atomics, no data races.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "bilinear.h"
#include "cpu/nchw_staging.h"
#include "cpu/scope_space_cpu.h"
#include "cpu/tap_sampling.h"
#include "cpu/vectorize.h"
#include "geometry.h"

namespace dk_detectron2 {
namespace {
using cpu::DKTensors;
using cpu::TapSample;
using cpu::sample_tap;

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
// The corners of every tap of a whole row are computed first, vectorised over the row
// (cpu::sample_row, weight offsets premultiplied by the weight's row stride). Then each
// position's channels go in blocks whose accumulators stay in registers across all taps, so an
// integer tap costs 4 weight loads, 1 input load and 5 multiply-adds per vector (a bilinear image
// read, kOffset, 4 input loads and 4 multiply-adds more) and nothing is stored until the position
// is done. A tap or image corner outside the image reads a row of zeros (its coefficients are
// zero too), so the channel loops have no branches.
template <typename acc_t>
struct ForwardTaps {
  const cpu::RowTaps<acc_t>& row;
  int64_t taps, Wo, C;
  const void* zeros;  // C zeros of the input's dtype
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

// What one tap entry reads: the padded-scope rows (cpu::padded_scope) and weights of its 4 scope
// corners, and its image rows
// (1 for an integer tap, 4 bilinear corners with their weights for kOffset), at channel 0.
template <typename scalar_t, typename acc_t, bool kOffset>
struct TapReads {
  const scalar_t* w[4];
  acc_t a[4];
  const scalar_t* x[kOffset ? 4 : 1];
  acc_t b[4];
};

template <typename scalar_t, typename acc_t, bool kOffset>
DK_ALWAYS_INLINE TapReads<scalar_t, acc_t, kOffset> tap_reads(const cpu::RowTaps<acc_t>& row,
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

// float32: kVectors float vectors V with their accumulators in registers. V is the native vector
// of the instruction set each copy is compiled for (cpu::FloatVector, DK_DEFINE_NATIVE_WIDTH):
// 16 floats with AVX-512, 8 with AVX2, 4 otherwise.
using cpu::lanes_of;
using cpu::load_vector;
using cpu::store_vector;

// The bilinear image read of a tap at channels [c, c + lanes).
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

// Rows of the band an NCHW forward stages per thread (cpu::ChannelsLastBand), and how many
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
template <typename scalar_t, bool kOffset, typename V = cpu::FloatVector<4>>
DK_ALWAYS_INLINE void forward_rows(const DKTensors<scalar_t>& t, scalar_t* out, int64_t begin,
                                   int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKGeometry& g = t.g;
  const int64_t C = g.out_channels, Cg = C / g.rotation_groups, Wo = g.out_width;
  cpu::RowTaps<acc_t> row_taps;
  row_taps.resize(g.taps() * Wo, kOffset);
  const std::vector<scalar_t> zeros(C, scalar_t(0));
  std::vector<acc_t> acc(Cg);
  const ForwardTaps<acc_t> f{row_taps, g.taps(), Wo, C, zeros.data()};
  cpu::NextRowPrefetch next_row;
  // NCHW staging; a tensor, so memory profiles see it.
  const BandPlan plan = t.nchw ? plan_band(g, kOffset, sizeof(scalar_t)) : BandPlan{0, 0, 0};
  const at::Tensor staging =
      t.nchw ? at::empty({(plan.rows * g.width + Wo) * C},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value))
             : at::Tensor();
  scalar_t* const band_storage = t.nchw ? staging.data_ptr<scalar_t>() : nullptr;
  scalar_t* const row_buffer = t.nchw ? band_storage + plan.rows * g.width * C : nullptr;
  cpu::ChannelsLastBand<scalar_t> band(t.input, C, g.height, g.width, band_storage, plan.rows);
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
      cpu::sample_row<kOffset>(t, b, oy, group, static_cast<int32_t>(C), row_taps, first_row);
      for (int64_t ox = 0; ox < Wo; ++ox) {
        next_row.request();
        forward_position<V, kOffset>(image, t.scope, f, ox, group * Cg, (group + 1) * Cg,
                                     acc.data(), dst + ox * C);
      }
    }
    if (t.nchw) cpu::store_row_nchw(row_buffer, C, g.out_height, Wo, b, oy, out);
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

// ------------------------------------------------------------------------------------------------
// Backward, pass 1: gradients of rotation, offset and weight (a sweep over output positions)
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
struct DKGrads {
  const scalar_t* grad_output;  // [B, Ho, Wo, C]
  scalar_t* grad_rotation;      // [B, G*Kh*Kw*2, Ho, Wo]
  scalar_t* grad_offset;        // [B, Kh*Kw*2, Ho, Wo] or nullptr
};

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
            const BilinearCorners<acc_t>& s = tap.scope;
            const scalar_t* w0 = t.weight + s.index[0] * C + c0;
            const scalar_t* w1 = t.weight + s.index[1] * C + c0;
            const scalar_t* w2 = t.weight + s.index[2] * C + c0;
            const scalar_t* w3 = t.weight + s.index[3] * C + c0;
            acc_t* gw0 = grad_weight + s.index[0] * C + c0;
            acc_t* gw1 = grad_weight + s.index[1] * C + c0;
            acc_t* gw2 = grad_weight + s.index[2] * C + c0;
            acc_t* gw3 = grad_weight + s.index[3] * C + c0;
            const acc_t a0 = s.weight[0], a1 = s.weight[1], a2 = s.weight[2], a3 = s.weight[3];
            // d_j = sum_c grad_out[c] * value[c] * W[corner j, c]
            acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
            if (kOffset) {
              const BilinearCorners<acc_t>& m = tap.image;
              const scalar_t* x0 = image + m.index[0] * C + c0;
              const scalar_t* x1 = image + m.index[1] * C + c0;
              const scalar_t* x2 = image + m.index[2] * C + c0;
              const scalar_t* x3 = image + m.index[3] * C + c0;
              const acc_t b0 = m.weight[0], b1 = m.weight[1], b2 = m.weight[2], b3 = m.weight[3];
              // e_j = sum_c grad_out[c] * kernel[c] * x[image corner j, c]
              acc_t e0 = 0, e1 = 0, e2 = 0, e3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3, e0, e1, e2, e3)
              for (int64_t c = 0; c < Cg; ++c) {
                const acc_t v0 = x0[c], v1 = x1[c], v2 = x2[c], v3 = x3[c];
                const acc_t k0 = w0[c], k1 = w1[c], k2 = w2[c], k3 = w3[c];
                const acc_t go = gout[c0 + c];
                const acc_t tv = go * (b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3);
                const acc_t u = go * (a0 * k0 + a1 * k1 + a2 * k2 + a3 * k3);
                gw0[c] += a0 * tv;
                gw1[c] += a1 * tv;
                gw2[c] += a2 * tv;
                gw3[c] += a3 * tv;
                d0 += tv * k0;
                d1 += tv * k1;
                d2 += tv * k2;
                d3 += tv * k3;
                e0 += u * v0;
                e1 += u * v1;
                e2 += u * v2;
                e3 += u * v3;
              }
              grad_oy += m.dweight_dy[0] * e0 + m.dweight_dy[1] * e1 + m.dweight_dy[2] * e2 +
                         m.dweight_dy[3] * e3;
              grad_ox += m.dweight_dx[0] * e0 + m.dweight_dx[1] * e1 + m.dweight_dx[2] * e2 +
                         m.dweight_dx[3] * e3;
            } else {
              const scalar_t* x = image + tap.pixel * C + c0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
              for (int64_t c = 0; c < Cg; ++c) {
                const acc_t tv = acc_t(gout[c0 + c]) * acc_t(x[c]);
                const acc_t k0 = w0[c], k1 = w1[c], k2 = w2[c], k3 = w3[c];
                gw0[c] += a0 * tv;
                gw1[c] += a1 * tv;
                gw2[c] += a2 * tv;
                gw3[c] += a3 * tv;
                d0 += tv * k0;
                d1 += tv * k1;
                d2 += tv * k2;
                d3 += tv * k3;
              }
            }
            grot[0] = static_cast<scalar_t>(s.dweight_dy[0] * d0 + s.dweight_dy[1] * d1 +
                                            s.dweight_dy[2] * d2 + s.dweight_dy[3] * d3);
            grot[plane] = static_cast<scalar_t>(s.dweight_dx[0] * d0 + s.dweight_dx[1] * d1 +
                                                s.dweight_dx[2] * d2 + s.dweight_dx[3] * d3);
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
// Backward in one sweep per (image, rotation group): every gradient at once
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
          const BilinearCorners<acc_t>& s = tap.scope;
          const scalar_t* w0 = t.weight + s.index[0] * C + c0;
          const scalar_t* w1 = t.weight + s.index[1] * C + c0;
          const scalar_t* w2 = t.weight + s.index[2] * C + c0;
          const scalar_t* w3 = t.weight + s.index[3] * C + c0;
          acc_t* gw0 = grad_weight + s.index[0] * C + c0;
          acc_t* gw1 = grad_weight + s.index[1] * C + c0;
          acc_t* gw2 = grad_weight + s.index[2] * C + c0;
          acc_t* gw3 = grad_weight + s.index[3] * C + c0;
          const acc_t a0 = s.weight[0], a1 = s.weight[1], a2 = s.weight[2], a3 = s.weight[3];
          acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
          if (kOffset) {
            const BilinearCorners<acc_t>& m = tap.image;
            const scalar_t* x0 = image + m.index[0] * C + c0;
            const scalar_t* x1 = image + m.index[1] * C + c0;
            const scalar_t* x2 = image + m.index[2] * C + c0;
            const scalar_t* x3 = image + m.index[3] * C + c0;
            acc_t* gx0 = image_grad + m.index[0] * C + c0;
            acc_t* gx1 = image_grad + m.index[1] * C + c0;
            acc_t* gx2 = image_grad + m.index[2] * C + c0;
            acc_t* gx3 = image_grad + m.index[3] * C + c0;
            const acc_t b0 = m.weight[0], b1 = m.weight[1], b2 = m.weight[2], b3 = m.weight[3];
            acc_t e0 = 0, e1 = 0, e2 = 0, e3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3, e0, e1, e2, e3)
            for (int64_t c = 0; c < Cg; ++c) {
              const acc_t v0 = x0[c], v1 = x1[c], v2 = x2[c], v3 = x3[c];
              const acc_t k0 = w0[c], k1 = w1[c], k2 = w2[c], k3 = w3[c];
              const acc_t go = gout[c];
              const acc_t tv = go * (b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3);
              const acc_t u = go * (a0 * k0 + a1 * k1 + a2 * k2 + a3 * k3);
              gw0[c] += a0 * tv;
              gw1[c] += a1 * tv;
              gw2[c] += a2 * tv;
              gw3[c] += a3 * tv;
              d0 += tv * k0;
              d1 += tv * k1;
              d2 += tv * k2;
              d3 += tv * k3;
              e0 += u * v0;
              e1 += u * v1;
              e2 += u * v2;
              e3 += u * v3;
              gx0[c] += b0 * u;
              gx1[c] += b1 * u;
              gx2[c] += b2 * u;
              gx3[c] += b3 * u;
            }
            acc_t* goff = grad_offset + (b * g.taps() * 2 + k * 2) * plane + pos;
            goff[0] += m.dweight_dy[0] * e0 + m.dweight_dy[1] * e1 + m.dweight_dy[2] * e2 +
                       m.dweight_dy[3] * e3;
            goff[plane] += m.dweight_dx[0] * e0 + m.dweight_dx[1] * e1 + m.dweight_dx[2] * e2 +
                           m.dweight_dx[3] * e3;
          } else {
            const scalar_t* x = image + tap.pixel * C + c0;
            acc_t* gx = image_grad + tap.pixel * C + c0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int64_t c = 0; c < Cg; ++c) {
              const acc_t k0 = w0[c], k1 = w1[c], k2 = w2[c], k3 = w3[c];
              const acc_t go = gout[c];
              const acc_t tv = go * acc_t(x[c]);
              gw0[c] += a0 * tv;
              gw1[c] += a1 * tv;
              gw2[c] += a2 * tv;
              gw3[c] += a3 * tv;
              d0 += tv * k0;
              d1 += tv * k1;
              d2 += tv * k2;
              d3 += tv * k3;
              gx[c] += go * (a0 * k0 + a1 * k1 + a2 * k2 + a3 * k3);
            }
          }
          grot[0] = static_cast<scalar_t>(s.dweight_dy[0] * d0 + s.dweight_dy[1] * d1 +
                                          s.dweight_dy[2] * d2 + s.dweight_dy[3] * d3);
          grot[plane] = static_cast<scalar_t>(s.dweight_dx[0] * d0 + s.dweight_dx[1] * d1 +
                                              s.dweight_dx[2] * d2 + s.dweight_dx[3] * d3);
        }
      }
    }
  }
}

// float32: the same sweep, row by row. The corners of a whole row's taps and their derivatives
// come from cpu::sample_row; each (position, tap) then runs over its group's channels in 16-float
// vectors (the last one partial), keeping in registers the per-corner sums
//   d_j = sum_c tv[c] * W[scope corner j, c],  tv = grad_out * image value  (rotation gradient)
//   e_j = sum_c u[c] * x[image corner j, c],   u = grad_out * sampled kernel (offset gradient)
// which are reduced across lanes once per tap in a fixed order, so results do not depend on
// anything but the inputs. The weight and input gradients are read-modify-writes of the task's
// own rows; a corner outside the image reads the zeros row and writes a scratch row.

// Whole vectors V, or the first n floats of one (the last channels of a group); the lanes past n
// read zeros and are never stored.
template <typename V>
struct FullLanes {
  DK_ALWAYS_INLINE static V load(const float* p) { return load_vector<V>(p); }
  DK_ALWAYS_INLINE static void store(float* p, V v) { store_vector(p, v); }
};
template <typename V>
struct PartialLanes {
  int n;
  DK_ALWAYS_INLINE V load(const float* p) const {
    V v = {};
    __builtin_memcpy(&v, p, n * sizeof(float));
    return v;
  }
  DK_ALWAYS_INLINE void store(float* p, V v) const { __builtin_memcpy(p, &v, n * sizeof(float)); }
};

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

typedef cpu::FloatVector<4> f32x4;

// The lane sums of a, b, c and d (a fixed pairwise order): halves added pairwise, two vectors'
// halves per shuffle, until one lane per vector is left.
DK_ALWAYS_INLINE f32x4 lane_sums(f32x4 a, f32x4 b, f32x4 c, f32x4 d) {
  const f32x4 ab =
      __builtin_shufflevector(a, b, 0, 1, 4, 5) + __builtin_shufflevector(a, b, 2, 3, 6, 7);
  const f32x4 cd =
      __builtin_shufflevector(c, d, 0, 1, 4, 5) + __builtin_shufflevector(c, d, 2, 3, 6, 7);
  return __builtin_shufflevector(ab, cd, 0, 2, 4, 6) + __builtin_shufflevector(ab, cd, 1, 3, 5, 7);
}

DK_ALWAYS_INLINE f32x4 lane_sums(cpu::FloatVector<8> a, cpu::FloatVector<8> b,
                                 cpu::FloatVector<8> c, cpu::FloatVector<8> d) {
  typedef cpu::FloatVector<8> f32x8;
  const f32x8 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  const f32x8 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
  const f32x8 q = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +
                  __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(q, q, 0, 2, 4, 6) + __builtin_shufflevector(q, q, 1, 3, 5, 7);
}

DK_ALWAYS_INLINE f32x4 lane_sums(cpu::FloatVector<16> a, cpu::FloatVector<16> b,
                                 cpu::FloatVector<16> c, cpu::FloatVector<16> d) {
  typedef cpu::FloatVector<16> f32x16;
  typedef cpu::FloatVector<8> f32x8;
  const f32x16 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                                            22, 23) +
                    __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                            29, 30, 31);
  const f32x16 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                                            22, 23) +
                    __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                            29, 30, 31);
  const f32x16 q = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24,
                                           25, 26, 27) +
                   __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28,
                                           29, 30, 31);
  const f32x8 h = __builtin_shufflevector(q, q, 0, 1, 4, 5, 8, 9, 12, 13) +
                  __builtin_shufflevector(q, q, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(h, h, 0, 2, 4, 6) + __builtin_shufflevector(h, h, 1, 3, 5, 7);
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
  cpu::RowTaps<float> row;
  row.resize(taps * Wo, kOffset, true);
  const std::vector<float> zeros(C, 0.f);
  std::vector<float> scratch(C);
  const auto grad_row = [&](int32_t pixel) {
    return pixel >= 0 ? image_grad + int64_t(pixel) * C : scratch.data();
  };
  // deform_kernel2d: a tap's rotation sums wait here for the next tap's, to be reduced together.
  float* pending = nullptr;
  V pending_y = {}, pending_x = {};
  constexpr int64_t L = lanes_of<V>();
  for (int64_t oy = 0; oy < g.out_height; ++oy) {
    cpu::sample_row<kOffset, true>(t, b, oy, group, static_cast<int32_t>(C), row);
    for (int64_t ox = 0; ox < Wo; ++ox) {
      const int64_t pos = oy * Wo + ox;
      for (int64_t k = 0; k < taps; ++k) {
        const int64_t e = k * Wo + ox;
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
        // weights' derivatives follow from the weights (cpu::RowTaps).
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
        float* grot = grad_rotation +
                      (b * g.rotation_groups * taps * 2 + (group * taps + k) * 2) * plane + pos;
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

// ------------------------------------------------------------------------------------------------
// Backward, pass 2a: input gradient of deform_kernel2d, gathered per input pixel
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
  TapSample<acc_t> tap;
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
            const scalar_t* w0 = t.weight + s.index[0] * C + c0;
            const scalar_t* w1 = t.weight + s.index[1] * C + c0;
            const scalar_t* w2 = t.weight + s.index[2] * C + c0;
            const scalar_t* w3 = t.weight + s.index[3] * C + c0;
            const acc_t a0 = s.weight[0], a1 = s.weight[1], a2 = s.weight[2], a3 = s.weight[3];
            acc_t* dst = acc + c0;
            const scalar_t* go = gout + c0;
            DK_SIMD
            for (int64_t c = 0; c < Cg; ++c) {
              dst[c] += acc_t(go[c]) * (a0 * acc_t(w0[c]) + a1 * acc_t(w1[c]) +
                                        a2 * acc_t(w2[c]) + a3 * acc_t(w3[c]));
            }
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
// Backward, pass 2b: input gradient of deform_kernel_conv2d, scattered per (image, channel block)
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
  TapSample<acc_t> tap;
  for (int64_t oy = 0; oy < g.out_height; ++oy) {
    for (int64_t ox = 0; ox < g.out_width; ++ox) {
      const scalar_t* go = grad_output + ((b * g.out_height + oy) * g.out_width + ox) * C + cbegin;
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          if (!sample_tap<scalar_t, acc_t, true>(t, b, oy, ox, group, kh, kw, tap)) continue;
          const BilinearCorners<acc_t>& s = tap.scope;
          const BilinearCorners<acc_t>& m = tap.image;
          const scalar_t* w0 = t.weight + s.index[0] * C + cbegin;
          const scalar_t* w1 = t.weight + s.index[1] * C + cbegin;
          const scalar_t* w2 = t.weight + s.index[2] * C + cbegin;
          const scalar_t* w3 = t.weight + s.index[3] * C + cbegin;
          const acc_t a0 = s.weight[0], a1 = s.weight[1], a2 = s.weight[2], a3 = s.weight[3];
          acc_t* x0 = image_grad + m.index[0] * C;
          acc_t* x1 = image_grad + m.index[1] * C;
          acc_t* x2 = image_grad + m.index[2] * C;
          acc_t* x3 = image_grad + m.index[3] * C;
          const acc_t b0 = m.weight[0], b1 = m.weight[1], b2 = m.weight[2], b3 = m.weight[3];
          DK_SIMD
          for (int64_t c = 0; c < n; ++c) {
            const acc_t u = acc_t(go[c]) * (a0 * acc_t(w0[c]) + a1 * acc_t(w1[c]) +
                                            a2 * acc_t(w2[c]) + a3 * acc_t(w3[c]));
            x0[c] += b0 * u;
            x1[c] += b1 * u;
            x2[c] += b2 * u;
            x3[c] += b3 * u;
          }
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

// ------------------------------------------------------------------------------------------------
// Host side: layouts, parallel split, dtype dispatch
// ------------------------------------------------------------------------------------------------
bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// The same number of chunks whatever the thread count, so reductions are reproducible.
constexpr int64_t kMaxChunks = 64;

int64_t chunk_count(int64_t rows) { return std::max<int64_t>(1, std::min(rows, kMaxChunks)); }

struct Prepared {
  DKGeometry g;
  at::Tensor input, offset, rotation, weight;  // channels-last (or NCHW if nchw) / NCHW / NCHW /
                                               // [SS, C]
  at::Tensor scope;                            // depthwise: cpu::padded_scope of weight
  bool nchw = false;                           // depthwise forward of an NCHW input
};

Prepared prepare(const at::Tensor& input, const c10::optional<at::Tensor>& offset,
                 const at::Tensor& rotation, const at::Tensor& weight,
                 at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, int64_t rotation_groups,
                 bool stage_nchw_input = false) {
  Prepared p;
  p.g = make_geometry(input, weight, kernel_size, stride, padding, dilation, rotation_groups);
  check_rotation(rotation, p.g);
  TORCH_CHECK(input.scalar_type() == weight.scalar_type() &&
                  input.scalar_type() == rotation.scalar_type(),
              "input, rotation and weight must share a dtype");
  // The depthwise forward stages an NCHW input a few rows at a time (forward_rows) rather than
  // converting all of it.
  p.nchw = stage_nchw_input && p.g.depthwise() && !is_channels_last(input);
  p.input = p.nchw ? input.contiguous() : input.contiguous(at::MemoryFormat::ChannelsLast);
  p.rotation = rotation.contiguous();
  // The depthwise kernels read the weight transposed, [Sh*Sw, C]; the scope-space path as given.
  p.weight = p.g.depthwise() ? weight.reshape({p.g.out_channels, p.g.scope_cells()}).t().contiguous()
                             : weight.contiguous();
  if (p.g.depthwise()) p.scope = cpu::padded_scope(p.weight, p.g.scope_h, p.g.scope_w);
  if (offset.has_value()) {
    check_offset(*offset, p.g);
    TORCH_CHECK(offset->scalar_type() == input.scalar_type(), "offset must have input's dtype");
    p.offset = offset->contiguous();
  }
  return p;
}

template <typename scalar_t>
DKTensors<scalar_t> view(const Prepared& p) {
  return {p.g, p.input.data_ptr<scalar_t>(),
          p.offset.defined() ? p.offset.data_ptr<scalar_t>() : nullptr,
          p.rotation.data_ptr<scalar_t>(), p.weight.data_ptr<scalar_t>(),
          p.scope.defined() ? p.scope.data_ptr<scalar_t>() : nullptr, p.nchw};
}

at::Tensor forward_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& offset,
                       const at::Tensor& rotation, const at::Tensor& weight,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t rotation_groups) {
  const Prepared p = prepare(input, offset, rotation, weight, kernel_size, stride, padding,
                             dilation, rotation_groups, /*stage_nchw_input=*/true);
  const DKGeometry& g = p.g;
  if (g.height * g.width == 0) {
    // An empty image (H or W = 0, an output of padding only) reads zero everywhere; no kernel
    // may address its zero-byte storage, not even through zero-weight corners. Both paths.
    const auto format = is_channels_last(input) ? at::MemoryFormat::ChannelsLast
                                                : at::MemoryFormat::Contiguous;
    return at::zeros({g.batch, g.out_channels, g.out_height, g.out_width},
                     input.options().memory_format(format));
  }
  if (!g.depthwise()) {
    const at::Tensor out = cpu::scope_space_forward(g, p.input, p.offset, p.rotation, p.weight);
    return is_channels_last(input) ? out : out.contiguous();
  }
  // The row sampler (cpu::sample_row) keeps pixel indices in 32-bit lanes.
  TORCH_CHECK(g.height * g.width < (int64_t(1) << 31) &&
                  (g.scope_h + 2) * (g.scope_w + 2) * g.out_channels < (int64_t(1) << 31),
              "deform_kernel2d on the CPU supports images of fewer than 2^31 pixels and scopes of "
              "fewer than 2^31 elements, got a ", g.height, "x", g.width, " image and a [",
              g.out_channels, ", ", g.scope_h, ", ", g.scope_w, "] scope");
  const auto out_format = p.nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_height, g.out_width},
                             input.options().memory_format(out_format));
  const int64_t rows = g.batch * g.out_height;
  if (rows > 0 && g.out_channels > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "deform_kernel_forward_cpu", [&] {
      const DKTensors<scalar_t> t = view<scalar_t>(p);
      scalar_t* dst = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        if (t.offset != nullptr) {
          forward_dispatch<scalar_t, true>(t, dst, begin, end);
        } else {
          forward_dispatch<scalar_t, false>(t, dst, begin, end);
        }
      });
    });
  }
  return p.nchw || is_channels_last(input) ? out : out.contiguous();
}

// The single-sweep backward of an NCHW input (t.nchw, float32/float64): each thread transposes one
// image's input and grad_output to channels-last, runs every rotation group on it into a
// channels-last input gradient, and transposes that into grad_input (NCHW). Extra memory: two
// images and one output image per thread, instead of whole-tensor copies of all three.
template <typename scalar_t, typename acc_t>
void backward_staged_images(const DKTensors<scalar_t>& t, const DKGrads<scalar_t>& d,
                            bool has_offset, acc_t* partial, int64_t cells,
                            acc_t* offset_partial, int64_t offset_numel, scalar_t* grad_input) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    TORCH_INTERNAL_ASSERT(false, "NCHW staging needs float32 or float64");
  } else {
    const DKGeometry& g = t.g;
    const int64_t C = g.out_channels, pixels = g.height * g.width;
    const int64_t plane = g.out_height * g.out_width, taps2 = g.taps() * 2;
    const int64_t image = pixels * C, out_image = plane * C;
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      const at::Tensor staging = at::empty(
          {2 * image + out_image},
          at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
      scalar_t* input_cl = staging.data_ptr<scalar_t>();
      scalar_t* grad_input_cl = input_cl + image;
      scalar_t* grad_output_cl = grad_input_cl + image;
      for (int64_t b = begin; b < end; ++b) {
        cpu::transpose_rows(t.input + b * image, pixels, C, pixels, input_cl, C);
        cpu::transpose_rows(d.grad_output + b * out_image, plane, C, plane, grad_output_cl, C);
        std::fill(grad_input_cl, grad_input_cl + image, scalar_t(0));
        // Image b as image 0 of a one-image batch.
        DKTensors<scalar_t> one = t;
        one.input = input_cl;
        one.rotation = t.rotation + b * g.rotation_groups * taps2 * plane;
        if (t.offset != nullptr) one.offset = t.offset + b * taps2 * plane;
        one.nchw = false;
        scalar_t* grad_rotation = d.grad_rotation + b * g.rotation_groups * taps2 * plane;
        for (int64_t group = 0; group < g.rotation_groups; ++group) {
          scalar_t* gw = partial + (b * g.rotation_groups + group) * cells * C;
          scalar_t* goff = has_offset ? offset_partial + group * offset_numel + b * taps2 * plane
                                      : nullptr;
          if (has_offset) {
            backward_image_group_dispatch<scalar_t, true>(one, grad_output_cl, 0, group, gw,
                                                          grad_input_cl, grad_rotation, goff);
          } else {
            backward_image_group_dispatch<scalar_t, false>(one, grad_output_cl, 0, group, gw,
                                                           grad_input_cl, grad_rotation, goff);
          }
        }
        cpu::transpose_rows(grad_input_cl, C, pixels, C, grad_input + b * image, pixels);
      }
    });
  }
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                     const c10::optional<at::Tensor>& offset,
                                     const at::Tensor& rotation, const at::Tensor& weight,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t rotation_groups) {
  // An NCHW float32/float64 input with at least two images per thread is staged one image at a
  // time (see the single sweep below) instead of converting input, grad_output and grad_input.
  const bool stage_nchw = (input.scalar_type() == at::kFloat ||
                           input.scalar_type() == at::kDouble) &&
                          input.dim() == 4 && input.size(0) >= 2 * at::get_num_threads();
  const Prepared p = prepare(input, offset, rotation, weight, kernel_size, stride, padding,
                             dilation, rotation_groups, stage_nchw);
  const DKGeometry& g = p.g;
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_height,
                                                      g.out_width}),
              "grad_output has shape ", grad_output.sizes());
  const at::Tensor gout = grad_output.to(input.scalar_type())
                              .contiguous(p.nchw ? at::MemoryFormat::Contiguous
                                                 : at::MemoryFormat::ChannelsLast);
  const bool has_offset = offset.has_value();
  if (g.height * g.width == 0) {  // an empty image: every read was zero, so is every gradient
    const auto format = is_channels_last(input) ? at::MemoryFormat::ChannelsLast
                                                : at::MemoryFormat::Contiguous;
    at::Tensor grad_input = at::zeros(input.sizes(), input.options().memory_format(format));
    at::Tensor grad_rotation = at::zeros_like(rotation);
    at::Tensor grad_weight = at::zeros_like(weight);
    if (has_offset) return {grad_input, at::zeros_like(*offset), grad_rotation, grad_weight};
    return {grad_input, grad_rotation, grad_weight};
  }
  if (!g.depthwise()) {
    std::vector<at::Tensor> grads =
        cpu::scope_space_backward(g, grad_output, p.input, p.offset, p.rotation, p.weight);
    if (!is_channels_last(input)) grads[0] = grads[0].contiguous();
    return grads;
  }
  const auto cl = input.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor grad_input = at::empty(input.sizes(), p.nchw ? input.options() : cl);
  at::Tensor grad_rotation = at::empty(rotation.sizes(), rotation.options());
  at::Tensor grad_offset = has_offset ? at::zeros(offset->sizes(), offset->options()) : at::Tensor();
  at::Tensor grad_weight;
  const int64_t C = g.out_channels, SS = g.scope_cells();
  const int64_t rows = g.batch * g.out_height;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_kernel_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const DKTensors<scalar_t> t = view<scalar_t>(p);
    const DKGrads<scalar_t> d{gout.data_ptr<scalar_t>(), grad_rotation.data_ptr<scalar_t>(),
                              has_offset ? grad_offset.data_ptr<scalar_t>() : nullptr};

    // Enough (image, rotation group) tasks for every thread: one sweep computes all gradients.
    const int64_t tasks = g.batch * g.rotation_groups;
    if (tasks >= 2 * at::get_num_threads()) {
      // The float32 sweep accumulates into the padded scope layout (cpu::padded_scope), the
      // generic one into [Sh*Sw, C].
      constexpr bool kPadded = std::is_same_v<scalar_t, float>;
      const int64_t cells = kPadded ? (g.scope_h + 2) * (g.scope_w + 2) : SS;
      at::Tensor partial = at::zeros({tasks, cells, C}, acc_options);
      // float32 accumulates straight into grad_input; lower precisions in a float32 buffer.
      constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
      at::Tensor accumulator =
          kSameType ? grad_input.zero_()
                    : at::zeros(input.sizes(),
                                acc_options.memory_format(at::MemoryFormat::ChannelsLast));
      // With several rotation groups each group sums its own offset gradient; the groups' buffers
      // are added in order afterwards.
      // With one group and float32 that buffer is grad_offset itself.
      const bool offset_in_place = has_offset && kSameType && g.rotation_groups == 1;
      at::Tensor offset_partial =
          !has_offset ? at::Tensor()
          : offset_in_place
              ? grad_offset
              : at::zeros({g.rotation_groups, g.batch, g.taps() * 2, g.out_height, g.out_width},
                          acc_options);
      acc_t* partial_data = partial.data_ptr<acc_t>();
      acc_t* gin = accumulator.data_ptr<acc_t>();
      acc_t* goff = has_offset ? offset_partial.data_ptr<acc_t>() : nullptr;
      const int64_t offset_numel = has_offset ? grad_offset.numel() : 0;
      if (p.nchw) {
        backward_staged_images(t, d, has_offset, partial_data, cells, goff, offset_numel,
                               grad_input.data_ptr<scalar_t>());
      }
      if (!p.nchw) at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / g.rotation_groups, group = task % g.rotation_groups;
          acc_t* gw = partial_data + task * cells * C;
          acc_t* group_offset = has_offset ? goff + group * offset_numel : nullptr;
          if (has_offset) {
            backward_image_group_dispatch<scalar_t, true>(t, d.grad_output, b, group, gw, gin,
                                                          d.grad_rotation, group_offset);
          } else {
            backward_image_group_dispatch<scalar_t, false>(t, d.grad_output, b, group, gw, gin,
                                                           d.grad_rotation, group_offset);
          }
        }
      });
      at::Tensor summed = partial.sum(0);
      if (kPadded) {
        summed = summed.view({g.scope_h + 2, g.scope_w + 2, C})
                     .slice(0, 1, g.scope_h + 1)
                     .slice(1, 1, g.scope_w + 1)
                     .reshape({SS, C});
      }
      grad_weight = summed.t().reshape(weight.sizes()).to(weight.scalar_type()).contiguous();
      if (!kSameType) grad_input.copy_(accumulator);
      if (has_offset && !offset_in_place) grad_offset.copy_(offset_partial.sum(0));
      return;
    }

    TORCH_INTERNAL_ASSERT(!p.nchw, "an NCHW input is staged only for the single sweep");
    // Otherwise two sweeps. Pass 1: rotation/offset gradients and per-chunk weight-gradient
    // partials over chunks of output rows.
    const int64_t chunks = chunk_count(rows);
    const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    at::Tensor partial = at::zeros({chunks, SS, C}, acc_options);
    acc_t* partial_data = partial.data_ptr<acc_t>();
    if (rows > 0) {
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          const int64_t r0 = chunk * rows_per_chunk;
          const int64_t r1 = std::min(rows, r0 + rows_per_chunk);
          if (r0 >= r1) continue;
          acc_t* gw = partial_data + chunk * SS * C;
          if (has_offset) {
            backward_params_dispatch<scalar_t, true>(t, d, gw, r0, r1);
          } else {
            backward_params_dispatch<scalar_t, false>(t, d, gw, r0, r1);
          }
        }
      });
    }
    // Sum the partials in chunk order: [SS, C] -> weight layout [C, 1, Sh, Sw].
    grad_weight = partial.sum(0).t().reshape(weight.sizes()).to(weight.scalar_type()).contiguous();

    // Pass 2: input gradient.
    if (!has_offset) {
      scalar_t* gin = grad_input.data_ptr<scalar_t>();
      at::parallel_for(0, g.batch * g.height, 1, [&](int64_t begin, int64_t end) {
        backward_input_gather_dispatch<scalar_t>(t, d.grad_output, gin, begin, end);
      });
    } else {
      at::Tensor accumulator = std::is_same_v<scalar_t, acc_t>
                                   ? grad_input.zero_()
                                   : at::empty(input.sizes(), acc_options.memory_format(at::MemoryFormat::ChannelsLast)).zero_();
      acc_t* gin = accumulator.data_ptr<acc_t>();
      // Tasks: (image, rotation group, block of that group's channels). Each pixel's gradient is
      // summed in position order inside one task, so the result does not depend on threads.
      const int64_t Cg = C / g.rotation_groups;
      const int64_t wanted = 4 * at::get_num_threads();
      const int64_t per_image = g.batch * g.rotation_groups;
      const int64_t blocks = std::max<int64_t>(
          1, std::min<int64_t>((Cg + 15) / 16, (wanted + per_image - 1) / std::max<int64_t>(per_image, 1)));
      const int64_t block = (Cg + blocks - 1) / blocks;
      at::parallel_for(0, per_image * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / (g.rotation_groups * blocks);
          const int64_t group = (task / blocks) % g.rotation_groups;
          const int64_t c0 = group * Cg + (task % blocks) * block;
          const int64_t c1 = std::min(group * Cg + Cg, c0 + block);
          if (c0 >= c1) continue;
          backward_input_scatter_dispatch<scalar_t>(t, d.grad_output, gin, b, group, c0, c1);
        }
      });
      if (!std::is_same_v<scalar_t, acc_t>) grad_input.copy_(accumulator);
    }
  });
  if (!is_channels_last(input)) grad_input = grad_input.contiguous();
  if (has_offset) return {grad_input, grad_offset, grad_rotation, grad_weight};
  return {grad_input, grad_rotation, grad_weight};
}

// ------------------------------------------------------------------------------------------------
// Operator entry points
// ------------------------------------------------------------------------------------------------
at::Tensor deform_kernel2d_cpu(const at::Tensor& input, const at::Tensor& rotation,
                               const at::Tensor& weight, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t rotation_groups) {
  return forward_cpu(input, c10::nullopt, rotation, weight, kernel_size, stride, padding, dilation,
                     rotation_groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_kernel2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rotation,
    const at::Tensor& weight, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t rotation_groups) {
  auto grads = backward_cpu(grad_output, input, c10::nullopt, rotation, weight, kernel_size, stride,
                            padding, dilation, rotation_groups);
  return {grads[0], grads[1], grads[2]};
}

at::Tensor deform_kernel_conv2d_cpu(const at::Tensor& input, const at::Tensor& offset,
                                    const at::Tensor& rotation, const at::Tensor& weight,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t rotation_groups) {
  return forward_cpu(input, offset, rotation, weight, kernel_size, stride, padding, dilation,
                     rotation_groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_kernel_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& rotation, const at::Tensor& weight, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t rotation_groups) {
  auto grads = backward_cpu(grad_output, input, offset, rotation, weight, kernel_size, stride,
                            padding, dilation, rotation_groups);
  return {grads[0], grads[1], grads[2], grads[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dk_detectron2, CPU, m) {
  m.impl("deform_kernel2d", &deform_kernel2d_cpu);
  m.impl("_deform_kernel2d_backward", &deform_kernel2d_backward_cpu);
  m.impl("deform_kernel_conv2d", &deform_kernel_conv2d_cpu);
  m.impl("_deform_kernel_conv2d_backward", &deform_kernel_conv2d_backward_cpu);
}

}  // namespace dk_detectron2
