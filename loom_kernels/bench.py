"""Microbenchmarks of Loom's Triton kernels against torch (and flash-attn when importable), CUDA only.

Decode is memory bound, so it reports achieved bandwidth (the K/V bytes a step must read, plus q/out/tables, over
the time) as a fraction of the device's peak; prefill is compute bound, so it reports TFLOP/s (causal: only the
visible half of QK^T and PV counts). The elementwise kernels report GB/s against the torch reference. Each
attention row also shows its max |difference| from torch SDPA on the same data, a quick GPU correctness check.

    python -m loom_kernels.bench                      # everything, bf16, Llama-8B-like heads (32 q / 8 kv, d=128)
    python -m loom_kernels.bench --only decode --peak-bw 3.35 --graphs
"""
import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F

# Peak HBM bandwidth (TB/s) by the first substring found in torch.cuda.get_device_name(); plain "H100" is the SXM
# part ("NVIDIA H100 80GB HBM3"). Override with --peak-bw for anything else.
PEAK_BW_TBS = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35)]
DECODE_SHAPES = [(1, 4096), (1, 32768), (8, 8192), (32, 4096), (64, 2048), (256, 1024)]  # (batch, context)
PREFILL_SHAPES = [(1, 1024), (1, 4096), (1, 8192), (4, 2048), (16, 512)]  # (sequences, prompt length)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError:
    flash_attn_varlen_func = flash_attn_with_kvcache = None


