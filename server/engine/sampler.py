"""Vectorized sampling over a batch of logits rows: penalties, temperature, top-k / top-p / min-p, seeded draws,
logprobs. Each row carries its own parameters; there is no per-row loop over the vocabulary."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loom_kernels import argmax_rows
from server.engine.grammar import apply_grammar_masks
from server.engine.outputs import TokenLogprob
from server.engine.sequence import Sequence

MIN_TOP_P = 1e-6


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI presence/frequency penalties over generated tokens; repetition penalty (CTRL / Hugging Face) over
    prompt and generated tokens."""
    rows, vocab = logits.shape
    out_counts = torch.zeros(rows, vocab, dtype=torch.float32)
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    for i, seq in enumerate(seqs):  # building the index lists is per row; the arithmetic below is batched
        if seq.params.needs_penalties:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long)
            out_counts[i].index_add_(0, out, torch.ones(len(out)))
            seen[i, torch.tensor(seq.token_ids, dtype=torch.long)] = True
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

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits `[N, V]` float32, one row per sequence in `seqs`. Grammar masks come first (every transform after
        them sees only allowed tokens); logprobs are the model's own, before any of them."""
        raw = logits
        states = [s.grammar_state for s in seqs]
        if any(state is not None for state in states):
            for seq, state in zip(seqs, states):
                if state is not None and state.num_accepted != seq.num_output_tokens:
                    state.sync(seq.output_token_ids)  # a state built after tokens were generated catches up
            logits = apply_grammar_masks(logits, states)
        greedy = [s.params.greedy for s in seqs]
        if any(s.params.needs_penalties for s in seqs):
            logits = apply_penalties(logits, seqs)
        if all(greedy):
            chosen = argmax_rows(logits)
        else:
            chosen = self._sample(logits, seqs, greedy)
        want = [s.params.logprobs for s in seqs]
        lps = gather_logprobs(raw.log_softmax(-1), chosen, want) if any(w is not None for w in want) else [None] * len(seqs)
        return SampleResult(chosen.tolist(), lps)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        temperature = torch.tensor([1.0 if s.params.greedy else s.params.temperature for s in seqs]).unsqueeze(1)
        # top_p is kept above what float32 rounds to 0, so the most likely token always survives the nucleus
        top_p = torch.tensor([max(s.params.top_p, MIN_TOP_P) for s in seqs])
        logits = filter_logits(logits / temperature, torch.tensor([s.params.top_k for s in seqs]), top_p,
                               torch.tensor([s.params.min_p for s in seqs]))
        probs = logits.softmax(-1)
        # Exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) is a draw from p. Seeded rows draw their noise
        # from their own generator, so their tokens do not depend on what else is in the batch.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[i].exponential_(generator=seq.generator)
        sampled = (probs / noise).argmax(-1)
        return torch.where(torch.tensor(greedy), argmax_rows(logits), sampled)
