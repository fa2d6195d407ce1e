"""LoRA adapters beside a decoder's base weights: PEFT directories read into per-module (A, B) pairs (adapter.py),
wrappers that add a step's adapter deltas to the base linears' outputs (layer.py), the device slots the adapters of a
step occupy (slots.py) and the step's token-to-adapter segments (batch.py)."""
from server.model.lora.adapter import AdapterError, LoraAdapter, read_adapter
from server.model.lora.batch import LoraBatch
from server.model.lora.layer import LoraLinear
from server.model.lora.slots import LoraSlots

__all__ = ["AdapterError", "LoraAdapter", "LoraBatch", "LoraLinear", "LoraSlots", "read_adapter"]
