// CPU host code of deform_kernel2d and deform_kernel_conv2d: checks, layouts, the choice of
// kernel, the parallel split and the operator registration.
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
//
// Which path runs (host code below; kernels in deform_kernel_forward.h, deform_kernel_backward.h
// and deform_kernel_input_grad.h; kOffset = deform_kernel_conv2d, image taps displaced by an
// offset):
//
//   call       | condition                                   | path
//   -----------+---------------------------------------------+---------------------------------
//   any        | H * W == 0                                  | zeros, no kernel
//   any        | weight not depthwise ([C_out, C_in/g, ..])  | scope_space_cpu.cpp (GEMM)
//   forward    | float32                                     | forward_rows_{offset_}f32: 4, 2, 1
//              |                                             | native vectors, then a tail loop
//   forward    | float64, half, bfloat16                     | forward_rows (generic channels)
//   forward    | NCHW input                                  | the same, staging row bands
//   backward   | B * G >= 2 * threads, float32               | backward_image_group_{offset_}f32
//              |                                             | (one sweep, native vectors)
//   backward   | B * G >= 2 * threads, other dtypes          | backward_image_group (one sweep)
//   backward   | the one sweep with an NCHW float32/float64  | backward_staged_images (an image
//              | input, B >= 2 * threads                     | per thread, transposed)
//   backward   | otherwise                                   | two sweeps: backward_params_rows,
//              |                                             | then input_gather (no offset) or
//              |                                             | input_scatter (kOffset)
//
// float32 kernels have one copy per instruction set (vectorize.h: AVX-512, AVX2, baseline),
// chosen when the library loads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/deform_kernel_backward.h"
#include "cpu/deform_kernel_forward.h"
#include "cpu/deform_kernel_input_grad.h"
#include "cpu/nchw_staging.h"
#include "cpu/scope_space_cpu.h"
#include "cpu/tap_sampling.h"
#include "geometry.h"

namespace dk_detectron2 {
namespace {
using cpu::backward_image_group_dispatch;
using cpu::backward_input_gather_dispatch;
using cpu::backward_input_scatter_dispatch;
using cpu::backward_params_dispatch;
using cpu::DKGrads;
using cpu::DKTensors;
using cpu::forward_dispatch;

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
                  cpu::padded_scope_cells(g.scope_h, g.scope_w) * g.out_channels <
                      (int64_t(1) << 31),
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
      const int64_t cells = kPadded ? cpu::padded_scope_cells(g.scope_h, g.scope_w) : SS;
      at::Tensor partial = at::zeros({tasks, cells, C}, acc_options);
      // float32 accumulates straight into grad_input; lower precisions in a float32 buffer.
      constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
      at::Tensor accumulator =
          kSameType ? grad_input.zero_()
                    : at::empty(input.sizes(),  // at::zeros would ignore the memory format
                                acc_options.memory_format(at::MemoryFormat::ChannelsLast))
                          .zero_();
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
        summed = summed.view({g.scope_h + 3, g.scope_w + 2, C})
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
