"""One engine step: schedule -> run the model -> sample -> append tokens -> free what finished. Text (detokenizing,
stop strings, deltas, prompt logprobs) is the output processor's job; the core only schedules and runs the model."""
from __future__ import annotations

import itertools
import logging
import time

from server.engine.block_manager import BlockManager
from server.engine.errors import InternalEngineError, InvalidRequestError
from server.engine.grammar import GRAMMAR_DEAD_END
from server.engine.hybrid_block_manager import HybridBlockManager
from server.engine.limits import RequestLimits, context_window
from server.engine.lora_registry import LoraRegistry
from server.engine.model_runner import ModelRunner, StepLogits
from server.engine.output_processor import OutputProcessor
from server.engine.outputs import EngineStats, RequestOutput, StepOutput, TokenLogprob
from server.engine.sampler import Sampler, SampleResult
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from server.engine.sequence import Sequence
from server.engine.settings import EngineSettings
from server.engine.speculation import Speculator, num_accepted
from server.model import LoadedModel, ModelConfig

log = logging.getLogger("loom.engine")


def attention_horizon(cfg: ModelConfig) -> int | None:
    """How far back any layer still reads: the largest sliding window when every layer has one, so that K/V older
    than that is never read again and its blocks can go back to the pool; None when some layer sees everything."""
    windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
    return None if not windows or None in windows else max(windows)


