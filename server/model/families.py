"""Decoder families Loom runs, by `ModelConfig.family`: one module per architecture beside this file."""
from torch import nn

from server.model.gpt2 import GPT2LMHeadModel
from server.model.llama import LlamaForCausalLM

FAMILIES: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}
