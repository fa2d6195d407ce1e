// The GGUF block GEMM and de-quantization as their own extension (loom_kernels/quant/kquants.py).
#include "quant/kquants.h"
#include "quant/kquants_q8.h"
#include "quant/kquants_q8k.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released only after the arguments are converted, and taken back before the result is
  m.def("gguf_linear", &gguf_linear, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gguf_linear_q8", &gguf_linear_q8, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gguf_linear_q8k", &gguf_linear_q8k, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gguf_linear_tiled", &gguf_linear_tiled, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gguf_dequantize", &gguf_dequantize, pybind11::call_guard<pybind11::gil_scoped_release>());
}
