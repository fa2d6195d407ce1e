"""Accuracy of /v1/classify's scoring on the labelled set in tests/support/data/classify_eval.jsonl, naive vs.
corrected.

    python -m tools.eval_classify [--model default] [--dtype auto] [--variants naive,default]

Runs the classification task on the engine directly (no HTTP): one classify call per task (sentiment, topic) and
variant, so the content-free calibration inputs are shared by all items of a task, as they are within one request.

Measured with the default model (SmolLM2-135M-Instruct, bf16, 2 CPU cores):
    naive                 15/40 = 38%      forms+calibrated      33/40 = 82%
    calibrated            29/40 = 72%      default               35/40 = 88%   (sentiment 19/20, topic 16/20)
    forms                 19/40 = 48%      default+3-orders      36/40 = 90%
    default+examples      34/40 = 85%      default+descriptions  28/40 = 70%   default+end-marker 28/40 = 70%
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from server.tasks import Classifier, ClassifyOptions

DATA = Path(__file__).resolve().parents[1] / "tests" / "support" / "data" / "classify_eval.jsonl"
LABELS = {"sentiment": ["positive", "negative"], "topic": ["sports", "politics", "technology", "business"]}
DESCRIPTIONS = {"positive": "the writer is happy or pleased", "negative": "the writer is unhappy or complains",
                "sports": "games, athletes, teams, matches", "politics": "government, elections, laws, diplomacy",
                "technology": "computers, software, devices, engineering",
                "business": "companies, markets, money, deals"}
EXAMPLES = {"sentiment": [("I love this place, it is great.", "positive"), ("This is awful, I hate it.", "negative")],
            "topic": [("The team won the match.", "sports"), ("Parliament voted on the law.", "politics"),
                      ("The app update adds new features.", "technology"), ("The firm's profits grew.", "business")]}
VARIANTS = {
    # the plain method: mean logprob of the label as written, one label order, no calibration
    "naive": {"calibrate": False, "permutations": 1, "surface_forms": False},
    "calibrated": {"calibrate": True, "permutations": 1, "surface_forms": False},
    "forms": {"calibrate": False, "permutations": 1},
    "forms+calibrated": {"calibrate": True, "permutations": 1},
    "default": {},  # what the endpoint does unless told otherwise: forms, calibration, 2 label orders
    "default+end-marker": {"end_marker": True},
    "default+3-orders": {"permutations": 3},
    "default+descriptions": {"descriptions": True},
    "default+examples": {"examples": True},
}


def load_items() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def options(task: str, variant: dict) -> ClassifyOptions:
    v = dict(variant)
    descriptions = {k: DESCRIPTIONS[k] for k in LABELS[task]} if v.pop("descriptions", False) else {}
    examples = EXAMPLES[task] if v.pop("examples", False) else []
    return ClassifyOptions(descriptions=descriptions, examples=examples, **v)


async def evaluate(generate, tokenizer, max_model_len: int, variants: list[str]) -> dict[str, dict]:
    classifier = Classifier(generate, tokenizer, max_model_len)
    items = load_items()
    results = {}
    for name in variants:
        started, correct, wrong = time.perf_counter(), 0, []
        for task, labels in LABELS.items():
            subset = [it for it in items if it["task"] == task]
            preds, _ = await classifier.classify([it["text"] for it in subset], labels,
                                                 options(task, VARIANTS[name]))
            for it, p in zip(subset, preds):
                if p.label == it["label"]:
                    correct += 1
                else:
                    wrong.append((it["text"][:50], it["label"], p.label))
        results[name] = {"accuracy": correct / len(items), "correct": correct, "total": len(items),
                         "seconds": round(time.perf_counter() - started, 1), "wrong": wrong}
    return results


def main() -> None:
    from server.engine import AsyncEngine, EngineCore, EngineSettings
    from server.model import ModelSettings, load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--verbose", action="store_true", help="list the misclassified items")
    args = ap.parse_args()
    lm = load_model(ModelSettings(model=args.model, dtype=args.dtype), progress=False)
    engine = AsyncEngine(EngineCore(lm, EngineSettings(kv_cache_memory=0.5)))
    try:
        results = asyncio.run(evaluate(engine.generate, lm.tokenizer, engine.max_model_len,
                                       args.variants.split(",")))
    finally:
        engine.shutdown()
    for name, r in results.items():
        print(f"{name:24s} {r['correct']:2d}/{r['total']} = {r['accuracy']:.0%}  ({r['seconds']} s)", flush=True)
        if args.verbose:
            for text, want, got in r["wrong"]:
                print(f"    wrong: {text!r}: {want} -> {got}")


if __name__ == "__main__":
    main()
