// Grouped and full Deformable Kernels on the CPU: "im2col into scope space" + GEMM.
//
// Bilinear sampling is linear in the weight, so for output channel o of convolution group q and
// rotation group g:
//   out[o, p] = sum_{c, s} W[o, c, s] * U_qg[p, s, c],
//   U_qg[p, s, c] = sum_k beta(k, s; rotation_g(p)) * read(x[q's channel c], tap k of p),
// where beta are the (four non-zero) bilinear weights of tap k in the scope. Output channels that
// share (q, g) form one contiguous "segment"; each segment is one GEMM of depth Sh*Sw*C_in/groups,
// Sh*Sw/(Kh*Kw) times a convolution's. U is built tile by tile over positions (rows of [B*Ho*Wo])
// so its memory stays bounded. The backward is two GEMMs per segment and tile (weight gradient,
// column gradient) plus the adjoint of the column build: rotation/offset gradients per position,
// and the input gradient scattered by blocks of channels (no two tasks write the same element, so
// no atomics and a deterministic result).
#include "cpu/scope_space_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <vector>

#include "cpu/tap_sampling.h"

namespace dk_detectron2 {
namespace cpu {
namespace {

using Segment = ChannelSegment;

// Rows (global positions b*Ho*Wo + p) per tile: keeps one tile's columns around 16 MiB.
int64_t tile_rows(const DKGeometry& g, int64_t element_size) {
  const int64_t depth = g.scope_cells() * (g.in_channels / g.groups);
  const int64_t budget = (int64_t(16) << 20) / element_size;
  return std::max<int64_t>(32, budget / std::max<int64_t>(depth, 1));
}

// Row r of the columns is output position pos = r % (Ho * Wo) of image b = r / (Ho * Wo).
// for_each_tap calls f(k) for each tap k = kh * Kw + kw of that position that reads something in
// rotation group `group`, with `tap` filled by sample_tap.
template <typename scalar_t, bool kOffset, typename F>
DK_ALWAYS_INLINE void for_each_tap(const DKTensors<scalar_t>& t, int64_t b, int64_t pos,
                                   int64_t group, TapSample<at::opmath_type<scalar_t>>& tap,
                                   F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKGeometry& g = t.g;
  const int64_t oy = pos / g.out_width, ox = pos % g.out_width;
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      if (sample_tap<scalar_t, acc_t, kOffset>(t, b, oy, ox, group, kh, kw, tap)) {
        f(kh * g.kernel_w + kw);
      }
    }
  }
}

// Columns of rows [r0, r1) for convolution group q and rotation group `group`:
// cols[(row - r0), s * Cq + c], Cq = C_in / groups.
template <typename scalar_t, bool kOffset>
void build_columns(const DKTensors<scalar_t>& t, int64_t r0, int64_t r1, int64_t q, int64_t group,
                   scalar_t* cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKGeometry& g = t.g;
  const int64_t Cin = g.in_channels, Cq = Cin / g.groups, depth = g.scope_cells() * Cq;
  const int64_t plane = g.out_height * g.out_width;
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(r0, r1, 16, [&](int64_t begin, int64_t end) {
    // Float columns accumulate in place; half-precision ones in a float row, then converted.
    std::vector<acc_t> row_buffer(kInPlace ? 0 : depth);
    const std::vector<scalar_t> zeros(Cq, scalar_t(0));  // read for image corners outside
    std::vector<acc_t> scratch(Cq);                      // written for scope corners outside
    TapSample<acc_t> tap;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / plane;
      const scalar_t* image = t.input + b * g.height * g.width * Cin + q * Cq;
      scalar_t* dst = cols + (r - r0) * depth;
      acc_t* row = kInPlace ? reinterpret_cast<acc_t*>(dst) : row_buffer.data();
      std::fill(row, row + depth, acc_t(0));
      for_each_tap<scalar_t, kOffset>(t, b, r % plane, group, tap, [&](int64_t)
                                                                      DK_ALWAYS_INLINE_LAMBDA {
        const bool inside = all_inside(tap.scope) & (!kOffset || all_inside(tap.image));
        with_inside_out_of_line(inside, [&](auto inside_type) DK_ALWAYS_INLINE_LAMBDA {
          constexpr bool kInside = decltype(inside_type)::value;
          const auto u = tap_corner_rows<kInside>(row, tap.scope, Cq, 0, scratch.data());
          const auto a = corner_weights(tap.scope);
          if (kOffset) {
            const auto x = tap_corner_rows<kInside>(image, tap.image, Cin, 0, zeros.data());
            const auto bw = corner_weights(tap.image);
            DK_SIMD
            for (int64_t c = 0; c < Cq; ++c) corner_spread(u, a, c, corner_read(x, bw, c));
          } else {
            const scalar_t* x = image + tap.pixel * Cin;
            DK_SIMD
            for (int64_t c = 0; c < Cq; ++c) corner_spread(u, a, c, acc_t(x[c]));
          }
        });
      });
      if (!kInPlace) {
        for (int64_t i = 0; i < depth; ++i) dst[i] = static_cast<scalar_t>(row[i]);
      }
    }
  });
}

