"""Embeddings throughput of `loom serve --embedding-model default` against transformers, and what an embedding burst
does to running chat streams.

1. Loom: C concurrent clients (closed loop, one text per request) for `--seconds` each, texts of exactly 32 and 256
   tokens (all-MiniLM-L6-v2 tokens, [CLS]/[SEP] included) -> texts/s.
2. transformers `AutoModel` in this process on static batches (tokenize + forward + mean pool + normalize), float32
   and bfloat16; the faster counts. Then Loom's encoder in this process on the same static batches: the ceiling
   that serving one text per request can approach.
3. Chat inter-token latency of `--streams` streaming completions, alone and while 64 clients send 256-token
   embedding requests.

    python -m loadtests.embeddings                       # starts loom serve itself on a free port
    python -m loadtests.embeddings --base-url http://127.0.0.1:8000 --json out.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx

from loadtests.rawhttp import RawConnection


def one_token_words(tokenizer, n: int = 2000) -> list[str]:
    words = [w for w, i in tokenizer.get_vocab().items() if w.isalpha() and w.islower() and len(w) > 2]
    words = [w for w in sorted(words) if len(tokenizer.encode(w, add_special_tokens=False)) == 1]
    return random.Random(0).sample(words, min(n, len(words)))


def make_texts(words: list[str], tokens: int, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(tokens - 2)) for _ in range(count)]  # + [CLS] and [SEP]


async def embed_load(url: str, model: str, texts: list[str], clients: int, seconds: float,
                     client: str = "raw") -> dict:
    """`clients` closed-loop clients, one text per request, for `seconds`: texts/s and latency percentiles.
    `client`: "raw" (loadtests/rawhttp.py, a lean keep-alive client) or "httpx"."""
    done, latencies, errors = 0, [], 0
    stop = time.perf_counter() + seconds
    bodies = [json.dumps({"model": model, "input": t}).encode() for t in texts]

    async def closed_loop(k: int, post) -> None:
        nonlocal done, errors
        i = k
        while time.perf_counter() < stop:
            started = time.perf_counter()
            status = await post(bodies[i % len(bodies)])
            if status == 200:
                done += 1
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            i += clients

    t0 = time.perf_counter()
    if client == "raw":
        connections = [RawConnection(url) for _ in range(clients)]

        def raw_post(conn: RawConnection):
            async def post(body: bytes) -> int:
                return (await conn.post("/v1/embeddings", body))[0]
            return post
        try:
            await asyncio.gather(*(closed_loop(k, raw_post(c)) for k, c in enumerate(connections)))
        finally:
            await asyncio.gather(*(c.close() for c in connections))
    else:
        limits = httpx.Limits(max_connections=clients + 8)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            async def httpx_post(body: bytes) -> int:
                r = await http.post(f"{url}/v1/embeddings", content=body, headers={"content-type": "application/json"})
                return r.status_code
            t0 = time.perf_counter()
            await asyncio.gather(*(closed_loop(k, httpx_post) for k in range(clients)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "client": client, "texts_per_s": round(done / wall, 1), "errors": errors,
            "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
            "latency_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1) if latencies else None}


def hf_static(directory: str, texts: list[str], batch: int, seconds: float) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModel.from_pretrained(directory, dtype=dtype).eval()

        def run(chunk: list[str]) -> None:
            enc = tok(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"][..., None].float()
                torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).tolist()

        run(texts[:batch])
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run(texts[n % len(texts):][:batch] or texts[:batch])
            n += batch
        best[str(dtype).removeprefix("torch.")] = round(n / (time.perf_counter() - t0), 1)
    return {"batch": batch, **best, "fastest": max(best, key=best.get)}


def loom_static(texts: list[str], batch: int, seconds: float, dtype: str) -> dict:
    """Loom's encoder in this process on the same static batches as `hf_static` (tokenize + forward, pooled and
    normalized inside): the ceiling that serving, with its HTTP and one text per request, can approach."""
    from server.engine.encoder import EncoderBatcher
    from server.model import ModelSettings
    from server.model.encoder_loader import load_encoder

    enc = load_encoder("default", ModelSettings().cache_dir, dtype=dtype)

    def run(chunk: list[str]) -> None:
        EncoderBatcher.run_batch(enc, enc.encode_texts(chunk))

    run(texts[:batch])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(texts[n % len(texts):][:batch] or texts[:batch])
        n += batch
    return {"batch": batch, "dtype": str(enc.dtype).removeprefix("torch."),
            "texts_per_s": round(n / (time.perf_counter() - t0), 1)}


async def chat_itl(url: str, model: str, streams: int, tokens: int) -> list[float]:
    gaps: list[float] = []

    async def stream(i: int, http: httpx.AsyncClient) -> None:
        body = {"model": model, "prompt": f"Story number {i}: once upon a time", "max_tokens": tokens,
                "ignore_eos": True, "temperature": 0, "stream": True}
        last = None
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(stream(i, http) for i in range(streams)))
    return sorted(gaps)


def pct(gaps: list[float], q: float) -> float:
    return round(1000 * gaps[min(len(gaps) - 1, int(len(gaps) * q))], 1)


async def itl_under_burst(url: str, model: str, embed_model: str, texts: list[str], args) -> dict:
    alone = await chat_itl(url, model, args.streams, args.chat_tokens)
    burst = asyncio.ensure_future(embed_load(url, embed_model, texts, 64, 1e9, args.client))
    await asyncio.sleep(1.0)  # the burst is running
    loaded = await chat_itl(url, model, args.streams, args.chat_tokens)
    burst.cancel()
    return {"streams": args.streams, "itl_p50_ms_alone": pct(alone, 0.5), "itl_p99_ms_alone": pct(alone, 0.99),
            "itl_p50_ms_burst": pct(loaded, 0.5), "itl_p99_ms_burst": pct(loaded, 0.99),
            "itl_max_ms_burst": round(1000 * loaded[-1], 1)}


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", "default", "--embedding-model", "default",
           "--port", str(port), *args.serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"loom serve exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("loom serve never became ready")


async def amain(args) -> dict:
    from server.model import ModelSettings
    from server.model.encoder_loader import default_encoder_dir

    directory = str(default_encoder_dir(ModelSettings().cache_dir))
    from transformers import AutoTokenizer
    words = one_token_words(AutoTokenizer.from_pretrained(directory))
    proc, url = (None, args.base_url) if args.base_url else start_server(args)
    try:
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        embed_model = next(k for k, m in models.items() if "embeddings" in (m.get("capabilities") or []))
        chat_model = next(k for k, m in models.items() if "chat" in (m.get("capabilities") or []))
        report: dict = {"loom": [], "transformers": []}
        for length in args.lengths:
            texts = make_texts(words, length, 512, seed=length)
            for clients in args.clients:
                row = {"tokens": length, **await embed_load(url, embed_model, texts, clients, args.seconds,
                                                              args.client)}
                report["loom"].append(row)
                print(json.dumps(row), flush=True)
        report["itl"] = await itl_under_burst(url, chat_model, embed_model, make_texts(words, 256, 512, 7), args)
        print(json.dumps(report["itl"]), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    import torch
    torch.set_num_threads(args.threads)
    for length in args.lengths:
        texts = make_texts(words, length, 512, seed=length)
        row = {"tokens": length, **hf_static(directory, texts, args.hf_batch, args.seconds)}
        report["transformers"].append(row)
        print(json.dumps(row), flush=True)
        row = {"tokens": length, **loom_static(texts, args.hf_batch, args.seconds, args.encoder_dtype)}
        report.setdefault("loom_static", []).append(row)
        print(json.dumps({"loom_static": row}), flush=True)
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="a running server (else `loom serve` is started)")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="extra flags for the started server")
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 256])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--seconds", type=float, default=10.0, help="per measured level")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="the load generator's HTTP client (raw: loadtests/rawhttp.py, ~1%% of httpx's CPU per request)")
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--encoder-dtype", default="auto", help="dtype of the in-process Loom static-batch row")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the transformers run")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--chat-tokens", type=int, default=64)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    report = asyncio.run(amain(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
