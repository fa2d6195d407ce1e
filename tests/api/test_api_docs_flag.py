"""`--docs public|protected|off` (LOOM_DOCS): who may read /docs, /redoc and /openapi.json (issue 16, item 8)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.api import ServerSettings
from tests.support.servers import make_app, wait_ready

DOCS = ("/docs", "/redoc", "/openapi.json")
KEY = {"Authorization": "Bearer s3cret"}


@pytest.mark.parametrize("mode, anonymous, with_key", [
    ("public", 200, 200),  # the default: the schema is Loom's public API, and Swagger UI cannot send a key
    ("protected", 401, 200),
    ("off", 404, 404),
])
def test_docs_modes_with_an_api_key(dummy_engine, mode, anonymous, with_key):
    with TestClient(make_app(dummy_engine, api_key="s3cret", docs=mode)) as c:
        wait_ready(c.get)
        for path in DOCS:
            r = c.get(path)
            assert r.status_code == anonymous, (path, r.text[:200])
            if anonymous == 401:
                assert r.json()["error"]["code"] == "invalid_api_key"
            assert c.get(path, headers=KEY).status_code == with_key, path
        for path in ("/health", "/ready", "/metrics"):  # operations endpoints stay open whatever the mode
            assert c.get(path).status_code == 200, path
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers=KEY).status_code == 200


def test_docs_setting_defaults_to_public_and_reads_the_environment(monkeypatch):
    assert ServerSettings().docs == "public"
    monkeypatch.setenv("LOOM_DOCS", "off")
    assert ServerSettings().docs == "off"
    monkeypatch.setenv("LOOM_DOCS", "secret")
    with pytest.raises(ValueError):
        ServerSettings()


def test_protected_docs_without_a_key_are_open(dummy_engine):
    """`protected` guards with the API key; a server without one has nothing to guard with."""
    with TestClient(make_app(dummy_engine, docs="protected")) as c:
        wait_ready(c.get)
        assert all(c.get(path).status_code == 200 for path in DOCS)
