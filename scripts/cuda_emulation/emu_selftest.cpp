// Checks of the emulator itself (prelude.h), registered next to the emulated operators as
// torch.ops.dk_emu.*: the schedule switch, the launch limits, a kernel with a missing barrier, a
// kernel whose result depends on the order of its blocks, and a shared-memory overrun (which
// AddressSanitizer must report).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "prelude.h"

namespace {

// Tree sum of each block's values in shared memory; kBarrier = false drops the barriers.
template <bool kBarrier>
__global__ void block_sum_kernel(const float* in, float* out) {
  float* s = reinterpret_cast<float*>(dk_shared_bytes);
  const unsigned int t = threadIdx.x;
  s[t] = in[blockIdx.x * blockDim.x + t];
  if (kBarrier) __syncthreads();
  for (unsigned int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    if (kBarrier) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Every block writes its index: the result is whichever block ran last.
__global__ void last_writer_kernel(int64_t* out) {
  if (threadIdx.x == 0) *out = blockIdx.x;
}

__global__ void nothing_kernel(int64_t) {}

__global__ void shared_overrun_kernel(int64_t words) {
  float* s = reinterpret_cast<float*>(dk_shared_bytes);
  s[threadIdx.x + words] = 1.0f;  // one block of `words` floats: thread 0 writes past the end
}

void set_schedule(int64_t schedule, int64_t blocks_in_flight) {
  emu::schedule = schedule;
  emu::blocks_in_flight = blocks_in_flight;
}

int64_t launches() { return emu::launches; }

at::Tensor block_sum(const at::Tensor& input, int64_t threads, bool barrier) {
  const at::Tensor in = input.contiguous().to(at::kFloat);
  TORCH_CHECK(in.numel() % threads == 0, "block_sum: numel must be a multiple of threads");
  at::Tensor out = at::empty({in.numel() / threads}, in.options());
  const unsigned int blocks = static_cast<unsigned int>(out.numel());
  const size_t shared = threads * sizeof(float);
  if (barrier) {
    emu::Launcher(blocks, static_cast<unsigned int>(threads), shared, 0)(
        block_sum_kernel<true>, in.data_ptr<float>(), out.data_ptr<float>());
  } else {
    emu::Launcher(blocks, static_cast<unsigned int>(threads), shared, 0)(
        block_sum_kernel<false>, in.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

int64_t last_writer(int64_t blocks) {
  int64_t out = -1;
  emu::Launcher(static_cast<unsigned int>(blocks), 32u, 0, 0)(last_writer_kernel, &out);
  return out;
}

// Launches an empty kernel with this configuration; throws what a real launch would refuse.
void launch(int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by, int64_t bz,
            int64_t shared, int64_t opt_in) {
  if (opt_in > 0) cudaFuncSetAttribute(nothing_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(opt_in));
  emu::Launcher(dim3(gx, gy, gz), dim3(bx, by, bz), static_cast<size_t>(shared), 0)(
      nothing_kernel, int64_t(0));
  emu::opt_in().clear();
}

void shared_overrun(int64_t words) {
  emu::Launcher(1u, 4u, static_cast<size_t>(words) * sizeof(float), 0)(shared_overrun_kernel,
                                                                         words);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dk_emu, m) {
  m.def("set_schedule(int schedule, int blocks_in_flight) -> ()", &set_schedule);
  m.def("launches() -> int", &launches);
  m.def("selftest_block_sum(Tensor input, int threads, bool barrier) -> Tensor", &block_sum);
  m.def("selftest_last_writer(int blocks) -> int", &last_writer);
  m.def("selftest_launch(int gx, int gy, int gz, int bx, int by, int bz, int shared, "
        "int opt_in) -> ()", &launch);
  m.def("selftest_shared_overrun(int words) -> ()", &shared_overrun);
}
