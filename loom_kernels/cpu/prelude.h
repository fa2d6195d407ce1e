// Shared by Loom's CPU kernels (compiled with torch's cpp_extension): the includes, and widening loads.
#pragma once

// ATen and torch's pybind11 casters only: torch/extension.h also pulls in the whole C++ frontend (torch/all.h),
// which doubles the compile time of every kernel and is used by none.
#include <ATen/ATen.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// Widening loads the compiler can vectorize (c10's conversions go through a function call per element).
inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float widen(at::Half x) { return static_cast<float>(x); }

// n values widened to float32: float16 through F16C eight at a time where the build has it (c10's scalar conversion
// is a call per element), the other types through `widen`.
template <typename C>
inline void widen_row(const C* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}
#if defined(__F16C__)
template <>
inline void widen_row<at::Half>(const at::Half* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = widen(src[i]);
}
#endif

}  // namespace
