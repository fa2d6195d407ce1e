"""Decode steps replayed from CUDA graphs: one graph per padded batch size, all reading static input buffers.

A decode step launches hundreds of small kernels; on GPU their launch overhead, not the math, dominates small
batches. Padding rows use slot -1 (the KV write skips them) and length 0 (attention returns zeros for them), so a
graph captured for 16 sequences serves any batch of 9..16."""
from __future__ import annotations

import logging

import torch
from torch import nn

from server.model import FlatBatch, KVCache

log = logging.getLogger("loom.engine")


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch] + list(range(16, max_batch + 1, 16))
    return sizes if sizes[-1] == max_batch else sizes + [max_batch]


class CudaGraphDecoder:
    def __init__(self, model: nn.Module, kv_cache: KVCache, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device):
        self.model, self.kv_cache = model, kv_cache
        self.sizes = capture_sizes(max_batch)
        self.max_blocks = max_blocks_per_seq
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.zeros(1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture(device)

    def _batch(self, size: int) -> FlatBatch:
        return FlatBatch(input_ids=self.input_ids[:size], positions=self.positions[:size],
                         slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                         seq_lens=self.seq_lens[:size], cu_seqlens_q=self.cu_seqlens_q, num_prefill_seqs=0,
                         num_prefill_tokens=0, logits_indices=torch.arange(size, device=self.input_ids.device))

    @torch.inference_mode()
    def _capture(self, device: torch.device) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first so smaller graphs reuse its memory pool
            batch = self._batch(size)
            self.model(batch, self.kv_cache)  # warm up: Triton compiles outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(batch, self.kv_cache)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        log.info("captured decode CUDA graphs", extra={"sizes": self.sizes})

    def can_run(self, batch: FlatBatch) -> bool:
        return (batch.num_prefill_seqs == 0 and batch.num_tokens <= self.sizes[-1]
                and batch.block_tables.shape[1] <= self.max_blocks)

    def run(self, batch: FlatBatch) -> torch.Tensor:
        """Hidden states `[B, hidden]` of a decode-only batch (CPU tensors are copied into the static buffers)."""
        n = batch.num_tokens
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(batch.slot_mapping, non_blocking=True)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(batch.seq_lens, non_blocking=True)
        self.seq_lens[n:size].zero_()
        width = batch.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:n]
