"""Split a long text into pieces of at most `max_tokens` tokens, on the most natural boundary that works:
paragraphs first, then sentences, then words, and only as a last resort raw token windows."""
from __future__ import annotations

import re
from collections.abc import Callable

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?。！？])[\"')\]]*\s+")
_SEPARATORS = ["\n\n", " ", " "]  # joiners for paragraph, sentence and word pieces


def _split_level(text: str, level: int) -> list[str]:
    if level == 0:
        parts = _PARAGRAPH.split(text)
    elif level == 1:
        parts = _SENTENCE.split(text)
    else:
        parts = text.split()
    return [p.strip() for p in parts if p and p.strip()]


def split_text(text: str, max_tokens: int, count: Callable[[str], int],
               hard_split: Callable[[str, int], list[str]] | None = None, level: int = 0) -> list[str]:
    """Greedy packing of boundary-aligned parts into pieces of at most `max_tokens` (by `count`)."""
    text = text.strip()
    if not text:
        return []
    if count(text) <= max_tokens:
        return [text]
    if level > 2:  # a single "word" longer than the budget: cut it by tokens
        return hard_split(text, max_tokens) if hard_split else [text]
    joiner = _SEPARATORS[level]
    pieces: list[str] = []
    current: list[str] = []
    current_tokens = 0
    joiner_tokens = 1 if level == 0 else 0  # "\n\n" is about a token; a space merges into the next word
    parts = [(p, count(p)) for p in _split_level(text, level)]
    total = sum(n for _, n in parts)
    target = -(-total // -(-total // max_tokens))  # balanced pieces: no tiny leftover at the end
    for part, n in parts:
        if n > max_tokens:  # too big on its own: flush, then split it on a finer boundary
            if current:
                pieces.append(joiner.join(current))
                current, current_tokens = [], 0
            pieces.extend(split_text(part, max_tokens, count, hard_split, level + 1))
            continue
        if current and (current_tokens + joiner_tokens + n > max_tokens or current_tokens >= target):
            pieces.append(joiner.join(current))
            current, current_tokens = [], 0
        current.append(part)
        current_tokens += n + (joiner_tokens if len(current) > 1 else 0)
    if current:
        pieces.append(joiner.join(current))
    # token counts of joined text can differ slightly from the sum of the parts: re-split any piece that overflows
    out: list[str] = []
    for piece in pieces:
        if count(piece) > max_tokens and level < 3:
            out.extend(split_text(piece, max_tokens, count, hard_split, level + 1))
        else:
            out.append(piece)
    return out
