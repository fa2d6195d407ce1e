"""The C++ decode stack against `decode_stack_ref` (the same step through the public ops): every linear form,
widths that are not multiples of the 4-bit group or of 16, a qkv bias, a skipped KV slot, bf16 and fp32; GGUF
blocks as stored, fused projections mixing types, on widths that are whole 256-weight superblocks; LoRA slot
stacks on the linears, with rows of several adapters beside base rows that stay exactly the base-only result; and
the newer families' per-layer variations (q/k head norms, layers without rotary, partial rotary, sliding windows, an
o bias) and Gemma 3's layer (norms on both sides of each sublayer, GeGLU, a second rotary table)."""
import dataclasses

import pytest
import torch

from loom_kernels.fused_cpu.decode_stack import (
    DecodeStack,
    StackLayer,
    StackLinear,
    StackShape,
    decode_stack_available,
    decode_stack_ref,
)
from loom_kernels.lora.cpu_lora import lora_slot_meta
from loom_kernels.quant import (
    concat_gguf_blocks,
    pack_block_q4,
    pack_block_q8,
    pack_q4,
    pack_q8,
    quantize_q4,
    quantize_q8,
)
from loom_kernels.quant.test_kquants import random_blocks
from loom_kernels.rotary.test_rotary import cos_sin_cache

pytestmark = pytest.mark.skipif(not decode_stack_available(), reason="no C++ compiler for the CPU kernels")

HIDDEN, H, HKV, D, INTER, LAYERS = 80, 4, 2, 24, 72, 3
BLOCK, BLOCKS = 4, 16
# The C++ side sums squares and dot products in another order (and may contract into FMAs): a few output roundings
# apart after 3 layers.
TOL = {torch.float32: {"atol": 2e-4, "rtol": 2e-4}, torch.bfloat16: {"atol": 6e-2, "rtol": 5e-2},
       torch.float16: {"atol": 4e-3, "rtol": 4e-3}}
# A float32 step over a narrower cache: a K/V value the two sides compute an ulp apart may round to neighbouring
# float16 / bfloat16 values as it is written, and moves the outputs by about that much.
NARROW_CACHE_TOL = {torch.float16: {"atol": 1e-3, "rtol": 1e-3}, torch.bfloat16: {"atol": 2e-3, "rtol": 2e-3}}


