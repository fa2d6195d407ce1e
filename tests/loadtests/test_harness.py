"""The load-test harness measured against a fake OpenAI streaming server whose timings are known."""
from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtests import serve, soak, sweep
from loadtests.client import Target, arrival_times, run
from loadtests.dataset import RequestSpec, WordTokenizer
from loadtests.metrics import RequestResult, summarize
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fake_server():
    """The fake as a subprocess (its timings do not compete with the client for the GIL); yields a function that
    reconfigures it and returns its base URL."""
    import subprocess

    import httpx

    from loadtests.peers import stop_process, wait_ready
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.fake_openai_server", "--port", str(port)],
                            cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/ready", proc, 60)

        def configure(**fields) -> str:
            base = {"ttft": 0.05, "itl": 0.01, "tokens_per_chunk": 1, "report_usage": True, "kv_usage_after": 0.0}
            httpx.post(url + "/fake/config", json={**base, **fields}, timeout=10).raise_for_status()
            return url

        configure.pid = proc.pid
        yield configure
    finally:
        stop_process(proc, 10)


def make_specs(prompts: list[str], max_tokens: int = 10) -> list[RequestSpec]:
    return [RequestSpec("completion", p, len(p.split()), max_tokens) for p in prompts]


def bench(url: str, specs: list[RequestSpec], concurrency: int | None, rate: float = math.inf,
          include_usage: bool = True, **slo):
    target = Target(url, "fake-model", include_usage=include_usage)
    results, duration = asyncio.run(run(target, specs, concurrency, rate, progress=False))
    return results, duration, summarize(results, duration, **slo)


def between(value: float, lo: float, hi: float) -> bool:
    return lo <= value <= hi


# -- known timings ---------------------------------------------------------------------------------------------------
def test_timings_at_fixed_concurrency(fake_server):
    """TTFT 100 ms, then a token every 20 ms, 10 tokens: E2E 280 ms, TPOT = ITL = 20 ms; 8 requests at concurrency 4
    run as two waves, so the run takes ~560 ms and yields ~80 / 0.56 = 143 tokens/s."""
    url = fake_server(ttft=0.100, itl=0.020)
    results, duration, s = bench(url, make_specs([f"hello {i}" for i in range(8)]), concurrency=4)
    assert s["completed"] == 8 and s["failed"] == 0 and s["errors"] == {}
    assert s["total_output_tokens"] == 80 and s["output_tokens_from_usage"] == 8
    assert s["total_input_tokens"] == 16
    assert between(s["mean_ttft_ms"], 99, 150), s["mean_ttft_ms"]
    assert between(s["median_ttft_ms"], 99, 150)
    assert between(s["p99_ttft_ms"], 99, 180)
    assert between(s["mean_itl_ms"], 17, 26), s["mean_itl_ms"]
    assert between(s["median_itl_ms"], 15, 26), s["median_itl_ms"]
    assert between(s["mean_tpot_ms"], 18, 25), s["mean_tpot_ms"]
    assert between(s["median_tpot_ms"], 18, 25)
    assert between(s["mean_e2el_ms"], 279, 360), s["mean_e2el_ms"]
    assert s["median_ttft_ms"] <= s["p90_ttft_ms"] <= s["p99_ttft_ms"]
    assert all(len(r.itl) == 9 and r.chunks == 10 for r in results)
    assert between(duration, 0.56, 0.8), duration
    assert s["output_throughput"] == pytest.approx(80 / duration)
    assert between(s["output_throughput"], 80 / 0.8, 80 / 0.56)
    assert s["request_throughput"] == pytest.approx(8 / duration)
    assert s["total_token_throughput"] == pytest.approx(96 / duration)
    # closed loop: the second wave starts when the first finishes
    starts = sorted(r.start for r in results)
    assert max(starts[:4]) < 0.05 and between(min(starts[4:]), 0.27, 0.45)


