"""What the engine hands back per step and per request."""
from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.sequence import TokenLogprob


@dataclass
class RequestOutput:
    """A delta for one of a request's sequences (index < n). The last one has `finish_reason` set."""
    request_id: str
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first delta, when asked for
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    queue_time: float | None = None  # seconds from arrival to first scheduling, on a sequence's first delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_usage: float
    num_blocks: int
    free_blocks: int
    preemptions: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    prompt_tokens: int
    generation_tokens: int
    steps: int
    healthy: bool = True
