// CUDA implementations of deform_kernel2d and deform_kernel_conv2d, forward and backward.
//
// The host functions validate shapes (csrc/geometry.h), bring every tensor into the layout the
// kernels expect (see deform_kernel_depthwise.cuh), launch on the current stream of the input's
// device and return outputs in the memory format of dk_detectron2/layers/ops.py's fake kernels:
// output and grad_input in the input's format (channels-last in, channels-last out), the other
// gradients contiguous. Depthwise weights [C, 1, Sh, Sw] run the kernels of
// deform_kernel_depthwise.cuh; grouped and full weights branch to scope_space_cuda.cu.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../geometry.h"
#include "cuda_utils.cuh"
#include "deform_kernel_depthwise.cuh"
#include "scope_space_cuda.h"

namespace dk_detectron2 {
namespace cuda {
namespace {

// Threads of a grad_weight block (a power of two: the block sums its columns with a tree).
constexpr int kGradWeightThreads = 128;
// Shared memory one grad_weight block may use without opting in to more.
constexpr int64_t kGradWeightSharedBytes = 48 * 1024;
// Aim for about this many grad_weight blocks, each with at least kGradWeightItemsPerThread
// (b, position) pairs per thread.
constexpr int64_t kGradWeightTargetBlocks = 2048;
constexpr int64_t kGradWeightItemsPerThread = 4;

// The output layout rule of ops.py's fake kernels: a channels-last input stays channels-last.
at::MemoryFormat image_memory_format(const at::Tensor& input) {
  if (input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

void check_like_input(const char* op, const char* name, const at::Tensor& tensor,
                      const at::Tensor& input) {
  TORCH_CHECK(tensor.is_cuda() && tensor.device() == input.device(), op, ": ", name,
              " must be on the device of input (", input.device(), "), got ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == input.scalar_type(), op, ": ", name,
              " must have the dtype of input (", input.scalar_type(), "), got ",
              tensor.scalar_type());
}

void check_output_shaped(const char* op, const at::Tensor& grad_output,
                         const DKGeometry& geometry) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == geometry.batch &&
                  grad_output.size(1) == geometry.out_channels &&
                  grad_output.size(2) == geometry.out_height &&
                  grad_output.size(3) == geometry.out_width,
              op, ": grad_output must be [B, C_out, Ho, Wo] = [", geometry.batch, ", ",
              geometry.out_channels, ", ", geometry.out_height, ", ", geometry.out_width,
              "], got ", grad_output.sizes());
}

DKShape make_shape(const DKGeometry& geometry, bool channels_last) {
  DKShape k;
  k.batch = geometry.batch;
  k.channels = geometry.out_channels;  // depthwise: = in_channels
  k.height = geometry.height;
  k.width = geometry.width;
  k.out_height = geometry.out_height;
  k.out_width = geometry.out_width;
  k.kernel_h = geometry.kernel_h;
  k.kernel_w = geometry.kernel_w;
  k.scope_h = geometry.scope_h;
  k.scope_w = geometry.scope_w;
  k.stride_h = geometry.stride_h;
  k.stride_w = geometry.stride_w;
  k.pad_h = geometry.pad_h;
  k.pad_w = geometry.pad_w;
  k.dilation_h = geometry.dilation_h;
  k.dilation_w = geometry.dilation_w;
  k.rotation_groups = geometry.rotation_groups;
  k.channels_per_rotation_group = geometry.out_channels / geometry.rotation_groups;
  k.channels_last = channels_last;
  return k;
}

// Shapes checked and tensors laid out for the depthwise kernels.
struct Prepared {
  DKGeometry geometry;
  DKShape shape;
  at::MemoryFormat format;  // of input, output, grad_output and grad_input
  at::Tensor input, offset, rotation, weight;
};

Prepared prepare(const char* op, const at::Tensor& input, const at::Tensor* offset,
                 const at::Tensor& rotation, const at::Tensor& weight,
                 at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, int64_t rotation_groups) {
  check_like_input(op, "rotation", rotation, input);
  check_like_input(op, "weight", weight, input);
  Prepared p;
  p.geometry = make_geometry(input, weight, kernel_size, stride, padding, dilation,
                             rotation_groups);
  check_rotation(rotation, p.geometry);
  if (offset != nullptr) {
    check_like_input(op, "offset", *offset, input);
    check_offset(*offset, p.geometry);
    p.offset = offset->contiguous();
  }
  p.format = image_memory_format(input);
  p.shape = make_shape(p.geometry, p.format == at::MemoryFormat::ChannelsLast);
  p.input = input.contiguous(p.format);
  p.rotation = rotation.contiguous();
  p.weight = weight.contiguous();
  return p;
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
scalar_t* mutable_data_or_null(at::Tensor& tensor) {
  return tensor.defined() ? tensor.mutable_data_ptr<scalar_t>() : nullptr;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <bool kOffset>
at::Tensor forward(const char* op, const at::Tensor& input, const at::Tensor* offset,
                   const at::Tensor& rotation, const at::Tensor& weight,
                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t rotation_groups) {
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got ", input.device());
  c10::cuda::OptionalCUDAGuard device_guard(input.device());
  const Prepared p = prepare(op, input, offset, rotation, weight, kernel_size, stride, padding,
                             dilation, rotation_groups);
  const DKGeometry& geo = p.geometry;
  at::Tensor output =
      at::empty({geo.batch, geo.out_channels, geo.out_height, geo.out_width},
                p.input.options().memory_format(p.format));
  if (output.numel() == 0) return output;  // batch 0: nothing to launch
  // An empty image (H or W = 0, output made of padding only) reads zero everywhere; no kernel
  // may address its zero-byte storage, not even through zero-weight corners. Both paths.
  if (p.input.numel() == 0) return output.zero_();
  if (!geo.depthwise()) {  // grouped / full weights: scope-space columns + cuBLAS
    return scope_space_forward_cuda(geo, p.input, p.offset, p.rotation, p.weight)
        .contiguous(p.format);
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DKShape& k = p.shape;
  const int64_t chunks =
      (k.channels_per_rotation_group + kChannelsPerThread - 1) / kChannelsPerThread;
  const int64_t threads = k.batch * k.rotation_groups * chunks * k.positions();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.input.scalar_type(), "dk_forward_cuda", [&] {
        dk_forward_kernel<scalar_t, kOffset>
            <<<blocks_for(threads), kThreadsPerBlock, 0, stream>>>(
                p.input.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(p.offset),
                p.rotation.const_data_ptr<scalar_t>(), p.weight.const_data_ptr<scalar_t>(),
                output.mutable_data_ptr<scalar_t>(), k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
struct Gradients {
  at::Tensor input, offset, rotation, weight;
};

// grad_weight = sum over (b, position, tap) of the scope gradient, reduced per block into
// partial sums (one per chunk of (b, position) pairs) and then over the chunks.
template <typename scalar_t, bool kOffset>
void launch_grad_weight(const Prepared& p, const at::Tensor& grad_output, at::Tensor& grad_weight,
                        cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const DKShape& k = p.shape;
  const int64_t items = k.batch * k.positions();
  const int64_t cells = k.scope_cells();
  const int64_t most_chunks =
      std::max<int64_t>(1, items / (kGradWeightThreads * kGradWeightItemsPerThread));
  const int64_t wanted_chunks = (kGradWeightTargetBlocks + k.channels - 1) / k.channels;
  const int64_t num_chunks =
      std::max<int64_t>(1, std::min<int64_t>({wanted_chunks, most_chunks, int64_t(65535)}));
  const int64_t items_per_chunk = (items + num_chunks - 1) / num_chunks;
  const int64_t cells_per_pass = std::min<int64_t>(
      cells, kGradWeightSharedBytes / (kGradWeightThreads * int64_t(sizeof(acc_t))));
  const size_t shared_bytes = cells_per_pass * kGradWeightThreads * sizeof(acc_t);

  at::Tensor partial = at::empty({num_chunks, grad_weight.numel()},
                                 p.input.options().dtype(at::toOpMathType(p.input.scalar_type())));
  const dim3 grid(static_cast<unsigned int>(k.channels), static_cast<unsigned int>(num_chunks));
  dk_grad_weight_partial_kernel<scalar_t, kOffset>
      <<<grid, kGradWeightThreads, shared_bytes, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), p.input.const_data_ptr<scalar_t>(),
          data_or_null<scalar_t>(p.offset), p.rotation.const_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<acc_t>(), k, items_per_chunk, cells_per_pass);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dk_grad_weight_reduce_kernel<scalar_t>
      <<<blocks_for(grad_weight.numel()), kThreadsPerBlock, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<scalar_t>(), num_chunks,
          grad_weight.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kOffset>
Gradients backward(const char* op, const at::Tensor& grad_output_in, const at::Tensor& input,
                   const at::Tensor* offset, const at::Tensor& rotation,
                   const at::Tensor& weight, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t rotation_groups) {
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got ", input.device());
  c10::cuda::OptionalCUDAGuard device_guard(input.device());
  const Prepared p = prepare(op, input, offset, rotation, weight, kernel_size, stride, padding,
                             dilation, rotation_groups);
  check_like_input(op, "grad_output", grad_output_in, input);
  check_output_shaped(op, grad_output_in, p.geometry);
  const auto image_options = p.input.options().memory_format(p.format);
  if (grad_output_in.numel() == 0 || p.input.numel() == 0) {  // batch 0, or an empty image
    Gradients grads;
    grads.input = at::empty(p.input.sizes(), image_options).zero_();  // at::zeros drops the format
    grads.rotation = at::zeros_like(p.rotation);
    grads.weight = at::zeros_like(p.weight);
    if constexpr (kOffset) grads.offset = at::zeros_like(p.offset);
    return grads;
  }
  if (!p.geometry.depthwise()) {  // grouped / full weights: scope-space columns + cuBLAS
    const std::vector<at::Tensor> g = scope_space_backward_cuda(
        p.geometry, grad_output_in, p.input, p.offset, p.rotation, p.weight);
    Gradients grads;
    grads.input = g[0].contiguous(p.format);
    if constexpr (kOffset) {
      grads.offset = g[1];
      grads.rotation = g[2];
      grads.weight = g[3];
    } else {
      grads.rotation = g[1];
      grads.weight = g[2];
    }
    return grads;
  }
  const at::Tensor grad_output = grad_output_in.contiguous(p.format);
  Gradients grads;
  grads.rotation = at::empty_like(p.rotation);
  grads.weight = at::empty_like(p.weight);
  if constexpr (kOffset) grads.offset = at::empty_like(p.offset);
  const DKShape& k = p.shape;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.input.scalar_type(), "dk_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // grad_input
        if constexpr (kOffset) {
          // Bilinear image reads: scatter with atomics into an acc_t buffer (the order of the
          // float additions varies from run to run).
          at::globalContext().alertNotDeterministic(
              "dk_detectron2 deform_kernel_conv2d backward (CUDA, grad_input)");
          // at::empty(...).zero_(), not at::zeros: the buffer must have the input's format.
          at::Tensor accumulator =
              at::empty(p.input.sizes(),
                        image_options.dtype(at::toOpMathType(p.input.scalar_type())))
                  .zero_();
          dk_grad_input_scatter_kernel<scalar_t>
              <<<blocks_for(grad_output.numel()), kThreadsPerBlock, 0, stream>>>(
                  grad_output.const_data_ptr<scalar_t>(), p.offset.const_data_ptr<scalar_t>(),
                  p.rotation.const_data_ptr<scalar_t>(), p.weight.const_data_ptr<scalar_t>(),
                  accumulator.mutable_data_ptr<acc_t>(), k);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (accumulator.scalar_type() == p.input.scalar_type()) {
            grads.input = accumulator;
          } else {
            grads.input = at::empty(p.input.sizes(), image_options);
            grads.input.copy_(accumulator);
          }
        } else {
          // Integer image taps: each input element gathers the taps that read it.
          grads.input = at::empty(p.input.sizes(), image_options);
          const int64_t chunks =
              (k.channels_per_rotation_group + kChannelsPerThread - 1) / kChannelsPerThread;
          const int64_t threads = k.batch * k.rotation_groups * chunks * k.plane();
          dk_grad_input_gather_kernel<scalar_t>
              <<<blocks_for(threads), kThreadsPerBlock, 0, stream>>>(
                  grad_output.const_data_ptr<scalar_t>(), p.rotation.const_data_ptr<scalar_t>(),
                  p.weight.const_data_ptr<scalar_t>(), grads.input.mutable_data_ptr<scalar_t>(),
                  k);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        // grad_rotation (and grad_offset)
        dk_grad_rotation_offset_kernel<scalar_t, kOffset>
            <<<blocks_for(k.batch * k.taps() * k.positions()), kThreadsPerBlock, 0, stream>>>(
                grad_output.const_data_ptr<scalar_t>(), p.input.const_data_ptr<scalar_t>(),
                data_or_null<scalar_t>(p.offset), p.rotation.const_data_ptr<scalar_t>(),
                p.weight.const_data_ptr<scalar_t>(), mutable_data_or_null<scalar_t>(grads.offset),
                grads.rotation.mutable_data_ptr<scalar_t>(), k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // grad_weight
        launch_grad_weight<scalar_t, kOffset>(p, grad_output, grads.weight, stream);
      });
  return grads;
}

// ------------------------------------------------------------------------------------------------
// The operators, with the signatures of csrc/ops.cpp's schemas
// ------------------------------------------------------------------------------------------------
at::Tensor deform_kernel2d_cuda(const at::Tensor& input, const at::Tensor& rotation,
                                const at::Tensor& weight, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t rotation_groups) {
  return forward<false>("deform_kernel2d", input, nullptr, rotation, weight, kernel_size, stride,
                        padding, dilation, rotation_groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_kernel2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rotation,
    const at::Tensor& weight, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t rotation_groups) {
  Gradients g = backward<false>("_deform_kernel2d_backward", grad_output, input, nullptr,
                                rotation, weight, kernel_size, stride, padding, dilation,
                                rotation_groups);
  return {g.input, g.rotation, g.weight};
}

at::Tensor deform_kernel_conv2d_cuda(const at::Tensor& input, const at::Tensor& offset,
                                     const at::Tensor& rotation, const at::Tensor& weight,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t rotation_groups) {
  return forward<true>("deform_kernel_conv2d", input, &offset, rotation, weight, kernel_size,
                       stride, padding, dilation, rotation_groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_kernel_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& rotation, const at::Tensor& weight, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t rotation_groups) {
  Gradients g = backward<true>("_deform_kernel_conv2d_backward", grad_output, input, &offset,
                               rotation, weight, kernel_size, stride, padding, dilation,
                               rotation_groups);
  return {g.input, g.offset, g.rotation, g.weight};
}

}  // namespace
}  // namespace cuda
}  // namespace dk_detectron2

TORCH_LIBRARY_IMPL(dk_detectron2, CUDA, m) {
  using namespace dk_detectron2::cuda;
  m.impl("deform_kernel2d", &deform_kernel2d_cuda);
  m.impl("_deform_kernel2d_backward", &deform_kernel2d_backward_cuda);
  m.impl("deform_kernel_conv2d", &deform_kernel_conv2d_cuda);
  m.impl("_deform_kernel_conv2d_backward", &deform_kernel_conv2d_backward_cuda);
}
