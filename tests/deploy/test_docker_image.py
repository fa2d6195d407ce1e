"""The CPU image built and run for real by deploy/docker/build_local.sh: a container starts on the baked caches
(nothing compiled, converted or measured again on the build host's CPU), turns ready, answers a chat request and a
streamed one, exports them in /metrics, and `docker stop` (SIGTERM) ends it with exit code 0 in well under its grace
period; a second container from the same image is ready as fast.

A cold build takes minutes, so `make test` leaves this file out (tests/deploy/conftest.py collects it only with
LOOM_DOCKER_TEST=1); `.ci/run` runs it by name after `make test`. Where no Docker daemon can run (not root, no
dockerd) it skips with the reason, unless LOOM_REQUIRE_DOCKER=1 (CI) makes that a failure. Timings are printed
(`-s`) and bounded generously: the CPU is shared with whatever else runs."""
from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.deploy import DEPLOY
from tests.support.ports import free_port

BUILD = DEPLOY / "docker" / "build_local.sh"
IMAGE = os.environ.get("LOOM_IMAGE", "loom:cpu")
READY_LIMIT_S = 15.0  # the first start reads baked caches (~4.5 s on 2 cores): not the minutes of a compile + calibration
STOP_LIMIT_S = 10.0
CACHE = "/home/loom/.cache/loom"  # the image's LOOM_CACHE_DIR (Dockerfile)
# a cold build and two starts on 2 cores; pytest-timeout counts the module fixtures in the first test
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def report(what: str, seconds: float) -> None:
    print(f"\n[docker image] {what}: {seconds:.1f} s", flush=True)


@pytest.fixture(scope="module")
def docker() -> list[str]:
    """The docker command line, talking to a daemon that answers (build_local.sh starts a private one if needed)."""
    res = subprocess.run([str(BUILD), "--daemon"], capture_output=True, text=True)
    if res.returncode == 77:
        reason = res.stderr.strip().splitlines()[-1]
        if os.environ.get("LOOM_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    assert res.returncode == 0, res.stderr
    os.environ["DOCKER_HOST"] = res.stdout.strip()
    return ["/usr/bin/docker"] if os.path.exists("/usr/bin/docker") else ["docker"]


@pytest.fixture(scope="module")
def image(docker) -> str:
    started = time.monotonic()
    subprocess.run([str(BUILD)], check=True)  # its progress goes to the terminal (-s)
    report("image build (base included where it was not current)", time.monotonic() - started)
    size = int(subprocess.run([*docker, "image", "inspect", "-f", "{{ .Size }}", IMAGE], check=True,
                              capture_output=True, text=True).stdout)
    print(f"[docker image] {IMAGE}: {size / 1e9:.2f} GB", flush=True)
    return IMAGE


class Container:
    """One `docker run -d --network host` of the image, on a free port."""

    def __init__(self, docker: list[str], image: str):
        self.docker, self.port = docker, free_port()
        self.name = f"loom-test-{os.getpid()}-{self.port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.monotonic()
        subprocess.run([*docker, "run", "-d", "--name", self.name, "--network", "host", "-e",
                        f"LOOM_PORT={self.port}", "-e", "LOOM_LOG_LEVEL=info", image], check=True,
                       capture_output=True)

    def logs(self) -> str:
        res = subprocess.run([*self.docker, "logs", self.name], capture_output=True, text=True)
        return res.stdout + res.stderr

    def state(self) -> dict:
        out = subprocess.run([*self.docker, "inspect", "-f", "{{ json .State }}", self.name], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)

    def wait_ready(self, limit: float) -> float:
        while time.monotonic() - self.started < limit:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            if not self.state()["Running"]:
                pytest.fail(f"the container exited: {self.state()}\n{self.logs()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"not ready within {limit:.0f} s:\n{self.logs()[-4000:]}")

    def written_cache(self) -> list[str]:
        """Files the container added or changed under the cache dir (`docker diff` against the image)."""
        out = subprocess.run([*self.docker, "diff", self.name], check=True, capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if line[:1] in "AC" and line[2:].startswith(CACHE + "/")]

    def stop(self) -> float:
        started = time.monotonic()
        subprocess.run([*self.docker, "stop", "-t", "30", self.name], check=True, capture_output=True)
        return time.monotonic() - started

    def remove(self) -> None:
        subprocess.run([*self.docker, "rm", "-f", self.name], capture_output=True)


@pytest.fixture(scope="module")
def container(docker, image):
    c = Container(docker, image)
    yield c
    c.remove()


def chat(stream: bool) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0, "stream": stream}


def test_first_start_reads_the_baked_caches(container):
    seconds = container.wait_ready(READY_LIMIT_S)
    report("first container /ready", seconds)
    logs = container.logs()
    assert "building CPU extension" not in logs, logs[-4000:]
    assert "msg='kernel plan' source='cache'" in logs, logs[-4000:]
    assert container.written_cache() == [], "serve wrote to the baked cache: the bake missed something it reads"


def test_chat(container):
    r = httpx.post(f"{container.url}/v1/chat/completions", json=chat(False), timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "default"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip(), body
    assert choice["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 8


def test_streamed_chat(container):
    events = []
    with httpx.stream("POST", f"{container.url}/v1/chat/completions", json=chat(True), timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip(), chunks
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_metrics(container):
    r = httpx.get(f"{container.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = [s for f in text_string_to_metric_families(r.text) for s in f.samples]
    chats = sum(s.value for s in samples if s.name == "loom_requests_total" and s.labels["endpoint"] == "chat")
    assert chats == 2, "the two chat requests above"
    assert sum(s.value for s in samples if s.name == "loom_time_to_first_token_seconds_count") == 2
    assert sum(s.value for s in samples if s.name == "loom_generation_tokens_total") >= 2


def test_sigterm_stops_it_cleanly(container):
    seconds = container.stop()
    report("docker stop", seconds)
    state = container.state()
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, container.logs()[-4000:])
    assert seconds < STOP_LIMIT_S


def test_a_second_container_starts_as_fast(docker, image):
    c = Container(docker, image)
    try:
        report("second container /ready", c.wait_ready(READY_LIMIT_S))
        assert c.written_cache() == []
        report("second docker stop", c.stop())
        assert c.state()["ExitCode"] == 0
    finally:
        c.remove()
