"""One engine step: schedule -> build the flat batch -> forward -> sample -> append, detokenize, stop -> free."""
from __future__ import annotations

import itertools
import logging

import torch

from server.engine.block_manager import BlockManager
from server.engine.model_runner import ModelRunner, StepLogits
from server.engine.outputs import EngineStats, RequestOutput
from server.engine.sampler import Sampler, gather_logprobs
from server.engine.sampling_params import InvalidRequestError, SamplingParams
from server.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from server.engine.sequence import Sequence
from server.engine.settings import EngineSettings
from server.model import IncrementalDetokenizer, LoadedModel

log = logging.getLogger("loom.engine")


class EngineCore:
    def __init__(self, lm: LoadedModel, settings: EngineSettings | None = None):
        settings = settings or EngineSettings()
        self.lm, self.settings, self.tokenizer = lm, settings, lm.tokenizer
        self.runner = ModelRunner(lm, settings)
        self.block_manager = BlockManager(self.runner.num_blocks, settings.block_size, settings.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, settings.max_num_seqs, settings.max_num_batched_tokens)
        self.sampler = Sampler(settings.seed)
        self.max_model_len = min(settings.max_model_len or lm.config.max_model_len, lm.config.max_model_len)
        self.capacity = self.runner.num_blocks * settings.block_size
        self.requests: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()
        self.prompt_tokens = self.generation_tokens = self.steps = 0
        self.last_step_seqs = self.last_step_tokens = 0

    # -- requests -------------------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Validate a request against the model and cache; returns its resolved max_tokens."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty: it must contain at least one token", "prompt")
        vocab = self.lm.config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        limit = min(self.max_model_len, self.capacity)
        if n >= limit:
            raise InvalidRequestError(f"This model's maximum context length is {limit} tokens, but the prompt has "
                                      f"{n} tokens", "prompt")
        max_tokens = limit - n if params.max_tokens is None else params.max_tokens
        if n + max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens, but {n} prompt tokens + max_tokens "
                f"{max_tokens} = {n + max_tokens} tokens were requested; lower max_tokens or shorten the prompt",
                "max_tokens")
        if max_tokens == 0 and params.prompt_logprobs is None:
            raise InvalidRequestError("max_tokens 0 generates nothing; it is only useful with prompt logprobs (echo)",
                                      "max_tokens")
        return max_tokens

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        max_tokens = self.check_request(prompt_token_ids, params)
        seqs: list[Sequence] = []
        for index in range(params.n):
            seq = Sequence(next(self._ids), request_id, index, list(prompt_token_ids), params, max_tokens,
                           IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                           priority=priority, group_leader=seqs[0] if seqs else None)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> list[RequestOutput]:
        outputs = []
        for seq in self.requests.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, reason)
                outputs.append(self._output(seq, error=error))
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        self.steps += 1
        self.last_step_seqs, self.last_step_tokens = len(sched.prefills) + len(sched.decodes), sched.num_tokens
        try:
            step = self.runner.run(sched)
            return self._process(sched, step)
        except Exception as exc:  # a failing step fails its requests, not the engine
            log.exception("engine step failed; failing its requests")
            request_ids = {s.seq.request_id for s in sched.prefills + sched.decodes}
            return [out for rid in request_ids for out in self.abort(rid, "error", f"internal error: {exc}")]

    def _process(self, sched: SchedulerOutput, step: StepLogits) -> list[RequestOutput]:
        items: list[ScheduledSeq] = sched.prefills + sched.decodes
        for item in items:
            seq = item.seq
            if seq.seq_id in step.prompt_rows:
                self._record_prompt_logprobs(seq, item, step)
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
        to_sample = [i.seq for i in items if i.seq.seq_id in step.sample_rows and i.seq.max_tokens > 0]
        outputs: list[RequestOutput] = []
        finished = [i.seq for i in items if i.seq.seq_id in step.sample_rows and i.seq.max_tokens == 0]
        for seq in finished:  # prompt scoring only (echo / classification)
            self.prompt_tokens += seq.num_prompt_tokens
            self._finish(seq, "length")
        if to_sample:
            rows = [step.sample_rows[s.seq_id] for s in to_sample]
            result = self.sampler(step.logits[rows], to_sample)
            for seq, token, lp in zip(to_sample, result.token_ids, result.logprobs):
                if seq.num_output_tokens == 0:
                    self.prompt_tokens += seq.num_prompt_tokens
                self.generation_tokens += 1
                reason = self._append(seq, token, lp)
                if reason:
                    self._finish(seq, reason)
                    finished.append(seq)
                else:
                    out = self._output(seq)
                    if out.token_ids or out.text:
                        outputs.append(out)
        for seq in finished:
            outputs.append(self._output(seq))
            siblings = self.requests.get(seq.request_id, [])
            if all(s.is_finished for s in siblings):
                self.requests.pop(seq.request_id, None)
        return outputs

    def _record_prompt_logprobs(self, seq: Sequence, item: ScheduledSeq, step: StepLogits) -> None:
        """Row `start + i` of this chunk predicts prompt token `start + i + 1`. Tokens served by the prefix cache
        (and the first token, which nothing predicts) get None; rows recorded before a preemption are skipped."""
        first, count = step.prompt_rows[seq.seq_id]
        start = seq.num_computed_tokens
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.extend([None] * (start + 1))
        lo = len(seq.prompt_logprobs) - 1 - start
        hi = min(count, seq.num_prompt_tokens - 1 - start)  # the last prompt row predicts a generated token
        if hi <= lo:
            return
        targets = torch.tensor(seq.token_ids[start + 1 + lo:start + 1 + hi])
        logprobs = step.logits[first + lo:first + hi].log_softmax(-1)
        seq.prompt_logprobs.extend(gather_logprobs(logprobs, targets, [seq.params.prompt_logprobs] * (hi - lo)))

    def _append(self, seq: Sequence, token: int, logprob) -> str | None:
        """Add a sampled token; returns the finish reason if it ends the sequence."""
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        p = seq.params
        if (token in self.tokenizer.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.text += seq.detokenizer.flush()
            return "stop"
        delta = seq.detokenizer.add(token)
        if delta:
            seq.text += delta
            if p.stop and self._truncate_at_stop(seq, len(delta)):
                return "stop"
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.text += seq.detokenizer.flush()
            return "length"
        return None

    @staticmethod
    def _truncate_at_stop(seq: Sequence, delta_len: int) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(len(seq.text) - delta_len - longest + 1, 0)
        hits = [(i, s) for s in seq.params.stop if (i := seq.text.find(s, search_from)) != -1]
        if not hits:
            return False
        index, stop = min(hits)
        seq.text = seq.text[:index + (len(stop) if seq.params.include_stop_str_in_output else 0)]
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)

    def _output(self, seq: Sequence, error: str | None = None) -> RequestOutput:
        hold = 0
        if seq.params.stop and not seq.is_finished:  # a stop string may be starting at the end of the text
            hold = max(len(s) for s in seq.params.stop) - 1
        text_end = max(len(seq.text) - hold, seq.emitted_text_len)
        num_out = seq.num_output_tokens
        out = RequestOutput(
            request_id=seq.request_id, index=seq.index, token_ids=seq.output_token_ids[seq.emitted_tokens:],
            text=seq.text[seq.emitted_text_len:text_end], logprobs=seq.logprobs[seq.emitted_tokens:],
            prompt_logprobs=seq.prompt_logprobs if seq.emitted_tokens == 0 and seq.params.prompt_logprobs is not None
            else None, finish_reason=seq.finish_reason if seq.is_finished else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=num_out,
            num_cached_tokens=seq.num_cached_tokens, error=error,
            queue_time=seq.first_scheduled_time - seq.arrival_time
            if seq.emitted_tokens == 0 and seq.first_scheduled_time is not None else None)
        seq.emitted_tokens, seq.emitted_text_len = num_out, text_end
        return out

    def stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        return EngineStats(running=len(s.running), waiting=len(s.waiting), kv_usage=bm.usage, num_blocks=bm.num_blocks,
                           free_blocks=bm.num_free_blocks, preemptions=s.num_preemptions,
                           prefix_hit_tokens=s.prefix_hit_tokens, prefix_query_tokens=s.prefix_query_tokens,
                           prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens, steps=self.steps)
