"""GGUF files for benchmarks, made here (nothing is downloaded): random weights of a real model's shape.

  python -m loadtests.make_gguf --shape 1b --out ~/.cache/loom-bench/llama-1b-Q4_K_M.gguf
      a Llama-3.2-1B-shaped model (the default model's 49k vocabulary): random weights from a transformers config,
      through llama.cpp's convert_hf_to_gguf.py and llama-quantize (loadtests/build_llama_server.sh builds them); the converter needs `pip install sentencepiece`
  python -m loadtests.make_gguf --shape 8b --direct --out ~/.cache/loom-bench/llama-8b-Q4_K_M.gguf
      a Llama-3.1-8B-shaped file written directly with gguf-py: random Q4_K_M-style blocks (Q4_K, with Q6_K for
      attn_v / ffn_down / output), as llama-quantize lays them out; no 16 GB float checkpoint on the way
  python -m loadtests.make_gguf --requantize default --type Q4_K_M --out ~/.cache/loom-bench/default-Q4_K_M.gguf
      the default model re-quantized by llama-quantize (--allow-requantize), for the perplexity comparison
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PEERS = Path(os.environ.get("LOOM_PEERS_CACHE", "~/.cache/loom-peers")).expanduser()
SHAPES = {  # Llama 3.x dimensions; vocabulary: the default model's tokenizer (49,152)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
Q4_K_M = {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K", "token_embd": "Q4_K"}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def tool(name: str) -> str:
    path = PEERS / name
    if not path.exists():
        sys.exit(f"{path} is missing: run loadtests/build_llama_server.sh first")
    return str(path)


def via_llama_cpp(shape: str, qtype: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from server.model.loader import default_gguf
    from server.model.weights.gguf import tokenizer_dir

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1,
                          eos_token_id=2, **SHAPES[shape])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        del model
        for f in tokenizer_dir(default_gguf(), Path("~/.cache/loom").expanduser()).iterdir():
            (Path(tmp) / f.name).write_bytes(f.read_bytes())
        f16 = Path(tmp) / "model-f16.gguf"
        env_path = f"{PEERS / 'llama.cpp' / 'gguf-py'}:{os.environ.get('PYTHONPATH', '')}"
        print("+ convert_hf_to_gguf.py", flush=True)
        subprocess.run([sys.executable, str(PEERS / "llama.cpp" / "convert_hf_to_gguf.py"), tmp, "--outtype", "f16",
                        "--outfile", str(f16)], check=True, env={**os.environ, "PYTHONPATH": env_path})
        run([tool("llama-quantize"), str(f16), str(out), qtype])


def direct(shape: str, out: Path) -> None:
    from tests.support.gguf_files import TinyShape, write_gguf
    s = SHAPES[shape]
    dims = TinyShape(hidden=s["hidden_size"], intermediate=s["intermediate_size"], layers=s["num_hidden_layers"],
                     heads=s["num_attention_heads"], kv_heads=s["num_key_value_heads"], head_dim=s["head_dim"],
                     context=8192, rope_base=500000.0)
    write_gguf(out, "llama", Q4_K_M, dims, tied=s["tie_word_embeddings"], keep_floats=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES))
    p.add_argument("--requantize", help="a GGUF to re-quantize ('default': the default model)")
    p.add_argument("--type", default="Q4_K_M", help="llama-quantize type (default Q4_K_M)")
    p.add_argument("--direct", action="store_true", help="write random Q4_K_M-style blocks with gguf-py")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out = args.out.expanduser()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.requantize:
        from server.model.loader import default_gguf
        src = default_gguf() if args.requantize == "default" else Path(args.requantize)
        run([tool("llama-quantize"), "--allow-requantize", str(src), str(args.out), args.type])
    elif args.direct:
        direct(args.shape, args.out)
    else:
        via_llama_cpp(args.shape, args.type, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
