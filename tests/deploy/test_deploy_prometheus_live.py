"""End to end, on loopback: a real `loom serve --model dummy:tiny`, a real Prometheus (Debian's `prometheus` package)
scraping it with the job from deploy/prometheus/prometheus.yml, and Prometheus' HTTP API returning Loom's series.
Then every query of the Grafana dashboard, the template variable and the autoscaler's metric run against it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.support.deploy import DASHBOARD, DEPLOY, ROOT, concrete_promql, dashboard_exprs, find_tool, run
from tests.support.servers import free_port

PROMETHEUS = find_tool("prometheus")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PROMETHEUS, reason="prometheus not installed: apt-get install -y prometheus")]

LOOM = [sys.executable, "-m", "server.cli", "serve"]


def http(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def wait_for(what: str, check, proc: subprocess.Popen, log, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def loom(tmp_path_factory):
    """`loom serve` on a free loopback port, ready, with one finished completion (so histograms have samples)."""
    help_ = run([*LOOM, "--help"], timeout=120, cwd=ROOT)
    if help_.returncode != 0:
        pytest.skip(f"`loom serve` is not available yet: {help_.stderr.strip()[-300:]}")
    port = free_port()
    log = tmp_path_factory.mktemp("loom") / "loom.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}  # no host settings (API key, port)
    with log.open("w") as out:
        proc = subprocess.Popen([*LOOM, "--model", "dummy:tiny", "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--kv-cache-memory", "0.05", "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("loom /ready", lambda: http(base + "/ready")[0] == 200, proc, log, timeout=240)
        status, body = http(base + "/v1/models")
        assert status == 200, body
        model = json.loads(body)["data"][0]["id"]
        status, body = http(base + "/v1/completions", {"model": model, "prompt": "Once upon a time",
                                                       "max_tokens": 8, "temperature": 0}, timeout=60)
        assert status == 200, body
        status, metrics = http(base + "/metrics")
        assert status == 200 and b"loom_kv_cache_usage_ratio" in metrics, metrics[:2000]
        yield {"base": base, "port": port, "proc": proc}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(loom, tmp_path_factory):
    """Prometheus on a free loopback port, scraping Loom every second with the shipped job definition."""
    tmp = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "loom")
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{loom['port']}"]
    cfg["scrape_configs"] = [job]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    api = f"http://127.0.0.1:{port}"
    try:
        wait_for("prometheus /-/ready", lambda: http(api + "/-/ready")[0] == 200, proc, log, timeout=60)
        yield {"api": api, "proc": proc, "log": log}
    finally:
        stop(proc)


def query(api: str, promql: str) -> dict:
    status, body = http(f"{api}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert status == 200, (status, body[:500])
    return json.loads(body)


def wait_for_series(prom: dict, promql: str, timeout: float = 60) -> list:
    def found():
        res = query(prom["api"], promql)
        assert res["status"] == "success", res
        return res["data"]["result"]
    return wait_for(f"series for {promql}", found, prom["proc"], prom["log"], timeout)


def test_prometheus_scrapes_loom(loom, prometheus):
    (up,) = wait_for_series(prometheus, 'up{job="loom"} == 1')
    assert up["metric"]["instance"] == f"127.0.0.1:{loom['port']}"

    (kv,) = wait_for_series(prometheus, 'loom_kv_cache_usage_ratio{job="loom"}')
    assert kv["metric"]["service"] == "loom", "the static label from deploy/prometheus/prometheus.yml"
    assert 0.0 <= float(kv["value"][1]) <= 1.0

    # The fixture's one completion has finished: nothing runs or waits, and the engine is healthy.
    for gauge, value in (("loom_num_requests_running", 0), ("loom_num_requests_waiting", 0),
                         ("loom_engine_healthy", 1)):
        (series,) = wait_for_series(prometheus, f'{gauge}{{job="loom"}}')
        assert float(series["value"][1]) == value, (gauge, series)
    requests = wait_for_series(prometheus, 'loom_requests_total{job="loom", endpoint!=""}')
    assert sum(float(s["value"][1]) for s in requests) >= 1, requests
    (tokens,) = wait_for_series(prometheus, 'loom_generation_tokens_total{job="loom"}')
    assert float(tokens["value"][1]) >= 1
    buckets = wait_for_series(prometheus, 'loom_time_to_first_token_seconds_bucket{job="loom", le="+Inf"}')
    assert float(buckets[0]["value"][1]) >= 1


def test_every_dashboard_query_runs(loom, prometheus):
    """Each PromQL of deploy/grafana/dashboards/loom.json parses and evaluates against the real series."""
    dashboard = json.loads(DASHBOARD.read_text())
    wait_for_series(prometheus, 'count_over_time(loom_engine_healthy{job="loom"}[1m]) >= 3')  # enough for rate()
    empty = []
    for title, expr in dashboard_exprs(dashboard):
        res = query(prometheus["api"], concrete_promql(expr))
        assert res["status"] == "success", f"{title}: {expr}: {res.get('error')}"
        if not res["data"]["result"]:
            empty.append(title)
    # Gauges, counters and the rates of anything observed so far must have data; only series nothing has touched
    # yet (errors: none happened; labelled counters without samples) may legitimately be empty.
    for must in ("Running", "Waiting", "KV cache usage", "Tokens / s", "Request rate", "Time to first token"):
        assert must not in empty, f"{must!r} shows no data: {empty}"

    for var in dashboard["templating"]["list"]:
        metric = var["definition"].split("(", 1)[1].split(",")[0].strip()
        status, body = http(f"{prometheus['api']}/api/v1/series?{urllib.parse.urlencode({'match[]': metric})}")
        assert status == 200 and any(s.get(var["name"]) for s in json.loads(body)["data"]), var


def test_autoscaler_metric_is_served(prometheus):
    """The series prometheus-adapter turns into the HPA's pods metric exists under the same name."""
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-values.yaml").read_text())
    name = adapter["rules"]["custom"][0]["name"]["as"]
    (series,) = wait_for_series(prometheus, f'{name}{{job="loom"}}')
    assert float(series["value"][1]) == 0.0, "idle server: nothing waiting"


def test_running_loom_serves_what_the_inference_gateway_reads(loom):
    """Every series deploy/k8s/inference-gateway/epp.yaml points the endpoint picker at, from a live /metrics, with
    the labels the picker parses."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.deploy import picker_metric_flags
    status, body = http(loom["base"] + "/metrics")
    assert status == 200
    samples = {s.name: s for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    for flag, series in picker_metric_flags().items():
        if series:
            assert series in samples, (flag, series)
    info = samples["loom_cache_config_info"]
    assert info.value == 1 and int(info.labels["block_size"]) == 16 and int(info.labels["num_gpu_blocks"]) > 0
    assert 0.0 <= samples["loom_kv_cache_usage_ratio"].value <= 1.0
