"""What the encoder routes share: picking the encoder a request names, turning its inputs into token ids (refusing
empty, too many and over-long inputs with OpenAI-style errors), and cosine similarity."""
from __future__ import annotations

import asyncio
import math

from server.api.errors import APIError
from server.api.lifecycle import ServedModel
from server.api.params import check_text_length
from server.model import LoadedEncoder

MAX_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request
OFF_LOOP_CHARS = 8192  # texts this long in all are tokenized on a worker thread (a hop costs ~50 us)
FLAGS = {"embed": "--embedding-model default|DIR", "classify": "--classifier-model DIR"}
WHAT = {"embed": "embedding", "classify": "classifier"}


def encoders_for(served: ServedModel, task: str) -> list[LoadedEncoder]:
    """The encoders serving `task` ("embed" or "classify"), in load order: the first is the one a request that names
    no model gets."""
    return [e for e in served.encoders.values() if e.task == task]


def pick_encoder(served: ServedModel, model: str | None, task: str) -> LoadedEncoder:
    """The encoder `model` names (omitted: the one serving `task`); 404 when there is none."""
    fitting = encoders_for(served, task)
    if model is not None and model in served.encoders:
        enc = served.encoders[model]
        if enc.task != task:
            raise APIError(400, f"the model {model!r} is a {WHAT[enc.task]} model, not a {WHAT[task]} model",
                           param="model", code="model_not_supported")
        return enc
    if not fitting:
        raise APIError(404, f"this server serves no {WHAT[task]} model; start it with {FLAGS[task]}",
                       param="model", code="model_not_found")
    if model is not None:
        names = ", ".join(repr(e.name) for e in fitting)
        raise APIError(404, f"the model {model!r} does not exist; {WHAT[task]} models served here: {names}",
                       param="model", code="model_not_found")
    return fitting[0]


def truncation(enc: LoadedEncoder, truncate: int | None) -> int | None:
    if truncate is None:
        return None
    if truncate == -1:
        return enc.max_len
    if truncate == 0 or truncate > enc.max_len:
        raise APIError(400, f"truncate_prompt_tokens must be -1 or between 1 and the model's maximum input length "
                            f"({enc.max_len}), not {truncate}", param="truncate_prompt_tokens")
    return truncate


async def token_inputs(enc: LoadedEncoder, value, truncate: int | None, param: str = "input",
                       allow_empty_text: bool = False) -> list[list[int]]:
    """Token ids of each input: texts are tokenized with the model's special tokens, token ids taken as they are.
    Big inputs are tokenized off the event loop (2,048 long texts take tens of ms: /health must not wait on them)."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    chars = sum(len(t) for t in texts if isinstance(t, str))
    if chars < OFF_LOOP_CHARS:
        return _token_inputs(enc, value, truncate, param, allow_empty_text)
    return await asyncio.to_thread(_token_inputs, enc, value, truncate, param, allow_empty_text)


def _token_inputs(enc: LoadedEncoder, value, truncate: int | None, param: str,
                  allow_empty_text: bool) -> list[list[int]]:
    if isinstance(value, str):
        value = [value]
    if not value:
        raise APIError(400, f"{param} must not be empty", param=param)
    if len(value) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request, not {len(value)}", param=param)
    limit = truncation(enc, truncate)
    if isinstance(value[0], int):  # one list of token ids
        value = [value]
    if isinstance(value[0], str):
        for i, text in enumerate(value):
            if not text and not allow_empty_text:
                raise APIError(400, f"{param}[{i}] is an empty string", param=param)
            if limit is None:
                check_text_length(len(text), enc.max_len, param)
        inputs = enc.encode_texts(value, limit)
    else:
        inputs = [list(ids) if limit is None else list(ids)[:limit] for ids in value]
        for i, ids in enumerate(inputs):
            if not ids:
                raise APIError(400, f"{param}[{i}] is an empty list of token ids", param=param)
    for i, ids in enumerate(inputs):
        if len(ids) > enc.max_len:
            raise APIError(400, f"{param}[{i}] has {len(ids)} tokens, more than this model's maximum input length "
                                f"({enc.max_len}); shorten it or set truncate_prompt_tokens", param=param,
                           code="context_length_exceeded")
    return inputs


def cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b))
    norm = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    return dot / norm if norm else 0.0
