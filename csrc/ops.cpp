// Operator schemas of dk_detectron2 and the Python extension module.
//
// The schemas are declared once here; each backend registers its kernels in its own file
// (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(dk_detectron2, CPU, ...), csrc/cuda/*.cu with
// TORCH_LIBRARY_IMPL(dk_detectron2, CUDA, ...)). Autograd, fake (meta) kernels and autocast are
// registered from Python in dk_detectron2/layers/ops.py, next to the input validation.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/vectorize.h"

TORCH_LIBRARY(dk_detectron2, m) {
  // Local deformable kernel: weight [C_out, C_in/groups, Sh, Sw], rotation [B, G*Kh*Kw*2, Ho, Wo].
  m.def(
      "deform_kernel2d(Tensor input, Tensor rotation, Tensor weight, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int rotation_groups) -> Tensor");
  m.def(
      "_deform_kernel2d_backward(Tensor grad_output, Tensor input, Tensor rotation, "
      "Tensor weight, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int rotation_groups) -> (Tensor grad_input, Tensor grad_rotation, Tensor grad_weight)");
  // Deformable kernel integrated with deformable convolution: offset [B, Kh*Kw*2, Ho, Wo].
  m.def(
      "deform_kernel_conv2d(Tensor input, Tensor offset, Tensor rotation, Tensor weight, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int rotation_groups) -> Tensor");
  m.def(
      "_deform_kernel_conv2d_backward(Tensor grad_output, Tensor input, Tensor offset, "
      "Tensor rotation, Tensor weight, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int rotation_groups) -> (Tensor grad_input, Tensor grad_offset, "
      "Tensor grad_rotation, Tensor grad_weight)");
  // Global deformable kernel sampler: input [M, Sh, Sw], coord [P, 2] -> [P, M].
  m.def("nd_linear_sample(Tensor input, Tensor coord) -> Tensor");
  m.def(
      "_nd_linear_sample_backward(Tensor grad_output, Tensor input, Tensor coord) "
      "-> (Tensor grad_input, Tensor grad_coord)");
}

namespace {
bool compiled_with_cuda() {
#ifdef DK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Floats per vector in the CPU kernels written with explicit vectors (DK_DEFINE_NATIVE_WIDTH).
int cpu_vector_lanes() {
#if DK_X86_DISPATCH
  const int level = dk_detectron2::cpu::x86_64_level();
  return level == 4 ? 16 : level == 3 ? 8 : 4;
#else
  return 4;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled Deformable Kernel operators (registered as torch.ops.dk_detectron2.*)";
  m.def("compiled_with_cuda", &compiled_with_cuda,
        "Whether this build contains the CUDA kernels.");
  m.def("cpu_vector_lanes", &cpu_vector_lanes,
        "Floats per vector in the CPU kernels' explicit-vector copy that runs here: 16 (AVX-512), "
        "8 (AVX2 + FMA) or 4 (baseline; also chosen by DK_DETECTRON2_CPU_LEVEL=1).");
}
