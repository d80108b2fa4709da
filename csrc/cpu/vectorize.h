// Run-time instruction-set dispatch for the CPU kernels' hot loops.
//
// DK_CPU_CLONES on a function makes GCC emit one copy per instruction set (AVX-512, AVX2+FMA,
// baseline x86-64) and pick the best one when the library loads, so one binary runs fast on every
// x86-64 CPU and never executes an instruction the CPU lacks (unlike -march=native).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
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
