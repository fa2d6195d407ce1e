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

}  // namespace
