"""The one-call C++ decode step (loom_kernels/fused_cpu/decode_stack.py) for a Llama-family model on CPU.

The stack runs each linear in the form a decode-only step takes at that batch size: a `QuantLinear`'s calibrated
decode plan (the same as its plan for every step, except where `--activations auto` lets decoding alone take int8
activations), a oneDNN-packed or a plain weight; otherwise the two paths differ only in dispatch. One compiled stack
per distinct set of forms (kernel and weight), built on first use of a batch size. Float32 models of unquantized
weights keep the Python path: it stays bit-identical to Hugging Face."""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from loom_kernels.fused_cpu.decode_stack import DecodeStack, StackLayer, StackLinear, StackShape, decode_stack_available
from server.model.batch import FlatBatch, KVCache
from server.model.lora.layer import LoraLinear
from server.model.weights.linear import PackedLinear
from server.model.weights.quant import QuantLinear

log = logging.getLogger("loom.model")

def stack_linear(module: nn.Module, m: int) -> StackLinear:
    """`module`'s weight in the form its decode plan runs at batch size `m`; a LoraLinear's with its slot stacks
    (the stack holds them, so adapters loaded into slots later are seen)."""
    if isinstance(module, LoraLinear):
        return dataclasses.replace(stack_linear(module.base, m), lora_a=module.lora_a, lora_b=module.lora_b,
                                   lora_meta=module.lora_meta)
    if isinstance(module, QuantLinear):
        return module.form(module.pick(m, decode=True))
    if isinstance(module, PackedLinear):
        return StackLinear("mkldnn", module.packed_weight, module.bias, module.out_features)
    if isinstance(module, nn.Linear):
        return StackLinear("dense", module.weight, module.bias)
    raise TypeError(f"no decode-stack form for {type(module).__name__}")


def wants_stack(model: nn.Module, kv_cache: KVCache) -> bool:
    """A model of the families the stack implements (those with `enable_decode_stack`: the Llama layer, with Qwen3's
    q/k norms, SmolLM3's NoPE layers, Phi-3's partial rotary and sliding windows, and Gemma 3's), on CPU, a compiler,
    K/V in the activation dtype (or float16 / bfloat16 under float32), and either reduced precision or quantized
    weights."""
    norm = model.model.norm.weight
    quantized = any(isinstance(mod, QuantLinear) for mod in model.modules())
    return (norm.device.type == "cpu" and KVCache.readable(kv_cache.k[0].dtype, norm.dtype)
            and (norm.dtype != torch.float32 or quantized) and decode_stack_available())


def stack_layer(layer: nn.Module, m: int, kv_group: int = 0) -> StackLayer:
    """A decoder layer of llama.py (or of a family built on it) as the stack runs it at batch size `m`: Qwen3's
    `q_norm` / `k_norm` modules, SmolLM3's `use_rope` and the attention's window where the layer has them; Gemma 3's
    four norms and, for its local layers, the second rotary table; `kv_group`: whose tables address its cache (a
    grouped KV layout)."""
    attn, mlp = layer.self_attn, layer.mlp
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # built with cfg.norm_eps too
    gemma = hasattr(layer, "post_feedforward_layernorm")
    post_norm = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
    return StackLayer(layer.input_layernorm.weight, stack_linear(attn.qkv_proj, m), stack_linear(attn.o_proj, m),
                      post_norm.weight, stack_linear(mlp.gate_up_proj, m),
                      stack_linear(mlp.down_proj, m), q_norm=None if q_norm is None else q_norm.weight,
                      k_norm=None if k_norm is None else k_norm.weight, rope=getattr(attn, "use_rope", True),
                      window=attn.attn.window, rope_table=int(getattr(attn, "is_sliding", False)),
                      kv_group=kv_group,
                      post_attn_norm=layer.post_attention_layernorm.weight if gemma else None,
                      post_ffn_norm=layer.post_feedforward_layernorm.weight if gemma else None)


class DecodeStacks:
    """Compiled decode stacks of one model and KV cache, by batch size."""

    def __init__(self, model: nn.Module, kv_cache: KVCache):
        self.model, self.kv_cache = model, kv_cache
        self.by_size: dict[int, DecodeStack] = {}
        self.by_forms: dict[tuple, DecodeStack] = {}

    def _build(self, m: int) -> DecodeStack:
        model, cfg = self.model, self.model.config
        layout = self.kv_cache.layout  # a grouped cache: each layer addresses its group's tables
        layers = [stack_layer(layer, m, 0 if layout is None else layout.layer_group[i])
                  for i, layer in enumerate(model.model.layers)]
        forms = tuple((lin.kind, id(lin.weight), id(lin.lora_a)) for layer in layers
                      for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        if forms not in self.by_forms:
            local = getattr(model, "cos_sin_local", None)  # Gemma 3's local layers rotate with their own base
            shape = StackShape(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps,
                               model.model.layers[0].self_attn.attn.scale, cfg.rotary_dim, gemma=local is not None)
            self.by_forms[forms] = DecodeStack(layers, model.model.norm.weight, self.kv_cache.k, self.kv_cache.v,
                                               model.cos_sin, shape, local, dtype=model.model.norm.weight.dtype)
            log.debug("decode stack compiled", extra={"batch_size": m, "stacks": len(self.by_forms)})
        return self.by_forms[forms]

    def takes(self, batch: FlatBatch, kv_cache: KVCache) -> bool:
        """Decode-only steps on the cache the stacks were built over, adapter rows included (the stack adds the LoRA
        deltas after each base product)."""
        return batch.num_prefill_tokens == 0 and self.kv_cache is kv_cache

    def run(self, x: torch.Tensor, batch: FlatBatch) -> torch.Tensor:
        m = x.shape[0]
        stack = self.by_size.get(m)
        if stack is None:
            stack = self.by_size[m] = self._build(m)
        lora = None if batch.lora is None else batch.lora.slot_per_row(m)
        grouped = batch.group_block_tables is not None
        return stack.run(x, batch.positions, batch.group_slot_mapping if grouped else batch.slot_mapping,
                         batch.group_block_tables if grouped else batch.block_tables, batch.seq_lens, lora)
