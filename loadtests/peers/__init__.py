"""Registry of servers the harness can start, measure and stop: Loom itself and the comparison peers.

Each entry: name -> command line (built for a port, the model files and the sweep's largest concurrency),
readiness URL, model id to send, the extra request fields it needs for exact output lengths, and a check that
says why it cannot run here (a missing binary or package).

    with start_server("llama-server", ServerContext(...)) as srv:
        srv.base_url, srv.model_id, srv.pid
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
PEERS_CACHE = Path(os.environ.get("LOOM_PEERS_CACHE", "~/.cache/loom-peers")).expanduser()
LLAMA_SERVER = Path(os.environ.get("LLAMA_SERVER_BIN", PEERS_CACHE / "llama-server"))


@dataclass
class ServerContext:
    """What a command is built from."""
    port: int
    host: str = "127.0.0.1"
    max_concurrency: int = 64  # parallel slots / max batch
    ctx_per_seq: int = 2048  # context each slot must hold (prompt + output)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    loom_args: list[str] = field(default_factory=list)
    gguf: Path | None = None  # the default model's GGUF (llama-server, Loom's source)
    hf_dir: Path | None = None  # the same weights converted to a Hugging Face directory (HF peers)


@dataclass
class ServerSpec:
    name: str
    description: str
    command: Callable[[ServerContext], list[str]]
    ready_path: str
    model_id: str | None = None  # None: ask /v1/models
    extra_body: dict = field(default_factory=lambda: {"ignore_eos": True})
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot run here, or None
    version: Callable[[], str] = lambda: ""
    startup_timeout_s: float = 600.0
    env: dict = field(default_factory=dict)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_model_files() -> tuple[Path, Path]:
    """(GGUF, converted HF directory) of the default model: the same weights for every server."""
    from server.model.loader import default_gguf, hf_reference_directory
    return default_gguf(), Path(hf_reference_directory("default", Path("~/.cache/loom").expanduser()))


def _python_tool(*args: str) -> list[str]:
    return [sys.executable, *args]


def _loom_base() -> list[str]:
    exe = Path(sys.executable).with_name("loom")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]


def _loom_command(ctx: ServerContext) -> list[str]:
    return [*_loom_base(), "serve", "--model", "default", "--host", ctx.host, "--port", str(ctx.port), *ctx.loom_args]


def _loom_unavailable() -> str | None:
    """Loom is a peer like the others: run as its command, never imported into the harness."""
    probe = subprocess.run([*_loom_base(), "serve", "--help"], capture_output=True, text=True, timeout=120,
                           check=False)
    if probe.returncode != 0:
        return f"`loom --help` failed: {(probe.stderr or probe.stdout).strip()[-300:]}"
    return None


def _git_version() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return f"git {head}{'+dirty' if dirty else ''}" if head else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _transformers_version() -> str:
    try:
        from importlib.metadata import version
        return f"transformers {version('transformers')}, torch {version('torch')}"
    except Exception:  # noqa: BLE001
        return ""


def _hf_unavailable() -> str | None:
    for mod in ("transformers", "torch", "fastapi", "uvicorn"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


def _hf_continuous_unavailable() -> str | None:
    if (why := _hf_unavailable()) is not None:
        return why
    try:
        from transformers.generation.continuous_batching import ContinuousBatchingManager  # noqa: F401
    except ImportError:
        return "this transformers has no continuous batching (transformers.generation.continuous_batching)"
    return None


def _llama_command(ctx: ServerContext) -> list[str]:
    n = ctx.max_concurrency
    cmd = [str(LLAMA_SERVER), "-m", str(ctx.gguf), "--host", ctx.host, "--port", str(ctx.port),
           "-np", str(n), "-c", str(n * ctx.ctx_per_seq), "--cont-batching", "-t", str(ctx.threads),
           "-tb", str(ctx.threads), "--alias", "smollm2-135m-q4_1", "--no-webui"]
    # With GGML_NATIVE on a CPU that reports AMX, ggml's AMX mat-mul (reached through weight "repacking") segfaults
    # in the warm-up run here (ggml_backend_amx_mul_mat); --no-repack keeps the plain AVX-512 kernels.
    # LLAMA_SERVER_REPACK=1 tries the repacked/AMX path again.
    if os.environ.get("LLAMA_SERVER_REPACK") != "1":
        cmd.append("--no-repack")
    return cmd


def _llama_unavailable() -> str | None:
    if not LLAMA_SERVER.exists():
        return f"{LLAMA_SERVER} not built: run loadtests/build_llama_server.sh (~5 min)"
    return None


def _llama_version() -> str:
    f = LLAMA_SERVER.parent / "llama-server.version"
    if f.exists():
        return f.read_text().strip()
    try:
        out = subprocess.run([str(LLAMA_SERVER), "--version"], capture_output=True, text=True, timeout=10,
                             check=False)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


SERVERS: dict[str, ServerSpec] = {
    "loom": ServerSpec(
        "loom", "Loom (`loom serve --model default`)", _loom_command, "/ready",
        unavailable=_loom_unavailable, version=_git_version),
    "hf-static": ServerSpec(
        "hf-static", "transformers `generate`, static batches (fastest dtype measured at start, sdpa) behind loadtests/peers/hf_static.py",
        lambda c: _python_tool("-m", "loadtests.peers.hf_static", "--model", str(c.hf_dir), "--host", c.host,
                               "--port", str(c.port), "--max-batch", str(c.max_concurrency),
                               "--threads", str(c.threads)),
        "/health", model_id="hf-static", unavailable=_hf_unavailable, version=_transformers_version),
    "hf-continuous": ServerSpec(
        "hf-continuous", "transformers continuous batching (`init_continuous_batching`, fastest dtype measured at start, sdpa) behind "
                         "loadtests/peers/hf_continuous.py",
        lambda c: _python_tool("-m", "loadtests.peers.hf_continuous", "--model", str(c.hf_dir), "--host", c.host,
                               "--port", str(c.port), "--max-batch", str(c.max_concurrency),
                               "--threads", str(c.threads)),
        "/health", model_id="hf-continuous", unavailable=_hf_continuous_unavailable, version=_transformers_version),
    "llama-server": ServerSpec(
        "llama-server", "llama.cpp `llama-server` (Q4_1 GGUF, parallel slots, continuous batching)",
        _llama_command, "/health", model_id="smollm2-135m-q4_1", unavailable=_llama_unavailable,
        version=_llama_version),
}
PEERS = [n for n in SERVERS if n != "loom"]


@dataclass
class RunningServer:
    spec: ServerSpec
    proc: subprocess.Popen
    base_url: str
    model_id: str | None
    log_path: Path | None
    command: list[str]
    startup_s: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid


class ServerFailed(RuntimeError):
    pass


def _tail(path: Path | None, n: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float, log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerFailed(f"exited with {proc.returncode} before it was ready\n{_tail(log_path)}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServerFailed(f"not ready at {url} after {timeout:.0f}s\n{_tail(log_path)}")


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after `timeout`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def start_server(name: str, ctx: ServerContext, log_dir: Path | None = None) -> Iterator[RunningServer]:
    """Start a registered server, wait until its readiness URL answers 200, yield it, stop it."""
    spec = SERVERS[name]
    if (why := spec.unavailable()) is not None:
        raise ServerFailed(why)
    cmd = spec.command(ctx)
    log_path = None
    out = subprocess.DEVNULL
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}-{ctx.port}.log"
        out = open(log_path, "w")  # noqa: SIM115 - closed below
    env = {**os.environ, **spec.env, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    try:
        base = f"http://{ctx.host}:{ctx.port}"
        wait_ready(base + spec.ready_path, proc, spec.startup_timeout_s, log_path)
        model_id = spec.model_id
        if model_id is None:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                model_id = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        yield RunningServer(spec, proc, base, model_id, log_path, cmd, time.monotonic() - t0)
    finally:
        stop_process(proc)
        if log_path is not None:
            out.close()


def available(names: list[str] | None = None) -> dict[str, str | None]:
    """name -> None if it can run here, else why not."""
    return {n: SERVERS[n].unavailable() for n in (names or list(SERVERS))}
