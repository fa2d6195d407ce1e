"""deploy/docker-compose.yml (+ the GPU overlay): validated by the Compose CLI when one is installed (`docker compose`
or Debian's `docker-compose`; neither needs a Docker engine for `config`), and structurally with PyYAML always."""
from __future__ import annotations

import re

import pytest

from tests.support.deploy import DEPLOY, ROOT, find_tool, load_yaml, run

COMPOSE = DEPLOY / "docker-compose.yml"
GPU_OVERLAY = DEPLOY / "docker-compose.gpu.yml"


def compose_cli() -> list[str] | None:
    docker = find_tool("docker")
    if docker and run([docker, "compose", "version"], timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = find_tool("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture(scope="module")
def cli() -> list[str]:
    cmd = compose_cli()
    if cmd is None:
        pytest.skip("no Compose CLI: install the docker compose plugin, or `apt-get install -y docker-compose`")
    return cmd


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, GPU_OVERLAY]], ids=["cpu", "gpu-overlay"])
def test_compose_config_is_valid(cli, files, tmp_path):
    args = [a for f in files for a in ("-f", str(f))]
    res = run([*cli, *args, "config", "-q"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_cli_rejects_a_broken_file(cli, tmp_path):
    """The validator is not vacuous: a wrong type in the same file fails."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("init: true", "init: [yes]"))
    res = run([*cli, "-f", str(broken), "config", "-q"])
    assert res.returncode != 0


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


def test_services_and_images(compose):
    services = compose["services"]
    assert set(services) == {"loom", "prometheus", "grafana"}
    loom = services["loom"]
    assert loom["build"]["context"] == ".." and (DEPLOY / loom["build"]["context"] / "Dockerfile").is_file()
    assert loom["build"]["args"]["TARGET"] == "${LOOM_TARGET:-cpu}"
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name} is pinned to a release: {image}"


def test_loom_service(compose, loom_env_vars, default_drain_timeout):
    loom = compose["services"]["loom"]
    assert any(str(p).endswith(":8000") for p in loom["ports"])
    unknown = set(loom["environment"]) - loom_env_vars
    assert not unknown, f"variables Loom does not read: {unknown}"
    assert loom["environment"]["LOOM_API_KEY"] == "${LOOM_API_KEY:-}", "no key in the file, only from the shell"
    drain = float(re.search(r"[\d.]+", str(loom["environment"].get("LOOM_DRAIN_TIMEOUT", default_drain_timeout)))
                  .group())
    grace = int(re.fullmatch(r"(\d+)s", loom["stop_grace_period"]).group(1))
    assert grace > drain + 10, "Docker must wait for the drain (and uvicorn's own 10 s) before SIGKILL"
    assert any(re.search(r":/models:ro$", v) for v in loom["volumes"]), "models mount read-only at /models"


def test_gpu_overlay_reserves_an_nvidia_gpu():
    overlay = load_yaml(GPU_OVERLAY)["services"]["loom"]
    assert overlay["build"]["args"]["TARGET"] == "gpu"
    devices = overlay["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_bind_mounts_exist_and_match_prometheus_and_grafana(compose):
    for name in ("prometheus", "grafana"):
        for vol in compose["services"][name]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name} mounts {src}, which is missing"
    prom_cfg = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    loom_job = next(j for j in prom_cfg["scrape_configs"] if j["job_name"] == "loom")
    assert loom_job.get("metrics_path", "/metrics") == "/metrics"
    assert loom_job["static_configs"][0]["targets"] == ["loom:8000"], "scrapes the compose service by name"
    grafana = compose["services"]["grafana"]
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "loom.yml")["providers"][0]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).is_file()
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert ROOT.joinpath("Dockerfile").is_file()
