"""Comparison peer (a baseline, not product code): Hugging Face transformers `generate` with static batching.

Requests that arrive within `--window-ms` of the first waiting one (up to `--max-batch`) are left-padded into one
batch and run through a single `model.generate` call in bf16; the batch's tokens stream back step by step. A new
batch starts only when the previous one has finished, so late arrivals wait and short requests wait for long ones:
that is what static batching costs.

    python -m loadtests.peers.hf_static --model HF_DIR --port 8101 [--max-batch 64] [--window-ms 20]
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from loadtests.peers.common import base_parser, build_app, load_hf, serve

log = logging.getLogger("loadtests.hf_static")
_END = object()


@dataclass
class Pending:
    ids: list[int]
    max_tokens: int
    ignore_eos: bool
    temperature: float
    out: asyncio.Queue = field(default_factory=asyncio.Queue)


class RowStop:
    """Per-row stopping: a row is done at its own `max_tokens`, or at EOS unless it ignores EOS. Keeps the state the
    streamer reads, so the criterion (called first each step) and the streamer agree on which tokens a row owns."""

    def __init__(self, batch: list[Pending], prompt_len: int, eos: int | None):
        self.max = torch.tensor([p.max_tokens for p in batch])
        self.check_eos = torch.tensor([not p.ignore_eos and eos is not None for p in batch])
        self.prompt_len = prompt_len
        self.eos = -1 if eos is None else eos
        self.done = torch.zeros(len(batch), dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        n = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].cpu()
        self.done = self.done | (n >= self.max) | (self.check_eos & (last == self.eos))
        return self.done.to(input_ids.device)


class BatchStreamer:
    """Receives each step's tokens [B] from `generate` and hands every unfinished row's token to its request."""

    def __init__(self, batch: list[Pending], stop: RowStop, loop: asyncio.AbstractEventLoop):
        self.batch, self.stop, self.loop = batch, stop, loop
        self.finished = [False] * len(batch)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        tokens = value.view(-1).tolist()
        items = []
        for i, tok in enumerate(tokens):
            if self.finished[i]:
                continue
            items.append((self.batch[i].out, tok))
            if bool(self.stop.done[i]):
                self.finished[i] = True
                items.append((self.batch[i].out, _END))
        if items:
            self.loop.call_soon_threadsafe(_deliver, items)

    def end(self) -> None:
        items = [(p.out, _END) for p, f in zip(self.batch, self.finished) if not f]
        if items:
            self.loop.call_soon_threadsafe(_deliver, items)


def _deliver(items) -> None:
    for q, item in items:
        q.put_nowait(item)


class StaticBatcher:
    def __init__(self, model, tokenizer, model_name: str, max_batch: int, window_s: float):
        self.model, self.tok, self.model_name = model, tokenizer, model_name
        self.max_batch, self.window_s = max_batch, window_s
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        # EOS is handled per row by RowStop; generate must not stop rows on its own
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = self.pad_id
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.lock = threading.Lock()
        self.task: asyncio.Task | None = None
        self.batches = 0

    async def generate(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool,
                       temperature: float) -> AsyncIterator[int]:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._batch_loop())
        p = Pending(prompt_ids, max_tokens, ignore_eos, temperature)
        await self.queue.put(p)
        while True:
            item = await p.out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            try:
                await loop.run_in_executor(None, self._run_batch, batch, loop)
            except Exception as exc:
                log.exception("batch failed")
                for p in batch:
                    p.out.put_nowait(exc)

    def _run_batch(self, batch: list[Pending], loop: asyncio.AbstractEventLoop) -> None:
        self.batches += 1
        width = max(len(p.ids) for p in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding
            input_ids[i, width - len(p.ids):] = torch.tensor(p.ids)
            mask[i, width - len(p.ids):] = 1
        stop = RowStop(batch, width, self.eos_token_id)
        streamer = BatchStreamer(batch, stop, loop)
        sample = any(p.temperature > 0 for p in batch)
        kwargs = ({"do_sample": True, "temperature": max(p.temperature for p in batch), "top_k": 0} if sample
                  else {"do_sample": False})
        try:
            with torch.inference_mode():
                self.model.generate(input_ids=input_ids, attention_mask=mask,
                                    max_new_tokens=max(p.max_tokens for p in batch), min_new_tokens=0,
                                    stopping_criteria=[stop], streamer=streamer, pad_token_id=self.pad_id, **kwargs)
        finally:
            streamer.end()


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--max-batch", type=int, default=64, help="most requests in one generate() batch")
    p.add_argument("--window-ms", type=float, default=20.0, help="how long the first request waits for company")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    model, tok = load_hf(args, attn_implementation="sdpa")
    name = args.served_model_name or "hf-static"
    backend = StaticBatcher(model, tok, name, args.max_batch, args.window_ms / 1000.0)
    backend.model_name = name
    with torch.inference_mode():  # warm-up: the first generate() call pays one-off costs
        model.generate(input_ids=torch.tensor([tok("warm up")["input_ids"]]), max_new_tokens=2, do_sample=False)
    serve(build_app(backend, tok, args.max_model_len), args.host, args.port)


if __name__ == "__main__":
    main()