def peak_bandwidth(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((tbs for key, tbs in PEAK_BW_TBS if key.lower() in name.lower()), None)


def timed(fn, graphs: bool) -> float:
    """Median milliseconds per call; with `graphs`, replayed from a CUDA graph as the server's decode steps are."""
    import triton.testing
    if graphs:
        return triton.testing.do_bench_cudagraph(fn, rep=100)
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def paged(batch: int, length: int, args, device: str):
    """Caches holding `batch` sequences of `length` tokens in shuffled blocks, their dense [B, Hkv, L, D] copies."""
    dtype, bs = DTYPES[args.dtype], args.block_size
    per_seq = -(-length // bs)
    shape = (batch * per_seq, bs, args.kv_heads, args.head_dim)
    k_cache = torch.randn(shape, device=device, dtype=dtype)
    v_cache = torch.randn(shape, device=device, dtype=dtype)
    table = torch.randperm(batch * per_seq, device=device).int().view(batch, per_seq)
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    dense = [c[table.long()].flatten(1, 2)[:, :length].transpose(1, 2).contiguous() for c in (k_cache, v_cache)]
    return k_cache, v_cache, table, lens, dense


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[B, H, D]` over dense k/v `[B, Hkv, L, D]`."""
    return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]


def sdpa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[B * L, H, D]` (equal-length prompts) over dense k/v `[B, Hkv, L, D]`, causal."""
    batch, _, length, head_dim = k.shape
    q_dense = q.view(batch, length, -1, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q_dense, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape)


def bench_decode(args, device: str, peak: float | None) -> list[dict]:
    from loom_kernels.attention.decode_triton import choose_num_splits
    from loom_kernels.attention.decode_triton import paged_attention_decode_triton as decode
    rows, scale = [], args.head_dim ** -0.5
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for batch, length in DECODE_SHAPES:
        k_cache, v_cache, table, lens, (k, v) = paged(batch, length, args, device)
        q = torch.randn(batch, args.heads, args.head_dim, device=device, dtype=k.dtype)
        moved = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size() + table.numel() * 4
        ref = sdpa_decode(q, k, v, scale)
        splits = choose_num_splits(batch, args.kv_heads, table.shape[1] * args.block_size, sms)
        impls = {f"triton (splits={splits})": partial(decode, q, k_cache, v_cache, table, lens, scale),
                 "triton (splits=1)": partial(decode, q, k_cache, v_cache, table, lens, scale, num_splits=1),
                 "torch sdpa (dense)": partial(sdpa_decode, q, k, v, scale)}
        if flash_attn_with_kvcache is not None:
            k_fa, v_fa = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            impls["flash_attn (dense)"] = partial(flash_attn_with_kvcache, q[:, None], k_fa, v_fa, cache_seqlens=lens,
                                                  softmax_scale=scale)
        for name, fn in impls.items():
            ms = timed(fn, args.graphs)
            tbs = moved / (ms * 1e-3) / 1e12
            rows.append({"op": "decode", "shape": f"B={batch} L={length}", "impl": name, "ms": f"{ms:.4f}",
                         "TB/s": f"{tbs:.2f}", "% peak": f"{100 * tbs / peak:.0f}%" if peak else "n/a",
                         "max err": f"{(fn().float().view(ref.shape) - ref.float()).abs().max().item():.1e}"})
        del k_cache, v_cache, k, v
    return rows


def bench_prefill(args, device: str) -> list[dict]:
    from loom_kernels.attention.prefill_triton import paged_attention_prefill_triton as prefill
    rows, scale = [], args.head_dim ** -0.5
    for batch, length in PREFILL_SHAPES:
        k_cache, v_cache, table, lens, (k, v) = paged(batch, length, args, device)
        q = torch.randn(batch * length, args.heads, args.head_dim, device=device, dtype=k.dtype)
        cu = torch.arange(0, batch * length + 1, length, dtype=torch.int32, device=device)
        flops = 4 * batch * length * (length + 1) / 2 * args.heads * args.head_dim
        impls = {"triton (paged)": partial(prefill, q, k_cache, v_cache, table, cu, lens, scale),
                 "torch sdpa (dense)": partial(sdpa_prefill, q, k, v, scale)}
        if flash_attn_varlen_func is not None:
            k_fa = k.transpose(1, 2).reshape(-1, args.kv_heads, args.head_dim)
            v_fa = v.transpose(1, 2).reshape(-1, args.kv_heads, args.head_dim)
            impls["flash_attn varlen (dense)"] = partial(flash_attn_varlen_func, q, k_fa, v_fa, cu, cu, length, length,
                                                         softmax_scale=scale, causal=True)
        ref = sdpa_prefill(q, k, v, scale)
        for name, fn in impls.items():
            ms = timed(fn, False)
            rows.append({"op": "prefill", "shape": f"B={batch} L={length}", "impl": name, "ms": f"{ms:.4f}",
                         "TFLOP/s": f"{flops / (ms * 1e-3) / 1e12:.1f}",
                         "max err": f"{(fn().float() - ref.float()).abs().max().item():.1e}"})
        del k_cache, v_cache, k, v
    return rows


def bench_elementwise(args, device: str) -> list[dict]:
    from loom_kernels.activation.reference import silu_and_mul_ref
    from loom_kernels.activation.triton_kernel import silu_and_mul_triton
    from loom_kernels.kv_write.reference import write_kv_ref
    from loom_kernels.kv_write.triton_kernel import write_kv_triton
    from loom_kernels.rms_norm.reference import rms_norm_ref
    from loom_kernels.rms_norm.triton_kernel import rms_norm_triton
    from loom_kernels.rotary.reference import rotary_ref
    from loom_kernels.rotary.triton_kernel import rotary_triton
    dtype, tokens, hidden, d = DTYPES[args.dtype], args.tokens, args.heads * args.head_dim, args.head_dim
    elt = torch.finfo(dtype).bits // 8
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    res = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = torch.ones(hidden, device=device, dtype=dtype)
    gate_up = torch.randn(tokens, 2 * args.intermediate, device=device, dtype=dtype)
    q = torch.randn(tokens, args.heads, d, device=device, dtype=dtype)
    kk = torch.randn(tokens, args.kv_heads, d, device=device, dtype=dtype)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device=device) / d)
    freqs = torch.outer(torch.arange(8192, device=device).float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    pos = torch.randint(0, 8192, (tokens,), device=device)
    cache = torch.empty(tokens // args.block_size + 1, args.block_size, args.kv_heads, d, device=device, dtype=dtype)
    slots = torch.randperm(cache.shape[0] * args.block_size, device=device)[:tokens]
    cases = [("rms_norm+residual", 5 * tokens * hidden * elt, rms_norm_triton, rms_norm_ref, (x, w, 1e-6, res)),
             ("silu_and_mul", 3 * tokens * args.intermediate * elt, silu_and_mul_triton, silu_and_mul_ref, (gate_up,)),
             ("rotary", 2 * (q.numel() + kk.numel()) * elt, rotary_triton, rotary_ref, (q, kk, pos, cos_sin)),
             ("write_kv", 4 * kk.numel() * elt, write_kv_triton, write_kv_ref, (kk, kk, cache, cache.clone(), slots))]
    rows = []
    for op, moved, tri, ref, call_args in cases:
        for name, fn in (("triton", tri), ("torch reference", ref)):
            ms = timed(partial(fn, *call_args), False)
            rows.append({"op": op, "shape": f"T={tokens}", "impl": name, "ms": f"{ms:.4f}",
                         "TB/s": f"{moved / (ms * 1e-3) / 1e12:.2f}"})
    return rows


def print_table(rows: list[dict]) -> None:
    cols = list(dict.fromkeys(key for row in rows for key in row))
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    print("  ".join("-" * width[c] for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(width[c]) for c in cols))
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="decode,prefill,elementwise", help="comma-separated subset")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens for the elementwise kernels")
    parser.add_argument("--intermediate", type=int, default=14336, help="MLP width for silu_and_mul")
    parser.add_argument("--peak-bw", type=float, default=None, help="peak memory bandwidth in TB/s")
    parser.add_argument("--graphs", action="store_true", help="time decode replayed from CUDA graphs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("loom_kernels.bench: no CUDA device; these benchmarks only mean something on a GPU. Nothing to do.")
        return 0
    device, name = "cuda", torch.cuda.get_device_name()
    peak = peak_bandwidth(name, args.peak_bw)
    print(f"{name}: peak bandwidth {f'{peak} TB/s' if peak else 'unknown (pass --peak-bw)'}; dtype {args.dtype}, "
          f"heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}, block_size {args.block_size}, "
          f"flash_attn {'found' if flash_attn_varlen_func else 'not installed'}\n")
    only = set(args.only.split(","))
    if "decode" in only:
        print_table(bench_decode(args, device, peak))
    if "prefill" in only:
        print_table(bench_prefill(args, device))
    if "elementwise" in only:
        print_table(bench_elementwise(args, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