def test_ttft_percentiles_follow_numpy(fake_server):
    """TTFTs of 50, 100, ..., 500 ms sent at once: each request measures its own TTFT (plus a little HTTP overhead)
    and the report's mean/p50/p90/p99 are numpy's (linear interpolation) over them: about 275, 455, 495.5 ms."""
    ttfts = [50 * (i + 1) for i in range(10)]
    url = fake_server(itl=0.010)
    results, _, s = bench(url, make_specs([f"ttft={t}" for t in ttfts], max_tokens=3), concurrency=None)
    measured = [r.ttft * 1000 for r in results]
    assert all(between(m, t, t + 60) for m, t in zip(measured, ttfts)), list(zip(measured, ttfts))
    for key, q in (("median", 50), ("p90", 90), ("p99", 99)):
        assert s[f"{key}_ttft_ms"] == pytest.approx(float(np.percentile(measured, q)))
        assert between(s[f"{key}_ttft_ms"], np.percentile(ttfts, q), np.percentile(ttfts, q) + 60)
    assert s["mean_ttft_ms"] == pytest.approx(float(np.mean(measured)))
    assert s["std_ttft_ms"] == pytest.approx(float(np.std(measured)))
    assert between(s["mean_tpot_ms"], 8, 15)


def test_errors_are_counted_not_measured(fake_server):
    prompts = [f"ok {i}" for i in range(6)] + ["fail please", "fail again", "midfail now"]
    url = fake_server(ttft=0.02, itl=0.005)
    results, _, s = bench(url, make_specs(prompts), concurrency=3)
    assert s["num_requests"] == 9 and s["completed"] == 6 and s["failed"] == 3
    assert s["errors"] == {"http 500": 2, "stream error": 1}
    assert s["total_output_tokens"] == 60  # failed requests add nothing
    assert [r.ok for r in results] == [True] * 6 + [False] * 3
    assert "injected failure" in results[6].error


def test_connection_refused_is_an_error():
    url = f"http://127.0.0.1:{free_port()}"
    _, _, s = bench(url, make_specs(["a", "b"]), concurrency=1)
    assert s["failed"] == 2 and s["completed"] == 0 and s["output_throughput"] == 0
    assert s["mean_ttft_ms"] is None


def test_goodput_under_slo(fake_server):
    """6 fast (TTFT 30 ms) and 4 slow (300 ms) requests, 2 of the fast ones with 60 ms ITL: under TTFT <= 150 ms,
    6 are good; adding TPOT <= 30 ms leaves 4."""
    prompts = ["ttft=30 a"] * 4 + ["ttft=30 itl=60"] * 2 + ["ttft=300"] * 4
    url = fake_server(itl=0.010)
    _, duration, s = bench(url, make_specs(prompts, max_tokens=5), concurrency=None, slo_ttft_ms=150)
    _, duration2, s2 = bench(url, make_specs(prompts, max_tokens=5), concurrency=None, slo_ttft_ms=150,
                             slo_tpot_ms=30)
    assert s["good_requests"] == 6 and s["slo_attainment"] == pytest.approx(0.6)
    assert s["goodput"] == pytest.approx(6 / duration)
    assert s["slo"] == {"ttft_ms": 150}
    assert s2["good_requests"] == 4 and s2["goodput"] == pytest.approx(4 / duration2)


def test_output_tokens_from_usage_else_from_chunks(fake_server):
    """Two tokens per chunk: usage says 10 tokens; without usage, 5 chunks are all the harness can count."""
    url = fake_server(ttft=0.01, itl=0.005, tokens_per_chunk=2)
    r1, _, s1 = bench(url, make_specs(["x"] * 2), concurrency=2)
    r2, _, s2 = bench(url, make_specs(["x"] * 2), concurrency=2, include_usage=False)
    assert s1["total_output_tokens"] == 20 and all(r.usage_reported and r.chunks == 5 for r in r1)
    assert s2["total_output_tokens"] == 10 and not any(r.usage_reported for r in r2)


def test_short_outputs_are_flagged(fake_server):
    specs = make_specs(["eos stops early", "fine"], max_tokens=8)
    url = fake_server(ttft=0.01, itl=0.002)
    results, _, s = bench(url, specs, concurrency=2)
    assert [r.output_tokens for r in results] == [3, 8]
    assert s["short_outputs"] == 1


