"""`loom` command line: `loom generate` (offline batch) and `loom serve` (HTTP server)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.logs import setup_logging


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="HF directory, .gguf file, 'default', or 'dummy:<preset|config>'")
    g.add_argument("--served-model-name", default=None)
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--quantization", default=None, choices=["auto", "gguf", "q4", "q8", "none"],
                   help="CPU weights: gguf = a GGUF's own 4/8-bit blocks; auto = gguf for a GGUF unless --dtype float32, "
                        "safetensors as they are; q4/q8 = quantize at load (cached); none = de-quantized")
    g.add_argument("--cache-dir", default=None, type=Path, help="where converted GGUF checkpoints are kept")
    e = p.add_argument_group("engine")
    e.add_argument("--block-size", type=int, default=None)
    e.add_argument("--kv-cache-memory", type=float, default=None, help="GiB of KV cache on CPU")
    e.add_argument("--gpu-memory-utilization", type=float, default=None)
    e.add_argument("--num-kv-blocks", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    e.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None)
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace):
    """Model and engine settings: CLI flags override LOOM_* environment variables, which override defaults."""
    from server.engine import EngineSettings
    from server.model import ModelSettings

    def given(cls) -> dict:
        return {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}

    return ModelSettings(**given(ModelSettings)), EngineSettings(**given(EngineSettings))


def read_prompts(args: argparse.Namespace) -> list:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        for n, line in enumerate(Path(args.prompts_file).read_text().splitlines(), 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if isinstance(item, dict):
                item = item.get("messages") or item.get("prompt")
            if item is None:
                sys.exit(f"{args.prompts_file}:{n}: expected a string, or an object with 'prompt' or 'messages'")
            prompts.append(item)
    if not prompts:
        sys.exit("give at least one --prompt or a --prompts-file")
    return prompts


def cmd_generate(args: argparse.Namespace) -> None:
    from server.engine import EngineCore, InvalidRequestError, SamplingParams
    from server.engine.offline import generate
    from server.model import load_model

    prompts = read_prompts(args)
    model_settings, engine_settings = settings_from_args(args)
    lm = load_model(model_settings, progress=sys.stderr.isatty())
    tok = lm.tokenizer
    use_template = not args.raw and tok.has_chat_template
    ids = []
    for p in prompts:
        if isinstance(p, list):
            ids.append(tok.encode_chat(p))
        else:
            ids.append(tok.encode_chat([{"role": "user", "content": p}]) if use_template else tok.encode(p))
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=args.stop or [])
        core = EngineCore(lm, engine_settings)
        results = generate(core, ids, params)
    except InvalidRequestError as exc:
        sys.exit(f"error: {exc}")
    for prompt, (c,) in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason}, ensure_ascii=False), flush=True)
        else:
            print(c.text, flush=True)
            if len(prompts) > 1:
                print("-" * 40, flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "serve"]:  # the load generator has its own flags (and --help)
        from loadtests.serve import main as bench_serve
        return bench_serve(argv[2:])
    parser = argparse.ArgumentParser(prog="loom", description="Loom LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts offline and print the results")
    add_model_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="JSON lines: a string, or {'prompt': str} or {'messages': [...]}")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt, in input order")
    gen.set_defaults(func=cmd_generate)

    sub.add_parser("bench", help="`loom bench serve ...`: drive an OpenAI-compatible server under load "
                                 "(python -m loadtests.serve)")
    try:
        from server.api.cli import add_serve_command
        add_serve_command(sub, add_model_args)
    except ImportError:  # the HTTP layer is optional for offline use
        pass

    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
