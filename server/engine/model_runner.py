"""Runs the model for one scheduled step: sizes and owns the KV cache, lays scheduled sequences out as a
`FlatBatch`, and returns the logits rows the engine needs."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from server.engine.scheduler import SchedulerOutput
from server.engine.settings import EngineSettings
from server.model import FlatBatch, KVCache, LoadedModel
from server.model.attention import assign_kv_groups
from server.model.kv_layout import KVLayout, kv_layout
from server.model.lora import LoraBatch, LoraSlots

log = logging.getLogger("loom.engine")


@dataclass
class StepLogits:
    logits: torch.Tensor  # [N, V] float32 on CPU
    sample_rows: dict[int, int]  # seq_id -> row of `logits` to sample from (the first of 1 + its drafts rows)
    prompt_rows: dict[int, tuple[int, int, int]]  # seq_id -> (first row, count, prompt position of the first row)


def memory_limit_bytes() -> int | None:
    """What this process may use: the cgroup's memory limit when there is one, else the machine's memory."""
    for path, unlimited in (("/sys/fs/cgroup/memory.max", "max"),
                            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", None)):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text != unlimited and text.isdigit() and int(text) < 2 ** 60:
            return int(text)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_cache_dtype(lm: LoadedModel, setting: str = "auto") -> torch.dtype:
    """The KV cache's element type. `auto`: the model's dtype, except float16 for quantized weights computing in
    float32 on CPU (CPUs without bf16): as llama.cpp stores K/V by default, half the bytes to keep and to read
    every decode step, rounding far below what 4/8-bit weights already lose; a float32 model unquantized keeps
    float32 K/V (exact math asked for). The CPU kernels read float16 / bfloat16 caches under float32 activations
    only; a narrower cache under bf16/fp16 activations is refused."""
    if setting == "auto":
        cpu_float32_quantized = lm.device.type == "cpu" and lm.dtype == torch.float32 and lm.quantization != "none"
        return torch.float16 if cpu_float32_quantized else lm.dtype
    check_kv_dtype(setting, lm.dtype)
    return KV_DTYPES[setting]


def check_kv_dtype(setting: str, activations: torch.dtype) -> None:
    """Refuse an explicit `--kv-cache-dtype` the kernels cannot read under `activations` (ValueError)."""
    if setting != "auto" and not KVCache.readable(KV_DTYPES[setting], activations):
        raise ValueError(f"--kv-cache-dtype {setting} under {str(activations).removeprefix('torch.')} activations: "
                         f"the cache holds the activations' dtype, or float16 / bfloat16 under float32 ones")


@dataclass
class KVSizing:
    blocks: int
    bytes_per_block: int
    reason: str  # which rule decided
    wanted_blocks: int | None = None  # max_num_seqs full contexts
    cap_bytes: int | None = None


def size_kv_cache(lm: LoadedModel, settings: EngineSettings, max_model_len: int,
                  layout: KVLayout | None = None) -> KVSizing:
    """How many KV blocks to allocate, and why. CPU default: room for `max_num_seqs` sequences of the full context
    (layers x 2 x KV heads x head dim x dtype bytes per token; with a grouped `layout`, the pages such a sequence
    holds: its windowed groups only a window's worth), capped by `kv_cache_memory_fraction` of the memory this
    process may use; `--kv-cache-memory` (GiB) or `--num-kv-blocks` override it. GPU: what is left of
    `gpu_memory_utilization` after the weights and the profiled activations."""
    cfg = lm.config
    per_block = KVCache.bytes_per_block(cfg.num_layers if layout is None else layout.slots, settings.block_size,
                                        cfg.num_kv_heads, cfg.head_dim, kv_cache_dtype(lm, settings.kv_cache_dtype))
    if settings.num_kv_blocks:
        return KVSizing(settings.num_kv_blocks, per_block, "num_kv_blocks")
    if lm.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(lm.device)
        used_by_others = total - free  # weights and activations were profiled before this call
        budget = total * settings.gpu_memory_utilization - used_by_others
        return KVSizing(max(int(budget // per_block), 1), per_block, "gpu_memory_utilization")
    if settings.kv_cache_memory is not None:
        return KVSizing(max(int(settings.kv_cache_memory * 2 ** 30 // per_block), 1), per_block, "kv_cache_memory")
    wanted = settings.max_num_seqs * (-(-max_model_len // settings.block_size) if layout is None else
                                      layout.blocks_for(max_model_len, settings.block_size,
                                                        settings.max_num_batched_tokens))
    limit = memory_limit_bytes()
    if limit is None:
        return KVSizing(wanted, per_block, "max_num_seqs x max_model_len (memory size unknown)", wanted)
    cap = int(limit * settings.kv_cache_memory_fraction)
    if wanted * per_block <= cap:
        return KVSizing(wanted, per_block, "max_num_seqs x max_model_len", wanted, cap)
    return KVSizing(max(cap // per_block, 1), per_block, "kv_cache_memory_fraction of memory", wanted, cap)


class ModelRunner:
    def __init__(self, lm: LoadedModel, settings: EngineSettings, max_model_len: int):
        self.lm = lm
        self.model = lm.model
        self.device = lm.device
        self.block_size = settings.block_size
        self.lora = LoraSlots(self.model, settings.max_loras, settings.max_lora_rank, lm.dtype, lm.device) \
            if settings.enable_lora else None  # adapters' slots beside every projection
        if lm.device.type == "cuda":
            self._profile(settings)
        cfg = lm.config
        layout = kv_layout(cfg)
        sizing = size_kv_cache(lm, settings, max_model_len, layout)
        self.num_blocks = sizing.blocks
        kv_dtype = kv_cache_dtype(lm, settings.kv_cache_dtype)
        self.kv_cache = KVCache.allocate(cfg.num_layers, self.num_blocks, self.block_size, cfg.num_kv_heads,
                                         cfg.head_dim, kv_dtype, lm.device, layout)
        assign_kv_groups(self.model, layout)
        mib = 2 ** 20
        log.info("kv cache allocated", extra={
            "blocks": self.num_blocks, "block_size": self.block_size, "tokens": self.num_blocks * self.block_size,
            "dtype": str(kv_dtype).removeprefix("torch."),
            **({"kv_groups": layout.num_groups, "layers_per_block": layout.slots} if layout else {}),
            "mib": round(self.num_blocks * sizing.bytes_per_block / mib, 1), "bytes_per_token":
            sizing.bytes_per_block // self.block_size, "reason": sizing.reason,
            **({"wanted_mib": round(sizing.wanted_blocks * sizing.bytes_per_block / mib, 1)}
               if sizing.wanted_blocks else {}),
            **({"cap_mib": round(sizing.cap_bytes / mib, 1)} if sizing.cap_bytes else {})})
        enable_stack = getattr(self.model, "enable_decode_stack", None)  # Llama family on CPU (model/cpu_stack.py)
        if lm.device.type == "cpu" and enable_stack is not None and enable_stack(self.kv_cache):
            log.info("decode steps run as one C++ call per step")
        self.graphs = None
        if lm.device.type == "cuda" and settings.cuda_graphs and layout is None:  # graphs hold one table
            from server.engine.cuda_graph import CudaGraphDecoder
            self.graphs = CudaGraphDecoder(self.model, self.kv_cache, settings.max_num_seqs,
                                           -(-max_model_len // self.block_size), lm.device)

    @property
    def layout(self) -> KVLayout | None:
        """The KV cache's grouped layout (a model mixing windowed and full-attention layers), else None."""
        return self.kv_cache.layout

    @torch.inference_mode()
    def _profile(self, settings: EngineSettings) -> None:
        """Peak activation memory of the largest step, so the KV cache takes only what is left."""
        cfg = self.lm.config
        n = min(settings.max_num_batched_tokens, cfg.max_model_len)
        scratch = KVCache.allocate(cfg.num_layers, -(-n // self.block_size), self.block_size, cfg.num_kv_heads,
                                   cfg.head_dim, kv_cache_dtype(self.lm, settings.kv_cache_dtype), self.device)
        table = list(range(scratch.num_blocks))
        batch = FlatBatch.build([([0] * n, 0, table)], [], self.block_size).to(self.device)
        self.model.compute_logits(self.model(batch, scratch))
        torch.cuda.synchronize()
        del scratch
        torch.cuda.empty_cache()

    def build_batch(self, sched: SchedulerOutput) -> tuple[FlatBatch, StepLogits]:
        """Lay the step out with `FlatBatch.build` and pick the logits rows: the last row of every sequence whose
        tokens all have K/V after this step (it samples), and the prompt rows of prompt-logprob requests that predict
        a token from their `prompt_logprobs_start` on. A decoding sequence's last token and its drafts take a decode
        row each, attending up to its own position: every layer writes all rows' K/V before any row attends, so row
        j sees the rows before it, and verification runs on the decode path (the fused CPU step, CUDA graphs) with
        logits at every row. A windowed sequence's table still names the blocks it released (block_manager.py):
        they keep positions where they are, and no kernel lets a query see a key outside its window. A grouped KV
        layout adds each sequence's tables of its other groups."""
        logits_rows, sample_rows, prompt_rows = [], {}, {}
        parts: tuple[list, list] = ([], [])
        groups: tuple[list, list] | None = ([], []) if self.layout is not None else None
        row = 0
        for is_decode, items in enumerate((sched.prefills, sched.decodes)):
            for item in items:
                seq, drafts = item.seq, item.draft_token_ids
                start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
                tokens = seq.token_ids[start:end - len(drafts)] + drafts
                if is_decode:
                    parts[1].extend((token, start + j, seq.block_table) for j, token in enumerate(tokens))
                else:
                    parts[0].append((tokens, start, seq.block_table))
                if groups is not None:
                    tables = [t.block_table for t in seq.group_tables]
                    groups[is_decode].extend([tables] * (len(tokens) if is_decode else 1))
                if seq.params.prompt_logprobs is not None:
                    # the row at position p predicts token p + 1: none before `prompt_logprobs_start` is wanted, so
                    # their rows take no logits (a classify's shared context would cost [T, vocab] for nothing)
                    first, stop = max(start, seq.params.prompt_logprobs_start - 1), min(end, seq.num_prompt_tokens)
                    if first < stop:
                        prompt_rows[seq.seq_id] = (len(logits_rows), stop - first, first)
                        logits_rows.extend(range(row + first - start, row + stop - start))
                row += len(tokens)
                if drafts:
                    sample_rows[seq.seq_id] = len(logits_rows)
                    logits_rows.extend(range(row - 1 - len(drafts), row))
                elif end == seq.num_tokens:
                    if not logits_rows or logits_rows[-1] != row - 1:
                        logits_rows.append(row - 1)
                    sample_rows[seq.seq_id] = len(logits_rows) - 1
        batch = FlatBatch.build(parts[0], parts[1], self.block_size, logits_rows,
                                None if groups is None else groups[0] + groups[1])
        return batch, StepLogits(torch.empty(0), sample_rows, prompt_rows)

    def lora_batch(self, sched: SchedulerOutput) -> LoraBatch | None:
        """The step's adapter rows, each adapter in a slot: a sequence takes `num_new_tokens` rows, in `build_batch`'s
        order (prefills, then decodes)."""
        items = sched.prefills + sched.decodes
        adapters = {i.seq.params.lora.id: i.seq.params.lora for i in items if i.seq.params.lora is not None}
        if not adapters or self.lora is None:
            return None
        slots = self.lora.slot_of(list(adapters.values()))
        spans, row = [], 0
        for item in items:
            if item.seq.params.lora is not None:
                spans.append((slots[item.seq.params.lora.id], row, item.num_new_tokens))
            row += item.num_new_tokens
        return LoraBatch.build(spans, self.device)

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> StepLogits:
        batch, step = self.build_batch(sched)
        batch.lora = self.lora_batch(sched)
        if self.graphs is not None and batch.lora is None and self.graphs.can_run(batch):
            hidden = self.graphs.run(batch)  # decode rows are exactly the logits rows, in order
            step.logits = self.model.compute_logits(hidden).cpu()
            return step
        if self.device.type != "cpu":
            batch = batch.to(self.device)
        if batch.lora is None:
            hidden = self.model(batch, self.kv_cache)
        else:
            with self.lora.bound(batch.lora):
                hidden = self.model(batch, self.kv_cache)
        if batch.logits_indices.numel():
            step.logits = self.model.compute_logits(hidden[batch.logits_indices]).cpu()
        return step
