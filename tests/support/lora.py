"""LoRA adapters for tests: random PEFT adapters (B non-zero, so they change the output) written by peft itself, and
Hugging Face references with an adapter merged into the weights."""
from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(base: Path, out: Path, r: int = 4, alpha: float = 8.0, targets: list[str] = ALL_TARGETS,
                  seed: int = 0, use_rslora: bool = False, scale: float = 0.3) -> Path:
    """A PEFT adapter of the checkpoint at `base`, saved by `save_pretrained` (adapter_config.json +
    adapter_model.safetensors). A and B are random (`scale` keeps the deltas a fair fraction of the weights)."""
    from peft import LoraConfig, get_peft_model

    from tests.support.models import hf_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora, init_lora_weights=False,
                     lora_dropout=0.0)
    peft_model = get_peft_model(hf_model(base), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    peft_model.save_pretrained(out)
    return out


def hf_merged(base: Path, adapter: Path):
    """transformers' model of `base` with `adapter` merged into its weights (float32)."""
    from peft import PeftModel

    from tests.support.models import hf_model

    return PeftModel.from_pretrained(hf_model(base), adapter).merge_and_unload().eval()
