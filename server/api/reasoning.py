"""Reasoning output (`--reasoning-parser deepseek_r1|qwen3`): the model's thinking, written between `<think>` and
`</think>`, is split out of the answer, whole or as the text streams in; the same rules serve chat, Messages and
Responses, and a stream always reassembles to exactly the whole-text split.

Where the thinking starts. A chat template may open it in the prompt (DeepSeek-R1 distills, newer Qwen3 templates end
the prompt with `<think>`), close it there (Qwen3 with `enable_thinking: false` ends the prompt with an empty
`<think></think>`), or leave it to the model, which then writes `<think>` itself. As vLLM's parsers do, an answer
starts inside the thinking unless the prompt closed it (or, for qwen3, `enable_thinking` is false): a leading
`<think>` is dropped, everything up to the first `</think>` is reasoning, the rest is the answer. An answer cut off
before `</think>` is all reasoning. Whitespace around the two parts is trimmed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from server.model import Tokenizer

OPEN, CLOSE = "<think>", "</think>"
ReasoningFormat = Literal["deepseek_r1", "qwen3"]
REASONING_FORMATS: tuple[str, ...] = ("deepseek_r1", "qwen3")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that may be the start of `tag` (held back until it is clear)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


@dataclass
class ReasoningParser:
    """Feed text deltas, get (reasoning delta, content delta) pairs; `finish` flushes what was held back."""
    thinking: bool  # the answer starts inside its thinking part
    state: Literal["open", "reasoning", "content"] = "open"
    buf: str = ""
    reasoning_started: bool = False
    strip_content: bool = False  # the answer follows a thinking part: its leading whitespace goes

    def __post_init__(self) -> None:
        if not self.thinking:
            self.state = "content"

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        return self._step(final=False)

    def finish(self) -> tuple[str, str]:
        return self._step(final=True)

    def _step(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        if self.state == "open":
            head = self.buf.lstrip()
            if not final and OPEN.startswith(head):  # `<think>` may still be coming
                return "", ""
            self.buf, self.state = head.removeprefix(OPEN), "reasoning"
        if self.state == "reasoning":
            reasoning = self._reasoning(final)
        if self.state == "content":
            content, self.buf = self.buf, ""
            if self.strip_content:
                content = content.lstrip()
                self.strip_content = not content
        return reasoning, content

    def _reasoning(self, final: bool) -> str:
        at = self.buf.find(CLOSE)
        if at >= 0:
            ready, self.buf = self.buf[:at].rstrip(), self.buf[at + len(CLOSE):]
            self.state, self.strip_content = "content", True
        elif final:
            ready, self.buf = self.buf.rstrip(), ""
        else:  # a partial `</think>` and trailing whitespace wait: the thinking may end right there
            ready = self.buf[:len(self.buf) - _partial_suffix(self.buf, CLOSE)].rstrip()
            self.buf = self.buf[len(ready):]
        if not self.reasoning_started:
            ready = ready.lstrip()
            self.reasoning_started = bool(ready)
        return ready


@dataclass(frozen=True)
class ReasoningSetup:
    """How one request's answers are split: the parser format and whether they start inside the thinking."""
    fmt: ReasoningFormat
    thinking: bool

    def parser(self) -> ReasoningParser:
        return ReasoningParser(self.thinking)

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of a whole answer ("" where there is none)."""
        if not self.thinking:
            return "", text
        reasoning, _, content = text.lstrip().removeprefix(OPEN).partition(CLOSE)
        return reasoning.strip(), content.lstrip()


def reasoning_setup(fmt: str | None, prompt_tail: str, template_kwargs: dict[str, Any] | None) -> ReasoningSetup | None:
    """The setup for a request whose rendered prompt ends with `prompt_tail` (None: no reasoning parser)."""
    if fmt is None:
        return None
    if fmt not in REASONING_FORMATS:
        raise ValueError(f"unknown reasoning parser {fmt!r} (one of {', '.join(REASONING_FORMATS)})")
    tail = prompt_tail.rstrip()
    if tail.endswith(CLOSE):
        thinking = False
    elif tail.endswith(OPEN):
        thinking = True
    else:
        thinking = fmt == "deepseek_r1" or (template_kwargs or {}).get("enable_thinking") is not False
    return ReasoningSetup(fmt, thinking)


def prompt_tail(tokenizer: Tokenizer, prompt_ids: list[int], tokens: int = 8) -> str:
    """The end of a rendered prompt as text, special tokens kept (enough to see a `<think>` or `</think>`)."""
    return tokenizer.decode(prompt_ids[-tokens:], skip_special_tokens=False)