class EngineCore:
    def __init__(self, lm: LoadedModel, settings: EngineSettings | None = None):
        settings = self._step_defaults(settings or EngineSettings(), lm.device.type)
        self.lm, self.settings, self.tokenizer = lm, settings, lm.tokenizer
        self.max_model_len = context_window(settings.max_model_len, lm.config.max_model_len)
        self.runner = ModelRunner(lm, settings, self.max_model_len)
        pool = BlockManager(self.runner.num_blocks, settings.block_size, settings.enable_prefix_caching,
                            touch_fresh_last=lm.device.type == "cpu",  # lazily committed pool
                            window=attention_horizon(lm.config))
        layout = self.runner.layout
        self.block_manager = pool if layout is None else HybridBlockManager(pool, layout.group_window)
        self.scheduler = Scheduler(self.block_manager, settings.max_num_seqs, settings.max_num_batched_tokens,
                                   settings.max_prefill_chunk, settings.max_loras if settings.enable_lora else None)
        self.loras = LoraRegistry(self.runner.lora, getattr(lm.model, "shard_sizes", None))
        self.sampler = Sampler(settings.seed)
        self.speculator = Speculator(settings, self.max_model_len)
        self.processor = OutputProcessor(lm.tokenizer)
        capacity = (self.runner.num_blocks * settings.block_size if layout is None else
                    layout.max_tokens(self.runner.num_blocks, settings.block_size, settings.max_num_batched_tokens))
        self.limits = RequestLimits(self.max_model_len, capacity, lm.config.vocab_size)
        self.requests: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()
        self.prompt_tokens = self.generation_tokens = self.steps = 0
        self.prefilled_tokens = 0  # prompt tokens computed, chunk by chunk (the queue's drain rate)
        self.last_step_seqs = self.last_step_tokens = 0

    @staticmethod
    def _step_defaults(settings: EngineSettings, device_type: str) -> EngineSettings:
        """Fill the step limits left unset, by device. A CPU step's time and transient memory grow with its tokens:
        1,024 tokens keep a prefill step's RSS peak at +26-47 MiB for the default model (+48-66 at 2,048,
        `loadtests.step_memory`) at the same prompt tokens per second, and a 256-token share per sequence keeps a
        running stream's inter-token gap near 0.6 s while a long prompt prefills (~2 ms per prompt token on 2 cores;
        4.5 s with whole-budget chunks). A GPU step is nearly flat in tokens: 2,048-token steps, a whole budget's
        chunk."""
        cpu = device_type == "cpu"
        budget = settings.max_num_batched_tokens or (1024 if cpu else 2048)
        chunk = settings.max_prefill_chunk or (min(256, budget) if cpu else budget)
        return settings.model_copy(update={"max_num_batched_tokens": budget, "max_prefill_chunk": chunk})

    # -- requests -------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, max_tokens: int | None = None) -> None:
        """Queue a request. `max_tokens` is the value `limits.check` resolved, when the caller already checked."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        if params.lora is not None and not self.loras.enabled:
            raise InvalidRequestError("this engine serves no LoRA adapters (--enable-lora)", "model")
        if max_tokens is None:
            max_tokens = self.limits.check(prompt_token_ids, params)
        seqs: list[Sequence] = []
        try:
            for index in range(params.n):
                seq = Sequence(next(self._ids), request_id, index, list(prompt_token_ids), params, max_tokens,
                               priority=priority, priority_step=self.settings.priority_step_seconds,
                               group_leader=seqs[0] if seqs else None)
                seqs.append(seq)
                self.processor.add(seq)
                self.scheduler.add(seq)
        except BaseException:  # all or nothing: a request that fails half-added would leak its sequences' state
            for seq in seqs:
                self.scheduler.finish(seq, "abort")
                self.processor.discard(seq)
            raise
        self.requests[request_id] = seqs

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Finish a request's unfinished sequences ("abort") and free their blocks; returns their last deltas."""
        outputs = []
        for seq in self.requests.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                outputs.append(self.processor.output(seq))
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def num_waiting_seqs(self) -> int:
        return len(self.scheduler.waiting)

    def num_unprefilled_tokens(self) -> int:
        """Prompt tokens not yet prefilled: of waiting sequences and of running ones still in chunked prefill."""
        waiting = sum(s.num_tokens - s.num_computed_tokens for s in self.scheduler.waiting)
        return waiting + sum(max(s.num_prompt_tokens - s.num_computed_tokens, 0) for s in self.scheduler.running)

    # -- the step -------------------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        sched = self.scheduler.schedule(self._drafts())
        if sched.is_empty:
            return StepOutput()
        self.steps += 1
        self.last_step_seqs, self.last_step_tokens = len(sched.prefills) + len(sched.decodes), sched.num_tokens
        context = sum(item.seq.num_tokens for item in sched.decodes) // max(len(sched.decodes), 1)
        try:
            started = time.perf_counter()
            out = self._process(sched, self.runner.run(sched))
            if not sched.prefills:  # what a decode step of this many rows costs: speculation's `auto` weighs it
                self.speculator.times.observe(sched.num_tokens, context, time.perf_counter() - started)
            return out
        except Exception as exc:  # a failing forward pass fails its requests, not the engine
            log.exception("engine step failed; failing its requests")
            error = InternalEngineError(f"internal error: {type(exc).__name__}: {exc}")
            request_ids = {s.seq.request_id for s in sched.prefills + sched.decodes}
            for request_id in request_ids:
                self.abort(request_id)
            return StepOutput(failed=dict.fromkeys(request_ids, error))

    def _drafts(self) -> dict[int, list[int]]:
        """This step's draft tokens by seq_id; a failure to propose costs the speculation, never the step."""
        try:
            return self.speculator.propose(self.scheduler.running)
        except Exception:  # noqa: BLE001 - drafts are an optimisation: decode without them
            log.exception("proposing draft tokens failed; decoding without them")
            return {}

    def _process(self, sched: SchedulerOutput, step: StepLogits) -> StepOutput:
        items = sched.prefills + sched.decodes
        for item in items:
            seq = item.seq
            if seq.seq_id in step.prompt_rows:
                row, count, position = step.prompt_rows[seq.seq_id]
                self.processor.record_prompt_logprobs(seq, step.logits[row:row + count], position)
            self.prefilled_tokens += max(min(item.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens), 0)
            if not item.draft_token_ids:  # a verified chunk's progress is known once its drafts are judged
                seq.num_computed_tokens += item.num_new_tokens
                self.block_manager.cache_full_blocks(seq)
        ready = [item for item in items if item.seq.seq_id in step.sample_rows]
        finished = [item.seq for item in ready if item.seq.max_tokens == 0]  # prompt scoring (echo, classify)
        for seq in finished:
            self.prompt_tokens += seq.num_prompt_tokens
            self.scheduler.finish(seq, "length")
        to_sample = [item for item in ready if item.seq.max_tokens > 0]
        outputs: list[RequestOutput] = []
        failed: dict[str, InternalEngineError] = {}
        for item, result in self._sample(step, to_sample, failed) if to_sample else ():
            seq = item.seq
            reason = self._advance(item, result, failed)
            if seq.request_id in failed:
                continue
            if reason:
                self.scheduler.finish(seq, reason)
                finished.append(seq)
            else:
                out = self.processor.output(seq)
                if out.token_ids or out.text:
                    outputs.append(out)
        for seq in finished:
            outputs.append(self.processor.output(seq))
            if all(s.is_finished for s in self.requests.get(seq.request_id, [])):
                self.requests.pop(seq.request_id, None)
        for request_id in failed:
            self.abort(request_id)
        for item in items:  # windowed models: what slid out of every layer's window goes back to the pool
            if not item.seq.is_finished:
                self.block_manager.release_behind_window(item.seq)
        return StepOutput([o for o in outputs if o.request_id not in failed], failed)

    def _sample(self, step: StepLogits, items: list[ScheduledSeq],
                failed: dict[str, InternalEngineError]) -> list[tuple[ScheduledSeq, SampleResult]]:
        """Sample the batch at once (a sequence verifying drafts has a row per position); if that fails, sample each
        sequence alone, so that only the sequences that cannot be sampled fail (their requests go into `failed`) and
        the rest of the batch carries on."""
        rows, seqs, drafts, spans = [], [], [], []
        for item in items:
            first, draft = step.sample_rows[item.seq.seq_id], item.draft_token_ids
            spans.append((len(rows), len(rows) + len(draft) + 1))
            rows.extend(range(first, first + len(draft) + 1))
            seqs.extend([item.seq] * (len(draft) + 1))
            drafts.extend([draft[:j] for j in range(len(draft) + 1)] if draft else [None])
        # a decode step's rows are all of the logits, in order: no [N, vocab] copy (0.55 ms at 32 x 49,152)
        logits = step.logits if rows == list(range(len(step.logits))) else step.logits[rows]
        speculating = len(rows) > len(items)
        try:
            result = self.sampler(logits, seqs, drafts) if speculating else self.sampler(logits, seqs)
            return [(item, result.rows(lo, hi)) for item, (lo, hi) in zip(items, spans)]
        except Exception:  # noqa: BLE001 - isolated below, sequence by sequence
            log.warning("batched sampling failed; sampling sequences one by one", exc_info=True)
        sampled = []
        for item, (lo, hi) in zip(items, spans):
            try:
                extra = (drafts[lo:hi],) if speculating else ()
                sampled.append((item, self.sampler(logits[lo:hi], seqs[lo:hi], *extra)))
            except Exception as exc:  # noqa: BLE001 - this sequence's own parameters broke sampling
                log.exception("sampling failed for one request", extra={"request_id": item.seq.request_id})
                failed[item.seq.request_id] = InternalEngineError(f"sampling failed: {type(exc).__name__}: {exc}")
        return [entry for entry in sampled if entry[0].seq.request_id not in failed]

    def _advance(self, item: ScheduledSeq, result: SampleResult, failed: dict[str, InternalEngineError]) -> str | None:
        """Append what the step gives `item.seq`: its sampled token, or its accepted drafts and the token after them,
        up to the first that finishes it. A verified sequence then keeps K/V and blocks for accepted tokens only, and
        a seeded one's generator resumes after the last row used. Returns the finish reason."""
        seq, draft = item.seq, item.draft_token_ids
        count = 1
        if draft:
            accepted = num_accepted(draft, result.token_ids)
            self.speculator.record(seq, len(draft), accepted)
            count = accepted + 1
        for i in range(count):
            reason = self._append(seq, result.token_ids[i], result.logprobs[i], failed)
            if reason or seq.request_id in failed:
                return reason
        if draft:
            seq.num_computed_tokens += count
            if result.generator_states and result.generator_states[count - 1] is not None:
                seq.generator.set_state(result.generator_states[count - 1])
            self.block_manager.release_uncomputed(seq)
            self.block_manager.cache_full_blocks(seq)
        return None

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None,
                failed: dict[str, InternalEngineError]) -> str | None:
        """One new token: counted, checked against the end conditions and the grammar, detokenized."""
        if seq.num_output_tokens == 0:
            self.prompt_tokens += seq.num_prompt_tokens
        self.generation_tokens += 1
        seq.token_ids.append(token)
        finish = self._token_finish(seq, token)
        if seq.grammar_state is not None:
            if not seq.grammar_state.accept(token):
                if not seq.grammar_state.dead_end:
                    failed[seq.request_id] = InternalEngineError(f"token {token} violates the request's grammar")
                    return None
                finish = GRAMMAR_DEAD_END  # nothing may follow: the answer ends here (the drawn token is not text)
            elif seq.grammar_state.terminated:  # the grammar is complete (its stop token accepted)
                finish = "stop"
        return self.processor.add_token(seq, token, logprob, finish)

    def _token_finish(self, seq: Sequence, token: int) -> str | None:
        """Does the token just appended end the sequence on its own (EOS, a stop token, no room left)?"""
        p = seq.params
        if (token in self.tokenizer.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        return EngineStats(running=len(s.running), waiting=len(s.waiting), kv_usage=bm.usage, num_blocks=bm.num_blocks,
                           free_blocks=bm.num_free_blocks, preemptions=s.num_preemptions,
                           prefix_hit_tokens=s.prefix_hit_tokens, prefix_query_tokens=s.prefix_query_tokens,
                           prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens, steps=self.steps,
                           block_size=bm.block_size, spec_draft_tokens=self.speculator.drafted,
                           spec_accepted_tokens=self.speculator.accepted)
