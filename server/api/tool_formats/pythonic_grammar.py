"""The forced-call grammar of pythonic calls, `[f(a=1, b="x"), g()]`, as an xgrammar structural tag.

What it enforces: the list brackets, function names from `tools`, only the parameters each schema lists, in the
schema's order, every required one present, and a Python literal for each value. A value whose JSON text is also the
Python literal of the same value (strings, numbers, and enums, arrays and objects of these) is held by xgrammar's
JSON-schema grammar, so its whole schema applies; `boolean` and `null` values are held to `True`/`False`/`None`;
other values (mixing booleans or nulls into arrays, objects or unions, `$ref`s, untyped ones) only to Python
literal syntax, so their schema is not enforced. A function without listed properties takes any keyword arguments
with literal values. Parameter names that are not Python identifiers cannot be written this way."""
from __future__ import annotations

import json
from typing import Any

from server.api.tool_formats.base import ToolPlan, tags_format

LITERAL_EBNF = r"""root ::= value
value ::= string | number | "True" | "False" | "None" | list | dict
string ::= "\"" ([^"\\\r\n] | "\\" escape)* "\""
escape ::= ["\\bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]
number ::= "-"? ("0" | [1-9] [0-9]*) ("." [0-9]+)? ([eE] [+-]? [0-9]+)?
list ::= "[" (value (", " value)*)? "]"
dict ::= "{" (string ": " value (", " string ": " value)*)? "}"
"""
KWARGS_EBNF = r"""root ::= (arg (", " arg)*)?
arg ::= [A-Za-z_] [A-Za-z0-9_]* "=" value
""" + LITERAL_EBNF.split("\n", 1)[1]
_SCALARS = {"string", "integer", "number"}


def literal(value: Any) -> str:
    """`value` (JSON data) as a Python literal: JSON text, with Python's True, False and None."""
    if value is True or value is False or value is None:
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(str(k))}: {literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _json_is_python(schema: Any) -> bool:
    """Every value `schema` allows is written the same in JSON and in Python (no true/false/null inside)."""
    if not isinstance(schema, dict) or "$ref" in schema or any(k in schema for k in ("anyOf", "oneOf", "allOf")):
        return False
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values)
    kind = schema.get("type")
    if kind in _SCALARS:
        return True
    if kind == "array":
        return _json_is_python(schema.get("items")) and "prefixItems" not in schema
    if kind == "object":
        props = schema.get("properties") or {}
        return schema.get("additionalProperties", False) is False and all(map(_json_is_python, props.values()))
    return False


def _value(schema: Any) -> dict:
    if _json_is_python(schema):
        return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind in ("boolean", "null") and not ({"enum", "const"} & set(schema)):
        return {"type": "grammar", "grammar": 'root ::= "True" | "False"' if kind == "boolean" else 'root ::= "None"'}
    return {"type": "grammar", "grammar": LITERAL_EBNF}


def _arguments(schema: dict) -> dict:
    """`a=1, b="x"`: the listed parameters in order, each required one present, commas only between them."""
    if not isinstance(schema.get("properties"), dict):
        return {"type": "grammar", "grammar": KWARGS_EBNF}
    props = schema["properties"]
    required = set(schema.get("required", ()))
    items = [(name, _value(s), name in required) for name, s in props.items()]

    def rest(start: int) -> list[dict]:  # the parameters after the first one written, each after ", "
        return [p if req else {"type": "optional", "content": p} for name, value, req in items[start:]
                for p in [{"type": "sequence", "elements": [{"type": "const_string", "value": f", {name}="}, value]}]]

    firsts = []  # which parameter comes first: any up to the first required one
    for i, (name, value, req) in enumerate(items):
        firsts.append({"type": "sequence", "elements": [{"type": "const_string", "value": f"{name}="}, value,
                                                        *rest(i + 1)]})
        if req:
            break
    else:
        firsts.append({"type": "const_string", "value": ""})  # no parameter at all
    return firsts[0] if len(firsts) == 1 else {"type": "or", "elements": firsts}


def forced(plan: ToolPlan) -> dict:
    tags = [{"type": "tag", "begin": f"{name}(", "end": ")", "content": _arguments(schema)}
            for name, schema in plan.forced_functions()]
    return {"type": "sequence", "elements": [{"type": "const_string", "value": "["},
                                             tags_format(tags, ", ", plan.single),
                                             {"type": "const_string", "value": "]"}]}
