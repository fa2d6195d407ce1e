"""Phi-3 and Phi-4-mini: the Llama decoder (llama.py) as their checkpoints store it, with partial rotary and LongRoPE.

The checkpoints hold q/k/v and gate/up already fused (`self_attn.qkv_proj`, `mlp.gate_up_proj`, in Loom's own
order: q, k, v rows; gate, then up), so they map one to one and nothing is packed at load. Only the first
`rotary_dim = head_dim * partial_rotary_factor` features of each head rotate (Phi-4-mini: 96 of 128): the rotary
table is that wide and the rotary op leaves the rest. `rope_scaling` "longrope" picks one of two factor sets for the
whole table; rope.py says which and why. A `sliding_window` applies to every layer.
"""
from torch import nn

from server.model.llama import LlamaForCausalLM
from server.model.rope import cos_sin_cache


class Phi3ForCausalLM(LlamaForCausalLM):
    packed: dict[str, tuple[str, int]] = {}  # fused in the checkpoint already

    def post_init(self) -> None:
        """Tie the head and compute the rotary table over the rotated features only (see LlamaForCausalLM)."""
        c = self.config
        if c.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # quantized heads carry their own codes
            self.lm_head.weight = self.model.embed_tokens.weight
        device = self.model.norm.weight.device
        if device.type != "meta":
            self.cos_sin = cos_sin_cache(c.rotary_dim, c.max_position_embeddings, c.rope_theta,
                                         c.rope_scaling).to(device)

    def expected_weights(self) -> set[str]:
        return {name for name, _ in self.named_parameters()}
