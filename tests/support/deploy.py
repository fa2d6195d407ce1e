"""Helpers for the deployment tests: paths, YAML, the metrics Loom exports, the dashboard's queries, tools."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GATEWAY = DEPLOY / "k8s" / "inference-gateway"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def exported_metric_names() -> set[str]:
    """Every sample name Loom's /metrics can expose, taken from server/api/metrics.py itself (so the dashboard, the
    HPA and the adapter rules are checked against the code, not against a list that can drift): counters as
    `name_total`, histograms as `name_bucket` / `name_sum` / `name_count`, gauges as they are."""
    from server.api.metrics import Metrics
    from server.engine import EngineStats

    stats = EngineStats(running=0, waiting=0, kv_usage=0.0, num_blocks=1, free_blocks=1, preemptions=0,
                        prefix_hit_tokens=0, prefix_query_tokens=0, prompt_tokens=0, generation_tokens=0, steps=0)
    class Engine:  # stands in for AsyncEngine: stats at scrape time, step and encoder-batch observers
        def stats(self) -> EngineStats:
            return stats

        def add_step_observer(self, observer) -> None:
            pass

        def add_encode_observer(self, observer) -> None:
            pass

    metrics = Metrics()
    metrics.watch(Engine())
    names: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def find_tool(name: str) -> str | None:
    """A command on PATH or next to this interpreter (CI runs `.venv/bin/python -m pytest` without activating)."""
    import shutil
    import sys

    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


# --- Grafana dashboard --------------------------------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loom.json"


def dashboard_panels(dashboard: dict) -> list[dict]:
    """All panels, those nested in collapsed rows included."""
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target."""
    return [(p["title"], t["expr"]) for p in dashboard_panels(dashboard) for t in p.get("targets", [])]


def concrete_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, so Prometheus can run it."""
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$instance", ".*")


# --- Dockerfile ---------------------------------------------------------------------------------------------------

def parse_dockerfile(text: str) -> list[tuple[str, str, int]]:
    """(INSTRUCTION, arguments, line number) per instruction: comments dropped, `\\` continuations joined.
    Parser directives (`# syntax=...`) are returned as ("DIRECTIVE", "syntax=...", n)."""
    out: list[tuple[str, str, int]] = []
    buf: list[str] = []
    start = 0
    seen_instruction = False
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf:
            if not line:
                continue
            if line.startswith("#"):
                body = line[1:].strip()
                if not seen_instruction and "=" in body and body.split("=", 1)[0].strip().lower() in (
                        "syntax", "escape", "check"):
                    out.append(("DIRECTIVE", body, n))
                continue
            start = n
        elif line.startswith("#"):  # comment lines inside a continued instruction are removed
            continue
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(x for x in buf if x)
        buf = []
        word, _, rest = joined.partition(" ")
        out.append((word.upper(), rest.strip(), start))
        seen_instruction = True
    assert not buf, "Dockerfile ends inside a continued instruction"
    return out


def run(cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run a tool, capturing its output; the caller asserts on the return code."""
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, **kwargs)


def picker_metric_flags() -> dict[str, str]:
    """`--*-metric` flag -> the series the endpoint picker reads ("" = switched off)."""
    args = next(d for d in load_yaml_all(GATEWAY / "epp.yaml") if d["kind"] == "Deployment")
    args = args["spec"]["template"]["spec"]["containers"][0]["args"]
    return {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].endswith("-metric")}
