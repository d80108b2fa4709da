// Grouped and full Deformable Kernels on CUDA (scope-space columns + cuBLAS GEMM); the CUDA
// counterpart of csrc/cpu/scope_space_cpu.h. Offset may be an undefined tensor (no image offsets);
// offset and rotation must be NCHW-contiguous, weight [C_out, C_in/groups, Sh, Sw].
#pragma once

#include <torch/types.h>

#include <vector>

#include "geometry.h"

namespace dk_detectron2 {
namespace cuda {

// Returns the output [B, C_out, Ho, Wo] in channels-last memory.
at::Tensor scope_space_forward_cuda(const DKGeometry& g, const at::Tensor& input,
                                    const at::Tensor& offset, const at::Tensor& rotation,
                                    const at::Tensor& weight);

// Returns {grad_input (channels-last), [grad_offset,] grad_rotation, grad_weight}.
std::vector<at::Tensor> scope_space_backward_cuda(const DKGeometry& g,
                                                  const at::Tensor& grad_output,
                                                  const at::Tensor& input,
                                                  const at::Tensor& offset,
                                                  const at::Tensor& rotation,
                                                  const at::Tensor& weight);

}  // namespace cuda
}  // namespace dk_detectron2
