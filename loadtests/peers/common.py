"""What the two Hugging Face comparison servers share: a minimal OpenAI-style HTTP face over a token generator.

A backend implements `generate(prompt_ids, max_tokens, ignore_eos, temperature)` as an async iterator of token
ids. This module turns it into /v1/completions and /v1/chat/completions (streaming with `include_usage`, or one
JSON answer), /v1/models and /health. It is a benchmark baseline, not product code: no auth, no stop strings, no
logprobs, greedy unless `temperature > 0`.
"""
from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class Backend(Protocol):
    model_name: str
    eos_token_id: int | None

    def generate(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool,
                 temperature: float) -> AsyncIterator[int]: ...


class IncrementalDecoder:
    """Text deltas for a growing list of token ids (holds back an incomplete UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}}, status)


def build_app(backend: Backend, tokenizer, max_model_len: int = 8192) -> FastAPI:
    app = FastAPI(title=f"comparison server: {backend.model_name}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "created": 0,
                                           "owned_by": "loadtests"}]}

    async def handle(request: Request, chat: bool):
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "body is not JSON")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return _error(400, "messages must be a non-empty list")
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                ids = list(prompt)
            elif isinstance(prompt, str):
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            else:
                return _error(400, "prompt must be a string or a list of token ids")
            max_tokens = body.get("max_tokens") or 16
        ids = list(ids)
        if not ids:
            return _error(400, "empty prompt")
        if len(ids) + max_tokens > max_model_len:
            return _error(400, f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds {max_model_len}")
        ignore_eos = bool(body.get("ignore_eos")) or (body.get("min_tokens") or 0) >= max_tokens
        temperature = float(body.get("temperature") or 0.0)
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:16]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def tokens() -> AsyncIterator[tuple[str, int]]:
            dec = IncrementalDecoder(tokenizer)
            async for tok in backend.generate(ids, max_tokens, ignore_eos, temperature):
                yield dec.push(tok), tok

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if not stream:
            text, n, last = [], 0, None
            async for delta, tok in tokens():
                text.append(delta)
                n, last = n + 1, tok
            finish = "stop" if (not ignore_eos and last == backend.eos_token_id and n < max_tokens) else "length"
            msg = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": finish}
                   if chat else {"index": 0, "text": "".join(text), "finish_reason": finish})
            return {"id": rid, "object": obj, "created": created, "model": backend.model_name, "choices": [msg],
                    "usage": usage(n)}

        async def sse() -> AsyncIterator[str]:
            base = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                    "model": backend.model_name}
            n, last = 0, None
            try:
                async for delta, tok in tokens():
                    n, last = n + 1, tok
                    yield "data: " + json.dumps({**base, "choices": [choice(delta, None, n == 1)]}) + "\n\n"
            except Exception as exc:  # noqa: BLE001 - reported to the client, the stream ends
                yield "data: " + json.dumps({"error": {"message": f"{type(exc).__name__}: {exc}"}}) + "\n\n"
                yield "data: [DONE]\n\n"
                return
            finish = "stop" if (not ignore_eos and last == backend.eos_token_id and n < max_tokens) else "length"
            yield "data: " + json.dumps({**base, "choices": [choice("", finish)]}) + "\n\n"
            if include_usage:
                yield "data: " + json.dumps({**base, "choices": [], "usage": usage(n)}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="Hugging Face directory (safetensors + tokenizer)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="auto: the faster of bfloat16 and float32 for a batched matmul on this CPU (measured)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--max-model-len", type=int, default=8192)
    return p


def fastest_dtype() -> str:
    """bf16 wins on CPUs with AMX or AVX512-BF16 and loses 2-5x where it is emulated (AVX2 only): measure a
    decode-sized batched matmul in both, so the peer runs at its best on whatever CPU this is."""
    import time

    import torch
    import torch.nn.functional as F

    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(16, 1024, dtype=dtype), torch.randn(4096, 1024, dtype=dtype)
        for _ in range(3):
            F.linear(x, w)
        t = time.perf_counter()
        for _ in range(20):
            F.linear(x, w)
        best[str(dtype).removeprefix("torch.")] = time.perf_counter() - t
    choice = min(best, key=best.get)
    print(f"dtype auto -> {choice} (16x1024 @ 1024x4096: " +
          ", ".join(f"{k} {v / 20 * 1e3:.2f} ms" for k, v in best.items()) + ")", flush=True)
    return choice


def load_hf(args, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = fastest_dtype() if args.dtype == "auto" else args.dtype
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype), **kwargs).eval()
    return model, tok


def serve(app: FastAPI, host: str, port: int) -> None:
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
