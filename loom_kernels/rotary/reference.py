"""PyTorch reference of rotary position embedding (neox / Hugging Face `rotate_half` style)."""
import torch


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate q `[T, H, D]` and k `[T, Hkv, D]` in place; `cos_sin_cache[pos] = cat(cos, sin)` over rot_dim/2 each.
    Only the first rot_dim features of each head rotate (partial rotary)."""
    cos, sin = cos_sin_cache[positions.long()].float().unsqueeze(1).chunk(2, dim=-1)  # [T, 1, rot/2]
    half = cos.shape[-1]
    for x in (q, k):
        x1 = x[..., :half].float()
        x2 = x[..., half:2 * half].float()
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        x[..., :half] = r1.to(x.dtype)
        x[..., half:2 * half] = r2.to(x.dtype)