def test_stop_after_bounds_a_level(fake_server):
    """A level that overruns stops sending: in-flight requests finish, later ones are neither sent nor counted."""
    url = fake_server(ttft=0.1, itl=0.01)
    target = Target(url, "fake-model")
    results, duration = asyncio.run(run(target, make_specs(["x"] * 10, max_tokens=2), 2, progress=False,
                                        stop_after=0.15))
    assert len(results) == 4 and all(r.ok for r in results)  # two waves started before 0.15 s
    assert duration < 0.5


def test_poisson_arrivals(fake_server):
    gaps = np.diff(arrival_times(4000, 10.0, seed=1))
    assert gaps.mean() == pytest.approx(0.1, rel=0.06)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential: CV = 1
    assert arrival_times(5, math.inf) == [0.0] * 5
    assert arrival_times(3, 2.0, seed=5) == arrival_times(3, 2.0, seed=5)
    # sent on schedule: 20 requests at 40 req/s take ~0.5 s, each sent at its arrival time
    offsets = arrival_times(20, 40.0, seed=0)
    url = fake_server(ttft=0.005, itl=0.001)
    results, duration, s = bench(url, make_specs(["x"] * 20, max_tokens=2), concurrency=None, rate=40.0)
    assert s["completed"] == 20
    assert all(abs(r.start - o) < 0.05 for r, o in zip(results, offsets)), [(round(r.start, 3), round(o, 3)) for r, o in zip(results, offsets)]
    assert between(duration, offsets[-1], offsets[-1] + 0.2)


def test_summarize_exact_numbers():
    rs = [RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
          RequestResult(ok=True, prompt_tokens=10, output_tokens=3, ttft=0.3, latency=0.5, itl=[0.1, 0.1]),
          RequestResult(ok=True, prompt_tokens=10, output_tokens=1, ttft=0.2, latency=0.2),
          RequestResult(ok=False, error="http 503: busy", latency=0.01)]
    s = summarize(rs, 2.0, slo_ttft_ms=250, slo_tpot_ms=100)
    assert s["completed"] == 3 and s["failed"] == 1 and s["errors"] == {"http 503": 1}
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 4.5 and s["input_throughput"] == 15
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["p90_ttft_ms"] == pytest.approx(280)
    assert s["mean_tpot_ms"] == pytest.approx(100)  # (0.4/4 + 0.2/2) / 2; one-token requests have no TPOT
    assert s["mean_itl_ms"] == pytest.approx(100) and s["mean_e2el_ms"] == pytest.approx(400)
    assert s["good_requests"] == 2 and s["goodput"] == 1.0 and s["slo_attainment"] == 0.5


