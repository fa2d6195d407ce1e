"""From an OpenAI request body to the engine's SamplingParams. Range checks live in SamplingParams itself (its
InvalidRequestError becomes a 400 naming the field); only what the engine cannot express is refused here."""
from __future__ import annotations

from server.api.errors import APIError
from server.api.protocol import SamplingFields
from server.engine import Grammar, SamplingParams

# No tokenizer Loom loads spans more characters than this with one token, so a text longer than the context window
# times this cannot fit: it is refused before tokenizing megabytes (which would cost seconds of CPU for nothing).
MAX_CHARS_PER_TOKEN = 64

_PASSED_THROUGH = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "seed")


def build_params(body: SamplingFields, *, max_tokens: int | None, logprobs: int | None = None,
                 prompt_logprobs: int | None = None, grammar: Grammar | None = None) -> SamplingParams:
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    given = {k: getattr(body, k) for k in _PASSED_THROUGH if getattr(body, k) is not None}
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])  # "" is refused like [""]
    return SamplingParams(max_tokens=max_tokens, n=body.n, stop=stop,
                          stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
                          include_stop_str_in_output=body.include_stop_str_in_output,
                          skip_special_tokens=body.skip_special_tokens, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, grammar=grammar, **given)


def check_text_length(num_chars: int, max_model_len: int, param: str) -> None:
    if num_chars > max_model_len * MAX_CHARS_PER_TOKEN:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens; a text of {num_chars} "
                            f"characters cannot fit it", param=param, code="context_length_exceeded")