// Adjoint of build_columns, part 1: rotation and offset gradients of rows [r0, r1), one row per
// iteration (each row's gradients are written by one task only). Accumulates (+=) because several
// segments can share a rotation group, and every segment shares the offset.
template <typename scalar_t, bool kOffset>
void columns_backward_params(const DKTensors<scalar_t>& t, int64_t r0, int64_t r1, int64_t q,
                             int64_t group, const scalar_t* grad_cols,
                             at::opmath_type<scalar_t>* grad_rotation,
                             at::opmath_type<scalar_t>* grad_offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKGeometry& g = t.g;
  const int64_t Cin = g.in_channels, Cq = Cin / g.groups, depth = g.scope_cells() * Cq;
  const int64_t plane = g.out_height * g.out_width;
  at::parallel_for(r0, r1, 16, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(Cq, scalar_t(0));  // read for corners outside
    TapSample<acc_t> tap;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / plane, pos = r % plane;
      const scalar_t* image = t.input + b * g.height * g.width * Cin + q * Cq;
      const scalar_t* gc = grad_cols + (r - r0) * depth;
      for_each_tap<scalar_t, kOffset>(t, b, pos, group, tap, [&](int64_t k)
                                                                  DK_ALWAYS_INLINE_LAMBDA {
        const BilinearCorners<acc_t>& s = tap.scope;
        const bool inside = all_inside(s) & (!kOffset || all_inside(tap.image));
        with_inside_out_of_line(inside, [&](auto inside_type) DK_ALWAYS_INLINE_LAMBDA {
          constexpr bool kInside = decltype(inside_type)::value;
          const auto gr = tap_corner_rows<kInside>(gc, s, Cq, 0, zeros.data());
          const auto a = corner_weights(s);
          std::array<acc_t, 4> d{};  // sum_c grad_cols[s_j, c] * value[c]
          if (kOffset) {
            const BilinearCorners<acc_t>& m = tap.image;
            const auto x = tap_corner_rows<kInside>(image, m, Cin, 0, zeros.data());
            const auto bw = corner_weights(m);
            std::array<acc_t, 4> e{};  // sum_c grad_value[c] * x[image corner j, c]
            for (int64_t c = 0; c < Cq; ++c) {
              corner_accumulate(d, gr, c, corner_read(x, bw, c));
              corner_accumulate(e, x, c, corner_read(gr, a, c));
            }
            acc_t* goff = grad_offset + (b * g.taps() * 2 + k * 2) * plane + pos;
            goff[0] += tap_dot<kInside>(m, m.dweight_dy, e);
            goff[plane] += tap_dot<kInside>(m, m.dweight_dx, e);
          } else {
            const scalar_t* x = image + tap.pixel * Cin;
            for (int64_t c = 0; c < Cq; ++c) corner_accumulate(d, gr, c, acc_t(x[c]));
          }
          acc_t* grot = grad_rotation +
                        (b * g.rotation_groups * g.taps() * 2 + (group * g.taps() + k) * 2) *
                            plane + pos;
          grot[0] += tap_dot<kInside>(s, s.dweight_dy, d);
          grot[plane] += tap_dot<kInside>(s, s.dweight_dx, d);
        });
      });
    }
  });
}

