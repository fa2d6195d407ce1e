"""Summarization with an instruction prompt rendered by the model's chat template.

A document that fits one call (`chunk_tokens`, and the context window after prompt and summary) is summarized
directly. A longer one is map-reduced: split on paragraph / sentence boundaries, every piece summarized concurrently
(the engine batches them), the partial summaries joined and, if still too long, reduced again level by level, until
one final call merges them. Only that final call streams.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.engine import CompletionOutput, InvalidRequestError, SamplingParams, TokenUsage, collect, gather_all
from server.tasks.chunking import split_text
from server.tasks.common import MAX_IN_FLIGHT, Generate

ANSWER_PREFIX = {"paragraph": "", "bullets": "- "}  # put in the model's mouth, so a list starts as a list
STYLES = {
    "paragraph": "in one short paragraph",
    "bullets": "as a short bulleted list of its key points, one point per line starting with '- '",
}
SYSTEM = "You are a careful assistant that writes concise, faithful summaries."
DOCUMENT = "Summarize the following text {style}. Keep the key facts and add nothing that is not in the text.\n\n" \
           "Text:\n{text}"
PARTS = "Below are summaries of consecutive parts of one document. Combine them into one summary of the whole " \
        "document {style}. Keep the key facts and add nothing new.\n\nPart summaries:\n{text}"
MAX_LEVELS = 6


@dataclass
class SummaryEvent:
    """A text delta of the final summary; the last event has `done` set, the whole summary and the usage."""
    delta: str = ""
    done: bool = False
    summary: str = ""
    usage: TokenUsage = field(default_factory=TokenUsage)
    map_calls: int = 0  # pieces summarized before the final call (0: the document fit one call)


class Summarizer:
    def __init__(self, generate: Generate, tokenizer, max_model_len: int, chunk_tokens: int = 1536,
                 max_tokens: int = 200, temperature: float = 0.0, repetition_penalty: float = 1.1,
                 max_input_chars: int = 2_000_000):
        self.generate, self.tok, self.max_model_len = generate, tokenizer, max_model_len
        self.chunk_tokens, self.max_tokens, self.max_input_chars = chunk_tokens, max_tokens, max_input_chars
        self.temperature, self.repetition_penalty = temperature, repetition_penalty
        self._overhead = len(self._prompt(DOCUMENT, "", "paragraph")) + 16  # template + instruction, with slack

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def _hard_split(self, text: str, max_tokens: int) -> list[str]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return [self.tok.decode(ids[i:i + max_tokens]) for i in range(0, len(ids), max_tokens)]

    def _prompt(self, template: str, text: str, style: str) -> list[int]:
        content = template.format(style=STYLES[style], text=text)
        prefix = ANSWER_PREFIX[style]
        if not self.tok.has_chat_template:
            return self.tok.encode(f"{content}\n\nSummary:\n{prefix}")
        rendered = self.tok.render_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}])
        return self.tok.encode(rendered + prefix, add_special_tokens=False)

    def check_input(self, text: str, param: str = "input") -> None:
        """Refuse a document that is empty or longer than `max_input_chars`, before any work on it."""
        if not text.strip():
            raise InvalidRequestError("input must not be empty", param)
        if len(text) > self.max_input_chars:
            raise InvalidRequestError(f"the input has {len(text)} characters; this server summarizes at most "
                                      f"{self.max_input_chars}", param, "input_too_long")

    def budget(self, max_tokens: int, chunk_tokens: int | None = None) -> int:
        """Most tokens of text one call may take: the chunk size, and what the context window leaves."""
        room = self.max_model_len - self._overhead - max_tokens - 8
        if room < 32:
            raise InvalidRequestError(f"max_tokens {max_tokens} leaves no room for text in this model's context "
                                      f"window of {self.max_model_len} tokens", "max_tokens")
        return min(chunk_tokens or self.chunk_tokens, room)

    def _params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              repetition_penalty=self.repetition_penalty, seed=0 if self.temperature else None)

    async def _call(self, template: str, text: str, style: str, max_tokens: int, usage: TokenUsage,
                    deadline: float | None) -> str:
        result = await collect(self.generate(self._prompt(template, text, style), self._params(max_tokens),
                                             deadline=deadline))
        usage.add(result)
        return (ANSWER_PREFIX[style] + result[0].text).strip()

    async def stream(self, text: str, style: str = "paragraph", max_tokens: int | None = None,
                     chunk_tokens: int | None = None, deadline: float | None = None) -> AsyncIterator[SummaryEvent]:
        """Every engine call of the map-reduce shares `deadline` (time.monotonic())."""
        if style not in STYLES:
            raise InvalidRequestError(f"style must be one of {sorted(STYLES)}, got {style!r}", "style")
        self.check_input(text)
        max_tokens = max_tokens or self.max_tokens
        budget = self.budget(max_tokens, chunk_tokens)
        usage, template, map_calls = TokenUsage(), DOCUMENT, 0
        # partial summaries must shrink the text, so each is held well under the budget
        partial_tokens = max(min(max_tokens, budget // 3), 8)
        level = 0
        # counting and splitting a long document is CPU work: done off the event loop
        while await asyncio.to_thread(self.count, text) > budget:  # map (and intermediate reduce) levels
            if level >= MAX_LEVELS:
                raise InvalidRequestError("the input is too long to summarize at this chunk size", "input")
            pieces = await asyncio.to_thread(split_text, text, budget, self.count, self._hard_split)
            partials = await gather_all((self._call(template, p, style, partial_tokens, usage, deadline)
                                         for p in pieces),
                                       MAX_IN_FLIGHT)
            map_calls += len(pieces)
            text = "\n\n".join(f"{i + 1}. {p}" for i, p in enumerate(partials) if p) or "(empty)"
            template, level = PARTS, level + 1
        parts, pending = [], ANSWER_PREFIX[style]  # the prefix goes out with the first delta
        final = CompletionOutput()
        stream = self.generate(self._prompt(template, text, style), self._params(max_tokens), deadline=deadline)
        async with contextlib.aclosing(stream):
            async for out in stream:
                final.add(out)
                if out.text:
                    delta, pending = pending + out.text, ""
                    parts.append(delta)
                    yield SummaryEvent(delta=delta)
        usage.add([final])
        yield SummaryEvent(done=True, summary="".join(parts).strip(), usage=usage, map_calls=map_calls)

    async def summarize(self, text: str, style: str = "paragraph", max_tokens: int | None = None,
                        chunk_tokens: int | None = None, deadline: float | None = None) -> SummaryEvent:
        """The whole summary at once (the stream's last event)."""
        final = None
        async with contextlib.aclosing(self.stream(text, style, max_tokens, chunk_tokens, deadline)) as events:
            async for event in events:
                final = event
        return final
