from loom_kernels.quant.int4pack import (
    Q4Packed,
    Q8Packed,
    pack_q4,
    pack_q8,
    q4_linear,
    q8_linear,
    quantize_q4,
    quantize_q8,
)
from loom_kernels.quant.reference import dequantize_q4_ref, q4_linear_ref, q8_linear_ref

__all__ = ["Q4Packed", "Q8Packed", "pack_q8", "dequantize_q4_ref", "pack_q4", "q4_linear", "q4_linear_ref", "q8_linear", "q8_linear_ref",
    "quantize_q4", "quantize_q8"]
