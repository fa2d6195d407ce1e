"""`Tokenizer.token_bytes`: each token's true bytes, also for tokens that hold part of a UTF-8 character (decoded
alone they read U+FFFD), on the default model's byte-level BPE and on tiny byte-level and byte-fallback tokenizers
(issue 16, item 7)."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from server.model.tokenizer import Tokenizer

TEXTS = ["🚀", "a 🚀 to the moon 🌕!", "héllo wörld — 日本語のテキスト\t\n", "<0xF0> looks like a byte piece"]


def byte_level_tiny() -> Tokenizer:
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>"])
    raw.train_from_iterator(["hello world, the moon and the rocket"] * 20, trainer)
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|end|>"))


def byte_fallback_tiny() -> Tokenizer:
    """SentencePiece-style (Llama 2, Mistral): `▁` for spaces, unknown characters as `<0xNN>` byte pieces."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for piece in ["▁", "a", "o", "t", "h", "e", "m", "n", "l", "▁to", "▁the"]:
        vocab[piece] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab, [], byte_fallback=True, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>"))


@pytest.fixture(scope="module")
def default_tokenizer(default_checkpoint):
    return Tokenizer.from_pretrained(str(default_checkpoint))


def test_default_model_rocket_is_three_partial_tokens_with_true_bytes(default_tokenizer):
    tok = default_tokenizer
    ids = tok.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1 and all(tok.decode([i]) == "\ufffd" for i in ids)  # what made `bytes` wrong before
    assert [tok.token_bytes(i) for i in ids] == [b"\xf0\x9f", b"\x9a", b"\x80"]


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_join_back_into_the_text(default_tokenizer, text):
    for tok in (default_tokenizer, byte_level_tiny()):
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode(), (text, ids)


def test_byte_fallback_pieces_are_their_byte():
    tok = byte_fallback_tiny()
    ids = tok.encode("a🚀", add_special_tokens=False)
    pieces = tok.hf.convert_ids_to_tokens(ids)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]
    assert [tok.token_bytes(i) for i in ids[-4:]] == [b"\xf0", b"\x9f", b"\x9a", b"\x80"]
    assert b"".join(tok.token_bytes(i) for i in ids[-4:]).decode() == "🚀"


def test_special_tokens_and_a_real_replacement_character(default_tokenizer):
    tok = default_tokenizer
    end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.token_bytes(end) == b"<|im_end|>"
    ids = tok.encode("\ufffd", add_special_tokens=False)  # U+FFFD itself is three real bytes
    assert b"".join(tok.token_bytes(i) for i in ids) == "\ufffd".encode()
