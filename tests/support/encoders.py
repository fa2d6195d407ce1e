"""Encoder fixtures: all-MiniLM-L6-v2 (from the installed package, float32) loaded once per session, its Hugging Face
reference, tiny random BERT-family classifiers saved with the MiniLM tokenizer, and an engine serving them beside the
dummy generator."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from server.engine import EncoderBatcher
from server.model import ModelSettings, load_encoder
from server.model.encoder_loader import default_encoder_dir
from tests.support.servers import make_engine

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return default_encoder_dir(ModelSettings().cache_dir)


@pytest.fixture(scope="session")
def minilm_fp32(minilm_dir):
    return load_encoder("default", ModelSettings().cache_dir, "float32")


@pytest.fixture(scope="session")
def hf_minilm(minilm_dir):
    from transformers import AutoModel
    return AutoModel.from_pretrained(str(minilm_dir), dtype=torch.float32).eval()


def save_tiny_encoder(path: Path, minilm_dir: Path, cls: str = "BertForSequenceClassification", seed: int = 0,
                      **config) -> Path:
    """A tiny random BERT-family checkpoint (MiniLM's tokenizer) with non-trivial norms and biases."""
    import transformers

    family = "Roberta" if cls.startswith("Roberta") else "Bert"
    cfg = getattr(transformers, f"{family}Config")(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64,
                                                   max_position_embeddings=130, **config)
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
                if "LayerNorm" in name:
                    p.add_(1.0)
            else:
                p.normal_(0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_dir / f, path / f)
    return path


@pytest.fixture(scope="session")
def tiny_classifiers(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-encoders")
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    topics = {0: "sports", 1: "politics", 2: "science", 3: "art"}
    return {
        "single": save_tiny_encoder(root / "cls-single", minilm_dir, num_labels=3, id2label=labels,
                                    label2id={v: k for k, v in labels.items()}),
        "multi": save_tiny_encoder(root / "cls-multi", minilm_dir, seed=1, num_labels=4, id2label=topics,
                                   label2id={v: k for k, v in topics.items()},
                                   problem_type="multi_label_classification"),
        "roberta": save_tiny_encoder(root / "cls-roberta", minilm_dir, cls="RobertaForSequenceClassification",
                                     seed=2, num_labels=2, pad_token_id=1),
    }


@pytest.fixture(scope="session")
def encoder_engine(dummy_lm, minilm_fp32, tiny_classifiers):
    """The dummy generator with MiniLM (float32) and the single- and multi-label tiny classifiers beside it."""
    cache = ModelSettings().cache_dir
    encoders = {"all-MiniLM-L6-v2": minilm_fp32}
    for key in ("single", "multi"):
        enc = load_encoder(str(tiny_classifiers[key]), cache, "float32", "classify")
        encoders[enc.name] = enc
    engine = make_engine(dummy_lm, encoders=EncoderBatcher(encoders, max_batch_tokens=1024))
    yield engine
    engine.shutdown()
