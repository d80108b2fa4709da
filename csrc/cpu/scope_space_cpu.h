// Grouped and full Deformable Kernels on the CPU (scope-space columns + GEMM).
// Tensors come prepared by deform_kernel_cpu.cpp: input channels-last, offset (or an undefined
// tensor) and rotation NCHW-contiguous, weight [C_out, C_in/groups, Sh, Sw].
// csrc/cuda/scope_space_cuda.h declares the same entry points for CUDA tensors: two headers, as
// each is compiled only into its own build (this one always, the CUDA one with DK_WITH_CUDA).
#pragma once

#include <torch/types.h>

#include <vector>

#include "geometry.h"

namespace dk_detectron2 {
namespace cpu {

// Returns the output [B, C_out, Ho, Wo] in channels-last memory.
at::Tensor scope_space_forward(const DKGeometry& g, const at::Tensor& input,
                               const at::Tensor& offset, const at::Tensor& rotation,
                               const at::Tensor& weight);

// Returns {grad_input (channels-last), [grad_offset,] grad_rotation, grad_weight}.
std::vector<at::Tensor> scope_space_backward(const DKGeometry& g, const at::Tensor& grad_output,
                                             const at::Tensor& input, const at::Tensor& offset,
                                             const at::Tensor& rotation, const at::Tensor& weight);

}  // namespace cpu
}  // namespace dk_detectron2
