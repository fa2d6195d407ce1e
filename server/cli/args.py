"""Flags shared by `loom generate` and `loom serve`, and the settings objects built from them. Every flag has a
`LOOM_*` environment variable; flags win over the environment, which wins over defaults. One settings object per
layer: ModelSettings (server/model), EngineSettings (server/engine), TaskSettings (server/tasks), ServerSettings
(server/api)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeVar

from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="HF directory, .gguf file, 'default', or 'dummy:<preset|config>'")
    g.add_argument("--served-model-name", default=None)
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--quantization", default=None, choices=["auto", "gguf", "q4", "q8", "none"],
                   help="CPU weights: gguf = a GGUF's own 4/8-bit blocks; auto = gguf for a GGUF unless --dtype float32, "
                        "safetensors as they are; q4/q8 = quantize at load (cached); none = de-quantized")
    g.add_argument("--linear-kernels", default=None, choices=["auto", "quantized"],
                   help="auto: the fastest kernel per batch size (may keep dense copies); quantized: 4/8-bit only")
    g.add_argument("--weight-memory", type=float, default=None,
                   help="quantized linears may hold at most this multiple of their stored bytes (default 1.3: "
                        "essentially the file's own blocks); e.g. 8 lets calibration keep dense copies where large "
                        "batches run faster on them, at up to 8x the memory of a 4-bit file")
    g.add_argument("--activations", default=None, choices=["auto", "float", "int8"],
                   help="int8: linears over GGUF blocks may take int8-quantized activations where measured faster "
                        "(as llama.cpp does; faster, a small accuracy cost: see BENCHMARKS.md); auto (default): "
                        "the same for decoding alone on CPUs without native bf16, prompts in float; float: never")
    g.add_argument("--cpu-isa", default=None, choices=["auto", "avx2"],
                   help="avx2: take the AVX2-only kernel choices on any CPU (LOOM_CPU_ISA)")
    g.add_argument("--cache-dir", default=None, type=Path, help="where tokenizers read from GGUFs, kernel plans and q4/q8 quantizations are kept")
    e = p.add_argument_group("engine")
    e.add_argument("--block-size", type=int, default=None)
    add_kv_cache_args(e)
    e.add_argument("--gpu-memory-utilization", type=float, default=None)
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--max-waiting", type=int, default=None,
                   help="waiting sequences beyond which new requests get 429 (LOOM_MAX_WAITING, default 1024)")
    e.add_argument("--max-waiting-tokens", type=int, default=None,
                   help="prompt tokens not yet prefilled beyond which new requests get 429 (default 0: no cap)")
    e.add_argument("--priority-step-seconds", type=float, default=None,
                   help="waiting time one `priority` level is worth (default 10): lower first, none starves")
    e.add_argument("--grammar-compile-timeout", type=float, default=None,
                   help="seconds a grammar (JSON schema, regex, tools) may compile before it is stopped (400), and a "
                        "request may wait for a compile worker (503) (LOOM_GRAMMAR_COMPILE_TIMEOUT, default 10)")
    e.add_argument("--grammar-compile-workers", type=int, default=None,
                   help="grammar compile processes (LOOM_GRAMMAR_COMPILE_WORKERS, default 2)")
    e.add_argument("--grammar-compile-queue", type=int, default=None,
                   help="new grammars waiting for a compile worker beyond which requests get 503 "
                        "(LOOM_GRAMMAR_COMPILE_QUEUE, default 64)")
    e.add_argument("--grammar-cache-size", type=int, default=None,
                   help="distinct compiled grammars kept, LRU (LOOM_GRAMMAR_CACHE_SIZE, default 256)")
    add_speculative_args(e)
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    e.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None)
    e.add_argument("--enable-lora", action="store_true", default=None,
                   help="serve LoRA adapters (implied by --lora); also enables /v1/load_lora_adapter")
    e.add_argument("--max-loras", type=int, default=None,
                   help="most distinct LoRA adapters in one step; requests of further adapters wait (default 4)")
    e.add_argument("--max-lora-rank", type=int, default=None, help="largest LoRA rank accepted (default 16)")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])


def add_kv_cache_args(e: argparse._ArgumentGroup) -> None:
    e.add_argument("--kv-cache-memory", type=float, default=None,
                   help="GiB of KV cache on CPU (default: --max-num-seqs full contexts of the model, capped by "
                        "--kv-cache-memory-fraction)")
    e.add_argument("--kv-cache-memory-fraction", type=float, default=None,
                   help="most of the machine's (or cgroup's) memory a model-sized CPU KV cache takes (default 0.1)")
    e.add_argument("--kv-cache-dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="KV cache element type (default auto: the model's dtype, but float16 for quantized models "
                        "computing in float32 on CPU, as llama.cpp keeps K/V)")
    e.add_argument("--num-kv-blocks", type=int, default=None)


def add_speculative_args(e: argparse._ArgumentGroup) -> None:
    e.add_argument("--speculative", default=None, choices=["auto", "ngram", "none"],
                   help="speculative decoding from n-grams of the prompt and output, verified losslessly: auto "
                        "(default) where it is measured to pay, ngram whenever a draft is found, none off")
    e.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="most draft tokens verified per sequence and step (default 5)")
    e.add_argument("--ngram-min", type=int, default=None, help="shortest suffix n-gram drafts are looked up by (2)")
    e.add_argument("--ngram-max", type=int, default=None, help="longest suffix n-gram drafts are looked up by (4)")


def settings_of(cls: type[S], args: argparse.Namespace) -> S:
    """`cls` from the environment, with the flags given on the command line on top."""
    return cls(**{k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None})
