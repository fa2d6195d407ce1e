"""Offline batch generation on the engine (what `loom generate` and the tests use): every prompt is submitted at
once and the step loop runs them as one continuous batch."""
from __future__ import annotations

from collections.abc import Callable

from server.engine.engine_core import EngineCore
from server.engine.outputs import CompletionOutput
from server.engine.sampling_params import SamplingParams


def generate(core: EngineCore, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             on_step: Callable[[], None] | None = None) -> list[list[CompletionOutput]]:
    """Completions per prompt (n per prompt), in input order. A request the engine fails raises its error."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    results = {f"offline-{i}": [CompletionOutput(index=k) for k in range(p.n)] for i, p in enumerate(params_list)}
    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        core.add_request(f"offline-{i}", prompt, p)
    while core.has_unfinished():
        step = core.step()
        for error in step.failed.values():
            for other in results:
                core.abort(other)
            raise error
        for out in step.outputs:
            results[out.request_id][out.index].add(out)
        if on_step:
            on_step()
    return [results[f"offline-{i}"] for i in range(len(prompts))]
