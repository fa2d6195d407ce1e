"""Vectorized sampling over a batch of logits rows: penalties, temperature, top-k / top-p / min-p, seeded draws,
logprobs. Each row carries its own parameters; there is no per-row loop over the vocabulary.

A row may also sit after draft tokens being verified (speculation.py): its grammar mask and penalties then see the
sequence's tokens followed by those drafts, and a seeded sequence's rows draw their noise from its generator in
order, one row per position, as decoding without drafts would."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loom_kernels import argmax_rows
from server.engine.grammar import GrammarState, apply_grammar_masks
from server.engine.outputs import TokenLogprob
from server.engine.sequence import Sequence

MIN_TOP_P = 1e-6


Drafts = list[list[int] | None]  # per row: the draft tokens between the sequence's tokens and the row, or None


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    # per row after drafts, of a seeded sequence: its generator's state once the row drew (to roll back to)
    generator_states: list[torch.Tensor | None] | None = None

    def rows(self, lo: int, hi: int) -> SampleResult:
        states = self.generator_states[lo:hi] if self.generator_states is not None else None
        return SampleResult(self.token_ids[lo:hi], self.logprobs[lo:hi], states)


@dataclass
class _Lookahead:
    """A grammar state as seen from a row after draft tokens: fills the mask of the state those drafts lead to."""
    state: GrammarState
    drafts: list[int]

    @property
    def vocab_size(self) -> int:
        return self.state.vocab_size

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.state.fill_after(bitmask, row, self.drafts)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], drafts: Drafts | None = None) -> torch.Tensor:
    """OpenAI presence/frequency penalties over generated tokens; repetition penalty (CTRL / Hugging Face) over
    prompt and generated tokens (a row after drafts counts them as generated)."""
    rows, vocab = logits.shape
    out_counts = torch.zeros(rows, vocab, dtype=torch.float32)
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    for i, seq in enumerate(seqs):  # building the index lists is per row; the arithmetic below is batched
        if seq.params.needs_penalties:
            ahead = (drafts[i] or []) if drafts else []
            out = torch.tensor(seq.output_token_ids + ahead, dtype=torch.long)
            out_counts[i].index_add_(0, out, torch.ones(len(out)))
            seen[i, torch.tensor(seq.token_ids + ahead, dtype=torch.long)] = True
    presence = torch.tensor([s.params.presence_penalty for s in seqs]).unsqueeze(1)
    frequency = torch.tensor([s.params.frequency_penalty for s in seqs]).unsqueeze(1)
    repetition = torch.tensor([s.params.repetition_penalty for s in seqs]).unsqueeze(1)
    logits = logits - frequency * out_counts - presence * (out_counts > 0)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, nucleus (top-p) and min-p sets. k=0, p=1, min_p=0 disable."""
    vocab = logits.shape[1]
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        floor = min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(-1, descending=True)
        ranks = torch.arange(vocab).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
        drop = ranks >= k
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # keep a token while the mass of the tokens before it is below p (the first token always stays)
        drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def gather_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int | None]) -> list[TokenLogprob | None]:
    """The chosen token's logprob and the row's `num_top` most likely tokens, for rows that asked."""
    wanted = [n for n in num_top if n is not None]
    if not wanted:
        return [None] * len(num_top)
    k = max(wanted)
    top_vals, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    chosen_ids = chosen.tolist()
    top_vals = top_vals.tolist() if k else None
    top_ids = top_ids.tolist() if k else None
    result = []
    for i, n in enumerate(num_top):
        if n is None:
            result.append(None)
        else:
            top = list(zip(top_ids[i][:n], top_vals[i][:n])) if n else []
            result.append(TokenLogprob(chosen_ids[i], chosen_lp[i], top))
    return result


class Sampler:
    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], drafts: Drafts | None = None) -> SampleResult:
        """logits `[N, V]` float32, one row per entry of `seqs` (a sequence verifying drafts has one row per position,
        in order, with `drafts[i]` the drafts before row i). Grammar masks come first (every transform after them
        sees only allowed tokens); logprobs are the model's own, before any of them."""
        raw = logits
        states = [s.grammar_state for s in seqs]
        if any(state is not None for state in states):
            for seq, state in zip(seqs, states):
                if state is not None and state.num_accepted != seq.num_output_tokens:
                    state.sync(seq.output_token_ids)  # a state built after tokens were generated catches up
            if drafts:
                states = [_Lookahead(st, d) if st is not None and d else st for st, d in zip(states, drafts)]
            logits = apply_grammar_masks(logits, states)
        greedy = [s.params.greedy for s in seqs]
        if any(s.params.needs_penalties for s in seqs):
            logits = apply_penalties(logits, seqs, drafts)
        gen_states = None
        if all(greedy):
            chosen = argmax_rows(logits)
        else:
            chosen, gen_states = self._sample(logits, seqs, greedy, drafts)
        want = [s.params.logprobs for s in seqs]
        lps = gather_logprobs(raw.log_softmax(-1), chosen, want) if any(w is not None for w in want) else [None] * len(seqs)
        return SampleResult(chosen.tolist(), lps, gen_states)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool],
                drafts: Drafts | None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        temperature = torch.tensor([1.0 if s.params.greedy else s.params.temperature for s in seqs]).unsqueeze(1)
        # top_p is kept above what float32 rounds to 0, so the most likely token always survives the nucleus
        top_p = torch.tensor([max(s.params.top_p, MIN_TOP_P) for s in seqs])
        logits = filter_logits(logits / temperature, torch.tensor([s.params.top_k for s in seqs]), top_p,
                               torch.tensor([s.params.min_p for s in seqs]))
        probs = logits.softmax(-1)
        # Exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) is a draw from p. Seeded rows draw their noise
        # from their own generator, so their tokens do not depend on what else is in the batch.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        gen_states: list[torch.Tensor | None] = [None] * len(seqs)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[i].exponential_(generator=seq.generator)
                if drafts and drafts[i] is not None:
                    gen_states[i] = seq.generator.get_state()
        sampled = (probs / noise).argmax(-1)
        return torch.where(torch.tensor(greedy), argmax_rows(logits), sampled), gen_states
