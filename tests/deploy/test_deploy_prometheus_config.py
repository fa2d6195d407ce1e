"""The Prometheus configs pass `promtool check config` (Debian: `apt-get install -y prometheus`)."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.support.deploy import DEPLOY, find_tool, load_yaml, run

COMPOSE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
K8S_CONFIG = DEPLOY / "prometheus" / "prometheus-k8s.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    tool = find_tool("promtool")
    if not tool:
        pytest.skip("promtool not installed: apt-get install -y prometheus")
    return tool


def check(promtool: str, path) -> subprocess.CompletedProcess:
    return run([promtool, "check", "config", str(path)])


def test_compose_prometheus_config(promtool):
    res = check(promtool, COMPOSE_CONFIG)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_promtool_rejects_a_broken_config(promtool, tmp_path):
    bad = tmp_path / "prometheus.yml"
    bad.write_text(COMPOSE_CONFIG.read_text().replace("scrape_interval: 5s", "scrape_interval: often"))
    assert check(promtool, bad).returncode != 0


def test_kubernetes_scrape_config(promtool, tmp_path):
    res = check(promtool, K8S_CONFIG)
    if res.returncode != 0 and "kubernetes_sd_configs not found" in res.stdout + res.stderr:
        # Debian builds Prometheus without Kubernetes discovery. Check everything else (relabelling rules, regexes,
        # target labels) with the discovery block swapped for a static one of the same shape.
        cfg = load_yaml(K8S_CONFIG)
        for job in cfg["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
            job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
        swapped = tmp_path / "prometheus-k8s.yml"
        swapped.write_text(yaml.safe_dump(cfg))
        res = check(promtool, swapped)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_kubernetes_scrape_config_labels_pods_for_the_adapter():
    """prometheus-adapter maps series to pods through `namespace` and `pod` labels; the scrape job must set them
    and keep only pods annotated the way deploy/k8s/deployment.yaml annotates Loom's."""
    job = load_yaml(K8S_CONFIG)["scrape_configs"][0]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__address__", "__metrics_path__"} <= targets
    keeps = {r["source_labels"][0].removeprefix("__meta_kubernetes_pod_"): r["regex"]
             for r in job["relabel_configs"] if r.get("action") == "keep"}
    deployment = next(d for d in yaml.safe_load_all((DEPLOY / "k8s" / "deployment.yaml").read_text()))
    pod = deployment["spec"]["template"]["metadata"]
    assert pod["annotations"]["prometheus.io/scrape"] == keeps["annotation_prometheus_io_scrape"]
    assert pod["labels"]["app.kubernetes.io/name"] == keeps["label_app_kubernetes_io_name"]
