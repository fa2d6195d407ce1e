"""Offline batch generation on the engine (what `loom generate` and the tests use): every prompt is submitted at
once and the step loop runs them as one continuous batch."""
from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.engine_core import EngineCore
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import TokenLogprob


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_prompt_tokens: int = 0


def generate(core: EngineCore, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             on_step=None) -> list[list[Completion]]:
    """Completions per prompt (n per prompt), in input order."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    results = {f"offline-{i}": [Completion() for _ in range(p.n)] for i, p in enumerate(params_list)}
    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        core.add_request(f"offline-{i}", prompt, p)
    while core.has_unfinished():
        for out in core.step():
            c = results[out.request_id][out.index]
            c.text += out.text
            c.token_ids += out.token_ids
            c.logprobs += out.logprobs
            c.num_prompt_tokens = out.num_prompt_tokens
            if out.prompt_logprobs is not None:
                c.prompt_logprobs = out.prompt_logprobs
            if out.finished:
                c.finish_reason = out.finish_reason
                if out.error:
                    raise RuntimeError(out.error)
        if on_step:
            on_step()
    return [results[f"offline-{i}"] for i in range(len(prompts))]