def make_linear(kind: str, n: int, k: int, dtype: torch.dtype, bias: bool = False) -> StackLinear:
    w = torch.randn(n, k) / k ** 0.5
    b = 0.1 * torch.randn(n, dtype=dtype) if bias else None
    if kind == "q4":
        return StackLinear("q4", pack_q4(*quantize_q4(w, 32), 32, dtype), b)
    if kind == "q8":
        return StackLinear("q8", pack_q8(*quantize_q8(w), dtype), b)
    if kind == "q4_blocks":
        return StackLinear("q4_blocks", pack_block_q4(*quantize_q4(w, 32)), b)
    if kind == "q8_blocks":  # one scale per row, repeated over its blocks: a valid Q8_0 weight
        codes, scale = quantize_q8(w)
        return StackLinear("q8_blocks", pack_block_q8(codes, scale[:, None].expand(n, -(-k // 32))), b)
    if kind == "mkldnn":
        return StackLinear("mkldnn", torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16)), b, n)
    return StackLinear("dense", w.to(dtype), b)


def make_layers(kinds: list[str], dtype: torch.dtype) -> list[StackLayer]:
    layers = []
    for i in range(LAYERS):
        kind = kinds[i % len(kinds)]
        layers.append(StackLayer(
            input_norm=(1 + 0.1 * torch.randn(HIDDEN)).to(dtype),
            qkv=make_linear(kind, (H + 2 * HKV) * D, HIDDEN, dtype, bias=True),
            o=make_linear(kind, HIDDEN, H * D, dtype),
            post_norm=(1 + 0.1 * torch.randn(HIDDEN)).to(dtype),
            gate_up=make_linear(kind, 2 * INTER, HIDDEN, dtype),
            down=make_linear({"q4": "q8", "q4_blocks": "q8_blocks"}.get(kind, kind), HIDDEN, INTER, dtype)))
    return layers


def mkldnn_ok() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("dtype,kinds", [
    (torch.bfloat16, ["q4"]), (torch.bfloat16, ["dense", "q4"]), (torch.bfloat16, ["mkldnn", "q8"]),
    (torch.float32, ["q4", "dense"]), (torch.bfloat16, ["q4_blocks", "q4"]), (torch.float32, ["q4_blocks"])],
    ids=["bf16-q4q8", "bf16-dense", "bf16-mkldnn", "fp32", "bf16-blocks", "fp32-blocks"])
def test_decode_stack_matches_the_python_layer_loop(dtype, kinds):
    if "mkldnn" in kinds and not mkldnn_ok():
        pytest.skip("oneDNN bf16 unsupported on this CPU")
    torch.manual_seed(0)
    check_stack(make_layers(kinds, dtype), dtype, StackShape(H, HKV, D, 1e-5, D ** -0.5), HIDDEN)


# GGUF layers: widths of whole superblocks; per layer, the types of (q, k, v), o, (gate, up), down, as a Q4_K_M file
# mixes them, and the 32-weight types.
G_HIDDEN, G_H, G_HKV, G_D, G_INTER = 256, 4, 2, 64, 256
GGUF_LAYERS = [(("Q4_K", "Q4_K", "Q6_K"), "Q5_K", ("Q4_K", "Q5_0"), "Q6_K"),
               (("Q4_0", "Q4_1", "Q5_1"), "Q8_0", ("Q5_0", "Q4_1"), "Q8_0"),
               (("Q5_K", "Q8_0", "Q6_K"), "Q4_K", ("Q6_K", "Q4_K"), "Q5_K")]
GGUF_KQUANT_LAYERS = [(("Q4_K", "Q4_K", "Q6_K"), "Q5_K", ("Q4_K", "Q6_K"), "Q6_K"),
                      (("Q5_K", "Q6_K", "Q6_K"), "Q4_K", ("Q6_K", "Q4_K"), "Q5_K")]


def gguf_linear_of(types: tuple[str, ...], rows: tuple[int, ...], k: int, seed: int, bias=None,
                   kind: str = "gguf_blocks") -> StackLinear:
    parts = [random_blocks(t, n, k, seed=seed + i, scale=2.0 / k ** 0.5) for i, (t, n) in enumerate(zip(types, rows))]
    return StackLinear(kind, concat_gguf_blocks(parts), bias)


def make_gguf_layers(dtype: torch.dtype, kind: str = "gguf_blocks", types=GGUF_LAYERS) -> list[StackLayer]:
    q, kv = G_H * G_D, G_HKV * G_D
    layers = []
    for i, (qkv, o, gate_up, down) in enumerate(types):
        layers.append(StackLayer(
            input_norm=(1 + 0.1 * torch.randn(G_HIDDEN)).to(dtype),
            qkv=gguf_linear_of(qkv, (q, kv, kv), G_HIDDEN, 10 * i, 0.1 * torch.randn(q + 2 * kv, dtype=dtype), kind),
            o=gguf_linear_of((o,), (G_HIDDEN,), q, 10 * i + 3, kind=kind),
            post_norm=(1 + 0.1 * torch.randn(G_HIDDEN)).to(dtype),
            gate_up=gguf_linear_of(gate_up, (G_INTER, G_INTER), G_HIDDEN, 10 * i + 4, kind=kind),
            down=gguf_linear_of((down,), (G_HIDDEN,), G_INTER, 10 * i + 6, kind=kind)))
    return layers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_stack_runs_gguf_blocks_of_mixed_types(dtype):
    torch.manual_seed(0)
    layers = make_gguf_layers(dtype)
    assert [lin.weight.qtypes for lin in (layers[0].qkv, layers[0].gate_up)] == [["Q4_K", "Q4_K", "Q6_K"],
                                                                                  ["Q4_K", "Q5_0"]]
    check_stack(layers, dtype, StackShape(G_H, G_HKV, G_D, 1e-5, G_D ** -0.5), G_HIDDEN)


@pytest.mark.parametrize("kind", ["gguf_tiled", "gguf_q8", "gguf_q8k"])
def test_decode_stack_runs_the_other_gguf_kinds(kind):
    """The large-M GEMM and the int8-activation GEMMs as linear kinds: the same segments, run through
    gguf_linear_tiled / gguf_linear_q8 / gguf_linear_q8k (K-quant layers only) by the stack and by the reference
    alike."""
    torch.manual_seed(0)
    types = GGUF_KQUANT_LAYERS if kind == "gguf_q8k" else GGUF_LAYERS
    layers = make_gguf_layers(torch.bfloat16, kind=kind, types=types)
    check_stack(layers, torch.bfloat16, StackShape(G_H, G_HKV, G_D, 1e-5, G_D ** -0.5), G_HIDDEN)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layers_of", ["q4_blocks", "gguf", "gemma"])
def test_decode_stack_keeps_a_narrower_kv_cache_under_float32(cache_dtype, layers_of):
    """Float32 activations over float16 / bfloat16 K/V caches (the default KV cache of quantized models on CPUs
    without bf16): K/V rounded once as they are written, read widened, as the Python loop's write_kv and attention
    do."""
    torch.manual_seed(0)
    if layers_of == "q4_blocks":
        check_stack(make_layers(["q4_blocks"], torch.float32), torch.float32, StackShape(H, HKV, D, 1e-5, D ** -0.5),
                    HIDDEN, cache_dtype=cache_dtype)
    elif layers_of == "gguf":
        check_stack(make_gguf_layers(torch.float32), torch.float32, StackShape(G_H, G_HKV, G_D, 1e-5, G_D ** -0.5),
                    G_HIDDEN, cache_dtype=cache_dtype)
    else:
        shape = StackShape(H, HKV, D, 1e-6, 16 ** -0.5, gemma=True)
        check_stack(gemma_layers("dense", torch.float32), torch.float32, shape, HIDDEN, cache_dtype=cache_dtype)


def test_decode_stack_refuses_caches_of_another_dtype():
    layers = make_layers(["q4_blocks"], torch.bfloat16)
    caches = torch.zeros(len(layers), 2, BLOCKS, BLOCK, HKV, D, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float16 / bfloat16 under float32 activations"):
        DecodeStack(layers, torch.ones(HIDDEN, dtype=torch.bfloat16), list(caches[:, 0]), list(caches[:, 1]),
                    cos_sin_cache(64, D).cpu(), StackShape(H, HKV, D, 1e-5, D ** -0.5), dtype=torch.bfloat16)


TABLES = torch.tensor([[3, 7, 1], [0, 2, 9], [5, 0, 0], [11, 12, 0]], dtype=torch.int32)


def check_stack(layers: list[StackLayer], dtype: torch.dtype, shape: StackShape, hidden: int,
                lora_slots: torch.Tensor | None = None, tables: torch.Tensor = TABLES,
                cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One step of the C++ stack against the Python layer loop over the same layers (with `lora_slots`, a LoRA slot
    per row; `tables` [G, B, max_blocks]: a table per KV group, each layer addressing its `kv_group`'s): outputs, the
    K/V written (in the same slots, nothing else touched), and a second step equal to the first (no state kept).
    `cache_dtype`: K/V caches of another dtype than the activations (float16 / bfloat16 under float32). Returns the
    stack's output; the random inputs are drawn from a fixed seed."""
    torch.manual_seed(1)
    hkv, d = shape.num_kv_heads, shape.head_dim
    final_norm = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    caches = torch.randn(len(layers), 2, BLOCKS, BLOCK, hkv, d).to(cache_dtype or dtype)
    seq_lens = torch.tensor([9, 12, 1, 6], dtype=torch.int32)
    positions = (seq_lens - 1).long()
    grouped = tables.dim() == 3
    slots = torch.tensor([[int(t[b, p // BLOCK]) * BLOCK + int(p) % BLOCK for b, p in enumerate(positions)]
                          for t in (tables if grouped else [tables])])
    slots[:, 3] = -1  # a padded row: its K/V is not stored
    slots = slots if grouped else slots[0]
    cos_sin = cos_sin_cache(64, shape.rotary_dim or d).cpu()
    local = cos_sin_cache(64, shape.rotary_dim or d, base=100.0).cpu() if shape.gemma else None
    x = torch.randn(4, hidden).to(dtype)

    ref_caches = caches.clone()
    ref = decode_stack_ref(x, layers, final_norm, list(ref_caches[:, 0]), list(ref_caches[:, 1]), cos_sin, shape,
                           positions, slots, tables, seq_lens, lora_slots, local)
    stack = DecodeStack(layers, final_norm, list(caches[:, 0]), list(caches[:, 1]), cos_sin, shape, local, dtype=dtype)
    got = stack.run(x, positions, slots, tables, seq_lens, lora_slots)
    assert got.dtype == dtype and caches.dtype == (cache_dtype or dtype)
    out_tol = TOL[dtype] if cache_dtype in (None, dtype) else NARROW_CACHE_TOL[cache_dtype]
    torch.testing.assert_close(got, ref, **out_tol)
    torch.testing.assert_close(caches, ref_caches, **TOL[cache_dtype or dtype])  # the same K/V written, same slots
    for i, layer in enumerate(layers):
        untouched = torch.ones(BLOCKS, BLOCK, dtype=torch.bool)
        for s in (slots[layer.kv_group] if grouped else slots)[:3]:
            untouched[s // BLOCK, s % BLOCK] = False
        assert torch.equal(caches[i, :, untouched], ref_caches[i, :, untouched])  # nothing else changed
    again = stack.run(x, positions, slots, tables, seq_lens, lora_slots)  # the stack holds no state between steps
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    return got


LORA_SLOTS, LORA_RANK = 3, 12


def with_lora(layers: list[StackLayer], dtype: torch.dtype, hidden: int, heads: int, kv_heads: int, head_dim: int,
              inter: int) -> list[StackLayer]:
    """Every linear with LoRA slot stacks as LoraLinear holds them: slot 1 of a smaller rank (zero-padded), slot 2
    all zeros (an adapter that leaves the module alone)."""
    def attach(lin: StackLinear, n: int, k: int) -> StackLinear:
        a, b = torch.zeros(LORA_SLOTS, LORA_RANK, k), torch.zeros(LORA_SLOTS, n, LORA_RANK)
        for slot, rank in ((0, LORA_RANK), (1, 5)):
            a[slot, :rank] = torch.randn(rank, k) / k ** 0.5
            b[slot, :, :rank] = 0.5 * torch.randn(n, rank) / rank ** 0.5
        a, b = a.to(dtype), b.to(dtype)
        meta = torch.stack([lora_slot_meta(a[s], b[s]) for s in range(LORA_SLOTS)])
        return dataclasses.replace(lin, lora_a=a, lora_b=b, lora_meta=meta)

    q = heads * head_dim
    return [dataclasses.replace(layer, qkv=attach(layer.qkv, q + 2 * kv_heads * head_dim, hidden),
                                o=attach(layer.o, hidden, q), gate_up=attach(layer.gate_up, 2 * inter, hidden),
                                down=attach(layer.down, hidden, inter)) for layer in layers]


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, "q4"), (torch.float32, "dense"), (torch.bfloat16, "gguf_q8"),
                                        (torch.float32, "gguf_blocks")])
def test_decode_stack_adds_lora_rows(dtype, kind):
    """Rows on slots 1, base, 0 and 2 (all-zero stacks): the stack against the reference (lora_add_ref after each
    base product); the base row and the slot-2 row bit-equal to a base-only step of the same stack; the adapters'
    rows moved by their deltas."""
    torch.manual_seed(0)
    if kind.startswith("gguf"):
        dims = (G_HIDDEN, G_H, G_HKV, G_D, G_INTER)
        layers = make_gguf_layers(dtype, kind=kind)
    else:
        dims = (HIDDEN, H, HKV, D, INTER)
        layers = make_layers([kind], dtype)
    hidden, heads, kv_heads, head_dim, _ = dims
    layers = with_lora(layers, dtype, *dims)
    shape = StackShape(heads, kv_heads, head_dim, 1e-5, head_dim ** -0.5)
    lora_slots = torch.tensor([1, -1, 0, 2])
    got = check_stack(layers, dtype, shape, hidden, lora_slots)
    base = check_stack(layers, dtype, shape, hidden, None)
    assert torch.equal(got[[1, 3]], base[[1, 3]])  # the base model's rows: exactly the base-only step
    assert (got[[0, 2]] - base[[0, 2]]).abs().amax(1).min() > 0.1  # the adapters changed their rows


def norm_weight(n: int, dtype: torch.dtype) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(n)).to(dtype)


# Per variant, what it changes in layer i: Qwen3's q/k head norms, SmolLM3's NoPE middle layer, windows shorter than
# the test's sequences (9, 12, 6 tokens; the middle layer full), Phi-3/Qwen3's o bias; and all of them at once.
VARIANTS = {
    "qk_norm": lambda i, layer, dtype: dict(q_norm=norm_weight(D, dtype), k_norm=norm_weight(D, dtype)),
    "nope": lambda i, layer, dtype: dict(rope=i != 1),
    "window": lambda i, layer, dtype: dict(window=[5, None, 3][i]),
    "o_bias": lambda i, layer, dtype: dict(o=dataclasses.replace(layer.o, bias=0.1 * torch.randn(HIDDEN, dtype=dtype))),
}
EACH = list(VARIANTS.values())
VARIANTS["all"] = lambda i, layer, dtype: {k: v for f in EACH for k, v in f(i, layer, dtype).items()}


@pytest.mark.parametrize("variant", [*VARIANTS, "partial_rotary", "all+partial"])
@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, "q4"), (torch.float32, "dense")], ids=["bf16", "fp32"])
def test_decode_stack_runs_the_newer_families_layers(variant, dtype, kind):
    """Each variation against the reference, which runs it as qwen3.py / smollm3.py / phi3.py / attention.py do;
    partial rotary: the cos/sin table 16 wide, the last 8 of each head's 24 features left alone."""
    torch.manual_seed(0)
    layers = make_layers([kind], dtype)
    change = VARIANTS.get(variant.removesuffix("+partial"))
    if change is not None:
        layers = [dataclasses.replace(layer, **change(i, layer, dtype)) for i, layer in enumerate(layers)]
    rotary_dim = 16 if "partial" in variant else None
    check_stack(layers, dtype, StackShape(H, HKV, D, 1e-5, D ** -0.5, rotary_dim), HIDDEN)


def gemma_layers(kind: str, dtype: torch.dtype) -> list[StackLayer]:
    """Gemma 3's layers: norm weights as offsets from one (the stack scales by 1 + w), q/k norms, local layers 0 and
    2 windowed and rotating with the second table, layer 1 global."""
    def offset(n: int) -> torch.Tensor:
        return (0.1 * torch.randn(n)).to(dtype)
    return [dataclasses.replace(layer, input_norm=offset(HIDDEN), post_norm=offset(HIDDEN),
                                post_attn_norm=offset(HIDDEN), post_ffn_norm=offset(HIDDEN), q_norm=offset(D),
                                k_norm=offset(D), window=[5, None, 3][i], rope_table=[1, 0, 1][i])
            for i, layer in enumerate(make_layers([kind], dtype))]


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, "q4"), (torch.float32, "dense"),
                                        (torch.bfloat16, "q4_blocks")], ids=["bf16", "fp32", "bf16-blocks"])
