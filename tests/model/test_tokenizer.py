"""Chat template and incremental detokenization (multi-byte UTF-8, byte-fallback tokens)."""
import pytest

from server.model import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(default_model_fp32):
    return default_model_fp32.tokenizer


def stream(tok, prompt_ids, ids) -> tuple[str, list[str]]:
    d = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [d.add(i) for i in ids]
    deltas.append(d.flush())
    return "".join(deltas), deltas


@pytest.mark.parametrize("text", ["Hello, world! How are you?", "naïve café — déjà vu", "日本語のテキストです。",
                                  "emoji 🎉🧵 and more 👩‍💻", "  leading spaces\n\nnew lines\ttabs", "ünïcödé😀x"])
def test_incremental_equals_full_decode(tok, text):
    prompt = tok.encode("Say:")
    ids = tok.encode(text, add_special_tokens=False)
    joined, deltas = stream(tok, prompt, ids)
    assert joined == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas), "a partial character leaked into a delta"


def test_split_multibyte_character_is_held_back(tok):
    ids = tok.encode("🧵", add_special_tokens=False)
    assert len(ids) > 1, "expected the emoji to need several byte tokens"
    d = IncrementalDetokenizer(tok, [])
    assert [d.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.add(ids[-1]) == "🧵"


def test_chat_template_comes_from_the_model(tok):
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == text
