"""Speculative decoding on a copy-heavy request: output tokens/s with `--speculative none`, `auto` and `ngram` on the
same engine weights, greedy, one request at a time (and `--concurrency N` at once), plus whether the texts are
token-identical and how many drafts were accepted. The prompt asks for a rewrite of a ~150-word text, so much of
the answer copies it.

    python -m loadtests.speculative --model default --tokens 128
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from loom_kernels.cpu.platform import cpu_model
from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate
from server.model import ModelSettings, load_model

TEXT = ("The city council met on Tuesday evening to discuss the new library project. After two hours of debate, the "
        "members agreed to fund the construction of a three-storey building next to the central park. The library "
        "will hold more than forty thousand books, a children's reading room, a small theatre and a cafe. Work is "
        "expected to begin in the spring and to last about eighteen months. The mayor said that the project would "
        "give students a quiet place to study and would bring new visitors to the old town. Some residents worried "
        "about the cost and about traffic during the construction, but most of the people who spoke at the meeting "
        "welcomed the plan. The council will publish the final budget next month, and a public exhibition of the "
        "architect's drawings will open at the town hall on Saturday.")
PROMPTS = {"copy": f"Rewrite the following text, correcting nothing and keeping every sentence:\n\n{TEXT}",
           "plain": "Write a short story about a lighthouse keeper who finds a message in a bottle."}


def measure(lm, mode: str, prompt: list[int], tokens: int, concurrency: int, repeats: int) -> dict:
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.5, speculative=mode))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    generate(core, [prompt] * concurrency, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))  # warm-up
    best, outputs = None, None
    spec = core.speculator
    drafted, accepted = spec.drafted, spec.accepted  # the timed runs' own
    for _ in range(repeats):
        started = time.perf_counter()
        results = generate(core, [prompt] * concurrency, params)
        seconds = time.perf_counter() - started
        best, outputs = min(best or 1e9, seconds), [r[0].token_ids for r in results]
    return {"mode": mode, "tok_s": round(tokens * concurrency / best, 1), "outputs": outputs,
            "drafted": spec.drafted - drafted, "accepted": spec.accepted - accepted}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    lm = load_model(ModelSettings(model=args.model), progress=False)
    report: dict = {"model": args.model, "cpu": cpu_model(), "threads": torch.get_num_threads(), "runs": []}
    for name, text in PROMPTS.items():
        prompt = lm.tokenizer.encode_chat([{"role": "user", "content": text}])
        for c in args.concurrency:
            rows = [measure(lm, mode, prompt, args.tokens, c, args.repeats) for mode in ("none", "auto", "ngram")]
            base, reference = rows[0]["tok_s"], rows[0]["outputs"]
            for row in rows:
                row["speedup"] = round(row["tok_s"] / base, 2)
                row["identical"] = row.pop("outputs") == reference
                print(f"{name:5s} c={c:<3d} {row['mode']:5s} {row['tok_s']:7.1f} tok/s  {row['speedup']:.2f}x  "
                      f"drafts {row['accepted']}/{row['drafted']} accepted  identical={row['identical']}")
            report["runs"].append({"prompt": name, "concurrency": c, "modes": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
