"""Structured output requests: `response_format` (OpenAI) and `structured_outputs` (vLLM's extra) become one
`GrammarSpec`, compiled by the engine's grammar compiler off the event loop and under its time limit. Every refusal
is a 400 naming the field; nothing falls back silently to unconstrained text."""
from __future__ import annotations

import json

from server.api.errors import APIError
from server.api.protocol import StructuredFields
from server.engine import AsyncEngine, Grammar, GrammarSpec

_KEYS = {"json_": "json", "regex": "regex", "choice": "choice", "grammar": "grammar", "json_object": "json_object"}


def grammar_spec(body: StructuredFields) -> tuple[GrammarSpec, str] | None:
    """The spec a request asks for and the parameter to blame if it cannot be compiled (None: unconstrained)."""
    rf, so = body.response_format, body.structured_outputs
    if rf is not None and rf.type != "text":
        if so is not None:
            raise APIError(400, "give either response_format or structured_outputs, not both",
                           param="structured_outputs")
        if rf.type == "json_object":
            return GrammarSpec("json_object"), "response_format"
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                           param="response_format.json_schema")
        return GrammarSpec.json_schema(rf.json_schema.schema_), "response_format.json_schema.schema"
    if so is None:
        return None
    given = [key for key in _KEYS if getattr(so, key) not in (None, False)]
    if len(given) != 1:
        raise APIError(400, "structured_outputs needs exactly one of: json, regex, choice, grammar, json_object",
                       param="structured_outputs")
    key = given[0]
    param = f"structured_outputs.{_KEYS[key]}"
    value = getattr(so, key)
    if key == "json_":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise APIError(400, f"structured_outputs.json is not valid JSON: {exc}", param=param) from None
        return GrammarSpec.json_schema(value), param
    if key == "json_object":
        return GrammarSpec("json_object"), param
    if key == "choice":
        if not value or not all(value):
            raise APIError(400, "choice must be a non-empty list of non-empty strings", param=param)
        return GrammarSpec.choice(value), param
    if not value:
        raise APIError(400, f"{param} must not be empty", param=param)
    return GrammarSpec(key, value), param


async def compile_request_grammar(body: StructuredFields, engine: AsyncEngine) -> Grammar | None:
    """The request's compiled grammar, or None when it asks for plain text."""
    found = grammar_spec(body)
    if found is None:
        return None
    spec, param = found
    return await engine.compile_grammar(spec, param)
