"""Grammar compilation in a child process, so that a compile nobody waits for any more can be stopped.

xgrammar cannot interrupt a compile running in a thread: an abandoned one (its client gone, or over the time limit)
would hold its worker until it finished, minutes for a choice among tens of thousands of strings. A child process
is killed instead, and the next compile starts a fresh one. Children fork from multiprocessing's fork server, which
has xgrammar imported already, so a fresh child is ready in a fraction of a second; it compiles at a lower CPU
priority, one grammar at a time, and sends the compiled grammar back serialized.

The child also refuses what xgrammar would compile but not enforce: every warning it logs while compiling says it
ignored part of the request (a lookahead, an anchor mid-pattern, `multipleOf` on a number, a `oneOf` it cannot prove
disjoint), and a grammar whose first step allows no token at all matches nothing."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from server.engine.errors import InvalidRequestError, ServerBusyError

POLL_SECONDS = 0.02  # how soon an abandoned compile is noticed
START_SECONDS = 300  # a child's start (the fork server's first: importing xgrammar and torch) on a loaded machine
_WARNING = re.compile(r"^\[[\d:]+\] \S+:\d+: Warning: (.*)$")


class CompileStopped(Exception):
    """The compile was stopped before it finished: `reason` is "abandoned" or "timeout"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class CompileProcess:
    """One child process, started on first use and again after it is killed."""

    def __init__(self) -> None:
        self._process: Any = None
        self._conn: Any = None

    def compile(self, info_json: str, kind: str, text: str, limit: float, abandoned: threading.Event) -> str:
        """The serialized compiled grammar of (`kind`, `text`). InvalidRequestError if xgrammar refuses it or would
        not enforce all of it; CompileStopped (the child killed) once `abandoned` is set, or when the compile runs
        longer than `limit` seconds (a child's start does not count)."""
        if self._process is None or not self._process.is_alive():
            self._start(info_json, abandoned)
        self._conn.send((kind, text))
        return self._reply(time.monotonic() + limit, abandoned, kind)

    def _reply(self, deadline: float, abandoned: threading.Event, kind: str) -> Any:
        while not self._conn.poll(POLL_SECONDS):
            if abandoned.is_set() or time.monotonic() > deadline:
                self.close()
                raise CompileStopped("abandoned" if abandoned.is_set() else "timeout")
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError):  # the child died on this grammar (e.g. out of memory)
            self._process.join(1)
            code = self._process.exitcode
            self.close()
            raise InvalidRequestError(f"the grammar compiler failed on this {kind.replace('_', ' ')} (its process "
                                      f"exited with code {code})", code="grammar_compile_failed") from None
        if status == "invalid":
            raise InvalidRequestError(payload)
        return payload

    def _start(self, info_json: str, abandoned: threading.Event) -> None:
        """Start a child and wait until it is ready. The fork server imports the main module once (as any
        multiprocessing child would), so that each child need not."""
        self.close()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", "xgrammar", __name__])  # effective before the server's start
        self._conn, child = context.Pipe()
        self._process = context.Process(target=serve, args=(child, info_json), name="loom-grammar", daemon=True)
        try:
            self._process.start()
        except OSError as exc:  # the fork server is gone (the server is stopping) or the machine is out of processes
            self.close()
            raise ServerBusyError(f"the grammar compile process could not start ({exc})", "grammar_compiler_busy",
                                  1) from None
        finally:
            child.close()
        try:
            self._reply(time.monotonic() + START_SECONDS, abandoned, "start")
        except CompileStopped as exc:
            if exc.reason == "abandoned":
                raise
            raise ServerBusyError(f"the grammar compile process did not start within {START_SECONDS} s",
                                  "grammar_compiler_busy", 1) from None

    def close(self) -> None:
        if self._process is not None and self._process.pid is not None:  # a child that failed to start has no pid
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None


# -- the child -------------------------------------------------------------------------------------------------------
def serve(conn: Any, info_json: str) -> None:
    """The child's loop: compile each (kind, text) received, answer ("ok", serialized) or ("invalid", message)."""
    import xgrammar as xgr
    with contextlib.suppress(OSError):
        os.nice(10)  # the engine's forward passes come first
    info = xgr.TokenizerInfo.deserialize_json(info_json)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    conn.send(("ready", ""))
    while True:
        try:
            kind, text = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(compile_one(compiler, info, kind, text))


def compile_one(compiler: Any, info: Any, kind: str, text: str) -> tuple[str, str]:
    what = kind.replace("_", " ")
    with _captured_warnings() as warnings:
        try:
            compiled = _build(compiler, kind, text)
        except Exception as exc:  # noqa: BLE001 - xgrammar reports every parse/convert failure as RuntimeError
            return "invalid", f"invalid {what}: {xgr_message(exc)}"
    if warnings:
        return "invalid", f"this {what} cannot be enforced exactly: {'; '.join(dict.fromkeys(warnings))}"
    if _matches_nothing(compiled, info):
        return "invalid", f"this {what} matches no text at all (no token can start it)"
    return "ok", compiled.serialize_json()


# xgrammar writes the characters of a length-bounded string (and property name) as anything but a quote, a backslash
# or a line break: raw control characters pass, which is not JSON. Its unbounded strings exclude them; so do these.
_LOOSE_CHARS, _JSON_CHARS = '[^\\"\\\\\\r\\n]', '[^\\0-\\x1f\\"\\\\]'


def _build(compiler: Any, kind: str, text: str) -> Any:
    import xgrammar as xgr
    if kind == "regex":
        return compiler.compile_regex(text)
    if kind == "grammar":
        return compiler.compile_grammar(text)
    if kind == "json_schema":
        grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False)
    elif kind == "json_object":
        grammar = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    elif kind == "structural_tag":
        grammar = xgr.Grammar.from_structural_tag(text)
    else:
        raise ValueError(f"unknown grammar kind {kind!r}")
    ebnf = str(grammar)
    return compiler.compile_grammar(ebnf.replace(_LOOSE_CHARS, _JSON_CHARS) if _LOOSE_CHARS in ebnf else grammar)


def _matches_nothing(compiled: Any, info: Any) -> bool:
    import xgrammar as xgr
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask)
    return not bool(bitmask.any())


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """The warnings xgrammar's C++ side writes to stderr meanwhile (the child does nothing else at the time)."""
    warnings: list[str] = []
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield warnings
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode("utf-8", "replace").splitlines():
                if match := _WARNING.match(line.strip()):
                    warnings.append(match.group(1).strip())


def xgr_message(exc: Exception) -> str:
    """xgrammar's messages start with a timestamp and a C++ source location; keep what a client can act on."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
