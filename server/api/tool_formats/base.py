"""What every tool-call format shares: the request's tools plan, the events a parser emits, and the pieces of the
structural tags that force calls."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from server.engine.json_schema import enforceable_schema

Fmt = Literal["hermes", "llama3", "qwen3_coder", "pythonic", "mistral"]
ANY_OBJECT = {"type": "object"}


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI tool objects, as plain dicts
    mode: Literal["auto", "required", "named"]
    name: str | None  # the named function
    parallel: bool
    native: bool  # the chat template renders tools itself
    fmt: Fmt
    dialect: str = ""  # a format's variant the template speaks (mistral: "args" for `[TOOL_CALLS]name[ARGS]{...}`)

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    @property
    def single(self) -> bool:
        """A forced answer holds one call only."""
        return self.mode == "named" or not self.parallel

    def forced_functions(self) -> list[tuple[str, dict]]:
        """(name, enforceable parameters schema) of each function a forced answer may call."""
        return [(fn["name"], enforceable_schema(fn["parameters"], None) if fn.get("parameters") else ANY_OBJECT)
                for t in self.tools for fn in [t["function"]] if self.name is None or fn["name"] == self.name]

    def parameters(self, name: str) -> dict[str, Any]:
        """The `properties` of function `name`'s parameters schema ({} when it has none)."""
        for t in self.tools:
            if t["function"]["name"] == name:
                props = (t["function"].get("parameters") or {}).get("properties")
                return props if isinstance(props, dict) else {}
        return {}


@dataclass
class Event:
    kind: Literal["content", "call", "arguments", "reasoning"]  # reasoning: server/api/answer.py
    text: str = ""
    index: int = 0  # the call's index (call, arguments)
    id: str = ""  # call


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tags_format(tags: list[dict], separator: str, single: bool) -> dict:
    """One or more of `tags` (only one when `single`), `separator` between them."""
    return {"type": "tags_with_separator", "tags": tags, "separator": separator, "at_least_one": True,
            "stop_after_first": single}


def json_tag(begin: str, schema: dict, end: str) -> dict:
    return {"type": "tag", "begin": begin, "end": end,
            "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 2}}
