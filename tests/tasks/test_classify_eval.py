"""Accuracy of /v1/classify's scoring on the labelled set (40 clear-cut items, sentiment and topic) with the default
model: the corrected method must beat naive label likelihood by a wide margin. About a minute on 2 CPU cores, so it
only runs when asked: LOOM_CLASSIFY_EVAL=1 pytest tests/tasks/test_classify_eval.py -s"""
from __future__ import annotations

import asyncio
import os

import pytest

from tools.eval_classify import evaluate

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("LOOM_CLASSIFY_EVAL"), reason="set LOOM_CLASSIFY_EVAL=1")]


def test_calibrated_scoring_beats_naive():
    from server.engine import AsyncEngine, EngineCore, EngineSettings
    from server.model import ModelSettings, load_model

    lm = load_model(ModelSettings(model="default"), progress=False)
    engine = AsyncEngine(EngineCore(lm, EngineSettings(kv_cache_memory=0.5)))
    try:
        results = asyncio.run(evaluate(engine.generate, lm.tokenizer, engine.max_model_len, ["naive", "default"]))
    finally:
        engine.shutdown()
    for name, r in results.items():
        print(f"{name}: {r['correct']}/{r['total']} = {r['accuracy']:.0%} ({r['seconds']} s)")
    assert results["default"]["accuracy"] >= 0.8
    assert results["default"]["accuracy"] >= results["naive"]["accuracy"] + 0.3
