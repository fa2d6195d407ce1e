// RMSNorm, rotary and the row argmax as one extension (loom_kernels/fused_cpu/cpu_ops.py).
#include "fused_cpu/cpu_ops.h"

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", torch::wrap_pybind_function(rms_norm), "rms_norm");
  m.def("rotary", torch::wrap_pybind_function(rotary), "rotary");
  m.def("argmax_rows", torch::wrap_pybind_function(argmax_rows), "argmax_rows");
}
