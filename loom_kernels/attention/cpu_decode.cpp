// The paged decode attention as its own extension (loom_kernels/attention/cpu_decode.py).
#include "attention/cpu_decode.h"

// window > 0: each query sees its sequence's last `window` tokens only (sliding-window attention); 0: all of them.
at::Tensor paged_decode(at::Tensor q, at::Tensor kc, at::Tensor vc, at::Tensor bt, at::Tensor sl, double scale,
                        int64_t window) {
  TORCH_CHECK(q.dim() == 3 && kc.dim() == 4 && q.stride(2) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1,
              "paged_decode: bad layout");
  TORCH_CHECK(bt.scalar_type() == at::kInt && sl.scalar_type() == at::kInt, "paged_decode: int32 indices");
  bt = bt.contiguous();
  sl = sl.contiguous();
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  switch (q.scalar_type()) {
    case at::kFloat: decode_any_cache<float>(q, kc, vc, bt, sl, scale, out, window); break;
    case at::kBFloat16: decode_any_cache<at::BFloat16>(q, kc, vc, bt, sl, scale, out, window); break;
    case at::kHalf: decode_any_cache<at::Half>(q, kc, vc, bt, sl, scale, out, window); break;
    default: TORCH_CHECK(false, "paged_decode: unsupported dtype");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", torch::wrap_pybind_function(paged_decode), "paged_decode");
}
