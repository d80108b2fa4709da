// Shapes of one Deformable Kernel call, checked once and shared by the CPU and CUDA kernels.
// The Python layer (dk_detectron2/layers/ops.py) validates with user-facing messages; these
// checks are the last line of defence for direct torch.ops calls.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "bilinear.h"  // DK_HOST_DEVICE

namespace dk_detectron2 {

struct DKGeometry {
  int64_t batch, in_channels, out_channels, height, width, out_height, out_width;
  int64_t kernel_h, kernel_w, scope_h, scope_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups;           // convolution groups: in_channels / weight.size(1)
  int64_t rotation_groups;  // G: output channel o uses the rotation of group o / (out_channels / G)

  DK_HOST_DEVICE int64_t taps() const { return kernel_h * kernel_w; }
  DK_HOST_DEVICE int64_t scope_cells() const { return scope_h * scope_w; }
  DK_HOST_DEVICE int64_t positions() const { return out_height * out_width; }
  DK_HOST_DEVICE bool depthwise() const { return groups == in_channels && out_channels == in_channels; }
};

inline DKGeometry make_geometry(const at::Tensor& input, const at::Tensor& weight,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t rotation_groups) {
  TORCH_CHECK(input.dim() == 4, "input must be 4-D [B, C, H, W], got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D [C_out, C_in/groups, Sh, Sw], got ",
              weight.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "kernel_size, stride, padding and dilation must be pairs");
  DKGeometry g;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = kernel_size[0];
  g.kernel_w = kernel_size[1];
  g.scope_h = weight.size(2);
  g.scope_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  g.rotation_groups = rotation_groups;
  TORCH_CHECK(weight.size(1) > 0 && g.in_channels % weight.size(1) == 0,
              "input channels ", g.in_channels, " not divisible by weight.size(1) ",
              weight.size(1));
  g.groups = g.in_channels / weight.size(1);
  TORCH_CHECK(g.out_channels % g.groups == 0, "out channels not divisible by groups");
  TORCH_CHECK(rotation_groups > 0 && g.out_channels % rotation_groups == 0,
              "out channels not divisible by rotation_groups");
  TORCH_CHECK(g.kernel_h > 0 && g.kernel_w > 0 && g.scope_h >= g.kernel_h &&
                  g.scope_w >= g.kernel_w,
              "need 0 < kernel_size <= scope size");
  TORCH_CHECK(g.stride_h > 0 && g.stride_w > 0 && g.dilation_h > 0 && g.dilation_w > 0 &&
                  g.pad_h >= 0 && g.pad_w >= 0,
              "stride and dilation must be positive, padding non-negative");
  g.out_height = (g.height + 2 * g.pad_h - g.dilation_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
  g.out_width = (g.width + 2 * g.pad_w - g.dilation_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
  TORCH_CHECK(g.out_height > 0 && g.out_width > 0, "output would be empty");
  return g;
}

// Output channels [o0, o1) that share convolution group q and rotation group g: the unit of work
// of the scope-space (grouped / full) path, one GEMM each.
struct ChannelSegment {
  int64_t o0, o1, q, g;
};

inline std::vector<ChannelSegment> channel_segments(const DKGeometry& g) {
  const int64_t per_conv_group = g.out_channels / g.groups;
  const int64_t per_rotation_group = g.out_channels / g.rotation_groups;
  std::vector<ChannelSegment> segments;
  for (int64_t o = 0; o < g.out_channels;) {
    const int64_t q = o / per_conv_group, r = o / per_rotation_group;
    const int64_t end = std::min((q + 1) * per_conv_group, (r + 1) * per_rotation_group);
    segments.push_back({o, end, q, r});
    o = end;
  }
  return segments;
}

// The scope-space GEMM's view of the weight [C_out, C_in/groups, Sh, Sw]:
// [C_out, Sh*Sw*C_in/groups] in the columns' (cell, channel) order.
inline at::Tensor weight_as_columns(const at::Tensor& weight) {
  return weight.permute({0, 2, 3, 1}).reshape({weight.size(0), -1}).contiguous();
}

// The scope-space backward's result, {grad_input, [grad_offset,] grad_rotation, grad_weight}, each
// in its input's dtype, from gradients accumulated in the op-math type; grad_columns is the
// weight's gradient in weight_as_columns' layout.
inline std::vector<at::Tensor> scope_space_gradients(
    const at::Tensor& grad_input, const at::Tensor& grad_offset, const at::Tensor& grad_rotation,
    const at::Tensor& grad_columns, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& rotation, const at::Tensor& weight) {
  std::vector<at::Tensor> grads{grad_input.to(input.scalar_type())};
  if (offset.defined()) grads.push_back(grad_offset.to(offset.scalar_type()));
  grads.push_back(grad_rotation.to(rotation.scalar_type()));
  grads.push_back(
      grad_columns.view({weight.size(0), weight.size(2), weight.size(3), weight.size(1)})
          .permute({0, 3, 1, 2})
          .to(weight.scalar_type())
          .contiguous());
  return grads;
}

inline void check_rotation(const at::Tensor& rotation, const DKGeometry& g) {
  TORCH_CHECK(rotation.dim() == 4 && rotation.size(0) == g.batch &&
                  rotation.size(1) == g.rotation_groups * g.taps() * 2 &&
                  rotation.size(2) == g.out_height && rotation.size(3) == g.out_width,
              "rotation must be [B, G*Kh*Kw*2, Ho, Wo], got ", rotation.sizes());
}

inline void check_offset(const at::Tensor& offset, const DKGeometry& g) {
  TORCH_CHECK(offset.dim() == 4 && offset.size(0) == g.batch && offset.size(1) == g.taps() * 2 &&
                  offset.size(2) == g.out_height && offset.size(3) == g.out_width,
              "offset must be [B, Kh*Kw*2, Ho, Wo], got ", offset.sizes());
}

}  // namespace dk_detectron2
