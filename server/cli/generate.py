"""`loom generate`: complete prompts offline, as one continuous batch, and print the results."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.cli.args import add_model_args, settings_of


def add_generate_command(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="complete prompts offline and print the results")
    add_model_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="JSON lines: a string, or {'prompt': str} or {'messages': [...]}")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None, help="seed of every prompt's sampling")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt, in input order")
    gen.set_defaults(func=cmd_generate)


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
    from server.engine import EngineCore, EngineError, EngineSettings, SamplingParams
    from server.engine.offline import generate
    from server.model import ModelSettings, load_model

    prompts = read_prompts(args)
    lm = load_model(settings_of(ModelSettings, args), progress=sys.stderr.isatty())
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
        results = generate(EngineCore(lm, settings_of(EngineSettings, args)), ids, params)
    except EngineError as exc:
        sys.exit(f"error: {exc}")
    for prompt, (c,) in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason}, ensure_ascii=False), flush=True)
        else:
            print(c.text, flush=True)
            if len(prompts) > 1:
                print("-" * 40, flush=True)