# -- command lines ---------------------------------------------------------------------------------------------------
def test_serve_cli_sweep_writes_json_and_plot(fake_server, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    url = fake_server(ttft=0.02, itl=0.004)
    doc = serve.main(["--base-url", url, "--tokenizer", "words", "--concurrency", "1,4", "--num-requests", "4",
                      "--input-len", "12", "--output-len", "6", "--out", str(out), "--plot", str(png),
                      "--slo-ttft-ms", "500", "--quiet", "--no-progress", "--save-requests"])
    assert png.stat().st_size > 10_000
    saved = json.loads(out.read_text())
    assert saved["model"] == "fake-model" and [lv["concurrency"] for lv in saved["levels"]] == [1, 4]
    for lv in saved["levels"]:
        assert lv["completed"] == 4 and lv["total_output_tokens"] == 24 and lv["total_input_tokens"] == 48
        assert lv["good_requests"] == 4 and len(lv["requests"]) == 4
    assert doc["levels"][0]["median_ttft_ms"] >= 20


def test_serve_cli_tasks_workload(fake_server, tmp_path):
    """--workload tasks makes /v1/summarize and /v1/classify requests (the fake answers 404: counted as errors)."""
    url = fake_server()
    doc = serve.main(["--base-url", url, "--tokenizer", "words", "--workload", "tasks", "--num-requests", "4",
                      "--warmup", "0", "--quiet", "--no-progress", "--input-len", "8"])
    assert doc["levels"][0]["failed"] == 4 and set(doc["levels"][0]["errors"]) == {"http 404"}


def _fake_spec(name: str, ttft_ms: float, itl_ms: float):
    from loadtests.peers import ServerSpec
    return ServerSpec(name, f"fake server ({ttft_ms:g} ms TTFT)",
                      lambda c: [sys.executable, "-m", "tests.support.fake_openai_server", "--port", str(c.port),
                                 "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms)], "/ready", model_id="fake-model",
                      version=lambda: "fake 1.0", startup_timeout_s=60)


def test_sweep_quick_against_fake_servers(tmp_path, monkeypatch):
    """The whole sweep with two fake servers started as subprocesses: "loom" (TTFT 40 ms) and a peer (240 ms).
    BENCHMARKS.md shows the measured TTFT ratio, the machine's CPU, and an unavailable peer as skipped."""
    from loadtests import peers
    from loadtests.peers import ServerSpec
    monkeypatch.setitem(peers.SERVERS, "loom", _fake_spec("loom", 40, 4))
    monkeypatch.setitem(peers.SERVERS, "fake-peer", _fake_spec("fake-peer", 240, 4))
    monkeypatch.setitem(peers.SERVERS, "missing-peer", ServerSpec("missing-peer", "not here", lambda c: [], "/",
                                                                  unavailable=lambda: "not installed"))
    monkeypatch.setattr(sweep, "default_model_files", lambda: (Path("/fake.gguf"), Path("/fake-hf")))
    monkeypatch.setattr(sweep, "load_tokenizer", lambda spec: WordTokenizer())
    md = tmp_path / "BENCHMARKS.md"
    doc = sweep.main(["--quick", "--peers", "fake-peer,missing-peer", "--out-dir", str(tmp_path),
                      "--markdown", str(md), "--no-progress"])
    servers = {s["name"]: s for s in doc["servers"]}
    assert servers["missing-peer"]["skipped"] == "not installed"
    loom, peer = servers["loom"]["levels"], servers["fake-peer"]["levels"]
    assert [(lv["workload"], lv["concurrency"]) for lv in loom] == [("random", 1), ("random", 4),
                                                                   ("shared-prefix", 4)]
    assert all(lv["failed"] == 0 and lv["total_output_tokens"] == 16 * lv["num_requests"] for lv in loom + peer)
    # Each fake sleeps its TTFT before the first token: what the harness measures is that plus overhead, and the
    # 200 ms gap between the two is far beyond any scheduling noise, so the order is certain.
    loom_ttft, peer_ttft = loom[0]["median_ttft_ms"], peer[0]["median_ttft_ms"]
    assert 40 <= loom_ttft < peer_ttft and peer_ttft >= 240, (loom_ttft, peer_ttft)
    text = md.read_text()
    assert "### vs fake-peer" in text and "**missing-peer**: not measured: not installed" in text
    assert f"**{loom_ttft / peer_ttft:.2f}x**" in text
    cpu = sweep.machine_info()["cpu"]
    assert cpu != "unknown CPU" and f"- CPU: {cpu}, " in text
    assert (tmp_path / "sweep.json").exists()
    if doc.get("plot"):
        assert (tmp_path / "sweep.png").exists()


def test_sweep_plans_fewer_requests_for_slow_servers():
    args = sweep.build_parser().parse_args(["--level-budget-s", "60"])
    assert sweep.plan_requests(args, 1, None) == 8 and sweep.plan_requests(args, 64, None) == 128
    assert sweep.plan_requests(args, 64, 10_000.0) == 128
    assert sweep.plan_requests(args, 64, 50.0) == 64  # never less than one request per slot
    assert sweep.plan_requests(args, 16, 40.0) == 18  # 60 s x 40 tok/s / 128 tokens
    assert sweep.plan_requests(args, 16, 40.0, budget_s=30) == 16
    assert sweep.plan_requests(args, 1, 1.0) == 4  # a very slow server still gets half of --min-requests
    budget = sweep.Budget(10, levels=10, servers=2)  # 600 s, 60 s kept for two startups: 54 s a level
    assert 53 < budget.next_level() <= 54 and budget.levels == 9
    assert sweep.Budget(None, 5, 1).next_level() is None


# -- soak ------------------------------------------------------------------------------------------------------------
def test_rss_flatness_criterion():
    flat = [(t, 100 * 2 ** 20 + (t % 3) * 2 ** 18) for t in range(100)]
    assert soak.rss_flat(flat)["ok"] is True
    growing = [(t, int((100 + t * 0.3) * 2 ** 20)) for t in range(100)]  # +30% over the run
    r = soak.rss_flat(growing)
    assert r["ok"] is False and r["growth"] > 0.1
    warm = [(t, (50 if t < 8 else 100) * 2 ** 20) for t in range(100)]  # grows only during warm-up
    assert soak.rss_flat(warm)["ok"] is True
    assert soak.rss_flat(flat[:5])["ok"] is None


def test_metrics_parsing_and_kv_check():
    text = ('# HELP x\nloom_kv_cache_usage_ratio 0.0\nloom_num_requests_running 0\nloom_num_requests_waiting 0\n'
            'loom_kv_cache_blocks 100\nloom_kv_cache_free_blocks 100\nloom_requests_total{a="1"} 3\n'
            'loom_requests_total{a="2"} 4\n')
    m = soak.parse_prometheus(text)
    assert m["loom_requests_total"] == 7
    assert soak.kv_check(m)["ok"]
    bad = soak.kv_check({**m, "loom_kv_cache_free_blocks": 96, "loom_num_requests_running": 1})
    assert not bad["ok"] and len(bad["problems"]) == 2
    assert not soak.kv_check({})["ok"]


def test_soak_against_fake_server(fake_server, tmp_path):
    url = fake_server(ttft=0.005, itl=0.001)
    assert soak.pid_listening_on(int(url.rsplit(":", 1)[1])) == fake_server.pid
    report = soak.main(["--base-url", url, "--minutes", "0.04", "--rate", "20", "--sample-s", "0.1",
                        "--tokenizer", "words", "--input-len", "8", "--output-len", "4", "--settle-s", "2",
                        "--no-progress", "--out", str(tmp_path / "soak.json")])
    assert report["ok"] and report["checks"]["kv_blocks_returned"]["ok"]
    assert report["pid"] == fake_server.pid and report["checks"]["memory_flat"]["samples"] >= 8
    assert report["summary"]["completed"] == report["requests"] == 48


def test_soak_reports_leaked_blocks(fake_server):
    url = fake_server(ttft=0.005, itl=0.001, kv_usage_after=0.25)
    with pytest.raises(SystemExit) as exc:
        soak.main(["--base-url", url, "--minutes", "0.01", "--rate", "10", "--tokenizer", "words",
                   "--input-len", "8", "--output-len", "2", "--settle-s", "1", "--no-progress"])
    assert exc.value.code == 1


# -- dataset -----------------------------------------------------------------------------------------------------------
def test_prompts_have_exact_token_lengths(default_checkpoint):
    from loadtests.dataset import HFTokenizer, PromptMaker, build_workload
    tok = HFTokenizer(default_checkpoint)
    maker = PromptMaker(tok, seed=3)
    for n in (1, 7, 128, 512, 1000):
        assert len(tok.encode(maker.text(n))) == n
    specs = build_workload("random", maker, 20, 100, 50, range_ratio=0.5, seed=1)
    assert all(50 <= s.prompt_tokens <= 150 and 25 <= s.max_tokens <= 75 for s in specs)
    assert all(len(tok.encode(s.prompt)) == s.prompt_tokens for s in specs)
    assert len({s.prompt_tokens for s in specs}) > 5
    shared = build_workload("shared-prefix", maker, 4, 128, 128, prefix_len=512)
    ids = [tok.encode(s.prompt) for s in shared]
    assert all(len(i) == 640 for i in ids)
    assert all(i[:512] == ids[0][:512] for i in ids) and len({tuple(i[512:]) for i in ids}) == 4
    fixed = build_workload("random", maker, 5, 128, 128)
    assert {s.prompt_tokens for s in fixed} == {128} and {s.max_tokens for s in fixed} == {128}
    assert len({s.prompt for s in fixed}) == 5
    tasks = build_workload("tasks", maker, 40, 64, 32, summarize_fraction=0.5)
    kinds = [s.kind for s in tasks]
    assert 8 < kinds.count("summarize") < 32 and set(kinds) == {"summarize", "classify"}


def test_percentile_helpers_handle_empty():
    s = summarize([], 1.0)
    assert s["completed"] == 0 and s["median_ttft_ms"] is None and s["output_throughput"] == 0
    assert statistics.median([1, 2, 3]) == 2


# -- the Hugging Face comparison servers, on a tiny random model -----------------------------------------------------
def _stream_counts(url: str, max_tokens: list[int]) -> list[RequestResult]:
    specs = [RequestSpec("completion", f"The number {i} is", 4, n) for i, n in enumerate(max_tokens)]
    results, _ = asyncio.run(run(Target(url, None), specs, None, progress=False))
    return results


def _tiny_hf(tiny_checkpoints):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tiny_checkpoints["llama"]
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval(),
            AutoTokenizer.from_pretrained(path))


def test_hf_static_peer_batches_and_streams_exact_lengths(tiny_checkpoints):
    from loadtests.peers.common import build_app
    from loadtests.peers.hf_static import StaticBatcher
    from tests.support.fake_openai_server import serve_app
    model, tok = _tiny_hf(tiny_checkpoints)
    backend = StaticBatcher(model, tok, "hf-static", max_batch=8, window_s=0.2)
    with serve_app(build_app(backend, tok)) as url:
        results = _stream_counts(url, [5, 9, 3])
        assert backend.batches == 1  # all three arrived within the window: one padded generate() call
        assert [r.output_tokens for r in results] == [5, 9, 3] and all(r.ok and r.usage_reported for r in results)
        assert all(r.chunks <= r.output_tokens for r in results)
        # non-streaming answers and chat work too
        import httpx
        body = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True},
                          timeout=60).json()
        assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"
        chat = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                               "max_tokens": 3, "ignore_eos": True}, timeout=60).json()
        assert chat["usage"]["completion_tokens"] == 3


