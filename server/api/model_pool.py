"""The models of `--models-dir`, served by name beside the default model and loaded on first use.

Each loaded model is its own engine (EngineCore + AsyncEngine on its own thread, its own KV cache), so one engine
dying leaves the others serving. All state changes happen on the HTTP event loop, one load at a time: a request for
a model that is not loaded starts its load (or joins the one under way) and waits for it within its deadline. Before
a load, the least recently used models (idle ones first) are unloaded until it fits under `max_loaded` and in the
memory free beside them (the opener's estimate of the new model against what the machine has available, less a
headroom), each only once the requests holding it have finished (a request holds its model from its start to its last
byte: `InflightMiddleware`). A model that would not fit even with every other one unloaded is refused (503) before
anything is unloaded, instead of the process being killed for memory."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from server.api.errors import APIError
from server.engine import AsyncEngine
from server.model import Tokenizer

log = logging.getLogger("loom.api")


class Served(Protocol):
    """What the pool needs of a served model (server/api/lifecycle.py's ServedModel)."""
    engine: AsyncEngine
    max_model_len: int


class ModelOpener(Protocol):
    """Loads directory models (the CLI's, server/cli/models_dir.py). Both calls block: run off the event loop."""

    def check(self, path: str) -> None:
        """Refuse, from its metadata alone, a file that cannot load (before other models are unloaded for it)."""

    def resident_bytes(self, path: str) -> int:
        """About the memory the model at `path` holds once loaded (weights and its KV cache), from metadata."""

    def available_bytes(self) -> int | None:
        """Memory the machine has free for one more model now; None: unknown (no memory check)."""

    def open(self, name: str, path: str) -> tuple[AsyncEngine, str, Tokenizer]:
        """The model at `path` in its own engine, served as `name`."""


ServedBuilder = Callable[[AsyncEngine, str, Tokenizer], Served]
State = Literal["unloaded", "loading", "loaded", "unloading"]


def scan_models_dir(directory: str | Path) -> dict[str, str]:
    """Model name -> path: every `.gguf` file by its stem, every directory holding a config.json by its name."""
    found = {}
    for entry in sorted(Path(directory).iterdir()):
        if entry.is_file() and entry.suffix == ".gguf":
            found[entry.stem] = str(entry)
        elif entry.is_dir() and (entry / "config.json").is_file():
            found[entry.name] = str(entry)
    return found


@dataclass
class PoolEntry:
    name: str
    path: str
    state: State = "unloaded"
    served: Served | None = None
    inflight: int = 0  # requests holding this model
    last_used: float = 0.0  # time.monotonic() of the last request's start or end
    resident: int = 0  # the opener's estimate of its bytes in memory once loaded
    transition: asyncio.Task | None = None  # the load or unload under way
    created: int = field(default_factory=lambda: int(time.time()))


class ModelPool:
    def __init__(self, models: dict[str, str], opener: ModelOpener, build: ServedBuilder, max_loaded: int = 1,
                 idle_unload: float = 0.0, load_wait: float = 300.0, headroom: int = 0):
        self.entries = {name: PoolEntry(name, path) for name, path in models.items()}
        self.opener, self.build = opener, build
        self.max_loaded, self.idle_unload, self.load_wait = max_loaded, idle_unload, load_wait
        self.headroom = headroom  # bytes of available memory a load leaves free
        self._room = asyncio.Lock()  # one load (with the unloads that make room for it) at a time

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    async def acquire(self, name: str, deadline: float | None) -> tuple[Served, Callable[[], None]]:
        """The served model `name` and the call that releases it, loading it first if need be. 504 when the
        request's deadline passes while it waits, 503 (Retry-After) past `load_wait` without one, 500 when the
        load fails."""
        entry = self.entries[name]
        while True:
            if entry.state == "loaded":
                if entry.served.engine.healthy:
                    entry.inflight += 1
                    entry.last_used = time.monotonic()
                    return entry.served, lambda: self._release(entry)
                log.warning("model engine stopped; reloading", extra={"model": name})
                self._start(entry, "unloading", self._unload(entry))
            elif entry.state == "unloaded":
                self._start(entry, "loading", self._load(entry))
            await self._wait(entry, deadline)

    def _release(self, entry: PoolEntry) -> None:
        entry.inflight -= 1
        entry.last_used = time.monotonic()

    def _start(self, entry: PoolEntry, state: State, work: Awaitable[None]) -> None:
        """Begin a load or unload; the state changes now, so the next request (even on this tick) joins it."""
        entry.state, entry.transition = state, asyncio.ensure_future(work)

    async def _wait(self, entry: PoolEntry, deadline: float | None) -> None:
        timeout = self.load_wait if deadline is None else deadline - time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(entry.transition), max(timeout, 0.0))
        except TimeoutError:
            if deadline is not None:
                raise APIError(504, f"the request timed out while the model {entry.name!r} was loading",
                               code="request_timeout", type="timeout_error") from None
            raise APIError(503, f"the model {entry.name!r} is still loading", code="model_loading",
                           headers={"Retry-After": "5"}) from None

    async def _load(self, entry: PoolEntry) -> None:
        try:
            entry.resident = await asyncio.to_thread(self._measure, entry.path)
            async with self._room:
                await self._make_room(entry)
                started = time.perf_counter()
                engine, _, tokenizer = await asyncio.to_thread(self.opener.open, entry.name, entry.path)
        except APIError:
            entry.state = "unloaded"
            raise
        except Exception as exc:
            entry.state = "unloaded"
            log.warning("model load failed", extra={"model": entry.name, "error": repr(exc)})
            raise APIError(500, f"the model {entry.name!r} failed to load from {entry.path}: "
                                f"{type(exc).__name__}: {exc}", param="model", code="model_load_failed") from None
        entry.served, entry.state = self.build(engine, entry.name, tokenizer), "loaded"
        entry.last_used = time.monotonic()
        log.info("model loaded", extra={"model": entry.name, "seconds": round(time.perf_counter() - started, 2)})

    def _measure(self, path: str) -> int:
        self.opener.check(path)
        return self.opener.resident_bytes(path)

    async def _make_room(self, entry: PoolEntry) -> None:
        available = await asyncio.to_thread(self.opener.available_bytes)
        victims = self._victims(entry, available)
        for victim, reason in victims:
            if victim.state == "loaded":
                log.info("unloading the least recently used model to make room", extra={
                    "model": victim.name, "for": entry.name, "reason": reason, "model_bytes": victim.resident,
                    "needed_bytes": entry.resident, "available_bytes": available, "headroom_bytes": self.headroom})
                self._start(victim, "unloading", self._unload(victim))
        for victim, _ in victims:
            await asyncio.shield(victim.transition)

    def _victims(self, entry: PoolEntry, available: int | None) -> list[tuple[PoolEntry, str]]:
        """The models to unload before `entry` loads, each with why ("max_loaded_models" or "memory"): those already
        unloading first, then idle ones, then busy ones, least recently used first. 503 when even all would not
        free enough memory. The memory they free is their estimate, not a new reading: freed pages may come back
        to the machine late."""
        held = sorted((e for e in self.entries.values() if e is not entry and e.state in ("loaded", "unloading")),
                      key=lambda e: (e.state != "unloading", e.inflight > 0, e.last_used))
        free = None if available is None else available - self.headroom
        victims: list[tuple[PoolEntry, str]] = []
        for e in held:
            if len(held) - len(victims) >= self.max_loaded:
                victims.append((e, "max_loaded_models"))
            elif free is not None and entry.resident > free + sum(v.resident for v, _ in victims):
                victims.append((e, "memory"))
        if free is not None and entry.resident > free + sum(v.resident for v, _ in victims):
            gib = 2 ** 30
            log.warning("model too large for the memory available", extra={
                "model": entry.name, "needed_bytes": entry.resident, "available_bytes": available,
                "headroom_bytes": self.headroom, "reclaimable_bytes": sum(e.resident for e in held)})
            raise APIError(503, f"the model {entry.name!r} needs about {entry.resident / gib:.2f} GiB of memory "
                                f"(weights and KV cache) but only {(free + sum(e.resident for e in held)) / gib:.2f} "
                                f"GiB could be free with every other directory model unloaded (keeping "
                                f"{self.headroom / gib:.2f} GiB of headroom)", param="model",
                           code="insufficient_memory")
        return victims

    async def _unload(self, entry: PoolEntry) -> None:
        while entry.inflight:  # its running requests finish first
            await asyncio.sleep(0.02)
        engine, entry.served = entry.served.engine, None
        await asyncio.to_thread(engine.shutdown)
        entry.state = "unloaded"
        log.info("model unloaded", extra={"model": entry.name})

    async def unload_idle(self) -> None:
        """Unload, forever, each model nobody has used for `idle_unload` seconds (run as a task when it is > 0)."""
        while True:
            await asyncio.sleep(min(1.0, self.idle_unload / 4))
            now = time.monotonic()
            for e in self.entries.values():
                if e.state == "loaded" and not e.inflight and now - e.last_used >= self.idle_unload:
                    log.info("unloading an idle model", extra={"model": e.name})
                    self._start(e, "unloading", self._unload(e))

    def shutdown(self) -> None:
        """Stop every loaded engine (the server is ending)."""
        for e in self.entries.values():
            if e.served is not None:
                e.served.engine.shutdown()