def test_decode_stack_runs_gemma3_layers(dtype, kind):
    """Against the reference, which runs the layer as gemma3.py does (GemmaRMSNorm's float32 product with 1 + w,
    `gelu_tanh_and_mul`, the local table for the windowed layers); the query scale is Gemma's own."""
    torch.manual_seed(0)
    check_stack(gemma_layers(kind, dtype), dtype, StackShape(H, HKV, D, 1e-6, 16 ** -0.5, gemma=True), HIDDEN)


def test_decode_stack_addresses_each_layers_kv_group():
    """Gemma 3's layers in a grouped KV layout (server/model/kv_layout.py): the local layers 0 and 2 read and write
    through group 1's tables, the global layer 1 through group 0's, which name other blocks."""
    torch.manual_seed(0)
    layers = [dataclasses.replace(layer, kv_group=[1, 0, 1][i])
              for i, layer in enumerate(gemma_layers("dense", torch.float32))]
    local = torch.tensor([[4, 6, 8], [10, 13, 14], [15, 0, 0], [1, 2, 0]], dtype=torch.int32)
    shape = StackShape(H, HKV, D, 1e-6, 16 ** -0.5, gemma=True)
    grouped = check_stack(layers, torch.float32, shape, HIDDEN, tables=torch.stack([TABLES, local]))
    one_table = check_stack(layers, torch.float32, shape, HIDDEN, tables=torch.stack([TABLES, TABLES]))
    assert not torch.allclose(grouped, one_table)  # the local layers did read other blocks