def test_hf_continuous_peer_streams_exact_lengths(tiny_checkpoints):
    from loadtests.peers.common import build_app
    from loadtests.peers.hf_continuous import ContinuousBackend
    from tests.support.fake_openai_server import serve_app
    model, tok = _tiny_hf(tiny_checkpoints)
    backend = ContinuousBackend(model, tok, "hf-continuous", max_batch=8, kv_cache_gib=0.01, max_batch_tokens=256,
                                page_size=32)
    try:
        backend.warm_up(tok("warm up")["input_ids"], tokens=2)
        with serve_app(build_app(backend, tok)) as url:
            results = _stream_counts(url, [5, 9, 3, 6])
        assert [r.output_tokens for r in results] == [5, 9, 3, 6] and all(r.ok for r in results)
        assert all(len(r.itl) == r.chunks - 1 for r in results)
    finally:
        backend.stop()


def test_peer_registry_commands():
    from loadtests import peers
    ctx = peers.ServerContext(port=1234, max_concurrency=16, ctx_per_seq=1024, threads=2, gguf=Path("/m.gguf"),
                              hf_dir=Path("/hf"), loom_args=["--max-num-seqs", "16"])
    llama = peers.SERVERS["llama-server"].command(ctx)
    assert llama[llama.index("-np") + 1] == "16" and llama[llama.index("-c") + 1] == str(16 * 1024)
    assert "--cont-batching" in llama and llama[llama.index("-m") + 1] == "/m.gguf"
    loom = peers.SERVERS["loom"].command(ctx)
    assert loom[-2:] == ["--max-num-seqs", "16"] and "--port" in loom and "default" in loom
    for name in ("hf-static", "hf-continuous"):
        cmd = peers.SERVERS[name].command(ctx)
        assert cmd[cmd.index("--model") + 1] == "/hf" and cmd[cmd.index("--max-batch") + 1] == "16"
    assert set(peers.available()) == set(peers.SERVERS)


