"""Comparison peer (a baseline, not product code): transformers' own continuous batching.

transformers 5.x ships `ContinuousBatchingManager` (`model.init_continuous_batching()`): a background thread runs
a paged-KV step loop over a FIFO scheduler; requests join and leave between steps (`add_request(streaming=True)`),
and each new token is routed to a per-request callback on our event loop (`register_result_handler`). On CPU it
runs with the `sdpa` attention path (there is no flash-attention; CUDA graphs and async batching are off).

    python -m loadtests.peers.hf_continuous --model HF_DIR --port 8102 [--max-batch 64] [--kv-cache-memory 2]
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import torch

from loadtests.peers.common import base_parser, build_app, load_hf, serve

log = logging.getLogger("loadtests.hf_continuous")


class ContinuousBackend:
    def __init__(self, model, tokenizer, model_name: str, max_batch: int, kv_cache_gib: float,
                 max_batch_tokens: int, page_size: int):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.model_name = model_name
        self.eos_token_id = tokenizer.eos_token_id
        cfg = model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
        num_blocks = max(8, int(kv_cache_gib * 2 ** 30 / (bytes_per_token * page_size)))
        gen = GenerationConfig(max_new_tokens=256, do_sample=False, eos_token_id=self.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                               else self.eos_token_id)
        cb = ContinuousBatchingConfig(page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                                      max_requests_per_batch=max_batch, allow_block_sharing=True,
                                      use_cuda_graph=False, auto_switch_to_flash=False)
        self.manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        log.info("continuous batching: %d blocks of %d tokens, %d tokens/batch, %d requests/batch",
                 num_blocks, page_size, max_batch_tokens, max_batch)
        self.manager.start()

    def warm_up(self, prompt_ids: list[int], tokens: int = 8, timeout: float = 300.0) -> None:
        """One request through the loop before serving: the first forward passes pay one-off costs."""
        rid = self.manager.add_request(prompt_ids, request_id="warmup", max_new_tokens=tokens, eos_token_id=-1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.manager.get_result(request_id=rid, timeout=1)
            if out is not None and out.is_finished():
                return
        raise RuntimeError("warm-up request did not finish")

    async def generate(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool,
                       temperature: float) -> AsyncIterator[int]:
        if temperature > 0:
            log.debug("temperature ignored: this peer decodes greedily")
        q: asyncio.Queue = asyncio.Queue()
        rid = "r-" + uuid.uuid4().hex
        self.manager.register_result_handler(rid, q.put_nowait)  # before add_request: no output can be missed
        added = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.manager.add_request(prompt_ids, request_id=rid, max_new_tokens=max_tokens,
                                                   streaming=True, eos_token_id=-1 if ignore_eos else None))
        if added is None:
            raise RuntimeError("continuous batching manager refused the request (stopped or failed)")
        sent, finished = 0, False
        try:
            while not finished:
                out = await q.get()
                if out.error:
                    finished = True
                    raise RuntimeError(out.error)
                finished = out.is_finished()
                new = out.generated_tokens[sent:]
                sent += len(new)
                for tok in new:
                    yield tok
        finally:
            if not finished:  # the client went away: free the request's blocks
                self.manager.cancel_request(rid)

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=10)


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--max-batch", type=int, default=64, help="most requests in one step")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="most tokens in one step (as Loom's default)")
    p.add_argument("--kv-cache-memory", type=float, default=2.0, help="GiB of paged KV cache (as Loom's default)")
    p.add_argument("--page-size", type=int, default=256, help="tokens per KV block")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    model, tok = load_hf(args, attn_implementation="sdpa")
    name = args.served_model_name or "hf-continuous"
    backend = ContinuousBackend(model, tok, name, args.max_batch, args.kv_cache_memory, args.max_batch_tokens,
                                args.page_size)
    backend.warm_up(tok("Warm up the continuous batching loop.")["input_ids"])
    try:
        serve(build_app(backend, tok, args.max_model_len), args.host, args.port)
    finally:
        backend.stop()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
