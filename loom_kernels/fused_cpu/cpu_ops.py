"""RMSNorm (+ residual add), rotary embedding and the greedy sampler's row argmax for CPU serving in C++, one call each instead of the reference's
~10 and ~20 small torch ops (at batch 1 a decode step is ~600 such ops: dispatch, not arithmetic, is the cost).
Same roundings as the references (fp32 math, rounded to the tensor's dtype where they round); used for bf16/fp16
tensors, so float32 runs keep the reference and stay bit-identical to Hugging Face. The argmax rounds nothing and
serves float32 logits (torch's takes 0.68 ms for 32 x 49,152 here, 12x a vectorized max). Compiled once with torch's
cpp_extension (cached on disk) like loom_kernels/attention/cpu_decode.py; without a compiler the references serve."""
from __future__ import annotations

import functools
import logging

import torch

from loom_kernels.backend import kernel_backend
from loom_kernels.cpu_source import PRELUDE, build_cpu_extension

log = logging.getLogger("loom.kernels")

# Kept apart from PRELUDE so loom_kernels/fused_cpu/decode_stack.py can compile the same functions into its own build.
SOURCE = r"""
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

std::vector<at::Tensor> rms_norm(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> residual, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "rms_norm: bad layout");
  at::Tensor res = residual.has_value() ? residual.value() : at::Tensor();
  if (res.defined()) TORCH_CHECK(res.sizes() == x.sizes() && res.stride(1) == 1 && res.scalar_type() == x.scalar_type());
  auto out = at::empty(x.sizes(), x.options());
  auto new_res = res.defined() ? at::empty(x.sizes(), x.options()) : at::Tensor();
  switch (x.scalar_type()) {
    case at::kBFloat16: rms<at::BFloat16>(x, w, res, eps, out, new_res); break;
    case at::kHalf: rms<at::Half>(x, w, res, eps, out, new_res); break;
    case at::kFloat: rms<float>(x, w, res, eps, out, new_res); break;
    default: TORCH_CHECK(false, "rms_norm: unsupported dtype");
  }
  if (res.defined()) return {out, new_res};
  return {out};
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

void rotary(at::Tensor q, at::Tensor k, at::Tensor positions, at::Tensor cs) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1, "rotary: bad layout");
  TORCH_CHECK(cs.scalar_type() == at::kFloat && cs.stride(1) == 1, "rotary: float32 cos/sin cache");
  auto pos = positions.to(at::kLong).contiguous();
  const int64_t half = cs.size(1) / 2;
  for (at::Tensor* x : {&q, &k}) {
    switch (x->scalar_type()) {
      case at::kBFloat16: rot<at::BFloat16>(*x, pos.data_ptr<int64_t>(), cs.data_ptr<float>(), cs.stride(0), half); break;
      case at::kHalf: rot<at::Half>(*x, pos.data_ptr<int64_t>(), cs.data_ptr<float>(), cs.stride(0), half); break;
      case at::kFloat: rot<float>(*x, pos.data_ptr<int64_t>(), cs.data_ptr<float>(), cs.stride(0), half); break;
      default: TORCH_CHECK(false, "rotary: unsupported dtype");
    }
  }
}

// torch.argmax(x, -1) for float32 rows: the first index of the row's maximum, or of its first NaN if it has one.
static int64_t argmax_row(const float* row, int64_t V) {
  int64_t i = 0;
  float mx = -std::numeric_limits<float>::infinity();
  bool nan = false;
#if defined(__AVX512F__)
  __m512 vmx = _mm512_set1_ps(mx);
  __mmask16 unord = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 v = _mm512_loadu_ps(row + i);
    unord |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmx = _mm512_max_ps(vmx, v);
  }
  mx = _mm512_reduce_max_ps(vmx);
  nan = unord != 0;
#endif
  for (; i < V; ++i) {
    nan |= row[i] != row[i];
    mx = row[i] > mx ? row[i] : mx;
  }
  int64_t j = 0;
  if (nan) {
    while (row[j] == row[j]) ++j;
    return j;
  }
#if defined(__AVX512F__)
  const __m512 target = _mm512_set1_ps(mx);
  for (; j + 16 <= V; j += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), target, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  while (j < V && row[j] != mx) ++j;
  return j < V ? j : 0;  // all -inf: index 0, as torch
}

static at::Tensor argmax_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) > 0, "argmax_rows: float32 [N, V]");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t N = x.size(0), V = x.size(1), stride = x.stride(0);
  at::Tensor out = at::empty({N}, x.options().dtype(at::kLong));
  const float* p = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) o[r] = argmax_row(p + r * stride, V);
  });
  return out;
}
"""

@functools.cache
def _compiled():
    """The compiled extension (built once per process, cached on disk by torch), or None without a compiler."""
    try:
        # no -ffast-math: it would fuse/reorder the float math and drift from the references' roundings
        return build_cpu_extension("loom_cpu_fused_ops", PRELUDE + SOURCE, ["rms_norm", "rotary", "argmax_rows"],
                                   fast_math=False)
    except Exception as exc:  # noqa: BLE001 - no compiler / headers: the references serve instead
        log.warning("CPU fused kernels unavailable, using the PyTorch references", extra={"reason": str(exc)[:200]})
        return None


def fused_cpu_available(t: torch.Tensor) -> bool:
    """For reduced-precision CPU tensors only (float32 keeps the references, bit-identical to Hugging Face)."""
    return (t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)
            and kernel_backend().mode != "torch" and _compiled() is not None)


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    res = None if residual is None else residual.reshape(-1, shape[-1])
    outs = _compiled().rms_norm(flat, weight.to(x.dtype).contiguous(), res, eps)
    if residual is None:
        return outs[0].reshape(shape)
    return outs[0].reshape(shape), outs[1].reshape(shape)


def rotary_cpu(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    _compiled().rotary(q, k, positions, cos_sin_cache)


def argmax_rows_available(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0
            and kernel_backend().mode != "torch" and _compiled() is not None)


def argmax_rows_cpu(x: torch.Tensor) -> torch.Tensor:
    return _compiled().argmax_rows(x)
