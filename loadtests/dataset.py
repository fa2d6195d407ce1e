"""Synthetic workloads: prompts of an exact token length, made with the served model's tokenizer (no downloads).

A prompt is a run of whole-word vocabulary tokens (" apple", " river", ...), each a single token that BPE never
merges with its neighbours, so `len(encode(prompt)) == n` exactly; every prompt is checked and repaired if not.

Workloads (each returns a list of `RequestSpec`):
- `random`        prompt/output lengths fixed (`range_ratio=0`) or sampled uniformly in `len * [1 - r, 1 + r]`
- `shared-prefix` one shared system prefix of `prefix_len` tokens + a distinct suffix of `input_len` tokens
- `tasks`         Loom's /v1/summarize and /v1/classify endpoints, mixed (`summarize_fraction`)
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

WORKLOADS = ("random", "shared-prefix", "tasks")
CLASSIFY_LABELS = ["sports", "politics", "technology", "business", "science", "health"]


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def vocab(self) -> dict[str, int]: ...


@dataclass
class RequestSpec:
    """One request of a workload. `prompt_tokens` is the harness's own count (the server's usage wins when given)."""
    kind: str  # "completion" | "chat" | "summarize" | "classify"
    prompt: str
    prompt_tokens: int
    max_tokens: int | None = None
    extra: dict = field(default_factory=dict)  # merged into the request body


class HFTokenizer:
    """A `tokenizers` tokenizer.json (fast, no transformers import); special tokens are never added."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer
        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        self._tok = Tokenizer.from_file(str(self.path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=False)


class WordTokenizer:
    """One token per whitespace-separated word: for tests and for servers whose tokenizer is unknown."""

    WORDS: ClassVar[list[str]] = [c1 + v + c2 for c1 in "bdfgklmnprst" for v in "aeiou" for c2 in "bdgkmnprst"]

    def encode(self, text: str) -> list[int]:
        index = {w: i for i, w in enumerate(self.WORDS)}
        return [index.get(w, len(self.WORDS)) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return "".join(" " + self.WORDS[i % len(self.WORDS)] for i in ids)

    def vocab(self) -> dict[str, int]:
        return {" " + w: i for i, w in enumerate(self.WORDS)}


def default_tokenizer_dir() -> Path:
    """The default model as a Hugging Face directory (what every HF peer loads too)."""
    from server.model.loader import hf_reference_directory
    return Path(hf_reference_directory("default", Path("~/.cache/loom").expanduser()))


def load_tokenizer(spec: str | None) -> TextTokenizer:
    """`default` (the default model's), `words` (one token per word), or a tokenizer.json / HF directory."""
    if spec in (None, "", "default"):
        return HFTokenizer(default_tokenizer_dir())
    if spec == "words":
        return WordTokenizer()
    return HFTokenizer(spec)


class PromptMaker:
    """Makes texts of an exact token length from single-token, space-prefixed, lowercase vocabulary words."""

    def __init__(self, tokenizer: TextTokenizer, seed: int = 0):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        words = []
        for piece in tokenizer.vocab():
            text = piece.replace("\u0120", " ")  # byte-level BPE spells a leading space as "Ġ"
            if re.fullmatch(r" [a-z]{3,9}", text):
                words.append(text)
        words.sort()
        words = random.Random(1234).sample(words, min(len(words), 4000))
        # keep only words that really encode to one token on their own (text() re-checks whole prompts)
        checked = [w for w in words if len(tokenizer.encode(w)) == 1]
        if len(checked) < 50:
            raise ValueError(f"tokenizer has too few whole-word tokens ({len(checked)}) to build prompts")
        self.words = checked

    def text(self, n: int, rng: random.Random | None = None) -> str:
        """A text of exactly `n` tokens (n >= 1)."""
        rng = rng or self.rng
        words = rng.choices(self.words, k=n)
        for _ in range(20):
            text = "".join(words)
            have = len(self.tok.encode(text))
            if have == n:
                return text
            if have > n:
                words = words[: max(1, len(words) - (have - n))]
            else:
                words += rng.choices(self.words, k=n - have)
        raise RuntimeError(f"could not make a prompt of exactly {n} tokens")

    def count(self, text: str) -> int:
        return len(self.tok.encode(text))


def _lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    if range_ratio <= 0:
        return [mean] * n
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_workload(maker: PromptMaker, num_requests: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, seed: int = 0, kind: str = "completion") -> list[RequestSpec]:
    rng = random.Random(seed)
    ins = _lengths(rng, num_requests, input_len, range_ratio)
    outs = _lengths(rng, num_requests, output_len, range_ratio)
    return [RequestSpec(kind, maker.text(i, rng), i, o) for i, o in zip(ins, outs)]


def shared_prefix_workload(maker: PromptMaker, num_requests: int, prefix_len: int, input_len: int, output_len: int,
                           range_ratio: float = 0.0, seed: int = 0, kind: str = "completion") -> list[RequestSpec]:
    """Every prompt = the same `prefix_len`-token system prefix + its own `input_len`-token suffix."""
    rng = random.Random(seed)
    prefix = maker.text(prefix_len, random.Random(seed + 7919))
    ins = _lengths(rng, num_requests, input_len, range_ratio)
    outs = _lengths(rng, num_requests, output_len, range_ratio)
    specs = []
    for i, o in zip(ins, outs):
        text = prefix + maker.text(i, rng)
        specs.append(RequestSpec(kind, text, maker.count(text), o))
    return specs


def tasks_workload(maker: PromptMaker, num_requests: int, input_len: int, output_len: int,
                   summarize_fraction: float = 0.5, range_ratio: float = 0.0, seed: int = 0,
                   stream_summaries: bool = True) -> list[RequestSpec]:
    """Loom's task endpoints: summaries of `input_len`-token documents (`output_len`-token summaries) and
    classifications of `input_len`-token texts into one of six labels (prefill-only work, no streaming)."""
    rng = random.Random(seed)
    ins = _lengths(rng, num_requests, input_len, range_ratio)
    outs = _lengths(rng, num_requests, output_len, range_ratio)
    specs = []
    for i, o in zip(ins, outs):
        text = maker.text(i, rng).strip()
        if rng.random() < summarize_fraction:
            specs.append(RequestSpec("summarize", text, i, o, {"stream": stream_summaries}))
        else:
            specs.append(RequestSpec("classify", text, i, None, {"labels": CLASSIFY_LABELS}))
    return specs


def build_workload(name: str, maker: PromptMaker, num_requests: int, input_len: int = 128, output_len: int = 128,
                   range_ratio: float = 0.0, prefix_len: int = 512, summarize_fraction: float = 0.5,
                   seed: int = 0, endpoint: str = "completions") -> list[RequestSpec]:
    kind = "chat" if endpoint == "chat" else "completion"
    if name == "random":
        return random_workload(maker, num_requests, input_len, output_len, range_ratio, seed, kind)
    if name == "shared-prefix":
        return shared_prefix_workload(maker, num_requests, prefix_len, input_len, output_len, range_ratio, seed, kind)
    if name == "tasks":
        return tasks_workload(maker, num_requests, input_len, output_len, summarize_fraction, range_ratio, seed)
    raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")


def load_jsonl(path: str | Path, maker: PromptMaker | None, default_max_tokens: int,
               endpoint: str = "completions") -> list[RequestSpec]:
    """Requests from a file: one JSON object a line, `{"prompt": str, "max_tokens"?: int}`."""
    kind = "chat" if endpoint == "chat" else "completion"
    specs = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            prompt = item["prompt"]
            n = maker.count(prompt) if maker else len(prompt.split())
            specs.append(RequestSpec(kind, prompt, n, item.get("max_tokens", default_max_tokens)))
    return specs
