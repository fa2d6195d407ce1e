"""An engine whose answers are scripted: the API layer's parsing (reasoning, tool calls, stop sequences) and its
error mapping checked on exact text and exact failures, which a random model never produces."""
from __future__ import annotations

from collections.abc import AsyncIterator

from server.engine import AsyncEngine, RequestOutput, SamplingParams


class ScriptedEngine:
    """Stands in for AsyncEngine: everything but `generate` is the wrapped engine's; `generate` answers every
    sequence with the text pieces in `pieces` (one delta, and one token, each), then finishes with `finish`. With
    `error`, it raises that after `error_after` pieces instead."""

    def __init__(self, engine: AsyncEngine, pieces: list[str] | None = None, finish: str = "stop"):
        self.engine, self.pieces, self.finish = engine, pieces or ["ok"], finish
        self.error: Exception | None = None
        self.error_after = 0

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0, deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        for index in range(params.n):
            for k, piece in enumerate(self.pieces):
                if self.error is not None and k == self.error_after:
                    raise self.error
                yield RequestOutput(request_id or "scripted", index, token_ids=[0], text=piece,
                                    finish_reason=self.finish if k == len(self.pieces) - 1 else None,
                                    num_prompt_tokens=len(prompt_token_ids), num_output_tokens=k + 1)
