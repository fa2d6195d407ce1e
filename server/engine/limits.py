"""Validation of a request against the model and the KV cache, done once per request. The limits are immutable once
the engine is built, so `AsyncEngine` checks on the caller's thread (a refusal answers at once, without waiting for
the engine's step) and the core trusts the resolved `max_tokens` it is handed."""
from __future__ import annotations

from dataclasses import dataclass

from server.engine.errors import InvalidRequestError
from server.engine.sampling_params import SamplingParams


def context_window(requested: int | None, model_len: int) -> int:
    """`--max-model-len`, never beyond what the model supports."""
    return min(requested or model_len, model_len)


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int  # the context window
    kv_capacity: int  # tokens the whole KV cache holds
    vocab_size: int

    @property
    def max_sequence_len(self) -> int:
        return min(self.max_model_len, self.kv_capacity)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raise InvalidRequestError for a request that can never run; return its resolved max_tokens."""
        n, limit = len(prompt_token_ids), self.max_sequence_len
        if n == 0:
            raise InvalidRequestError("the prompt is empty: it must contain at least one token", "prompt")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        if n >= limit:
            raise InvalidRequestError(f"This model's maximum context length is {limit} tokens, but the prompt has "
                                      f"{n} tokens", "prompt", "context_length_exceeded")
        max_tokens = limit - n if params.max_tokens is None else params.max_tokens
        if n + max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens, but {n} prompt tokens + max_tokens "
                f"{max_tokens} = {n + max_tokens} tokens were requested; lower max_tokens or shorten the prompt",
                "max_tokens", "context_length_exceeded")
        if max_tokens == 0 and params.prompt_logprobs is None:
            raise InvalidRequestError("max_tokens 0 generates nothing; it is only useful with prompt logprobs (echo)",
                                      "max_tokens")
        return max_tokens
