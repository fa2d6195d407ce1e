"""The async HTTP side: one streaming request -> a `RequestResult`, and a whole benchmark run (fixed concurrency
and/or Poisson arrivals) -> per-request results plus the wall-clock duration."""
from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx

from loadtests.dataset import RequestSpec
from loadtests.metrics import RequestResult

PATHS = {"completion": "/v1/completions", "chat": "/v1/chat/completions", "summarize": "/v1/summarize",
         "classify": "/v1/classify"}


@dataclass
class Target:
    """Where requests go and what every generation request carries besides the prompt."""
    base_url: str
    model: str | None = None
    extra_body: dict = field(default_factory=lambda: {"ignore_eos": True})  # exact output lengths
    api_key: str | None = None
    temperature: float = 0.0
    include_usage: bool = True

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def build_payload(target: Target, spec: RequestSpec) -> tuple[str, dict, bool]:
    """(path, JSON body, streams?) for one request."""
    body: dict = {}
    if target.model:
        body["model"] = target.model
    if spec.kind in ("completion", "chat"):
        if spec.kind == "completion":
            body["prompt"] = spec.prompt
        else:
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        body.update(max_tokens=spec.max_tokens, temperature=target.temperature, stream=True)
        if target.include_usage:
            body["stream_options"] = {"include_usage": True}
        body.update(target.extra_body)
    elif spec.kind == "summarize":
        body.update(input=spec.prompt, max_tokens=spec.max_tokens, stream=True)
    elif spec.kind == "classify":
        body.update(input=spec.prompt)
    else:
        raise ValueError(f"unknown request kind {spec.kind!r}")
    body.update(spec.extra)
    return PATHS[spec.kind], body, bool(body.get("stream"))


def chunk_text(obj: dict) -> str:
    """The generated text a streamed chunk carries (completions, chat, or Loom's summary.chunk)."""
    choices = obj.get("choices")
    if choices:
        c = choices[0]
        if c.get("text"):
            return c["text"]
        delta = c.get("delta") or {}
        return delta.get("content") or delta.get("reasoning_content") or ""
    d = obj.get("delta")
    return d if isinstance(d, str) else ""


async def send_request(client: httpx.AsyncClient, target: Target, spec: RequestSpec) -> RequestResult:
    path, body, streaming = build_payload(target, spec)
    res = RequestResult(ok=False, kind=spec.kind, prompt_tokens=spec.prompt_tokens,
                        max_tokens=spec.max_tokens if spec.kind in ("completion", "chat") else None)
    usage = None
    last = None
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", target.base_url.rstrip("/") + path, json=body,
                                 headers=target.headers) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                res.error = f"http {resp.status_code}: {detail}"
                res.latency = time.perf_counter() - t0
                return res
            if not streaming:
                obj = json.loads(await resp.aread())
                res.latency = res.ttft = time.perf_counter() - t0
                usage = obj.get("usage")
                res.chunks = 1
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    obj = json.loads(data)
                    if obj.get("error"):
                        err = obj["error"]
                        code = err.get("code") if isinstance(err, dict) else None
                        res.error = (f"stream error{f' ({code})' if code else ''}: "
                                     f"{err.get('message', err) if isinstance(err, dict) else err}")
                        res.latency = now - t0
                        return res
                    if obj.get("usage"):
                        usage = obj["usage"]
                    if chunk_text(obj):
                        if res.ttft is None:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
                        res.chunks += 1
                res.latency = time.perf_counter() - t0
    except httpx.TimeoutException as exc:
        res.error = f"timeout: {type(exc).__name__}"
        res.latency = time.perf_counter() - t0
        return res
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        res.latency = time.perf_counter() - t0
        return res

    if usage and usage.get("completion_tokens") is not None:
        res.output_tokens = int(usage["completion_tokens"])
        res.usage_reported = True
    else:
        res.output_tokens = res.chunks
    if usage and usage.get("prompt_tokens"):
        res.prompt_tokens = int(usage["prompt_tokens"])
    if spec.kind != "classify" and res.ttft is None:
        res.error = "empty output: the stream carried no text"
        return res
    res.ok = True
    return res


def arrival_times(n: int, request_rate: float, seed: int = 0, burstiness: float = 1.0) -> list[float]:
    """Offsets (s) at which requests are sent: all at 0 for an infinite rate, else a Poisson process
    (gamma-distributed gaps with shape `burstiness`; 1 = exponential), as in vLLM."""
    if not request_rate or math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (request_rate * burstiness)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, theta)
    return out


async def run(target: Target, specs: list[RequestSpec], concurrency: int | None = None,
              request_rate: float = math.inf, seed: int = 0, warmup: list[RequestSpec] = (), progress: bool = True,
              timeout: float = 600.0, desc: str = "", stop_after: float | None = None,
              send=None) -> tuple[list[RequestResult], float]:
    """Send `warmup` one by one (not measured), then `specs`: each at its arrival time, at most `concurrency` in
    flight (None = unbounded). Returns the per-request results (in spec order) and the measured duration (first
    send to last finish). With `stop_after` (s), requests whose turn comes later are not sent (and not returned);
    those in flight finish. `send(client, target, spec)` replaces `send_request` (the soak's mixed load)."""
    from tqdm.auto import tqdm

    # A full collection over a big heap (torch imported for the tokenizer path) stalls this event loop ~0.1 s and
    # shows up as latency; freezing what exists now keeps the collector to the objects the run itself creates.
    gc.collect()
    gc.freeze()
    try:
        return await _run(target, specs, concurrency, request_rate, seed, warmup, progress, timeout, desc, stop_after,
                          tqdm, send or send_request)
    finally:
        gc.unfreeze()  # frozen objects are never finalized: bindings (triton's nanobind) then report leaks at exit


async def _run(target, specs, concurrency, request_rate, seed, warmup, progress, timeout, desc, stop_after, tqdm,
               send):
    limit = concurrency or 4096
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        for spec in warmup:
            await send_request(client, target, spec)

        sem = asyncio.Semaphore(concurrency) if concurrency else None
        offsets = arrival_times(len(specs), request_rate, seed)
        bar = tqdm(total=len(specs), desc=desc or "requests", unit="req", disable=not progress, leave=False)
        start = time.perf_counter()
        errors = 0

        async def one(spec: RequestSpec, offset: float) -> RequestResult | None:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is not None:
                async with sem:
                    sent = time.perf_counter() - start
                    if stop_after is not None and sent > stop_after:
                        bar.update(1)
                        return None
                    r = await send(client, target, spec)
            else:
                sent = time.perf_counter() - start
                if stop_after is not None and sent > stop_after:
                    bar.update(1)
                    return None
                r = await send(client, target, spec)
            r.start = sent
            if not r.ok:
                nonlocal errors
                errors += 1
                bar.set_postfix(errors=errors, refresh=False)
            bar.update(1)
            return r

        results = await asyncio.gather(*(one(s, o) for s, o in zip(specs, offsets)))
        duration = time.perf_counter() - start
        bar.close()
    return [r for r in results if r is not None], duration


async def fetch_model_id(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> str | None:
    """The first model id /v1/models lists (None if the server has no such endpoint)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout) as c:
            r = await c.get(base_url.rstrip("/") + "/v1/models", headers=headers)
            if r.status_code == 200:
                data = r.json().get("data") or []
                return data[0]["id"] if data else None
    except (httpx.HTTPError, ValueError, KeyError):
        pass
    return None
