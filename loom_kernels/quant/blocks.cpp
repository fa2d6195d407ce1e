// The block GEMM as its own extension (loom_kernels/quant/blocks.py).
#include "quant/blocks.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("block_linear", &block_linear); }
