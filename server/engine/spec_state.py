"""One sequence's speculative-decoding state: its n-gram index, and its record of accepted drafts, from which the
chance that its next draft token is accepted is estimated (and its back-off when drafting stops paying)."""
from __future__ import annotations

from dataclasses import dataclass

from server.engine.ngram_proposer import NgramIndex

DECAY = 0.8  # weight of a sequence's past verifications against its newest
FIRST_BACKOFF, MAX_BACKOFF = 4, 256  # steps a sequence stops drafting after its acceptance fell below break-even


@dataclass
class SpecState:
    """One sequence's n-gram index and its record of accepted drafts (a prior of one hit in two tries)."""
    index: NgramIndex
    hits: float = 1.0  # draft positions accepted, decayed per verification
    tries: float = 2.0  # draft positions verified up to and including the first rejected one
    pause: int = 0  # steps left without drafting
    backoff: int = FIRST_BACKOFF

    @property
    def acceptance(self) -> float:
        """Estimated probability that a draft token is accepted once the ones before it were."""
        return self.hits / self.tries

    def record(self, drafted: int, accepted: int) -> None:
        self.hits = self.hits * DECAY + accepted
        self.tries = self.tries * DECAY + min(accepted + 1, drafted)
        if accepted == drafted:  # a whole draft copied: the sequence is in a stretch worth drafting promptly again
            self.backoff = FIRST_BACKOFF

    def back_off(self) -> None:
        """Stop drafting for a while, then try again from the prior."""
        self.pause, self.backoff = self.backoff, min(self.backoff * 2, MAX_BACKOFF)
        self.hits, self.tries = 1.0, 2.0
