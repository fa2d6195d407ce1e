"""BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa) as plain modules: embeddings, post-norm transformer layers with
bidirectional attention, then a pooled sentence vector (embedding models) or a classification head's probabilities.

A batch is a padded `[B, L]` tensor of token ids and the true `lengths`. Every linear, norm and activation runs on
the real tokens only (flat `[T, hidden]`, no padding rows); attention alone runs padded, through SDPA with a key
mask, so padding never reaches a real token's vector. Parameter names follow Hugging Face's, so checkpoints load by
name (q, k and v are concatenated into one linear at load)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from server.model.config import UnsupportedModelError
from server.model.weights.linear import POST_OPS, PackedLinear

FAMILIES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta"}
ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
# the activations oneDNN can fuse into a prepacked GEMM (server/model/weights/linear.POST_OPS)
FUSED_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class EncoderConfig:
    architecture: str
    family: str  # "bert" or "roberta" (RoBERTa's positions start after the padding id)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str = "gelu"
    id2label: dict[int, str] = field(default_factory=dict)
    problem_type: str | None = None

    @property
    def is_classifier(self) -> bool:
        return self.architecture.endswith("ForSequenceClassification")

    @property
    def position_offset(self) -> int:
        return self.pad_token_id + 1 if self.family == "roberta" else 0

    @property
    def max_len(self) -> int:
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EncoderConfig:
        arch = (raw.get("architectures") or [""])[0]
        family = FAMILIES.get(raw.get("model_type", ""))
        if family is None:
            raise UnsupportedModelError(f"encoder model_type {raw.get('model_type')!r} is not supported "
                                        f"(BERT, RoBERTa, XLM-RoBERTa)")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError("only absolute position embeddings are supported")
        if raw.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise UnsupportedModelError(f"activation {raw.get('hidden_act')!r} is not supported")
        labels = {int(k): str(v) for k, v in (raw.get("id2label") or {}).items()}
        if arch.endswith("ForSequenceClassification"):
            n = raw.get("num_labels") or len(labels) or 2
            labels = {i: labels.get(i, f"LABEL_{i}") for i in range(n)}
        return cls(architecture=arch, family=family, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                   num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
                   intermediate_size=raw["intermediate_size"], max_position_embeddings=raw["max_position_embeddings"],
                   type_vocab_size=raw.get("type_vocab_size", 2), layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
                   pad_token_id=raw.get("pad_token_id") or 0, hidden_act=raw.get("hidden_act", "gelu"),
                   id2label=labels, problem_type=raw.get("problem_type"))


@dataclass
class Pooling:
    mode: str = "mean"  # "mean", "cls" or "lasttoken"
    normalize: bool = False  # L2-normalize the pooled vector (a sentence-transformers Normalize module)


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, h // cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(h, cfg.intermediate_size)
        self.out = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.hidden_act, self.act = cfg.hidden_act, ACTIVATIONS[cfg.hidden_act]

    def fuse_activation(self) -> bool:
        """Run the activation inside the intermediate linear's GEMM where it is oneDNN-prepacked (one pass over the
        [T, intermediate] activations less); False where it is not."""
        if not isinstance(self.intermediate, PackedLinear):
            return False
        self.intermediate.post_op = POST_OPS[FUSED_ACTIVATIONS[self.hidden_act]]
        self.act = _identity
        return True

    def forward(self, x: torch.Tensor, shape: tuple[int, int], rows: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        batch, length = shape
        qkv = self.qkv(x)
        if rows is not None:  # flat real tokens -> padded [B * L] rows for attention
            padded = qkv.new_zeros(batch * length, qkv.shape[-1])
            padded[rows] = qkv
            qkv = padded
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(batch * length, -1)
        if rows is not None:
            attn = attn[rows]
        x = self.attn_norm(x + self.attn_out(attn))
        return self.out_norm(x + self.out(self.act(self.intermediate(x))))


class EncoderModel(nn.Module):
    """`forward(ids [B, L], lengths [B]) -> [B, D]`: pooled (and normalized) vectors of an embedding model, or the
    class probabilities of a classifier (softmax; sigmoid per label for multi-label checkpoints)."""

    def __init__(self, cfg: EncoderConfig, pooling: Pooling | None = None):
        super().__init__()
        self.cfg, self.pooling = cfg, pooling or Pooling()
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        if cfg.is_classifier:
            n = len(cfg.id2label)
            self.head_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)  # BERT's pooler / RoBERTa's dense
            self.head_out = nn.Linear(cfg.hidden_size, n)

    @property
    def output_dim(self) -> int:
        return len(self.cfg.id2label) if self.cfg.is_classifier else self.cfg.hidden_size

    @property
    def multi_label(self) -> bool:
        return self.cfg.problem_type == "multi_label_classification"

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        valid = torch.arange(length, device=ids.device)[None, :] < lengths[:, None]  # [B, L]
        ragged = bool((lengths != length).any())
        rows = valid.flatten().nonzero().squeeze(1) if ragged else None
        mask = valid[:, None, None, :] if ragged else None
        positions = torch.arange(length, device=ids.device).expand(batch, length) + self.cfg.position_offset
        flat_ids, flat_pos = ids.flatten(), positions.flatten()
        if rows is not None:
            flat_ids, flat_pos = flat_ids[rows], flat_pos[rows]
        x = self.embeddings(flat_ids, flat_pos)
        for layer in self.layers:
            x = layer(x, (batch, length), rows, mask)
        starts = torch.cumsum(lengths, 0) - lengths  # each sequence's first row in the flat layout
        if self.cfg.is_classifier:
            logits = self.head_out(torch.tanh(self.head_dense(x[starts]))).float()  # a FloatHead once loaded
            return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return self.pool(x, starts, lengths)

    def pool(self, x: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled in float32: similarity scores and rankings are decided on these vectors."""
        mode, x = self.pooling.mode, x.float()
        if mode == "cls":
            out = x[starts]
        elif mode == "lasttoken":
            out = x[starts + lengths - 1]
        else:
            owner = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
            out = x.new_zeros(len(lengths), x.shape[-1]).index_add_(0, owner, x) / lengths[:, None].to(x.dtype)
        return F.normalize(out, dim=-1) if self.pooling.normalize else out

    # -- weights ------------------------------------------------------------------------------------------------
    def _target(self, name: str) -> str | None:
        """Loom's parameter name for a checkpoint tensor (None: not used)."""
        for prefix in ("bert.", "roberta.", "model."):
            name = name.removeprefix(prefix)
        if name.startswith("embeddings."):
            return None if name.endswith("position_ids") else name
        head = {"pooler.dense.weight": "head_dense.weight", "pooler.dense.bias": "head_dense.bias",
                "classifier.dense.weight": "head_dense.weight", "classifier.dense.bias": "head_dense.bias",
                "classifier.out_proj.weight": "head_out.weight", "classifier.out_proj.bias": "head_out.bias",
                "classifier.weight": "head_out.weight", "classifier.bias": "head_out.bias"}
        if name in head:
            return head[name] if self.cfg.is_classifier else None
        if not name.startswith("encoder.layer."):
            return None
        index, rest = name.removeprefix("encoder.layer.").split(".", 1)
        local = {"attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
                 "intermediate.dense": "intermediate", "output.dense": "out", "output.LayerNorm": "out_norm"}
        module, _, kind = rest.rpartition(".")
        if module in local:
            return f"layers.{index}.{local[module]}.{kind}"
        if module.startswith("attention.self."):
            return f"layers.{index}.qkv.{module.removeprefix('attention.self.')}.{kind}"
        return None

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        qkv: dict[str, dict[str, torch.Tensor]] = {}
        filled = set()
        for name, tensor in tensors:
            target = self._target(name)
            if target is None:
                continue
            if ".qkv." in target:  # layers.i.qkv.query.weight: gather q, k, v, then concatenate
                base, part, kind = target.rsplit(".", 2)
                qkv.setdefault(f"{base}.{kind}", {})[part] = tensor
                continue
            params[target].copy_(tensor)
            filled.add(target)
        for target, parts in qkv.items():
            if set(parts) == {"query", "key", "value"}:
                params[target].copy_(torch.cat([parts["query"], parts["key"], parts["value"]]))
                filled.add(target)
        missing = set(params) - filled
        if missing:
            raise UnsupportedModelError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
