"""Output processing, kept apart from the step loop as vLLM v1 keeps it: incremental detokenization, stop strings,
the prompt's logprobs, and the `RequestOutput` deltas handed back after each step. The engine core tells it which
tokens each sequence got; it owns every sequence's text."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.grammar import GRAMMAR_DEAD_END
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.sampler import gather_logprobs
from server.engine.sequence import Sequence
from server.model import IncrementalDetokenizer, Tokenizer


@dataclass
class SequenceText:
    """What the client has of one sequence: its text (stop strings trimmed) and how much of it went out."""
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted_text_len: int = 0
    emitted_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[int, SequenceText] = {}  # seq_id -> its text

    def add(self, seq: Sequence) -> None:
        self.states[seq.seq_id] = SequenceText(
            IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, seq.params.skip_special_tokens))

    def discard(self, seq: Sequence) -> None:
        """Forget a sequence that never ran (its request failed while being added)."""
        self.states.pop(seq.seq_id, None)

    def record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, position: int) -> None:
        """`logits` are this step's rows for `seq`'s prompt from `position` on: row i predicts prompt token
        position + i + 1. Tokens without a row (served by the prefix cache, before `prompt_logprobs_start`, and the
        first token, which nothing predicts) get None; rows recorded before a preemption are not recorded twice."""
        state = self.states[seq.seq_id]
        if len(state.prompt_logprobs) < position + 1:
            state.prompt_logprobs.extend([None] * (position + 1 - len(state.prompt_logprobs)))
        lo = len(state.prompt_logprobs) - 1 - position
        hi = min(len(logits), seq.num_prompt_tokens - 1 - position)  # the last prompt row predicts a generated token
        if hi <= lo:
            return
        targets = torch.tensor(seq.token_ids[position + 1 + lo:position + 1 + hi])
        logprobs = logits[lo:hi].log_softmax(-1)
        state.prompt_logprobs.extend(gather_logprobs(logprobs, targets, [seq.params.prompt_logprobs] * (hi - lo)))

    def add_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None, finish: str | None) -> str | None:
        """Detokenize `seq`'s newest token. `finish` is the core's verdict on the token alone (EOS: "stop", out of
        room: "length"); a stop string in the text also finishes the sequence. Returns the finish reason."""
        state = self.states[seq.seq_id]
        if logprob is not None:
            state.logprobs.append(logprob)
        if finish in ("stop", GRAMMAR_DEAD_END):  # EOS, a stop token, a token past a dead end: not answer text
            state.text += state.detokenizer.flush()
            return finish
        delta = state.detokenizer.add(token)
        if delta:
            state.text += delta
            if seq.params.stop and self._truncate_at_stop(seq, state, len(delta)):
                return "stop"
        if finish is not None:
            state.text += state.detokenizer.flush()
        return finish

    @staticmethod
    def _truncate_at_stop(seq: Sequence, state: SequenceText, delta_len: int) -> bool:
        stops = seq.params.stop
        search_from = max(len(state.text) - delta_len - max(map(len, stops)) + 1, 0)
        hits = [(i, s) for s in stops if (i := state.text.find(s, search_from)) != -1]
        if not hits:
            return False
        index, stop = min(hits)
        state.text = state.text[:index + (len(stop) if seq.params.include_stop_str_in_output else 0)]
        return True

    def output(self, seq: Sequence) -> RequestOutput:
        """The delta of `seq` since its last output. Text that may be the start of a stop string is held back until
        the sequence finishes. A finished sequence's state is dropped."""
        state = self.states[seq.seq_id]
        hold = max(map(len, seq.params.stop)) - 1 if seq.params.stop and not seq.is_finished else 0
        text_end = max(len(state.text) - hold, state.emitted_text_len)
        num_out = seq.num_output_tokens
        first = state.emitted_tokens == 0
        out = RequestOutput(
            request_id=seq.request_id, index=seq.index, token_ids=seq.output_token_ids[state.emitted_tokens:],
            text=state.text[state.emitted_text_len:text_end], logprobs=state.logprobs[state.emitted_tokens:],
            prompt_logprobs=state.prompt_logprobs if first and seq.params.prompt_logprobs is not None else None,
            finish_reason=seq.finish_reason if seq.is_finished else None, num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=num_out, num_cached_tokens=seq.num_cached_tokens,
            queue_time=seq.first_scheduled_time - seq.arrival_time
            if first and seq.first_scheduled_time is not None else None)
        state.emitted_tokens, state.emitted_text_len = num_out, text_end
        if seq.is_finished:
            del self.states[seq.seq_id]
        return out
