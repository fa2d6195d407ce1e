"""C++ shared by Loom's CPU kernels (compiled with torch's cpp_extension): the includes and the widening loads."""

PRELUDE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// Widening loads the compiler can vectorize (c10's conversions go through a function call per element).
static inline float widen(float x) { return x; }
static inline float widen(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
static inline float widen(at::Half x) { return static_cast<float>(x); }
"""
