// The bilinear sampling rule of Deformable Kernels, written once for host and device.
//
// A point (y, x) on a grid of size (height, width) reads the four grid cells around it with
// bilinear weights. The rule follows the original Deformable Kernels release (and DCN):
//   * a point with y <= -1, y >= height, x <= -1 or x >= width (or a non-finite coordinate)
//     reads zero and has zero gradient;
//   * otherwise each of the four corners (floor(y) + {0,1}, floor(x) + {0,1}) contributes its
//     weight, and a corner outside the grid contributes zero.
// The same rule is used in kernel space (sampling the S x S scope) and in image space
// (deformable convolution's input read), forward and backward, CPU and CUDA.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#define DK_UNROLL _Pragma("unroll")
#else
#define DK_HOST_DEVICE inline
#define DK_UNROLL
#endif

namespace dk_detectron2 {

// The four corners touched by one sample point. Corners outside the grid (and every corner of
// a point that reads zero) have weight 0, index 0 and inside false. A caller that tests `inside`
// never addresses them, so a non-finite value at cell 0 cannot reach the sum through a weight 0
// (0 * inf is NaN). The CUDA kernels test it; the CPU kernels replace such a corner's row by a
// row of zeros (or a scratch row for a write) and leave it out of the chain rule (csrc/cpu/
// tap_sampling.h: corner_rows, inside_dot).
template <typename T>
struct BilinearCorners {
  int64_t index[4];  // flat index y * width + x of corners (y0,x0) (y0,x0+1) (y0+1,x0) (y0+1,x0+1)
  T weight[4];       // interpolation weight of each corner
  T dweight_dy[4];   // derivative of each weight with respect to the point's y
  T dweight_dx[4];   // derivative of each weight with respect to the point's x
  bool inside[4];    // the corner is a cell of the grid (index and weight are real)
};

// True when the point reads anything at all (the open range (-1, size) on both axes).
template <typename T>
DK_HOST_DEVICE bool bilinear_in_range(T y, T x, int64_t height, int64_t width) {
  // Written so that NaN fails every comparison and reads zero.
  return y > T(-1) && y < T(height) && x > T(-1) && x < T(width);
}

template <typename T>
DK_HOST_DEVICE void bilinear_corners(T y, T x, int64_t height, int64_t width,
                                     BilinearCorners<T>& c) {
DK_UNROLL
  for (int i = 0; i < 4; ++i) {
    c.index[i] = 0;
    c.weight[i] = T(0);
    c.dweight_dy[i] = T(0);
    c.dweight_dx[i] = T(0);
    c.inside[i] = false;
  }
  if (!bilinear_in_range(y, x, height, width)) return;
  const T yf = ::floor(y);
  const T xf = ::floor(x);
  const int64_t y0 = static_cast<int64_t>(yf);
  const int64_t x0 = static_cast<int64_t>(xf);
  const T ly = y - yf, lx = x - xf;
  const T hy = T(1) - ly, hx = T(1) - lx;
  const T w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const T dy[4] = {-hx, -lx, hx, lx};
  const T dx[4] = {-hy, hy, -ly, ly};
DK_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int64_t cy = y0 + (i >> 1);
    const int64_t cx = x0 + (i & 1);
    if (cy >= 0 && cy < height && cx >= 0 && cx < width) {
      c.index[i] = cy * width + cx;
      c.weight[i] = w[i];
      c.dweight_dy[i] = dy[i];
      c.dweight_dx[i] = dx[i];
      c.inside[i] = true;
    }
  }
}

// The scope coordinate k + (S - K) / 2 that tap k of a K-tap axis reads at zero rotation: the
// K x K grid centred in the S x S scope, so with S - K even the taps hit scope cells exactly.
// (Python's geometry.scope_base(K, S) is the offset (S - K) / 2 alone.)
template <typename T>
DK_HOST_DEVICE T base_grid_position(int64_t k, int64_t kernel, int64_t scope) {
  return T(k) + T(scope - kernel) / T(2);
}

}  // namespace dk_detectron2
