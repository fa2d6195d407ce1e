"""Rotary embedding tables: `[max_positions, rot_dim]` = cat(cos, sin), with Llama-3, linear and LongRoPE scaling.

LongRoPE (Phi-3/Phi-4-mini) has two sets of per-frequency divisors: `short_factor` for contexts within the pretraining
length (`original_max_position_embeddings`) and `long_factor` beyond it. transformers picks the set per forward pass
from the longest position in it, and when a generation crosses the pretraining length it drops its KV cache and
recomputes the whole sequence with the long set. A paged KV cache cannot do that: keys rotated with one set and
queries with the other no longer see relative positions. So, as vLLM does, the table uses one set for every position,
chosen by the context the table serves: the long set when it reaches past the pretraining length, the short set
otherwise. That is transformers' result exactly for every sequence when the served context is within the pretraining
length; otherwise for prompts longer than it (whatever the prefill chunking) and for every token once a sequence has
grown past it (transformers recomputes the sequence with the long set then). A sequence still within the pretraining
length of a long-context model gets the long set where transformers would take the short one.
"""
import math
from typing import Any

import torch


def inverse_frequencies(rot_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "factors":  # one divisor per frequency, as llama.cpp stores Llama 3's scaling (rope_freqs)
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def longrope(rot_dim: int, max_positions: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention factor) of LongRoPE for a table of `max_positions` (see the module doc),
    computed as transformers' `_compute_longrope_parameters` does (same operation order: same float32 bits)."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    attention = scaling.get("attention_factor")
    if attention is None:  # the paper's: sqrt(1 + ln(factor) / ln(original)); none without extension
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(scaling["long_factor" if max_positions > original else "short_factor"], dtype=torch.float32)
    exponent = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
    return 1.0 / (ext * theta ** exponent), attention


def cos_sin_cache(rot_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    kind = (scaling or {}).get("rope_type")
    if kind == "longrope":
        inv_freq, attention = longrope(rot_dim, max_positions, theta, scaling)
    else:
        inv_freq, attention = inverse_frequencies(rot_dim, theta, scaling), 1.0
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    return table * attention if attention != 1.0 else table  # LongRoPE scales cos and sin (so q . k by its square)
