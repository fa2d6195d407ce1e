"""N-gram prompt lookup: draft tokens copied from a sequence's own prompt and output (what llama.cpp, vLLM, SGLang
and TGI call prompt lookup decoding). When the last n tokens occurred before, the tokens that followed them then are
the guess for what follows now; the longest n between `min_n` and `max_n` that matches wins, and among equal n the
most recent occurrence.

Each sequence keeps an index from n-gram to the position after its latest occurrence, grown as tokens are appended
(O(max_n) per token, a C-speed bulk insert for a prompt), so a proposal is a few dictionary look-ups however long
the context is. Keys are the n-grams' hashes; a hit is checked against the tokens themselves, so a collision can
only cost a draft, never a wrong one."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NgramIndex:
    min_n: int
    max_n: int
    table: dict[int, int] = field(default_factory=dict)  # hash of an n-gram -> position right after its latest end
    indexed: int = 0  # the n-grams ending before this position are in `table`

    def update(self, tokens: list[int]) -> None:
        """Index the n-grams that end before the last token (so every entry has at least one token after it)."""
        end = len(tokens) - 1
        if end <= self.indexed:
            return
        for n in range(self.min_n, self.max_n + 1):
            lo = max(self.indexed, n - 1) - n + 1  # start of the first n-gram not indexed yet
            hi = end - n + 1  # starts stop here: the n-gram starting at `hi` would end on the last token
            if lo >= hi:
                continue
            grams = zip(*(tokens[lo + j:hi + j] for j in range(n)))
            self.table.update(zip(map(hash, grams), range(lo + n, hi + n)))  # later occurrences overwrite earlier
        self.indexed = end

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix, or []."""
        self.update(tokens)
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = tokens[length - n:]
            pos = self.table.get(hash(tuple(suffix)))
            if pos is None or tokens[pos - n:pos] != suffix:
                continue
            period = length - pos  # the suffix recurs every `period` tokens: a continuation past the end repeats it
            return [tokens[pos + i % period] for i in range(k)]
        return []
