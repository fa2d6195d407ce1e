"""Encoders against Hugging Face transformers in float32: all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2
norm) on a mixed-length batch, tiny random BERT / RoBERTa classifiers' probabilities, and padding invariance."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from server.model import ModelSettings, UnsupportedModelError, load_encoder
from server.model.bert import ACTIVATIONS
from server.model.encoder_loader import read_pooling
from server.model.weights.linear import POST_OPS, PackedLinear

TEXTS = ["Hello, world!", "😀🎉🔥🚀", "The loom weaves threads of warp and weft into cloth.",
         " ".join(f"token{i}" for i in range(300)), "a", "Ünïcödé façade — naïve café"]


def run(enc, inputs: list[list[int]]) -> torch.Tensor:
    length = max(map(len, inputs))
    ids = torch.zeros(len(inputs), length, dtype=torch.long)
    for i, seq in enumerate(inputs):
        ids[i, :len(seq)] = torch.tensor(seq)
    with torch.inference_mode():
        return enc.model(ids, torch.tensor([len(s) for s in inputs]))


def test_minilm_matches_transformers_mean_pooled_and_normalized(minilm_fp32, hf_minilm):
    assert (minilm_fp32.model.pooling.mode, minilm_fp32.model.pooling.normalize) == ("mean", True)
    assert minilm_fp32.max_len == 256 and minilm_fp32.dim == 384
    batch = minilm_fp32.tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == 256 and lengths.min() <= 4  # one text fills the window, one is a few tokens
    with torch.inference_mode():
        hidden = hf_minilm(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ours = run(minilm_fp32, [ids[:n] for ids, n in zip(batch["input_ids"].tolist(), lengths.tolist())])
    assert (ours - expected).abs().max() < 1e-5


def test_padding_never_changes_a_vector(minilm_fp32):
    short = minilm_fp32.encode_texts(["a short text"])[0]
    longs = minilm_fp32.encode_texts([" ".join(["long"] * 250), " ".join(["other"] * 200)])
    alone = run(minilm_fp32, [short])[0]
    for batch in ([*longs, short], [longs[0], short, longs[1]], [short] * 3 + longs):
        inside = run(minilm_fp32, batch)[batch.index(short)]
        assert (alone - inside).abs().max() < 1e-6


@pytest.mark.parametrize("key", ["single", "multi", "roberta"])
def test_tiny_classifier_probabilities_match_transformers(tiny_classifiers, key):
    from transformers import AutoModelForSequenceClassification
    path = tiny_classifiers[key]
    enc = load_encoder(str(path), ModelSettings().cache_dir, "float32", "classify")
    hf = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    texts = ["good", "a much longer sentence that needs padding in the batch", "😀"]
    batch = enc.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = hf(**batch).logits
    expected = torch.sigmoid(logits) if key == "multi" else torch.softmax(logits, -1)
    lengths = batch["attention_mask"].sum(1).tolist()
    ours = run(enc, [ids[:n] for ids, n in zip(batch["input_ids"].tolist(), lengths)])
    assert (ours - expected).abs().max() < 1e-5
    assert enc.labels == [hf.config.id2label[i] for i in range(hf.config.num_labels)]
    assert enc.multi_label == (key == "multi")


def test_roberta_embedding_positions_match_transformers(tiny_classifiers):
    """A classifier checkpoint served as an embedding model: its encoder's mean-pooled states (RoBERTa positions
    start after the padding id)."""
    from transformers import AutoModel
    path = tiny_classifiers["roberta"]
    enc = load_encoder(str(path), ModelSettings().cache_dir, "float32", "embed")
    hf = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    batch = enc.tokenizer(["short", "a longer one with more words in it"], padding=True, return_tensors="pt")
    # MiniLM's tokenizer pads with 0, RoBERTa's positions count non-pad (id 1) tokens: same here, no id 1 in text
    with torch.inference_mode():
        hidden = hf(input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 1),
                    attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
    lengths = batch["attention_mask"].sum(1).tolist()
    ours = run(enc, [ids[:n] for ids, n in zip(batch["input_ids"].tolist(), lengths)])
    assert (ours - expected).abs().max() < 1e-5


def test_pooling_read_from_sentence_transformers_files(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert (read_pooling(tmp_path).mode, read_pooling(tmp_path).normalize) == ("cls", False)
    (tmp_path / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    assert read_pooling(tmp_path).mode == "lasttoken"
    (tmp_path / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(UnsupportedModelError):
        read_pooling(tmp_path)


def test_bf16_auto_stays_close_to_float32(minilm_fp32):
    """bf16 on oneDNN-prepacked weights, GELU fused into the intermediate GEMM where the CPU has native bf16: the
    vectors stay within cosine 0.9995 of float32 (measured 0.99991 on Zen 4), and no worse than with the GELU run
    apart (the fused one rounds once, from the fp32 accumulator)."""
    enc = load_encoder("default", ModelSettings().cache_dir, "bfloat16")
    inputs = minilm_fp32.encode_texts(TEXTS[:3])
    reference = run(minilm_fp32, inputs)
    fused = F.cosine_similarity(run(enc, inputs).float(), reference, dim=-1)
    assert fused.min() > 0.9995
    if isinstance(enc.model.layers[0].intermediate, PackedLinear):  # a CPU with native bf16
        assert all(layer.act is not ACTIVATIONS["gelu"] for layer in enc.model.layers)  # fused
        for layer in enc.model.layers:
            layer.intermediate.post_op, layer.act = POST_OPS["none"], ACTIVATIONS["gelu"]
        apart = F.cosine_similarity(run(enc, inputs).float(), reference, dim=-1)
        assert fused.min() >= apart.min() - 1e-5
