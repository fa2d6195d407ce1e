"""Structured output: grammars compiled by xgrammar, one matcher per constrained sequence, and the batch's
allowed-token bitmask applied to the logits in one vectorized call.

A `GrammarSpec` says what to enforce (a JSON schema, any JSON object, a regex, a choice of strings, an EBNF grammar,
or an xgrammar structural tag, which tool calling uses). `GrammarCompiler` (server/engine/grammar_compiler.py) turns
a spec into a `Grammar` once, off the engine thread. The compiled `Grammar` travels in `SamplingParams`; the engine
core only asks each sequence's `GrammarState` for its mask and advances it with the tokens it accepts. A grammar can
reach a state that allows no token at all (a dead end: e.g. the regex `a[^\\s\\S]` after its `a`); the sequence
then finishes with the finish reason `GRAMMAR_DEAD_END` instead of failing."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import torch

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "structural_tag"]
GRAMMAR_DEAD_END = "grammar_dead_end"  # the finish reason of a sequence whose grammar allows no further token


@dataclass(frozen=True)
class GrammarSpec:
    """What to enforce. `value` is canonical text (a schema or a choice list as JSON, a regex, EBNF), so equal specs
    hash equal and share one compiled grammar."""
    kind: Kind
    value: str = ""

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:  # key order kept: it is the order properties are generated in
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def choice(cls, options: list[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def structural_tag(cls, tag: dict) -> GrammarSpec:
        return cls("structural_tag", json.dumps(tag, separators=(",", ":"), ensure_ascii=False))


class Grammar:
    """A compiled grammar, immutable and shared by every request (and every sequence) that uses its spec."""

    def __init__(self, spec: GrammarSpec, compiled: Any, compile_seconds: float):
        self.spec, self.compiled, self.compile_seconds = spec, compiled, compile_seconds

    def new_state(self) -> GrammarState:
        return GrammarState(self)

    def __repr__(self) -> str:
        return f"Grammar({self.spec.kind}, {self.spec.value[:60]!r})"


class GrammarState:
    """One sequence's position in its grammar. `num_accepted` output tokens have been fed to the matcher; `sync`
    replays any the matcher has not seen (a state built anew for a recomputed or resumed sequence catches up)."""

    def __init__(self, grammar: Grammar):
        import xgrammar as xgr
        self.grammar = grammar
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        self.num_accepted = 0

    def sync(self, output_token_ids: list[int]) -> None:
        for token in output_token_ids[self.num_accepted:]:
            self.accept(token)

    def accept(self, token: int) -> bool:
        """Advance by one token; False if the grammar does not allow it (the state is unchanged then)."""
        if self.matcher.is_terminated() or not self.matcher.accept_token(token):
            return False
        self.num_accepted += 1
        return True

    @property
    def vocab_size(self) -> int:
        """Tokens the grammar's bitmask covers (the model's output width, padding included)."""
        return self.grammar.compiled.tokenizer_info.vocab_size

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token accepted: nothing more may be generated."""
        return self.matcher.is_terminated()

    @property
    def dead_end(self) -> bool:
        """No token, not even a stop token, may come next: the grammar cannot be completed from here."""
        import xgrammar as xgr
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(bitmask)
        return not self.matcher.is_terminated() and not bool(bitmask.any())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def fill_after(self, bitmask: torch.Tensor, row: int, drafts: list[int]) -> None:
        """Fill `row` with the mask that follows `drafts` (speculative tokens), then roll the matcher back. A row the
        drafts cannot reach (one is refused, or the grammar ends before them) allows every token: the row's draw is
        never used, since verification stops at the refused draft."""
        accepted = 0
        for token in drafts:
            if self.matcher.is_terminated() or not self.matcher.accept_token(token):
                break
            accepted += 1
        if accepted == len(drafts) and not self.matcher.is_terminated():
            self.matcher.fill_next_token_bitmask(bitmask, row)
        else:
            bitmask[row] = -1
        if accepted:
            self.matcher.rollback(accepted)


def apply_grammar_masks(logits: torch.Tensor, states: list[GrammarState | None]) -> torch.Tensor:
    """Set to -inf every logit that a row's grammar forbids, for all constrained rows at once. Rows without a state
    are left alone. Columns beyond the grammar's vocabulary (padding of the model's output layer) are forbidden."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return logits
    import xgrammar as xgr
    vocab = logits.shape[1]
    covered = states[rows[0]].vocab_size
    bitmask = xgr.allocate_token_bitmask(len(states), covered)
    for row in rows:
        states[row].fill(bitmask, row)
    logits = logits.clone()
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(vocab, covered), indices=rows)
    if vocab > covered:
        logits[rows, covered:] = float("-inf")
    return logits