def test_raw_client_keeps_the_connection_and_reconnects_after_close():
    """loadtests/rawhttp.py: bodies go out whole, responses come back by Content-Length, one connection is reused
    until the server says `Connection: close`, then a new one is opened."""
    from loadtests.rawhttp import RawConnection

    async def scenario():
        connections, seen = [], []

        async def handle(reader, writer):
            connections.append(writer)
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                length = int(next(v for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
                                  if k.lower() == b"content-length"))
                body = await reader.readexactly(length)
                seen.append(json.loads(body))
                close = len(seen) == 2
                reply = json.dumps({"n": len(seen)}).encode()
                writer.write(b"HTTP/1.1 %d OK\r\ncontent-length: %d\r\n%s\r\n%s"
                             % (200 if len(seen) < 3 else 429, len(reply), b"connection: close\r\n" if close else b"",
                                reply))
                await writer.drain()
                if close:
                    writer.close()
                    break

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = RawConnection(f"http://127.0.0.1:{port}")
        replies = [await conn.post("/v1/embeddings", json.dumps({"input": "é" * i}).encode()) for i in range(3)]
        await conn.close()
        server.close()
        return replies, seen, len(connections)

    replies, seen, opened = asyncio.run(scenario())
    assert replies == [(200, b'{"n": 1}'), (200, b'{"n": 2}'), (429, b'{"n": 3}')]
    assert seen == [{"input": "é" * i} for i in range(3)]
    assert opened == 2  # the first two requests shared a connection; the server closed it; the third reconnected


