"""The Grafana dashboard and its provisioning, checked structurally (no Grafana here): every panel queries the
provisioned datasource, every metric a query names is one Loom exports (names read from server/api/metrics.py), and
the dashboard covers what operators need. tests/deploy/test_deploy_prometheus_live.py also runs every query
against a real Prometheus scraping a real `loom serve`."""
from __future__ import annotations

import json
import re

import pytest

from tests.support.deploy import DASHBOARD, DEPLOY, dashboard_exprs, dashboard_panels, load_yaml

METRIC = re.compile(r"\bloom_[a-zA-Z0-9_]+")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def datasource() -> dict:
    sources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert len(sources) == 1
    return sources[0]


def test_provisioning_files(datasource):
    assert datasource["type"] == "prometheus" and datasource["uid"] and datasource["isDefault"] is True
    providers = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "loom.yml")
    assert providers["apiVersion"] == 1
    assert providers["providers"][0]["type"] == "file"


def test_dashboard_shape(dashboard):
    assert dashboard["uid"] and dashboard["title"] == "Loom" and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    occupied = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cells = {(g["y"] + dy, g["x"] + dx) for dy in range(g["h"]) for dx in range(g["w"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert all(t.get("expr") and t.get("refId") for t in p["targets"]), p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


def test_every_query_uses_the_provisioned_datasource(dashboard, datasource):
    want = {"type": "prometheus", "uid": datasource["uid"]}
    for p in dashboard_panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == want, p["title"]
        for t in p["targets"]:
            assert t.get("datasource", want) == want, p["title"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"] == want, var["name"]


def test_queries_name_only_exported_metrics(dashboard, metric_names):
    used = set()
    for title, expr in dashboard_exprs(dashboard):
        names = set(METRIC.findall(expr))
        assert names, f"{title}: {expr} names no loom_ metric"
        unknown = names - metric_names
        assert not unknown, f"{title}: {sorted(unknown)} are not exported by server/api/metrics.py"
        used |= names
    for var in dashboard["templating"]["list"]:
        assert set(METRIC.findall(var["definition"])) <= metric_names, var["name"]
    # Every exported series is on the dashboard, but for these: the engine-health gauge is for alerts and the
    # readiness probe, the raw block counts are graphed as the KV usage ratio, and the cache geometry is for the
    # inference gateway's picker.
    not_graphed = {"loom_engine_healthy", "loom_kv_cache_blocks", "loom_kv_cache_free_blocks", "loom_cache_config_info"}
    assert metric_names - used == not_graphed, sorted(metric_names - used)


def test_dashboard_covers_the_operator_questions(dashboard):
    exprs = "\n".join(expr for _, expr in dashboard_exprs(dashboard))

    def quantile_of(hist: str) -> bool:
        return bool(re.search(rf"histogram_quantile\(0\.99, sum by \(le\) \(rate\({hist}_bucket", exprs))

    for hist in ("loom_time_to_first_token_seconds", "loom_inter_token_latency_seconds",
                 "loom_e2e_request_latency_seconds"):
        assert quantile_of(hist), f"p99 of {hist}"
    for needle in ("rate(loom_requests_total", "loom_num_requests_running", "loom_num_requests_waiting",
                   "loom_kv_cache_usage_ratio", "rate(loom_generation_tokens_total", "rate(loom_prompt_tokens_total",
                   "rate(loom_preemptions_total"):
        assert needle in exprs, needle
    hit_rate = r"rate\(loom_prefix_cache_hit_tokens_total.*\)\) / sum\(rate\(loom_prefix_cache_query_tokens_total"
    assert re.search(hit_rate, exprs), "prefix-cache hit rate = hit tokens / queried tokens"
    assert "[$__rate_interval]" in exprs and not re.search(r"\[\d+[smh]\]", exprs), "rates follow the time range"
