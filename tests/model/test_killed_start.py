"""A first start killed at any moment is followed by a start that becomes ready: each start below is SIGKILLed at
the next moment of the same cache's first start (the kernel build's own kill test is in loom_kernels/cpu), and the
start after the last kill must serve, leaving no half-written entry behind. (Every cache entry is written the same
way, tests/model/test_cache_files.py; the tokenizer is the one a GGUF's first start writes before calibrating.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.gguf_files import write_gguf
from tests.support.servers import free_port, start_loom_serve, stop, wait_ready

ROOT = Path(__file__).resolve().parents[2]
MOMENTS = ["tokenizer", "calibration"]


def serve_args(model: Path, cache: Path) -> list[str]:
    return ["--model", str(model), "--cache-dir", str(cache), "--max-model-len", "256"]


def kill_at(moment: str, args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "tests.support.paused_start", moment, "serve", "--port", str(free_port()), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "LOOM_LOG_LEVEL": "info"})
    deadline = time.monotonic() + 180
    try:
        while f"paused at {moment}" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"the start ended before {moment}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"never reached {moment}:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def leftovers(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*.tmp*"))


def test_a_start_killed_at_each_moment_is_followed_by_one_that_serves(tmp_path):
    model = write_gguf(tmp_path / "tiny-q4_0.gguf", "llama", {"default": "Q4_0"}, keep_floats=False).path
    cache = tmp_path / "cache"
    args = serve_args(model, cache)
    for moment in MOMENTS:
        kill_at(moment, args, tmp_path / f"{moment}.log")
    # the start after the tokenizer's kill found its half-written folder and removed it
    assert "removed unfinished cache entries" in (tmp_path / "calibration.log").read_text()
    assert leftovers(cache) == [] and not list((cache / "kernels").glob("*.json"))

    port, log = free_port(), tmp_path / "serve.log"
    proc = start_loom_serve(args, port, log, env={"LOOM_LOG_LEVEL": "info"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(lambda path: httpx.get(url + path, timeout=5), timeout=180)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]
    assert leftovers(cache) == []
    plans = [json.loads(p.read_text()) for p in (cache / "kernels").glob("*.json")]
    assert len(plans) == 1 and plans[0]["timings_ms"]  # measured, written whole
