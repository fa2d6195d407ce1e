"""Speculative decoding: which decoding sequences verify which draft tokens this step, and how their drafts fared.

Drafts come from n-gram prompt lookup (ngram_proposer.py) and are verified inside the step's one forward pass: a
sequence with k drafts runs k + 1 decode rows (its last token, then the drafts, each attending up to itself), and
the sampler draws a token at every row from the target distribution given everything before that row
(the earlier drafts included: grammar masks, penalties). Drafts are accepted up to the first one that differs from
the token drawn at its row; that drawn token, or the one after the last draft when all match, is emitted too. For a
draft that is one fixed token this is the standard acceptance rule: P(draw == draft) = p(draft), and a draw that
differs is distributed as p without the draft, renormalised (max(0, p - q) with q one-hot). So every emitted token
is exactly a draw from the distribution decoding without speculation samples, and a seeded sequence draws the very
same tokens (its generator is rolled back past the rows it did not use).

`auto` speculates where measurements say it pays: `StepTimes` learns what a decode step of R rows costs here from the
steps that run. A draft position is worth its row when its estimated acceptance probability exceeds the row's cost
in decode tokens; the step speculates only if the expected extra tokens outweigh the extra time. Shapes never seen
are explored (a plain step to time the batch, drafts in full to time the rows), and a refusal is re-tested now and
then as load changes. A sequence whose drafts keep failing backs off for doubling spells."""
from __future__ import annotations

from server.engine.ngram_proposer import NgramIndex
from server.engine.sequence import Sequence
from server.engine.settings import EngineSettings
from server.engine.spec_state import SpecState
from server.engine.step_times import StepTimes

RETRY = 64  # every this many steps refused for cost, `auto` verifies the drafts anyway to re-time their rows


def num_accepted(draft: list[int], sampled: list[int]) -> int:
    """Drafts accepted: those before the first that differs from the token sampled at its row."""
    n = 0
    while n < len(draft) and sampled[n] == draft[n]:
        n += 1
    return n


class Speculator:
    """Proposes each step's drafts and keeps the tally; `times` is fed by the engine with every decode step."""

    def __init__(self, settings: EngineSettings, max_model_len: int):
        self.mode, self.k = settings.speculative, settings.num_speculative_tokens
        self.min_n, self.max_n = settings.ngram_min, settings.ngram_max
        self.max_model_len = max_model_len
        self.times = StepTimes()
        self.refusals = 0  # steps `auto` kept from speculating for cost (every RETRY-th explores again)
        self.drafted = self.accepted = 0

    def propose(self, running: list[Sequence]) -> dict[int, list[int]]:
        """Draft tokens by seq_id for the running sequences that decode this step."""
        if self.mode == "none":
            return {}
        decoding = [s for s in running if s.num_output_tokens > 0 and s.num_computed_tokens == s.num_tokens - 1]
        drafts: dict[int, list[int]] = {}
        states: dict[int, SpecState] = {}
        for seq in decoding:
            limit = min(self.k, seq.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens)
            if limit <= 0:
                continue
            if seq.spec is None:
                seq.spec = SpecState(NgramIndex(self.min_n, self.max_n))
            if seq.spec.pause:
                seq.spec.pause -= 1
                continue
            draft = seq.spec.index.propose(seq.token_ids, limit)
            if draft:
                drafts[seq.seq_id], states[seq.seq_id] = draft, seq.spec
        if self.mode == "auto" and drafts:
            context = sum(s.num_tokens for s in decoding) // len(decoding)
            return self._worthwhile(drafts, states, len(decoding), context)
        return drafts

    def _worthwhile(self, drafts: dict[int, list[int]], states: dict[int, SpecState], batch: int,
                    context: int) -> dict[int, list[int]]:
        """Each draft cut to the positions whose chance of acceptance pays for their row; {} unless the step pays."""
        base = self.times.estimate(batch, context)
        if base is None:
            return {}  # time a plain step of this batch first
        full = self.times.estimate(batch + sum(map(len, drafts.values())), context)
        if full is None:
            return drafts  # time these rows
        threshold = batch * max(full - base, 0.0) / sum(map(len, drafts.values())) / base
        kept, gain, rows = {}, 0.0, 0
        for seq_id, draft in drafts.items():
            state = states[seq_id]
            n, p = 0, 1.0
            while n < len(draft) and p * state.acceptance > threshold:
                n, p = n + 1, p * state.acceptance
                gain += p
            if n == 0:
                state.back_off()
                continue
            kept[seq_id], rows = draft[:n], rows + n
        if kept and (batch + gain) * base > batch * self.times.estimate(batch + rows, context):
            return kept
        self.refusals += 1
        return drafts if self.refusals % RETRY == 0 else {}

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if seq.spec is not None:
            seq.spec.record(drafted, accepted)
