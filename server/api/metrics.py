"""Prometheus metrics (prefix `loom_`), one CollectorRegistry per app so several apps can live in one process.

Requests, their tokens and latencies are counted here, per request, from the deltas the engine streams back, under
a `model` label: the served name the request asked for (the base model's, a LoRA adapter's, a --models-dir model's),
so its values stay among the names the server knows (an unknown model is a 404 before any engine work). Engine-wide
counters and gauges (preemptions, prefix-cache hits, running / waiting, KV usage) are read from `engine.stats()` at
scrape time.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine import AsyncEngine, EncodeBatchStats, EngineStats, RequestOutput, StepStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 240.0, 480.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512)


class EngineCollector(Collector):
    """Engine-wide numbers, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        if s is None:  # the model is still loading
            return
        gauges = [("loom_num_requests_running", "sequences in the running batch", s.running),
                  ("loom_num_requests_waiting", "sequences waiting to be scheduled", s.waiting),
                  ("loom_kv_cache_usage_ratio", "fraction of KV-cache blocks in use (0..1)", s.kv_usage),
                  ("loom_kv_cache_blocks", "KV-cache blocks in the pool", s.num_blocks),
                  ("loom_kv_cache_free_blocks", "KV-cache blocks free (cached prefixes included)", s.free_blocks),
                  ("loom_engine_healthy", "1 while the engine loop runs", int(s.healthy))]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        # An info gauge in vLLM's label format, which the inference gateway's endpoint picker reads for the prompt
        # block size of its prefix-affinity scoring (deploy/k8s/inference-gateway): "gpu" is its name, not ours.
        info = GaugeMetricFamily("loom_cache_config_info", "KV-cache geometry (value 1; labels carry it)",
                                 labels=["block_size", "num_gpu_blocks"])
        info.add_metric([str(s.block_size), str(s.num_blocks)], 1)
        yield info
        counters = [("loom_preemptions", "sequences preempted for lack of KV blocks", s.preemptions),
                    ("loom_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache", s.prefix_hit_tokens),
                    ("loom_prefix_cache_query_tokens", "prompt tokens looked up in the prefix cache",
                     s.prefix_query_tokens),
                    ("loom_engine_steps", "engine steps run", s.steps),
                    ("loom_spec_decode_draft_tokens", "speculative draft tokens verified", s.spec_draft_tokens),
                    ("loom_spec_decode_accepted_tokens", "speculative draft tokens accepted", s.spec_accepted_tokens)]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        rate = s.spec_accepted_tokens / s.spec_draft_tokens if s.spec_draft_tokens else 0.0
        yield GaugeMetricFamily("loom_spec_decode_acceptance_ratio", "accepted / verified draft tokens (0..1)",
                                value=rate)


