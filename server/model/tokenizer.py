"""Tokenizer facade over Hugging Face tokenizers: encoding, the model's own chat template, incremental decoding."""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character each byte is spelled with in the vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        ids = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(ids)
        self._special_ids = frozenset(getattr(hf_tokenizer, "all_special_ids", ()) or ())
        self._bytes_cache = None

    @classmethod
    def from_pretrained(cls, path: str, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        from transformers import AutoTokenizer
        return cls(AutoTokenizer.from_pretrained(path), eos_token_ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def __len__(self) -> int:
        return len(self.hf)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, even when it holds only part of a UTF-8 character (decoding it alone
        gives U+FFFD): byte-fallback pieces (`<0xF0>`) are that byte, byte-level BPE pieces (GPT-2's `Ġ`-spelled
        alphabet) are mapped back to their bytes, special tokens are their text."""
        if self._bytes_cache is None:
            self._bytes_cache = lru_cache(maxsize=65536)(self._token_bytes)
        return self._bytes_cache(token_id)

    def _token_bytes(self, token_id: int) -> bytes:
        text = self.decode([token_id], skip_special_tokens=False)
        if REPLACEMENT not in text or token_id in self._special_ids:
            return text.encode()
        piece = self.hf.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if m := _BYTE_PIECE.fullmatch(piece):
                return bytes([int(m.group(1), 16)])
            alphabet = byte_level_alphabet()
            if self._byte_level and all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
        return text.encode()  # a real U+FFFD, or a scheme this facade does not know

    @property
    def _byte_level(self) -> bool:
        backend = getattr(self.hf, "backend_tokenizer", None)
        return backend is not None and type(backend.decoder).__name__ == "ByteLevel"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        """`tools` go to the template (transformers' `tools=`), for templates that render them; `template_kwargs`
        are the template's own variables (e.g. Qwen3's `enable_thinking`)."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use the completions API (or --raw)")
        extra = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **extra)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        # The rendered template already holds the special tokens (BOS etc.), so none are added again.
        text = self.render_chat(messages, add_generation_prompt, tools, template_kwargs)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Each step decodes a short window of ids twice (with and without the newest ones) and emits the difference,
    holding text back while it ends in U+FFFD: a multi-byte character split across byte-fallback tokens is only
    emitted once its last byte arrives. Decoding a window that starts a few tokens back keeps the tokenizer's
    leading-space rules right."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-6:])
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end of generation)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        return delta
