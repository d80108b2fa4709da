// Run-time instruction-set dispatch for the CPU kernels' hot loops.
//
// Two mechanisms, both choosing the copy when the library loads, so one binary runs fast on every
// x86-64 CPU and never executes an instruction the CPU lacks (unlike -march=native):
// - DK_CPU_CLONES on a function whose loops GCC vectorises by itself: GCC emits one copy per
//   instruction set (AVX-512, AVX2+FMA, baseline x86-64) and picks the best.
// - DK_DEFINE_NATIVE_WIDTH for kernels written with explicit float vectors: each copy gets the
//   vector type of its instruction set (FloatVector<16>, <8>, <4>). One fixed width would not do:
//   GCC keeps a vector wider than the registers in memory and builds every broadcast through the
//   stack, which made the AVX2 copy of the 16-lane forward 13x slower than it needs to be.
#pragma once

#include <cstdint>
#include <cstdlib>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DK_X86_DISPATCH 1
#define DK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define DK_TARGET_X86_64_V4 __attribute__((target("arch=x86-64-v4")))
#define DK_TARGET_X86_64_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define DK_X86_DISPATCH 0
#define DK_CPU_CLONES
#endif

#if defined(__GNUC__)
#define DK_ALWAYS_INLINE inline __attribute__((always_inline))
#define DK_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define DK_ALWAYS_INLINE inline
#define DK_ALWAYS_INLINE_LAMBDA
#endif

#if defined(_OPENMP)
#define DK_SIMD _Pragma("omp simd")
#else
#define DK_SIMD
#endif

namespace dk_detectron2 {
namespace cpu {

// kLanes floats in one register of the instruction set a kernel copy is compiled for.
template <int kLanes>
struct FloatVectorOf {
  typedef float type __attribute__((vector_size(4 * kLanes)));
};
template <int kLanes>
using FloatVector = typename FloatVectorOf<kLanes>::type;

template <typename V>
constexpr int64_t lanes_of() {
  return sizeof(V) / sizeof(float);
}

template <typename V>
DK_ALWAYS_INLINE V load_vector(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
DK_ALWAYS_INLINE void store_vector(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

#if DK_X86_DISPATCH
// The x86-64 level whose kernel copies run: 4 (AVX-512), 3 (AVX2 + FMA) or 1 (baseline), the
// widest this CPU has. The environment variable DK_DETECTRON2_CPU_LEVEL (1, 3 or 4, read once)
// can lower it, so the tests run every copy on one machine; it never raises it.
inline int x86_64_level() {
  static const int level = [] {
    __builtin_cpu_init();
    int supported = 1;
    if (__builtin_cpu_supports("x86-64-v4")) {
      supported = 4;
    } else if (__builtin_cpu_supports("x86-64-v3")) {
      supported = 3;
    }
    const char* wanted = std::getenv("DK_DETECTRON2_CPU_LEVEL");
    if (wanted != nullptr && *wanted != '\0') {
      const int requested = std::atoi(wanted);
      if (requested >= 1 && requested < supported) supported = requested >= 3 ? 3 : 1;
    }
    return supported;
  }();
  return level;
}
#endif

// Whole vectors V, or the first n floats of one (the last channels of a group); the lanes past n
// read zeros and are never stored.
template <typename V>
struct FullLanes {
  DK_ALWAYS_INLINE static V load(const float* p) { return load_vector<V>(p); }
  DK_ALWAYS_INLINE static void store(float* p, V v) { store_vector(p, v); }
};
template <typename V>
struct PartialLanes {
  int n;
  DK_ALWAYS_INLINE V load(const float* p) const {
    V v = {};
    __builtin_memcpy(&v, p, n * sizeof(float));
    return v;
  }
  DK_ALWAYS_INLINE void store(float* p, V v) const { __builtin_memcpy(p, &v, n * sizeof(float)); }
};

typedef FloatVector<4> f32x4;

// The lane sums of a, b, c and d (a fixed pairwise order): halves added pairwise, two vectors'
// halves per shuffle, until one lane per vector is left.
DK_ALWAYS_INLINE f32x4 lane_sums(f32x4 a, f32x4 b, f32x4 c, f32x4 d) {
  const f32x4 ab =
      __builtin_shufflevector(a, b, 0, 1, 4, 5) + __builtin_shufflevector(a, b, 2, 3, 6, 7);
  const f32x4 cd =
      __builtin_shufflevector(c, d, 0, 1, 4, 5) + __builtin_shufflevector(c, d, 2, 3, 6, 7);
  return __builtin_shufflevector(ab, cd, 0, 2, 4, 6) + __builtin_shufflevector(ab, cd, 1, 3, 5, 7);
}

DK_ALWAYS_INLINE f32x4 lane_sums(FloatVector<8> a, FloatVector<8> b,
                                 FloatVector<8> c, FloatVector<8> d) {
  typedef FloatVector<8> f32x8;
  const f32x8 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  const f32x8 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
  const f32x8 q = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +
                  __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(q, q, 0, 2, 4, 6) + __builtin_shufflevector(q, q, 1, 3, 5, 7);
}

DK_ALWAYS_INLINE f32x4 lane_sums(FloatVector<16> a, FloatVector<16> b,
                                 FloatVector<16> c, FloatVector<16> d) {
  typedef FloatVector<16> f32x16;
  typedef FloatVector<8> f32x8;
  const f32x16 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                                            22, 23) +
                    __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                            29, 30, 31);
  const f32x16 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                                            22, 23) +
                    __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                            29, 30, 31);
  const f32x16 q = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24,
                                           25, 26, 27) +
                   __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28,
                                           29, 30, 31);
  const f32x8 h = __builtin_shufflevector(q, q, 0, 1, 4, 5, 8, 9, 12, 13) +
                  __builtin_shufflevector(q, q, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(h, h, 0, 2, 4, 6) + __builtin_shufflevector(h, h, 1, 3, 5, 7);
}

}  // namespace cpu
}  // namespace dk_detectron2

// Defines `void name params`, which runs `impl<V, extra...> args` with V the float vector of the
// widest instruction set the CPU has: 16 lanes (AVX-512), 8 (AVX2 + FMA) or 4 (baseline x86-64;
// also the only copy on other compilers and architectures). `impl` must be always-inline so each
// copy is compiled for its instruction set.
#if DK_X86_DISPATCH
#define DK_DEFINE_NATIVE_WIDTH(name, params, args, impl, ...)                         \
  DK_TARGET_X86_64_V4 void name##_x86_64_v4 params {                                  \
    impl<::dk_detectron2::cpu::FloatVector<16>, __VA_ARGS__> args;                    \
  }                                                                                   \
  DK_TARGET_X86_64_V3 void name##_x86_64_v3 params {                                  \
    impl<::dk_detectron2::cpu::FloatVector<8>, __VA_ARGS__> args;                     \
  }                                                                                   \
  void name##_x86_64 params { impl<::dk_detectron2::cpu::FloatVector<4>, __VA_ARGS__> args; } \
  void name params {                                                                  \
    switch (::dk_detectron2::cpu::x86_64_level()) {                                   \
      case 4: name##_x86_64_v4 args; return;                                          \
      case 3: name##_x86_64_v3 args; return;                                          \
      default: name##_x86_64 args; return;                                            \
    }                                                                                 \
  }
#else
#define DK_DEFINE_NATIVE_WIDTH(name, params, args, impl, ...) \
  void name params { impl<::dk_detectron2::cpu::FloatVector<4>, __VA_ARGS__> args; }
#endif
