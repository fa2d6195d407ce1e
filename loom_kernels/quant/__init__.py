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
from loom_kernels.quant.kquants import (
    GGUF_KERNEL_TYPES,
    Q8K_TYPES,
    GGUFBlocks,
    concat_gguf_blocks,
    dequantize_gguf,
    gguf_blocks,
    gguf_kernels_available,
    gguf_linear,
    gguf_linear_q8,
    gguf_linear_q8k,
    gguf_linear_tiled,
    row_bytes,
)
from loom_kernels.quant.reference import (
    block_linear_ref,
    dequantize_block_ref,
    dequantize_q4_ref,
    q4_linear_ref,
    q8_linear_ref,
)

__all__ = ["GGUF_KERNEL_TYPES", "Q8K_TYPES", "BlockQ4", "BlockQ8", "GGUFBlocks", "Q4Packed", "Q8Packed",
           "block_kernels_available", "block_linear_ref", "block_q4_linear", "block_q8_linear", "concat_gguf_blocks",
           "dequantize_block_ref", "dequantize_gguf", "dequantize_q4_ref", "gguf_blocks", "gguf_kernels_available",
           "gguf_linear", "gguf_linear_q8", "gguf_linear_q8k", "gguf_linear_tiled", "pack_block_q4", "pack_block_q8",
           "pack_q4", "pack_q8", "q4_linear", "q4_linear_ref", "q8_linear", "q8_linear_ref", "quantize_q4",
           "quantize_q8", "row_bytes"]
