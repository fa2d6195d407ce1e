// RMSNorm (+ residual) and rotary embedding over whole tensors: `rms<T>` and `rot<T>`, used by the fused-ops
// extension (cpu_ops.cpp) and compiled into the decode stack (decode_stack.cpp) too.
#pragma once

#include "cpu/prelude.h"

namespace {

template <typename T> static inline T narrow(float f) { return static_cast<T>(f); }

// out = weight * round(h * rsqrt(mean(h^2) + eps)), h = x (+ residual, rounded); new_res = x + residual
template <typename T>
static void rms(const at::Tensor& x, const at::Tensor& w, const at::Tensor& res, double eps, at::Tensor& out,
                at::Tensor& new_res) {
  const int64_t rows = x.size(0), D = x.size(1);
  const bool has_res = res.defined();
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* rp = has_res ? res.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  T* np = has_res ? new_res.data_ptr<T>() : nullptr;
  const int64_t xs = x.stride(0), rs = has_res ? res.stride(0) : 0;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(D);
    for (int64_t r = begin; r < end; ++r) {
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        float v = widen(xp[r * xs + d]);
        if (has_res) {
          T s = narrow<T>(v + widen(rp[r * rs + d]));
          np[r * D + d] = s;
          v = widen(s);
        }
        h[d] = v;
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      for (int64_t d = 0; d < D; ++d)
        op[r * D + d] = narrow<T>(widen(wp[d]) * widen(narrow<T>(h[d] * inv)));
    }
  });
}

// In place, neox style over the first 2 * half features of each head: cos/sin from the float32 cache row.
template <typename T>
static void rot(at::Tensor& x, const int64_t* pos, const float* cs, int64_t cs_stride, int64_t half) {
  const int64_t T_ = x.size(0), H = x.size(1);
  const int64_t st = x.stride(0), sh = x.stride(1);
  T* xp = x.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cs + pos[t] * cs_stride;
      const float* s = c + half;
      for (int64_t h = 0; h < H; ++h) {
        T* p = xp + t * st + h * sh;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = widen(p[i]), x2 = widen(p[half + i]);
          p[i] = narrow<T>(x1 * c[i] - x2 * s[i]);
          p[half + i] = narrow<T>(x2 * c[i] + x1 * s[i]);
        }
      }
    }
  });
}

}  // namespace
