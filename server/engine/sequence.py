"""A sequence's state as it moves through the scheduler and the model: tokens, KV blocks, progress. Its text lives in
the output processor."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from server.engine.grammar import GrammarState
from server.engine.sampling_params import SamplingParams
from server.engine.spec_state import SpecState


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class GroupTable:
    """A sequence's block table in one more KV group of a model that mixes sliding-window and full-attention layers
    (model/kv_layout.py): the same fields as the sequence's own table, which is group 0's."""
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    num_released_blocks: int = 0


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against the context window
    priority: int = 0  # lower runs first; each level is worth `priority_step` seconds of waiting
    priority_step: float = 10.0
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    num_cached_tokens: int = 0  # of those, prefix-cache hits at admission
    num_hashed_blocks: int = 0  # leading blocks already registered in the prefix cache
    block_table: list[int] = field(default_factory=list)
    num_released_blocks: int = 0  # leading block_table entries out of every layer's window: references dropped
    group_tables: list[GroupTable] = field(default_factory=list)  # KV groups 1.. of a grouped layout
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    group_leader: Sequence | None = None  # n > 1: siblings wait for the leader's prompt blocks to be cached
    grammar_state: GrammarState | None = None  # structured output: this sequence's own matcher
    spec: SpecState | None = None  # speculative decoding: its n-gram index and acceptance record

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed + self.index)
        if self.params.grammar is not None:
            self.grammar_state = self.params.grammar.new_state()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def sort_key(self) -> tuple[float, int]:
        """Lower runs first: arrival time, moved later by `priority_step` seconds per priority level. Among requests
        that arrive together priority decides, yet a low-priority request is never starved: once it has waited
        `priority_step` seconds per level longer, it goes before newly arriving high-priority ones."""
        return self.arrival_time + self.priority * self.priority_step, self.seq_id