class Metrics:
    def __init__(self) -> None:
        self._engine: AsyncEngine | None = None
        disable_created_metrics()  # no `*_created` series: they double the output and nobody graphs them
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loom_requests", "finished sequences by endpoint, finish reason and model",
                                ["endpoint", "finish_reason", "model"], registry=r)
        self.errors = Counter("loom_request_errors", "requests answered with an error, by status", ["status"],
                              registry=r)
        self.prompt_tokens = Counter("loom_prompt_tokens", "prompt tokens processed (each sequence's prompt once)",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("loom_generation_tokens", "tokens generated", ["model"], registry=r)
        self.ttft = Histogram("loom_time_to_first_token_seconds", "request start to its first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loom_time_per_output_token_seconds", "mean time per token after the first, per sequence",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loom_inter_token_latency_seconds", "time between successive tokens of a sequence",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loom_e2e_request_latency_seconds", "request start to its last token", ["model"],
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("loom_request_queue_time_seconds", "time a request waited before it was scheduled",
                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("loom_batch_size", "sequences per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.step_tokens = Histogram("loom_step_tokens", "tokens per engine step",
                                     buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), registry=r)
        self.step_time = Histogram("loom_step_duration_seconds", "wall time of one engine step",
                                   buckets=LATENCY_BUCKETS, registry=r)
        # encoder models (embeddings, rerank, score, classifier heads), per model
        self.enc_requests = Counter("loom_encoder_requests", "encoder requests by model, endpoint and outcome",
                                    ["model", "endpoint", "outcome"], registry=r)
        self.enc_tokens = Counter("loom_encoder_tokens", "input tokens of encoder requests", ["model"], registry=r)
        self.enc_latency = Histogram("loom_encoder_request_latency_seconds", "encoder request start to its answer",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.enc_batch = Histogram("loom_encoder_batch_size", "sequences per encoder batch", ["model"],
                                   buckets=BATCH_BUCKETS, registry=r)
        self.enc_batch_tokens = Histogram("loom_encoder_batch_tokens", "tokens per encoder batch", ["model"],
                                          buckets=(8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), registry=r)
        self.enc_batch_time = Histogram("loom_encoder_batch_duration_seconds", "wall time of one encoder batch",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(lambda: self._engine.stats() if self._engine is not None else None))

    def watch(self, engine: AsyncEngine) -> None:
        """Export `engine`'s stats at scrape time and observe each of its steps."""
        self._engine = engine
        engine.add_step_observer(self.observe_step)
        engine.add_encode_observer(self.observe_encode_batch)

    def observe_encode_batch(self, batch: EncodeBatchStats) -> None:
        """Runs on the engine thread after each encoder batch."""
        self.enc_batch.labels(batch.model).observe(batch.num_seqs)
        self.enc_batch_tokens.labels(batch.model).observe(batch.num_tokens)
        self.enc_batch_time.labels(batch.model).observe(batch.seconds)

    def observe_encode(self, model: str, endpoint: str, outcome: str, tokens: int, seconds: float) -> None:
        self.enc_requests.labels(model, endpoint, outcome).inc()
        if outcome == "ok":
            self.enc_tokens.labels(model).inc(tokens)
            self.enc_latency.labels(model).observe(seconds)

    def observe_step(self, step: StepStats) -> None:
        """Runs on the engine thread after each step (prometheus-client is thread-safe)."""
        self.batch.observe(step.num_seqs)
        self.step_tokens.observe(step.num_tokens)
        self.step_time.observe(step.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, endpoint: str, model: str) -> RequestTimer:
        return RequestTimer(self, endpoint, model)


class RequestTimer:
    """Latencies and tokens of one engine request (all its n sequences) for the served name `model`, fed with every
    delta it yields."""

    def __init__(self, metrics: Metrics, endpoint: str, model: str):
        self.endpoint, self.model = endpoint, model
        m = metrics
        self.requests, self.prompt_tokens, self.generation_tokens = m.requests, m.prompt_tokens.labels(model), \
            m.generation_tokens.labels(model)
        self.ttft, self.tpot, self.itl, self.e2e, self.queue = (h.labels(model) for h in (m.ttft, m.tpot, m.itl,
                                                                                           m.e2e, m.queue))
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.seq_first: dict[int, float] = {}
        self.seq_last: dict[int, float] = {}
        self.queued_observed = False
        self.prompted: set[int] = set()  # sequences whose prompt is counted
        self.finished: set[int] = set()

    def observe(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        queue_time = getattr(out, "queue_time", None)  # when the engine reports it
        if queue_time is not None and not self.queued_observed:
            self.queue.observe(queue_time)
            self.queued_observed = True
        scored = out.finished and out.num_output_tokens == 0 and out.finish_reason == "length"  # max_tokens=0
        if (out.token_ids or scored) and out.index not in self.prompted:  # as the engine counts: once it ran
            self.prompted.add(out.index)
            self.prompt_tokens.inc(out.num_prompt_tokens)
        if out.token_ids:
            self.generation_tokens.inc(len(out.token_ids))
            if self.first_token is None:
                self.first_token = now
                self.ttft.observe(now - self.start)
            last = self.seq_last.get(out.index)
            if last is not None:
                self.itl.observe((now - last) / len(out.token_ids))
            else:
                self.seq_first[out.index] = now
            self.seq_last[out.index] = now
        if out.finished:
            self.finished.add(out.index)
            self.requests.labels(self.endpoint, out.finish_reason, self.model).inc()
            first = self.seq_first.get(out.index)
            if first is not None and out.num_output_tokens > 1:
                self.tpot.observe((now - first) / (out.num_output_tokens - 1))

    def done(self) -> None:
        self.e2e.observe(time.perf_counter() - self.start)

    def abandoned(self, n: int, reason: str = "abort") -> None:
        """The request ended early: the caller stopped listening (client gone, shutdown: "abort") or its deadline
        passed ("timeout"). Its unfinished sequences count with that finish reason."""
        for index in range(n):
            if index not in self.finished:
                self.finished.add(index)
                self.requests.labels(self.endpoint, reason, self.model).inc()
