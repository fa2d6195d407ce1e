"""The engine's output contract: what it streams back per request (`RequestOutput` deltas), the one fold of those
deltas into whole completions, token usage, and engine-wide stats. Everything outside the engine reads these types
and nothing else of it."""
from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.errors import EngineError


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs


@dataclass
class RequestOutput:
    """A delta for one of a request's sequences (index < n). The last one has `finish_reason` set."""
    request_id: str
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first delta, when asked for
    finish_reason: str | None = None  # "stop", "length", "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first scheduling, on a sequence's first delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    """One sequence of a request, whole: every delta so far folded together (`add`)."""
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, out: RequestOutput) -> CompletionOutput:
        self.index = out.index
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.finished:
            self.finish_reason = out.finish_reason
        return self


@dataclass
class TokenUsage:
    """Tokens used by one or more requests: each request's prompt once, every sequence's output."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, request: list[CompletionOutput]) -> TokenUsage:
        """Count one request from its completions (its n sequences share one prompt)."""
        if request:
            self.prompt_tokens += request[0].num_prompt_tokens
            self.cached_tokens += max(c.num_cached_tokens for c in request)
            self.completion_tokens += sum(c.num_output_tokens for c in request)
            self.requests += 1
        return self

    def merge(self, other: TokenUsage) -> TokenUsage:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.requests += other.requests
        return self


@dataclass
class StepOutput:
    """What one engine step produced: deltas, and the requests it failed (each with the reason)."""
    outputs: list[RequestOutput] = field(default_factory=list)
    failed: dict[str, EngineError] = field(default_factory=dict)


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
    block_size: int = 16
    healthy: bool = True
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens verified, and of those accepted
    spec_accepted_tokens: int = 0


@dataclass(frozen=True)
class Liveness:
    """Whether the engine loop still runs, for health probes: `alive` is false once it has stopped (shut down, or
    died of `error`); `last_step_time` (time.monotonic()) shows a loop that runs but no longer steps."""
    alive: bool
    last_step_time: float
    error: BaseException | None = None


@dataclass
class StepStats:
    """Handed to step observers (metrics) after each engine step."""
    num_seqs: int
    num_tokens: int
    seconds: float
