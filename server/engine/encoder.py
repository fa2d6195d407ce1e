"""The encoder batcher: embedding and classifier requests from every client, batched together and run on the engine
thread between decode steps (so all torch work stays on one thread).

Each request is a list of token-id sequences for one encoder model. Sequences wait in one FIFO per model; a batch
takes the oldest model's sequences in arrival order until `max_batch_tokens` (real tokens; at least one sequence)
or `max_batch_seqs`. A request is answered when all its sequences have run. The engine alternates one decode step
with one encoder batch; while sequences decode, a batch is also held to about one decode step's time (from the
encoder's measured tokens/s), so an embedding burst at most about doubles running streams' inter-token latency
instead of adding a whole `max_batch_tokens` batch to every token."""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.engine.errors import InternalEngineError, InvalidRequestError, RequestTimeoutError
from server.model.encoder_loader import LoadedEncoder

log = logging.getLogger("loom.engine")


def moving_average(old: float | None, new: float, weight: float = 0.2) -> float:
    """An exponential moving average that starts at its first sample (`old` None)."""
    return new if old is None else (1 - weight) * old + weight * new


@dataclass
class EncodeBatchStats:
    """One encoder batch, for metrics: its model, sequences, real tokens and wall time."""
    model: str
    num_seqs: int
    num_tokens: int
    seconds: float


@dataclass
class EncodeJob:
    request_id: str
    model: str
    inputs: list[list[int]]
    deadline: float | None
    sink: Callable[[list[list[float]] | BaseException], None]
    results: list[list[float] | None] = field(default_factory=list)
    remaining: int = 0
    order: int = 0  # arrival number, set by the batcher

    def __post_init__(self) -> None:
        self.results = [None] * len(self.inputs)
        self.remaining = len(self.inputs)


class EncoderBatcher:
    def __init__(self, encoders: dict[str, LoadedEncoder], max_batch_tokens: int = 2048, max_batch_seqs: int = 128):
        self.encoders, self.max_batch_tokens, self.max_batch_seqs = encoders, max_batch_tokens, max_batch_seqs
        self.jobs: dict[str, EncodeJob] = {}
        self.queues: dict[str, deque[tuple[EncodeJob, int]]] = {name: deque() for name in encoders}
        self.observers: list[Callable[[EncodeBatchStats], None]] = []
        self._arrivals = itertools.count()
        self.tokens_per_second: dict[str, float] = {}  # per model, a moving average over its batches

    def check(self, model: str, inputs: list[list[int]]) -> None:
        """Refuse what the model cannot run (caller's thread): unknown model, empty or over-long inputs, ids out of
        the vocabulary."""
        enc = self.encoders.get(model)
        if enc is None:
            raise InvalidRequestError(f"no encoder model {model!r} is loaded", "model", "model_not_found")
        if not inputs:
            raise InvalidRequestError("input must not be empty", "input")
        for i, ids in enumerate(inputs):
            if not ids:
                raise InvalidRequestError(f"input {i} is empty", "input")
            if len(ids) > enc.max_len:
                raise InvalidRequestError(f"input {i} has {len(ids)} tokens; this model's maximum input length is "
                                          f"{enc.max_len} tokens (set truncate_prompt_tokens to truncate)", "input",
                                          "context_length_exceeded")
            if min(ids) < 0 or max(ids) >= enc.vocab_size:
                raise InvalidRequestError(f"input {i} has token ids outside the vocabulary [0, {enc.vocab_size})",
                                          "input")

    # -- engine thread ----------------------------------------------------------------------------------------
    def add(self, job: EncodeJob) -> None:
        queue = self.queues[job.model]
        job.order = next(self._arrivals)
        self.jobs[job.request_id] = job
        for index in range(len(job.inputs)):
            queue.append((job, index))

    def abort(self, request_id: str) -> EncodeJob | None:
        """Drop a request: its queued sequences are skipped when the next batch reaches them."""
        return self.jobs.pop(request_id, None)

    def expire(self, now: float) -> None:
        for job in [j for j in self.jobs.values() if j.deadline is not None and j.deadline <= now]:
            self.abort(job.request_id)
            job.sink(RequestTimeoutError("the request did not finish within its timeout"))

    def has_work(self) -> bool:
        return bool(self.jobs)

    def budget_for(self, seconds: float) -> int:
        """Tokens of a batch that takes about `seconds` (the slowest model's rate; the whole budget until a rate is
        measured). A batch always takes at least one sequence."""
        if not self.tokens_per_second:
            return self.max_batch_tokens
        return max(1, min(self.max_batch_tokens, int(min(self.tokens_per_second.values()) * seconds)))

    def _next_batch(self, max_tokens: int) -> tuple[str, list[tuple[EncodeJob, int]]]:
        for queue in self.queues.values():  # aborted requests' sequences are dropped here
            while queue and queue[0][0].request_id not in self.jobs:
                queue.popleft()
        waiting = [name for name, q in self.queues.items() if q]
        if not waiting:
            return "", []
        model = min(waiting, key=lambda name: self.queues[name][0][0].order)  # the oldest request's model first
        queue, batch, tokens = self.queues[model], [], 0
        while queue and len(batch) < self.max_batch_seqs:
            job, index = queue[0]
            if job.request_id not in self.jobs:
                queue.popleft()
                continue
            n = len(job.inputs[index])
            if batch and tokens + n > max_tokens:
                break
            batch.append(queue.popleft())
            tokens += n
        return model, batch

    def step(self, max_tokens: int | None = None) -> None:
        """Run one batch (at most `max_tokens` real tokens, default `max_batch_tokens`, but at least one sequence)
        and answer the requests it completes."""
        if not any(self.queues.values()) or not self.jobs:
            return
        model, batch = self._next_batch(max_tokens or self.max_batch_tokens)
        if not batch:
            return
        enc = self.encoders[model]
        started = time.perf_counter()
        try:
            rows = self.run_batch(enc, [job.inputs[index] for job, index in batch])
        except Exception as exc:  # a failing forward pass fails its requests, not the engine
            log.exception("encoder batch failed; failing its requests")
            error = InternalEngineError(f"internal error: {type(exc).__name__}: {exc}")
            for job in {id(j): j for j, _ in batch}.values():
                if self.abort(job.request_id) is not None:
                    job.sink(error)
            return
        tokens = sum(len(job.inputs[index]) for job, index in batch)
        stats = EncodeBatchStats(model, len(batch), tokens, time.perf_counter() - started)
        self.tokens_per_second[model] = moving_average(self.tokens_per_second.get(model),
                                                       tokens / max(stats.seconds, 1e-6))
        for observer in self.observers:
            observer(stats)
        for (job, index), row in zip(batch, rows):
            job.results[index] = row
            job.remaining -= 1
            if job.remaining == 0 and self.abort(job.request_id) is not None:
                job.sink(job.results)

    @staticmethod
    def run_batch(enc: LoadedEncoder, inputs: list[list[int]]) -> list[list[float]]:
        """One forward pass over token-id sequences (padded to the longest): one output row each."""
        length, pad = max(len(ids) for ids in inputs), enc.model.cfg.pad_token_id
        ids = torch.tensor([seq + [pad] * (length - len(seq)) for seq in inputs], dtype=torch.long)
        lengths = torch.tensor([len(seq) for seq in inputs], dtype=torch.long)
        with torch.inference_mode():
            out = enc.model(ids.to(enc.device), lengths.to(enc.device))
        return out.float().cpu().tolist()
