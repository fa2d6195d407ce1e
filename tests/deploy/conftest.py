"""Fixtures for the deployment tests: the metric names Loom really exports and the LOOM_* settings it reads."""
from __future__ import annotations

import os

import pytest

from tests.support.deploy import exported_metric_names

# The image built and run for real takes minutes: collected only when asked for (`.ci/run` does), never by `make test`.
collect_ignore = [] if os.environ.get("LOOM_DOCKER_TEST") == "1" else ["test_docker_image.py"]


@pytest.fixture(scope="session")
def metric_names() -> set[str]:
    names = exported_metric_names()
    assert names and all(n.startswith("loom_") for n in names), names
    return names


@pytest.fixture(scope="session")
def loom_env_vars() -> set[str]:
    """The LOOM_* variables Loom reads: every settings field of the model, engine and server layers."""
    from server.api.settings import ServerSettings
    from server.engine import EngineSettings
    from server.model import ModelSettings

    fields = set(ModelSettings.model_fields) | set(EngineSettings.model_fields) | set(ServerSettings.model_fields)
    return {f"LOOM_{f.upper()}" for f in fields} | {"LOOM_LOG_LEVEL"}  # the last one is read by server/logs.py


@pytest.fixture(scope="session")
def default_drain_timeout() -> float:
    from server.api.settings import ServerSettings
    return ServerSettings.model_fields["drain_timeout"].default
