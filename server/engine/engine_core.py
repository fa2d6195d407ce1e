"""One engine step: schedule -> run the model -> sample -> append tokens -> free what finished. Text (detokenizing,
stop strings, deltas, prompt logprobs) is the output processor's job; the core only schedules and runs the model."""
from __future__ import annotations

import itertools
import logging

import torch

from server.engine.block_manager import BlockManager
from server.engine.errors import InternalEngineError, InvalidRequestError
from server.engine.limits import RequestLimits, context_window
from server.engine.model_runner import ModelRunner, StepLogits
from server.engine.output_processor import OutputProcessor
from server.engine.outputs import EngineStats, RequestOutput, StepOutput, TokenLogprob
from server.engine.sampler import Sampler
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.engine.sequence import Sequence
from server.engine.settings import EngineSettings
from server.model import LoadedModel

log = logging.getLogger("loom.engine")


class EngineCore:
    def __init__(self, lm: LoadedModel, settings: EngineSettings | None = None):
        settings = self._step_defaults(settings or EngineSettings(), lm.device.type)
        self.lm, self.settings, self.tokenizer = lm, settings, lm.tokenizer
        self.max_model_len = context_window(settings.max_model_len, lm.config.max_model_len)
        self.runner = ModelRunner(lm, settings, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, settings.block_size, settings.enable_prefix_caching,
                                          touch_fresh_last=lm.device.type == "cpu")  # lazily committed pool
        self.scheduler = Scheduler(self.block_manager, settings.max_num_seqs, settings.max_num_batched_tokens,
                                   settings.max_prefill_chunk)
        self.sampler = Sampler(settings.seed)
        self.processor = OutputProcessor(lm.tokenizer)
        self.limits = RequestLimits(self.max_model_len, self.runner.num_blocks * settings.block_size,
                                    lm.config.vocab_size)
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
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return StepOutput()
        self.steps += 1
        self.last_step_seqs, self.last_step_tokens = len(sched.prefills) + len(sched.decodes), sched.num_tokens
        try:
            return self._process(sched, self.runner.run(sched))
        except Exception as exc:  # a failing forward pass fails its requests, not the engine
            log.exception("engine step failed; failing its requests")
            error = InternalEngineError(f"internal error: {type(exc).__name__}: {exc}")
            request_ids = {s.seq.request_id for s in sched.prefills + sched.decodes}
            for request_id in request_ids:
                self.abort(request_id)
            return StepOutput(failed=dict.fromkeys(request_ids, error))

    def _process(self, sched: SchedulerOutput, step: StepLogits) -> StepOutput:
        items = sched.prefills + sched.decodes
        for item in items:
            seq = item.seq
            if seq.seq_id in step.prompt_rows:
                row, count, position = step.prompt_rows[seq.seq_id]
                self.processor.record_prompt_logprobs(seq, step.logits[row:row + count], position)
            self.prefilled_tokens += max(min(item.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens), 0)
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
        ready = [item.seq for item in items if item.seq.seq_id in step.sample_rows]
        finished = [s for s in ready if s.max_tokens == 0]  # prompt scoring only (echo / classification)
        for seq in finished:
            self.prompt_tokens += seq.num_prompt_tokens
            self.scheduler.finish(seq, "length")
        to_sample = [s for s in ready if s.max_tokens > 0]
        outputs: list[RequestOutput] = []
        failed: dict[str, InternalEngineError] = {}
        if to_sample:
            rows = [step.sample_rows[s.seq_id] for s in to_sample]
            # a decode step's rows are all of the logits, in order: no [N, vocab] copy (0.55 ms at 32 x 49,152)
            logits = step.logits if rows == list(range(len(step.logits))) else step.logits[rows]
            sampled = self._sample(logits, to_sample, failed)
            for seq, token, logprob in sampled:
                if seq.num_output_tokens == 0:
                    self.prompt_tokens += seq.num_prompt_tokens
                self.generation_tokens += 1
                seq.token_ids.append(token)
                finish = self._token_finish(seq, token)
                if seq.grammar_state is not None:
                    if not seq.grammar_state.accept(token):
                        failed[seq.request_id] = InternalEngineError(f"token {token} violates the request's grammar")
                        continue
                    if seq.grammar_state.terminated:  # the grammar is complete (its stop token accepted)
                        finish = "stop"
                reason = self.processor.add_token(seq, token, logprob, finish)
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
        return StepOutput([o for o in outputs if o.request_id not in failed], failed)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence],
                failed: dict[str, InternalEngineError]) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Sample the batch at once; if that fails, sample each sequence alone, so that only the sequences that
        cannot be sampled fail (their requests go into `failed`) and the rest of the batch carries on."""
        try:
            result = self.sampler(logits, seqs)
            return list(zip(seqs, result.token_ids, result.logprobs))
        except Exception:  # noqa: BLE001 - isolated below, row by row
            log.warning("batched sampling failed; sampling sequences one by one", exc_info=True)
        sampled = []
        for row, seq in enumerate(seqs):
            try:
                result = self.sampler(logits[row:row + 1], [seq])
                sampled.append((seq, result.token_ids[0], result.logprobs[0]))
            except Exception as exc:  # noqa: BLE001 - this sequence's own parameters broke sampling
                log.exception("sampling failed for one request", extra={"request_id": seq.request_id})
                failed[seq.request_id] = InternalEngineError(f"sampling failed: {type(exc).__name__}: {exc}")
        return [item for item in sampled if item[0].request_id not in failed]

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
                           block_size=bm.block_size)
