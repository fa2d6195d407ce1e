from loom_kernels.quant.blocks import (
    BlockQ4,
    BlockQ8,
    block_kernels_available,
    block_q4_linear,
    block_q8_linear,
    pack_block_q4,
    pack_block_q8,
)
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
from loom_kernels.quant.reference import (
    block_linear_ref,
    dequantize_block_ref,
    dequantize_q4_ref,
    q4_linear_ref,
    q8_linear_ref,
)

__all__ = ["BlockQ4", "BlockQ8", "Q4Packed", "Q8Packed", "block_kernels_available", "block_linear_ref",
           "block_q4_linear", "block_q8_linear", "dequantize_block_ref", "dequantize_q4_ref", "pack_block_q4",
           "pack_block_q8", "pack_q4", "pack_q8", "q4_linear", "q4_linear_ref", "q8_linear", "q8_linear_ref",
           "quantize_q4", "quantize_q8"]
