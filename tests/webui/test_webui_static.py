"""The playground without a browser: what `/` serves and how, `--no-webui`, the page staying public under an API key,
`/v1/status`, no file reaching for another host, and the files shipped in the wheel."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import ServerSettings, create_app
from server.api.webui import STATIC
from tests.support.servers import make_app, wait_ready

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ("prompt-input", "send-button", "stop-button", "status-strip", "tab-chat", "tab-summarize", "tab-classify",
         "schema-input", "tab-embeddings", "embed-input", "embed-button", "rerank-query", "rerank-button")


@pytest.fixture(scope="module")
def client(dummy_engine):
    with TestClient(make_app(dummy_engine)) as c:
        wait_ready(c.get)
        yield c


def test_root_serves_the_page_with_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "connect-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    for hook in HOOKS:
        assert f'data-testid="{hook}"' in r.text, hook
    assert client.head("/").status_code == 200
    for path, kind in (("app.js", "text/javascript"), ("app.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        asset = client.get(f"/webui/{path}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), (path, asset.headers)
        assert asset.content == (STATIC / path).read_bytes()
    assert client.get("/webui/nope.js").status_code == 404
    assert client.get("/webui/../pyproject.toml").status_code == 404
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_no_webui_leaves_root_404(dummy_engine, monkeypatch):
    with TestClient(make_app(dummy_engine, webui=False)) as c:
        wait_ready(c.get)
        assert c.get("/").status_code == 404
        assert c.get("/webui/app.js").status_code == 404
        assert c.get("/v1/status").status_code == 200  # the API is untouched
    monkeypatch.setenv("LOOM_WEBUI", "false")
    assert ServerSettings().webui is False


def test_the_flag_reaches_the_settings():
    import argparse

    from server.cli.args import settings_of
    from server.cli.serve import add_serve_command

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    assert settings_of(ServerSettings, parser.parse_args(["serve", "--no-webui"])).webui is False
    assert settings_of(ServerSettings, parser.parse_args(["serve"])).webui is True


def test_the_page_stays_public_under_an_api_key(dummy_engine):
    with TestClient(make_app(dummy_engine, api_key="k")) as c:
        wait_ready(c.get)
        assert c.get("/").status_code == 200
        assert c.get("/webui/app.js").status_code == 200
        refused = c.get("/v1/status")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/status", headers={"Authorization": "Bearer k"}).json()["ready"] is True


def test_status_reports_the_model_and_the_load(client):
    s = client.get("/v1/status").json()
    assert s["ready"] is True and s["reason"] is None
    assert s["model"] == "dummy:tiny" and s["max_model_len"] == 512 and s["embedding_model"] is None
    assert s["running"] == 0 and s["waiting"] == 0 and 0 <= s["kv_cache_usage"] <= 1 and s["kv_cache_blocks"] == 256
    before = s["generation_tokens"]
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert client.get("/v1/status").json()["generation_tokens"] == before + 3


def test_status_names_the_embedding_model(encoder_engine):
    """The encoder that /v1/embeddings and /v1/rerank use (the playground shows its tab for it), not a classifier."""
    with TestClient(make_app(encoder_engine)) as c:
        wait_ready(c.get)
        assert c.get("/v1/status").json()["embedding_model"] == "all-MiniLM-L6-v2"


def test_status_while_the_model_loads():
    app = create_app(None, ServerSettings(), loader=None)
    with TestClient(app) as c:
        s = c.get("/v1/status").json()
    assert s == {**s, "ready": False, "reason": "the model is still loading", "model": None}


def test_static_files_reach_no_other_host():
    """No CDN, font or script from elsewhere: every URL in the page's files is relative, or a namespace name."""
    namespaces = {"http://www.w3.org/2000/svg"}
    files = sorted(p for p in STATIC.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"index.html", "app.js", "app.css", "favicon.svg"}
    for path in files:
        text = path.read_text()
        urls = set(re.findall(r"""(?:https?:)?//[^\s"'`)<>]+""", text))
        # `//` also starts JS comments: only URL-like ones (a dot in the host part) count
        urls = {u for u in urls if re.match(r"(?:https?:)?//[\w-]+\.[\w.-]+", u)} - namespaces
        assert not urls, f"{path.name} refers to other hosts: {urls}"
        assert not re.search(r"@import|@font-face|\bimportScripts\b|\bimport\s*\(", text), path.name
        if path.suffix == ".html":
            for ref in re.findall(r"""(?:src|href)="([^"]+)\"""", text):
                assert not re.match(r"[a-z]+:|//", ref), f"{path.name}: {ref}"


def test_static_files_ship_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["server.api.webui"]
    files = {p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()}
    shipped = {f for f in files if any(Path(f).match(p) for p in patterns)}
    assert shipped == files, files - shipped
