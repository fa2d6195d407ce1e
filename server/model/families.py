"""Decoder families Loom runs, by `ModelConfig.family`: one module per architecture beside this file."""
from torch import nn

from server.model.gemma3 import Gemma3ForCausalLM
from server.model.gpt2 import GPT2LMHeadModel
from server.model.llama import LlamaForCausalLM
from server.model.phi3 import Phi3ForCausalLM
from server.model.qwen3 import Qwen3ForCausalLM
from server.model.smollm3 import SmolLM3ForCausalLM

FAMILIES: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM,
                                        "smollm3": SmolLM3ForCausalLM, "phi3": Phi3ForCausalLM,
                                        "gemma3": Gemma3ForCausalLM, "gpt2": GPT2LMHeadModel}
