"""Per-request sampling parameters, validated with messages a client can act on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from server.engine.grammar import Grammar
    from server.model.lora import LoraAdapter


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the context window
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    n: int = 1
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely
    prompt_logprobs: int | None = None  # same, for every prompt token after the first
    prompt_logprobs_start: int = 1  # prompt logprobs are wanted from this token on; the prefix cache may serve the rest
    skip_special_tokens: bool = True
    grammar: Grammar | None = None  # structured output: compiled off the engine thread (GrammarCompiler)
    # the LoRA adapter the request runs with (None: the base model); held here, an unloaded adapter's weights live on
    # until its last request finishes
    lora: LoraAdapter | None = None

    MAX_LOGPROBS = 20
    MAX_N = 16
    MAX_TOP_K = 2 ** 31 - 1  # beyond any vocabulary; larger values overflow the sampler's int tensors

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    GREEDY_BELOW = 1e-5  # temperatures under this are greedy: dividing float32 logits by them overflows

    @property
    def greedy(self) -> bool:
        return self.temperature < self.GREEDY_BELOW

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise InvalidRequestError(message, param)

        check(self.max_tokens is None or self.max_tokens >= 0, "max_tokens",
              f"max_tokens must be at least 0, got {self.max_tokens}")
        check(0.0 <= self.temperature <= 2.0, "temperature", f"temperature must be in [0, 2], got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        check(-1 <= self.top_k <= self.MAX_TOP_K, "top_k",
              f"top_k must be 0 or -1 (off) or between 1 and {self.MAX_TOP_K}, got {self.top_k}")
        check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty",
              f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        check(1 <= self.n <= self.MAX_N, "n", f"n must be between 1 and {self.MAX_N}, got {self.n}")
        check(self.n == 1 or not self.greedy, "n", "n > 1 needs sampling (temperature > 0): greedy copies are identical")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or 0 <= value <= self.MAX_LOGPROBS, name,
                  f"{name} must be between 0 and {self.MAX_LOGPROBS}, got {value}")
        check(len(self.stop) <= 16 and all(isinstance(s, str) and s for s in self.stop), "stop",
              "stop must be at most 16 non-empty strings")
        check(self.prompt_logprobs_start >= 1, "prompt_logprobs_start",
              f"prompt_logprobs_start must be at least 1, got {self.prompt_logprobs_start}")
        check(self.seed is None or 0 <= self.seed < 2 ** 63, "seed", "seed must be a non-negative 64-bit integer")
        if self.top_k == -1:
            self.top_k = 0
