"""Structured output after the thinking: with a reasoning parser on, an answer that starts inside its thinking part
is free text up to `</think>`, and only what follows is held to the request's grammar (a JSON schema, a regex, a
choice, an EBNF grammar, or the structural tag of a forced tool call). xgrammar expresses this directly: a structural
tag whose format is the sequence (any text ending in `</think>`, a little whitespace, the answer's own format)."""
from __future__ import annotations

import json
from typing import Any

from server.api.reasoning import CLOSE
from server.engine import GrammarSpec, InvalidRequestError
from server.engine.json_schema import enforceable_schema

MAX_WHITESPACE = 2  # JSON inside a structural tag may hold whitespace: bounded, so a model cannot loop on it


def answer_format(spec: GrammarSpec, param: str | None) -> dict[str, Any]:
    """`spec` as an xgrammar structural-tag format (a schema is checked and made enforceable here, as the engine
    does with a bare one)."""
    if spec.kind == "json_schema":
        schema = enforceable_schema(json.loads(spec.value), param)
        return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_WHITESPACE}
    if spec.kind == "json_object":
        return {"type": "json_schema", "json_schema": {"type": "object"}, "max_whitespace_cnt": MAX_WHITESPACE}
    if spec.kind == "regex":
        return {"type": "regex", "pattern": spec.value}
    if spec.kind == "choice":
        return {"type": "or", "elements": [{"type": "const_string", "value": o} for o in json.loads(spec.value)]}
    if spec.kind == "grammar":
        return {"type": "grammar", "grammar": spec.value}
    if spec.kind == "structural_tag":
        return json.loads(spec.value)["format"]
    raise InvalidRequestError(f"a {spec.kind} grammar cannot follow a thinking part", param)


def after_thinking(spec: GrammarSpec, param: str | None) -> GrammarSpec:
    """A spec that lets the model think freely until `</think>`, then enforces `spec`."""
    thinking = {"type": "tag", "begin": "", "content": {"type": "any_text"}, "end": CLOSE}
    return GrammarSpec.structural_tag({"type": "structural_tag", "format": {"type": "sequence", "elements": [
        thinking, {"type": "regex", "pattern": r"\s{0,4}"}, answer_format(spec, param)]}})
