"""A fixed mixed load for the soak: chat streams, non-streamed completions, classifications, clients that leave
mid-stream, and requests whose deadline (`timeout`) expires, each request labelled with what happened to it.

Scenarios (weights from `--mix`, default `chat=4,completion=2,classify=1.5,disconnect=1.5,deadline=1`):
- `chat`        a streamed chat completion (`output_len` tokens, EOS ignored)
- `completion`  a non-streamed completion
- `classify`    /v1/classify of an `input_len`-token text into one of six labels
- `disconnect`  a streamed chat completion the client drops after `disconnect_after` text chunks (the server
                must abort it and free its blocks)
- `deadline`    a completion (half streamed, half not) asking for many tokens with `timeout` = `deadline_s`:
                expected 504 `request_timeout`, or an SSE error event then [DONE]

Each result's `status` is one of: `200`, `disconnected` (a planned disconnect that went as planned), `429`,
`504` (HTTP 504, or the in-band timeout event of a stream), `http NNN` (any other status), `error` (transport error,
malformed stream...). 429 and 504 are expected outcomes under load and are counted apart from errors.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from loadtests.client import Target, send_request
from loadtests.dataset import CLASSIFY_LABELS, PromptMaker, RequestSpec, _lengths
from loadtests.metrics import RequestResult

DEFAULT_MIX = {"chat": 4.0, "completion": 2.0, "classify": 1.5, "disconnect": 1.5, "deadline": 1.0}
EXPECTED = ("429", "504")


@dataclass
class MixedSpec(RequestSpec):
    scenario: str = "chat"
    disconnect_after: int = 0


def parse_mix(text: str | None) -> dict[str, float]:
    if not text:
        return dict(DEFAULT_MIX)
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in DEFAULT_MIX:
            raise ValueError(f"unknown scenario {name!r}; one of {', '.join(DEFAULT_MIX)}")
        out[name.strip()] = float(weight)
    return out


def mixed_workload(maker: PromptMaker, n: int, input_len: int, output_len: int, range_ratio: float = 0.5,
                   seed: int = 0, mix: dict[str, float] | None = None, deadline_s: float = 0.5,
                   deadline_tokens: int = 512) -> list[MixedSpec]:
    rng = random.Random(seed)
    mix = mix or DEFAULT_MIX
    names, weights = list(mix), list(mix.values())
    ins = _lengths(rng, n, input_len, range_ratio)
    outs = _lengths(rng, n, output_len, range_ratio)
    specs: list[MixedSpec] = []
    for i, o in zip(ins, outs):
        scenario = rng.choices(names, weights)[0]
        text = maker.text(i, rng)
        if scenario == "chat":
            specs.append(MixedSpec("chat", text, i, o, scenario=scenario))
        elif scenario == "completion":
            specs.append(MixedSpec("completion", text, i, o, {"stream": False}, scenario=scenario))
        elif scenario == "classify":
            specs.append(MixedSpec("classify", text.strip(), i, None, {"labels": CLASSIFY_LABELS}, scenario=scenario))
        elif scenario == "disconnect":
            specs.append(MixedSpec("chat", text, i, max(o, 16), scenario=scenario,
                                   disconnect_after=rng.randint(1, max(1, min(o, 16) // 2))))
        else:
            specs.append(MixedSpec("completion", text, i, deadline_tokens,
                                   {"timeout": deadline_s, "stream": rng.random() < 0.5}, scenario=scenario))
    return specs


async def send_disconnecting(client: httpx.AsyncClient, target: Target, spec: MixedSpec) -> RequestResult:
    """Open a stream, read `disconnect_after` text chunks, then close the connection."""
    from loadtests.client import build_payload, chunk_text

    path, body, _ = build_payload(target, spec)
    res = RequestResult(ok=False, kind=spec.kind, prompt_tokens=spec.prompt_tokens)
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", target.base_url.rstrip("/") + path, json=body,
                                 headers=target.headers) as resp:
            if resp.status_code != 200:
                res.error = f"http {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                if chunk_text(json.loads(line[5:])):
                    res.chunks += 1
                    if res.ttft is None:
                        res.ttft = time.perf_counter() - t0
                    if res.chunks >= spec.disconnect_after:
                        break
            # leaving the block without reading the rest closes the connection (httpx cannot reuse it)
        res.ok = res.chunks >= spec.disconnect_after
        if not res.ok:
            res.error = "stream ended before the planned disconnect"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        res.latency = time.perf_counter() - t0
    res.output_tokens = res.chunks
    return res


def status_of(res: RequestResult, scenario: str) -> str:
    if res.ok:
        return "disconnected" if scenario == "disconnect" else "200"
    err = res.error or ""
    if err.startswith("http 429"):
        return "429"
    if err.startswith("http 504") or err.startswith("stream error (request_timeout)"):
        return "504"
    if err.startswith("http "):
        return err.split(":", 1)[0]
    return "error"


async def send_mixed(client: httpx.AsyncClient, target: Target, spec: RequestSpec) -> RequestResult:
    scenario = getattr(spec, "scenario", spec.kind)
    if scenario == "disconnect":
        res = await send_disconnecting(client, target, spec)
    else:
        res = await send_request(client, target, spec)
    res.kind = scenario
    res.status = status_of(res, scenario)
    return res


def by_status(results: list[RequestResult]) -> dict:
    """Counts by status and by scenario x status; `unexpected` counts what is neither a success nor 429/504, plus
    deadline requests that finished (their deadline should have expired) and 504s that were not deadline requests."""
    total = Counter(r.status for r in results)
    per = Counter(f"{r.kind}:{r.status}" for r in results)
    unexpected = [r for r in results if r.status not in ("200", "disconnected", *EXPECTED)]
    wrong_504 = sum(1 for r in results if r.status == "504" and r.kind != "deadline")
    errors = Counter((r.error or "")[:120] for r in unexpected)
    return {"by_status": dict(sorted(total.items())), "by_scenario": dict(sorted(per.items())),
            "unexpected": len(unexpected), "unexpected_504": wrong_504,
            "deadline_finished": per.get("deadline:200", 0), "errors": dict(errors.most_common(10))}
