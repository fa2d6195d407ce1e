"""The engine thread's loop: take new requests and aborts from the inbox, abort what is past its deadline, run one
encoder batch, one engine step, deliver the step's outputs to their requests' sinks, and sleep when there is
nothing to do. `AsyncEngine` (the asyncio face) puts messages in the inbox from any thread; everything else here
runs on the engine thread.

One request cannot take the loop down: whatever its submission raises fails that request alone (a failing step
fails its own requests inside `EngineCore.step`). Only a failure of the loop itself is fatal: every caller is then
failed with `EngineDeadError` instead of being left waiting, and `error` says why."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from loom_kernels.cpu.platform import trim_heap  # the loop hands a burst's freed heap back to the OS
from server.engine.admission import Admission
from server.engine.encoder import EncodeJob, EncoderBatcher, moving_average
from server.engine.engine_core import EngineCore
from server.engine.errors import EngineDeadError, EngineError, InternalEngineError, RequestTimeoutError
from server.engine.inflight import InflightRequests, Sink
from server.engine.sampling_params import SamplingParams
from server.engine.step_hooks import HeapTrimPolicy, StepObservers

log = logging.getLogger("loom.engine")


@dataclass
class Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved by the limits check on the caller's side
    priority: int
    deadline: float | None  # time.monotonic() by which the request must be done, else it is aborted
    sink: Sink


@dataclass
class Abort:
    request_id: str


def _internal_error(exc: Exception) -> InternalEngineError:
    return InternalEngineError(f"internal error: {type(exc).__name__}: {exc}")


class EngineLoop:
    def __init__(self, core: EngineCore, admission: Admission, encoder_batcher: EncoderBatcher):
        self.core, self.admission, self.encoder_batcher = core, admission, encoder_batcher
        self.observers = StepObservers()
        self.error: BaseException | None = None  # what ended the loop, if something did
        self.last_step_time = time.monotonic()  # the last step, encoder batch or idle wake-up
        self._trim = HeapTrimPolicy()
        self._inflight = InflightRequests()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._step_seconds: float | None = None  # moving average of the engine steps' wall time

    # -- any thread -----------------------------------------------------------------------------------------
    def send(self, message: Submit | EncodeJob | Abort) -> None:
        self._inbox.put(message)
        self._wake.set()

    def stop(self) -> None:
        """Make `run` return after its current round."""
        self._stopping = True
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- the engine thread ----------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                self._expire()
                self._encode_batch()
                if self.core.has_unfinished():
                    self._step()
                elif not self.encoder_batcher.has_work():
                    self._idle()
        except BaseException as exc:  # fatal: mark unhealthy and fail every caller instead of leaving them hanging
            self._die(exc)

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, Submit):
                self._add_request(message)
            elif isinstance(message, EncodeJob):
                self._add_encode_job(message)
            else:
                self._abort(message.request_id)

    def _add_request(self, message: Submit) -> None:
        """Inbox -> scheduler: the new sequences wait there, their prompts unprefilled. Whatever goes wrong fails
        this request alone; the loop carries on with the others."""
        seqs, tokens = message.params.n, message.params.n * len(message.prompt_token_ids)
        try:
            with self.admission.entering_scheduler(seqs, tokens):
                self.core.add_request(message.request_id, message.prompt_token_ids, message.params,
                                      message.priority, message.max_tokens)
        except EngineError as exc:
            message.sink(exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug this request ran into; the core has undone its adding
            log.exception("adding a request failed; failing it", extra={"request_id": message.request_id})
            message.sink(_internal_error(exc))
            return
        self._inflight.add(message.request_id, message.sink, message.params.n, message.deadline)

    def _add_encode_job(self, job: EncodeJob) -> None:
        try:
            self.encoder_batcher.add(job)
        except Exception as exc:  # noqa: BLE001 - as for a generation request: it fails alone
            log.exception("adding an encoder request failed; failing it", extra={"request_id": job.request_id})
            self.encoder_batcher.abort(job.request_id)
            job.sink(_internal_error(exc))

    def _abort(self, request_id: str) -> None:
        job = self.encoder_batcher.abort(request_id)
        if job is not None:  # (a caller that left ignores this; the drain's abort answers with it)
            job.sink(EngineDeadError("the request was aborted"))
        for out in self.core.abort(request_id):
            self._inflight.deliver(out)
        self._inflight.forget(request_id)
        self._count_waiting()

    def _expire(self) -> None:
        """Abort every request past its deadline (its blocks are freed now) and fail it with a timeout."""
        now = time.monotonic()
        self.encoder_batcher.expire(now)
        expired = self._inflight.expired(now)
        for request_id in expired:
            self.core.abort(request_id)  # its last deltas are dropped: the caller gets the timeout instead
            self._inflight.fail(request_id, RequestTimeoutError("the request did not finish within its timeout"))
        if expired:
            self._count_waiting()

    def _count_waiting(self) -> None:
        """After the scheduler moved sequences (admitted, preempted, finished), count what still waits there. The
        token count walks every waiting and running sequence, so it is only taken when a token cap needs it."""
        waiting = self.core.num_waiting_seqs()
        tokens = self.core.num_unprefilled_tokens() if self.admission.max_waiting_tokens else 0
        self.admission.count_scheduler(waiting, tokens, time.monotonic(), self.core.scheduler.num_admitted,
                                       self.core.prefilled_tokens)

    def _encode_batch(self) -> None:
        """One encoder batch between two decode steps; while streams decode, about as long as one of their steps."""
        batcher = self.encoder_batcher
        if not batcher.has_work():
            return
        decoding = self.core.has_unfinished() and self._step_seconds is not None
        batcher.step(batcher.budget_for(self._step_seconds) if decoding else None)
        self.last_step_time = time.monotonic()

    def _step(self) -> None:
        started = time.perf_counter()
        result = self.core.step()
        self.last_step_time = time.monotonic()
        seconds = time.perf_counter() - started
        self._step_seconds = moving_average(self._step_seconds, seconds)  # bounds encoder batches while decoding
        self._count_waiting()
        self.observers.notify(self.core.last_step_seqs, self.core.last_step_tokens, seconds)
        for out in result.outputs:
            self._inflight.deliver(out)
        for request_id, error in result.failed.items():
            self._inflight.fail(request_id, error)
        if self._trim.after_step(self.core.last_step_tokens, started):
            trim_heap()  # after the step's outputs went out: the trim delays no token

    def _idle(self) -> None:
        if self._trim.on_idle():  # just went idle: hand the heap the last burst freed back to the OS
            trim_heap()
        self._wake.wait(0.5)
        self._wake.clear()
        self.last_step_time = time.monotonic()

    def _die(self, exc: BaseException) -> None:
        log.error("engine loop died", exc_info=exc)
        self.error = exc
        dead = EngineDeadError(f"engine stopped: {exc!r}")
        self._inflight.fail_all(dead)
        for job in list(self.encoder_batcher.jobs.values()):
            job.sink(dead)
        self.encoder_batcher.jobs.clear()
