"""Engine logprobs (TokenLogprob) in OpenAI's two shapes: the legacy completions object (parallel lists, with the
prompt's tokens first when echoing) and chat's per-token entries with `bytes`."""
from __future__ import annotations

import math
from functools import lru_cache

from server.api.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob
from server.engine import TokenLogprob


class TokenText:
    """Token id -> the text it stands for (cached; special tokens spelled out), and its true bytes: a token holding
    part of a multi-byte character reads as U+FFFD alone, but its `bytes` are the real ones, so a client can join a
    reply's bytes back into its text (as OpenAI's are)."""

    def __init__(self, tokenizer):
        self._decode = lru_cache(maxsize=65536)(lambda i: tokenizer.decode([i], skip_special_tokens=False))
        exact = getattr(tokenizer, "token_bytes", None)
        self._bytes = exact if exact is not None else lambda i: self._decode(i).encode()

    def __call__(self, token_id: int) -> str:
        return self._decode(token_id)

    def bytes(self, token_id: int) -> list[int]:
        return list(self._bytes(token_id))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; OpenAI uses -9999 for "impossible"


def completion_logprobs(text: TokenText, entries: list[TokenLogprob | None], token_ids: list[int],
                        offset: int = 0) -> CompletionLogprobs:
    """`entries[i]` describes `token_ids[i]` (None for the prompt's first token, which nothing predicts)."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        token = text(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(entry.logprob))
        top = {text(t): _finite(lp) for t, lp in entry.top}
        top.setdefault(token, _finite(entry.logprob))
        out.top_logprobs.append(top)
    return out


def merge_completion_logprobs(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


def chat_logprobs(text: TokenText, entries: list[TokenLogprob], token_ids: list[int]) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        token = text(token_id)
        top = [TopLogprob(token=text(t), logprob=_finite(lp), bytes=text.bytes(t)) for t, lp in entry.top]
        content.append(TokenLogprobEntry(token=token, logprob=_finite(entry.logprob), bytes=text.bytes(token_id),
                                         top_logprobs=top))
    return ChatLogprobs(content=content)