def test_make_bench_keeps_the_sections_written_by_hand(tmp_path):
    from loadtests.sweep import hand_sections
    md = tmp_path / "BENCHMARKS.md"
    assert hand_sections(md) == ""  # no file yet
    md.write_text("# Benchmarks\n\n## Machine\nold generated\n\n## Engine level (added by hand; kept)\nfigures\n\n"
                  "## 2026-12-05 (added by hand)\nmore\n")
    assert hand_sections(md) == "\n## Engine level (added by hand; kept)\nfigures\n\n## 2026-12-05 (added by hand)\nmore\n"
    md.write_text("# Benchmarks\n\n## Machine\nonly generated\n")
    assert hand_sections(md) == ""


def test_make_bench_rewrites_only_between_the_sweep_markers(tmp_path):
    from loadtests.sweep import SWEEP_BEGIN, SWEEP_END, merge_markdown
    md = tmp_path / "BENCHMARKS.md"
    generated = "# Benchmarks\n\nGenerated by x.\n\n## Machine\n- CPU: new\n\n### vs peer\n| a |\n"
    assert merge_markdown(md, generated) == generated  # no file yet: the standalone document
    head = (f"# Benchmarks\n\nProse naming `{SWEEP_BEGIN}` and `{SWEEP_END}` is not a marker.\n\n"
            "## Latest (generated)\n\n")
    tail = "\n## Per CPU (by hand)\n\nkept\n"
    md.write_text(f"{head}{SWEEP_BEGIN}\nold generated\n\n### Machine\n- CPU: old\n{SWEEP_END}\n{tail}")
    merged = merge_markdown(md, generated)
    # the title dropped, headings one level down, everything outside the markers untouched
    assert merged == (f"{head}{SWEEP_BEGIN}\nGenerated by x.\n\n### Machine\n- CPU: new\n\n#### vs peer\n| a |\n"
                      f"{SWEEP_END}\n{tail}")
    md.write_text(merged)
    assert merge_markdown(md, generated) == merged  # a second run changes nothing
    # the older layout (no markers): the generated part is replaced, sections marked "(added by hand" are kept
    md.write_text("# Benchmarks\n\n## Machine\nold\n\n## Engine (added by hand)\nfigures\n")
    assert merge_markdown(md, generated) == generated + "\n## Engine (added by hand)\nfigures\n"


def test_the_repository_benchmarks_md_keeps_its_hand_written_part():
    """make bench must find the markers in the committed BENCHMARKS.md (else it would rewrite the whole file), and
    the plot it links to must be in the repository."""
    from loadtests.peers import REPO
    from loadtests.sweep import SWEEP_BEGIN, SWEEP_END
    lines = [ln.strip() for ln in (REPO / "BENCHMARKS.md").read_text().splitlines()]
    assert lines.count(SWEEP_BEGIN) == 1 and lines.count(SWEEP_END) == 1
    begin, end = lines.index(SWEEP_BEGIN), lines.index(SWEEP_END)
    assert begin < end and begin > 0 and end < len(lines) - 1
    links = [ln.split("](", 1)[1].rstrip(")") for ln in lines[begin:end] if ln.startswith("![")]
    assert links and all((REPO / link).is_file() for link in links), links