// Adjoint of build_columns, part 2: the input gradient. Tasks own blocks of the group's input
// channels and visit rows in order, so each element is summed by one task in a fixed order.
template <typename scalar_t, bool kOffset>
void columns_backward_input(const DKTensors<scalar_t>& t, int64_t r0, int64_t r1, int64_t q,
                            int64_t group, const scalar_t* grad_cols,
                            at::opmath_type<scalar_t>* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKGeometry& g = t.g;
  const int64_t Cin = g.in_channels, Cq = Cin / g.groups, depth = g.scope_cells() * Cq;
  const int64_t plane = g.out_height * g.out_width;
  const int64_t block = std::max<int64_t>(16, (Cq + 2 * at::get_num_threads() - 1) /
                                                  (2 * at::get_num_threads()));
  const int64_t blocks = (Cq + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(Cq, scalar_t(0));  // read for scope corners outside
    std::vector<acc_t> scratch(Cq);                      // written for image corners outside
    TapSample<acc_t> tap;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * block, c1 = std::min(Cq, c0 + block);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / plane;
        acc_t* image_grad = grad_input + b * g.height * g.width * Cin + q * Cq;
        const scalar_t* gc = grad_cols + (r - r0) * depth;
        for_each_tap<scalar_t, kOffset>(t, b, r % plane, group, tap, [&](int64_t)
                                                                        DK_ALWAYS_INLINE_LAMBDA {
          const bool inside = all_inside(tap.scope) & (!kOffset || all_inside(tap.image));
          with_inside_out_of_line(inside, [&](auto inside_type) DK_ALWAYS_INLINE_LAMBDA {
            constexpr bool kInside = decltype(inside_type)::value;
            const auto gr = tap_corner_rows<kInside>(gc, tap.scope, Cq, 0, zeros.data());
            const auto a = corner_weights(tap.scope);
            if (kOffset) {
              const auto x =
                  tap_corner_rows<kInside>(image_grad, tap.image, Cin, 0, scratch.data());
              const auto bw = corner_weights(tap.image);
              for (int64_t c = c0; c < c1; ++c) corner_spread(x, bw, c, corner_read(gr, a, c));
            } else {
              acc_t* x = image_grad + tap.pixel * Cin;
              DK_SIMD
              for (int64_t c = c0; c < c1; ++c) x[c] += corner_read(gr, a, c);
            }
          });
        });
      }
    }
  });
}

template <typename scalar_t>
DKTensors<scalar_t> tensors(const DKGeometry& g, const at::Tensor& input,
                            const at::Tensor& offset, const at::Tensor& rotation) {
  return {g, input.data_ptr<scalar_t>(), offset.defined() ? offset.data_ptr<scalar_t>() : nullptr,
          rotation.data_ptr<scalar_t>(), nullptr};
}

}  // namespace

at::Tensor scope_space_forward(const DKGeometry& g, const at::Tensor& input,
                               const at::Tensor& offset, const at::Tensor& rotation,
                               const at::Tensor& weight) {
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_height, g.out_width},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t rows = g.batch * g.positions();
  if (rows == 0 || g.out_channels == 0) return out;
  at::Tensor out_rows = out.permute({0, 2, 3, 1}).view({rows, g.out_channels});  // [B*P, C_out]
  const at::Tensor w = weight_as_columns(weight);
  const int64_t depth = w.size(1);
  const int64_t tile = tile_rows(g, input.element_size());
  const auto segments = channel_segments(g);
  at::Tensor cols = at::empty({std::min(tile, rows), depth}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "scope_space_forward_cpu", [&] {
    const DKTensors<scalar_t> t = tensors<scalar_t>(g, input, offset, rotation);
    for (int64_t r0 = 0; r0 < rows; r0 += tile) {
      const int64_t r1 = std::min(rows, r0 + tile);
      at::Tensor tile_cols = cols.narrow(0, 0, r1 - r0);
      for (const Segment& seg : segments) {
        if (t.offset != nullptr) {
          build_columns<scalar_t, true>(t, r0, r1, seg.q, seg.g, tile_cols.data_ptr<scalar_t>());
        } else {
          build_columns<scalar_t, false>(t, r0, r1, seg.q, seg.g, tile_cols.data_ptr<scalar_t>());
        }
        out_rows.narrow(0, r0, r1 - r0)
            .narrow(1, seg.o0, seg.o1 - seg.o0)
            .copy_(at::mm(tile_cols, w.narrow(0, seg.o0, seg.o1 - seg.o0).t()));
      }
    }
  });
  return out;
}

