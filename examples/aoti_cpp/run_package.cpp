// Runs an AOTInductor package of a DK model from C++, with no Python code involved.
//
//   run_package <dk_detectron2/_C*.so> <package.pt2> [height width]
//
// The DK operators live in dk_detectron2's compiled library; loading it registers them with the
// dispatcher (its static initialisers), which is all the package needs. The library is also a
// CPython extension module, so libpython's symbols must be in the process: link this program with
// -lpython3.11 (see build.sh) or dlopen libpython with RTLD_GLOBAL before the library. The
// package's compiled model opens libtorch by name: run with torch's lib folder on
// LD_LIBRARY_PATH.
//
// Input: one image [1, 3, height, width] (default 256 x 256) of pixel value 128 with a gradient,
// as tests/test_export_aoti.py (test_cpp_program_runs_the_package) builds it in Python; prints
// each output's shape and sum.
#include <dlfcn.h>

#include <cstdio>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

int main(int argc, char** argv) {
  if (argc != 3 && argc != 5) {
    std::fprintf(stderr, "usage: %s <dk_detectron2/_C*.so> <package.pt2> [height width]\n", argv[0]);
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load the DK operator library %s: %s\n", argv[1], dlerror());
    return 1;
  }
  const int64_t height = argc == 5 ? std::stoll(argv[3]) : 256;
  const int64_t width = argc == 5 ? std::stoll(argv[4]) : 256;
  torch::NoGradGuard no_grad;
  torch::inductor::AOTIModelPackageLoader loader(argv[2]);
  auto ramp = torch::linspace(0, 1, width, torch::kFloat32).view({1, 1, 1, width});
  at::Tensor image = torch::full({1, 3, height, width}, 128.0f) + 64.0f * ramp;
  std::vector<at::Tensor> outputs = loader.run({image});
  for (size_t i = 0; i < outputs.size(); ++i) {
    std::printf("output %zu %s sum %.6f\n", i, c10::str(outputs[i].sizes()).c_str(),
                outputs[i].sum().item<double>());
  }
  return 0;
}
