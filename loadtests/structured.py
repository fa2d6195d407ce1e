"""Structured output cost, engine level (no HTTP): decode step time with every sequence constrained by a JSON schema
against the same batch unconstrained, at each concurrency; and grammar compile time of a typical 10-field schema,
cold and from the cache.

    python -m loadtests.structured --model default --concurrency 1 32 --json loadtests/results/structured.json

Only steps where all `c` sequences decode together are timed (no prefill in the step), so both runs time the same
work apart from the grammar: each sequence's bitmask fill, the batched mask, and the matcher's advance."""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.grammar import GrammarSpec
from server.engine.grammar_compiler import GrammarCompiler
from server.model import ModelSettings, load_model

PERSON = {  # a typical 10-field record
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "format": "email"},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"]},
        "manager": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
    },
    "required": ["id", "name", "email", "age", "score", "active", "role", "tags", "address", "manager"],
}
# many records, so that constrained sequences keep decoding for the whole measured stretch
MANY = {"type": "object", "properties": {"people": {"type": "array", "items": PERSON, "minItems": 50}},
        "required": ["people"]}


def decode_step_times(core: EngineCore, prompts: list[list[int]], params: SamplingParams) -> list[float]:
    for i, prompt in enumerate(prompts):
        core.add_request(f"r{i}", prompt, params)
    times = []
    while core.has_unfinished():
        started = time.perf_counter()
        core.step()
        elapsed = time.perf_counter() - started
        if core.last_step_seqs == len(prompts) and core.last_step_tokens == len(prompts):  # all decoding
            times.append(elapsed)
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="runs per (concurrency, constrained) pair, interleaved")
    p.add_argument("--cold-compiles", type=int, default=5)
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)

    lm = load_model(ModelSettings(model=args.model, dtype=args.dtype))
    results: dict = {"model": args.model, "dtype": str(lm.dtype), "prompt_len": args.prompt_len,
                     "output_len": args.output_len}

    # -- compile time ---------------------------------------------------------------------------------------------
    started = time.perf_counter()
    compiler = GrammarCompiler(lm.tokenizer, lm.config.vocab_size, timeout=120)
    compiler._xgr_compiler()  # noqa: SLF001 - the tokenizer's one-off preprocessing, timed on its own
    tokenizer_info = time.perf_counter() - started
    cold = []
    for i in range(args.cold_compiles):  # distinct specs (a different title): each one a cache miss
        spec = GrammarSpec.json_schema({**PERSON, "title": f"person {i}"})
        started = time.perf_counter()
        compiler.compile(spec)
        cold.append(time.perf_counter() - started)
    spec = GrammarSpec.json_schema({**PERSON, "title": "person 0"})
    cached = []
    for _ in range(200):
        started = time.perf_counter()
        compiler.compile(spec)
        cached.append(time.perf_counter() - started)
    results["compile"] = {"tokenizer_info_s": round(tokenizer_info, 3),
                          "cold_ms_median": round(statistics.median(cold) * 1e3, 2),
                          "cold_ms_max": round(max(cold) * 1e3, 2),
                          "cached_us_median": round(statistics.median(cached) * 1e6, 1)}
    print(f"compile: tokenizer info {tokenizer_info:.2f}s once; 10-field schema cold {results['compile']['cold_ms_median']}"
          f" ms (median of {args.cold_compiles}), cached {results['compile']['cached_us_median']} us")

    # -- decode step time -----------------------------------------------------------------------------------------
    grammar = compiler.compile(GrammarSpec.json_schema(MANY))
    rng = random.Random(0)
    vocab = lm.config.vocab_size
    core = EngineCore(lm, EngineSettings(enable_prefix_caching=False, max_num_seqs=max(args.concurrency)))
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    decode_step_times(core, [[rng.randrange(100, vocab - 100) for _ in range(args.prompt_len)]], warm)
    results["decode"] = []
    for c in args.concurrency:
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for constrained in (False, True):
                prompts = [[rng.randrange(100, vocab - 100) for _ in range(args.prompt_len)] for _ in range(c)]
                params = SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=1, ignore_eos=True,
                                        grammar=grammar if constrained else None)
                times[constrained] += decode_step_times(core, prompts, params)
        free, bound = statistics.median(times[False]), statistics.median(times[True])
        row = {"concurrency": c, "unconstrained_ms": round(free * 1e3, 2), "constrained_ms": round(bound * 1e3, 2),
               "slowdown_pct": round((bound / free - 1) * 100, 1), "steps": [len(times[False]), len(times[True])]}
        results["decode"].append(row)
        print(f"c={c:3d}: decode step {row['unconstrained_ms']} ms unconstrained, {row['constrained_ms']} ms "
              f"constrained ({row['slowdown_pct']:+.1f}%; medians of {row['steps']} steps)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