def test_decode_stack_refuses_a_gemma_layer_without_its_norms_or_table():
    layers = make_layers(["dense"], torch.float32)
    caches = torch.zeros(LAYERS, 2, BLOCKS, BLOCK, HKV, D)
    args = (torch.ones(HIDDEN), list(caches[:, 0]), list(caches[:, 1]), cos_sin_cache(64, D).cpu())
    with pytest.raises(ValueError, match="post_attn_norm"):
        DecodeStack(layers, *args, StackShape(H, HKV, D, 1e-6, D ** -0.5, gemma=True), cos_sin_cache(64, D).cpu())
    with pytest.raises(ValueError, match="table 1; 1 given"):
        DecodeStack(gemma_layers("dense", torch.float32), *args, StackShape(H, HKV, D, 1e-6, D ** -0.5, gemma=True))


def test_decode_stack_refuses_a_table_of_another_width():
    layers = make_layers(["dense"], torch.float32)
    caches = torch.zeros(LAYERS, 2, BLOCKS, BLOCK, HKV, D)
    with pytest.raises(ValueError, match="rotary_dim 16"):
        DecodeStack(layers, torch.ones(HIDDEN), list(caches[:, 0]), list(caches[:, 1]), cos_sin_cache(64, D).cpu(),
                    StackShape(H, HKV, D, 1e-5, D ** -0.5, 16))