std::vector<at::Tensor> scope_space_backward(const DKGeometry& g, const at::Tensor& grad_output,
                                             const at::Tensor& input, const at::Tensor& offset,
                                             const at::Tensor& rotation,
                                             const at::Tensor& weight) {
  const bool has_offset = offset.defined();
  const int64_t rows = g.batch * g.positions();
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  const auto acc_options = input.options().dtype(acc_type);
  // at::zeros ignores a memory format in its options: channels-last buffers use empty + zero_.
  at::Tensor grad_input = at::empty(input.sizes(), acc_options.memory_format(
                                                       at::MemoryFormat::ChannelsLast)).zero_();
  at::Tensor grad_rotation = at::zeros(rotation.sizes(), acc_options);
  at::Tensor grad_offset = has_offset ? at::zeros(offset.sizes(), acc_options) : at::Tensor();
  const at::Tensor w = weight_as_columns(weight);
  at::Tensor grad_w = at::zeros(w.sizes(), acc_options);
  if (rows > 0 && g.out_channels > 0) {
    const at::Tensor gout_rows = grad_output.to(input.scalar_type())
                                     .contiguous(at::MemoryFormat::ChannelsLast)
                                     .permute({0, 2, 3, 1})
                                     .reshape({rows, g.out_channels});
    const int64_t depth = w.size(1);
    const int64_t tile = tile_rows(g, input.element_size());
    const auto segments = channel_segments(g);
    at::Tensor cols = at::empty({std::min(tile, rows), depth}, input.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "scope_space_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const DKTensors<scalar_t> t = tensors<scalar_t>(g, input, offset, rotation);
      acc_t* grot = grad_rotation.data_ptr<acc_t>();
      acc_t* goff = has_offset ? grad_offset.data_ptr<acc_t>() : nullptr;
      acc_t* gin = grad_input.data_ptr<acc_t>();
      for (int64_t r0 = 0; r0 < rows; r0 += tile) {
        const int64_t r1 = std::min(rows, r0 + tile);
        at::Tensor tile_cols = cols.narrow(0, 0, r1 - r0);
        for (const Segment& seg : segments) {
          const int64_t n = seg.o1 - seg.o0;
          const at::Tensor gout = gout_rows.narrow(0, r0, r1 - r0).narrow(1, seg.o0, n);
          if (has_offset) {
            build_columns<scalar_t, true>(t, r0, r1, seg.q, seg.g, tile_cols.data_ptr<scalar_t>());
          } else {
            build_columns<scalar_t, false>(t, r0, r1, seg.q, seg.g, tile_cols.data_ptr<scalar_t>());
          }
          grad_w.narrow(0, seg.o0, n).add_(at::mm(gout.t(), tile_cols).to(acc_type));
          const at::Tensor grad_cols = at::mm(gout, w.narrow(0, seg.o0, n)).contiguous();
          const scalar_t* gc = grad_cols.data_ptr<scalar_t>();
          if (has_offset) {
            columns_backward_params<scalar_t, true>(t, r0, r1, seg.q, seg.g, gc, grot, goff);
            columns_backward_input<scalar_t, true>(t, r0, r1, seg.q, seg.g, gc, gin);
          } else {
            columns_backward_params<scalar_t, false>(t, r0, r1, seg.q, seg.g, gc, grot, goff);
            columns_backward_input<scalar_t, false>(t, r0, r1, seg.q, seg.g, gc, gin);
          }
        }
      }
    });
  }
  return scope_space_gradients(grad_input, grad_offset, grad_rotation, grad_w, input, offset,
                               rotation, weight);
}

}  // namespace cpu
}  // namespace dk_detectron2
