"""Which JSON Schemas structured output can enforce, and the exact schema the grammar engine is given.

xgrammar compiles a schema into a grammar but ignores what it does not implement: some keywords with a warning
(`multipleOf` on numbers, lookaheads in `pattern`, `oneOf` it cannot prove disjoint), others silently (`required`
names missing from `properties`, keywords beside `allOf`/`anyOf`/`$ref`, keywords beside `enum`/`const`, number and
string bounds in a schema without `type`, `minProperties` over repeated keys). Each rule below was decided by
generating from random weights and validating the output (tests/engine/test_json_schema_keywords.py). A schema must
be a valid JSON Schema (Draft 2020-12) and use only what the grammar enforces; a few exact rewrites make more
schemas enforceable (integer bounds rounded inward, a provably disjoint `oneOf` compiled as `anyOf`, `enum`/`const`
values filtered by their sibling keywords, formats xgrammar writes too loosely given as patterns, optional groups in
patterns written so that xgrammar keeps their start). Anything else is refused with the keyword and its path."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from server.engine.errors import InvalidRequestError

ENFORCED = {
    "type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties", "propertyNames",
    "minProperties", "maxProperties", "unevaluatedProperties", "items", "prefixItems", "minItems", "maxItems",
    "unevaluatedItems", "additionalItems", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "uniqueItems",  # only `false`, which asks nothing
}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
               "writeOnly", "$anchor", "$dynamicAnchor", "$vocabulary", "contentMediaType", "contentEncoding",
               "contentSchema", "nullable", "discriminator", "strict"}
FORMATS = {"date", "time", "date-time", "duration", "email", "ipv4", "ipv6", "uuid", "uri", "uri-reference",
           "uri-template", "json-pointer", "relative-json-pointer"}  # not hostname: labels over 63 characters pass
_YEAR = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_DATE = (f"{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         f"|02-(?:0[1-9]|1[0-9]|2[0-8]))")  # never February 29: a leap year's is valid, but a regex cannot tell
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:[.][0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
# formats xgrammar writes too loosely (February 30th, leading zeros in an address): a pattern of valid values instead
FORMAT_PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$",
                   "ipv4": f"^{_OCTET}(?:[.]{_OCTET}){{3}}$"}
# keywords whose value is a map of name -> subschema, a list of subschemas, or one subschema
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions"}
_SCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}
_SCHEMA_ONE = {"additionalProperties", "propertyNames", "unevaluatedProperties", "items", "unevaluatedItems",
               "additionalItems"}
# keywords the grammar applies only when the schema names the type they constrain
_TYPED = {"minimum": "number", "maximum": "number", "exclusiveMinimum": "number", "exclusiveMaximum": "number",
          "multipleOf": "number", "minLength": "string", "maxLength": "string", "pattern": "string",
          "format": "string"}
_LOCAL = ANNOTATIONS | {"$defs", "definitions"}  # what may stand beside $ref, allOf, anyOf and oneOf
MAX_DEPTH = 32


def enforceable_schema(schema: Any, param: str | None) -> dict:
    """The schema to compile: `schema` itself, or an exact rewrite of it. InvalidRequestError (naming `param` and
    the keyword's path) unless it is a valid JSON Schema that the grammar enforces exactly."""
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"the JSON schema must be an object, got {type(schema).__name__}", param)
    from jsonschema import Draft202012Validator, SchemaError
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise InvalidRequestError(f"invalid JSON schema at {where}: {exc.message}", param) from None
    return _Walker(schema, param, Draft202012Validator(schema)).node(schema, "#", 0)


def check_schema(schema: Any, param: str | None) -> None:
    """Raise InvalidRequestError unless `schema` can be enforced (see `enforceable_schema`)."""
    enforceable_schema(schema, param)


@dataclass
class _Walker:
    root: dict
    param: str | None
    validator: Any  # a jsonschema validator of the root, which resolves its references

    def refuse(self, path: str, message: str) -> None:
        raise InvalidRequestError(f"unsupported JSON schema at {path}: {message}", self.param)

    def node(self, node: Any, path: str, depth: int, implied: str | None = None) -> Any:
        """The rewritten `node`; `implied` is the type its place guarantees (property names are strings)."""
        if isinstance(node, bool):
            return node
        if depth > MAX_DEPTH:
            raise InvalidRequestError(f"the JSON schema nests deeper than {MAX_DEPTH} levels (at {path})", self.param)
        self.check_keywords(node, path)
        self.check_combinations(node, path, implied)
        out = {}
        for key, value in node.items():
            if key in _SCHEMA_MAPS:
                value = {name: self.node(sub, f"{path}/{key}/{name}", depth + 1) for name, sub in value.items()}
            elif key in _SCHEMA_LISTS:
                value = [self.node(sub, f"{path}/{key}/{i}", depth + 1) for i, sub in enumerate(value)]
            elif key in _SCHEMA_ONE:
                value = self.node(value, f"{path}/{key}", depth + 1, "string" if key == "propertyNames" else None)
            if not (key == "uniqueItems" and value is False):
                out[key] = value
        if out.get("format") in FORMAT_PATTERNS:
            out["pattern"] = FORMAT_PATTERNS[out.pop("format")]
        if isinstance(out.get("pattern"), str):
            out["pattern"] = _optional_groups(out["pattern"])
        if "patternProperties" in out:
            out["patternProperties"] = {_optional_groups(k): v for k, v in out["patternProperties"].items()}
        if "oneOf" in out:
            out["anyOf"] = self.disjoint_branches(out.pop("oneOf"), path)
        if "enum" in node or "const" in node:
            self.filter_values(node, out, path)
        return _integer_bounds(out)

    def check_keywords(self, node: dict, path: str) -> None:
        for key in node:
            if key not in ENFORCED and key not in ANNOTATIONS:
                self.refuse(path, f"keyword {key!r} cannot be enforced by structured output")
        if node.get("uniqueItems") is True:
            self.refuse(path, "keyword 'uniqueItems' cannot be enforced by structured output")
        if "format" in node and node["format"] not in FORMATS:
            self.refuse(path, f"format {node['format']!r} is not supported (supported: {', '.join(sorted(FORMATS))})")
        if "pattern" in node and "format" in node:
            self.refuse(path, "'format' together with 'pattern' is not supported; use one of them")
        for key in ("pattern", "format"):
            if key in node and ("minLength" in node or "maxLength" in node):
                self.refuse(path, f"{key!r} together with 'minLength'/'maxLength' is not supported; put the length "
                                  f"in a pattern")
        ref = node.get("$ref")
        if ref is not None and not str(ref).startswith("#"):
            self.refuse(path, f"'$ref' must be a local reference ('#/...'), got {ref!r}")
        for where, pattern in [("pattern", node.get("pattern"))] + [("patternProperties", p)
                                                                    for p in node.get("patternProperties", {})]:
            if isinstance(pattern, str) and (feature := _unenforceable_regex(pattern)):
                self.refuse(path, f"{where!r} {pattern!r} uses a {feature}, which the grammar cannot enforce")
        if "multipleOf" in node and (node.get("type") != "integer" or not _whole(node["multipleOf"])):
            self.refuse(path, "'multipleOf' is only enforced with \"type\": \"integer\" and a whole number")

    def check_combinations(self, node: dict, path: str, implied: str | None) -> None:
        """Keywords the grammar enforces alone but drops in company."""
        for key in ("$ref", "allOf", "anyOf", "oneOf"):
            others = sorted(set(node) - _LOCAL - {key})
            if key in node and others:
                self.refuse(path, f"{key!r} beside {', '.join(map(repr, others))} is not supported; move those "
                                  f"keywords into the referenced or combined schemas")
        if len(node.get("allOf", ())) > 1:
            self.refuse(path, "'allOf' with more than one subschema is not supported")
        properties, required = node.get("properties", {}), node.get("required", [])
        for name in required:
            if name not in properties:
                self.refuse(path, f"'required' names {name!r}, which is not in 'properties' (list it there)")
        if node.get("minProperties", 0) > len(set(required)):
            self.refuse(path, "'minProperties' above the number of 'required' properties is not enforced (a "
                              "generated object may repeat a key); require the properties instead")
        if "enum" not in node and "const" not in node:
            types = _types(node) or ({implied} if implied else set())
            for key, kind in _TYPED.items():
                if key in node and kind not in types and not (kind == "number" and "integer" in types):
                    self.refuse(path, f"{key!r} is only enforced when 'type' includes {kind!r}")

    def filter_values(self, node: dict, out: dict, path: str) -> None:
        """The grammar emits `enum`/`const` values as given, ignoring sibling keywords: keep the values those
        keywords accept (a `const` they reject, or an `enum` left empty, cannot be satisfied)."""
        rest = {k: v for k, v in node.items() if k not in ("enum", "const")}
        if not set(rest) - ANNOTATIONS and "const" not in node:
            return
        valid = self.validator.evolve(schema=rest).is_valid
        if "const" in node and not valid(node["const"]):
            self.refuse(path, "'const' does not satisfy the keywords beside it: no value matches the schema")
        if "enum" in node:
            values = [v for v in node["enum"] if valid(v) and ("const" not in node or _same(v, node["const"]))]
            if not values:
                self.refuse(path, "no value of 'enum' satisfies the keywords beside it: no value matches the schema")
            out["enum"] = values

    def disjoint_branches(self, branches: list, path: str) -> list:
        """`oneOf` as `anyOf` (what the grammar enforces) when no value can match two branches."""
        for i, a in enumerate(branches):
            for b in branches[i + 1:]:
                if not self.disjoint(a, b):
                    self.refuse(path, "'oneOf' is only enforced when its branches are provably disjoint (different "
                                      "types, values, or a required property with different values); use 'anyOf'")
        return branches

    def disjoint(self, a: Any, b: Any) -> bool:
        a, b = self.deref(a), self.deref(b)
        if not isinstance(a, dict) or not isinstance(b, dict):
            return False
        ta, tb = _types(a), _types(b)
        if ta is not None and tb is not None and not _types_overlap(ta, tb):
            return True
        va, vb = _values(a), _values(b)
        if va is not None and vb is not None and not any(_same(x, y) for x in va for y in vb):
            return True
        shared = set(a.get("required", ())) & set(b.get("required", ()))
        return any(self.disjoint(a.get("properties", {}).get(p), b.get("properties", {}).get(p)) for p in shared)

    def deref(self, node: Any, hops: int = 8) -> Any:
        while isinstance(node, dict) and "$ref" in node and hops:
            node, hops = _pointer(self.root, node["$ref"]), hops - 1
        return node


def _optional_groups(pattern: str) -> str:
    """`(X)?` written `(X|)`: the same strings, but xgrammar lets a JSON string skip the start of an optional group
    that ends in a repetition (`^0(?:xy+)?$` took "0y")."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch, step = pattern[i], 1
        if ch == "\\":
            step = 2
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            first = i + 1 + (pattern[i + 1:i + 2] == "^")
            step = first - i + (pattern[first:first + 1] == "]")  # a leading ] is a member, not the end
        elif ch == ")" and pattern[i + 1:i + 2] == "?":
            out.append("|)")
            i += 3 if pattern[i + 2:i + 3] == "?" else 2
            continue
        out.append(pattern[i:i + step])
        i += step
    return "".join(out)


def _unenforceable_regex(pattern: str) -> str | None:
    """A lookaround or a backreference in `pattern` (regular grammars cannot express them; xgrammar drops
    lookaheads with a warning). None if the pattern has neither, or is not one Python parses (xgrammar judges)."""
    try:
        import re._parser as sre
    except ImportError:  # Python < 3.11
        import sre_parse as sre
    try:
        tree = sre.parse(pattern)
    except Exception:  # noqa: BLE001 - re.error, or a dialect Python does not read
        return None

    def ops(node: Any) -> Iterator[str]:
        if isinstance(node, sre.SubPattern):
            for op, arg in node:
                yield str(op)
                yield from ops(arg)
        elif isinstance(node, (list, tuple)):
            for part in node:
                yield from ops(part)

    found = set(ops(tree))
    if found & {"ASSERT", "ASSERT_NOT"}:
        return "lookahead or lookbehind"
    return "backreference" if found & {"GROUPREF", "GROUPREF_EXISTS"} else None


def _whole(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _types(node: dict) -> set[str] | None:
    """The JSON types a schema allows, when it says (by `type`, or by its `const`/`enum` values)."""
    if "type" in node:
        return {node["type"]} if isinstance(node["type"], str) else set(node["type"])
    values = _values(node)
    return None if values is None else {_json_type(v) for v in values}


def _types_overlap(a: set[str], b: set[str]) -> bool:
    widen = {"integer": {"integer", "number"}, "number": {"integer", "number"}}
    return any(widen.get(t, {t}) & b for t in a)


def _values(node: dict) -> list | None:
    if "const" in node:
        return [node["const"]]
    return list(node["enum"]) if "enum" in node else None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "integer" if _whole(value) else "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}[type(value)]


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1."""
    return (isinstance(a, bool) == isinstance(b, bool)) and a == b


def _pointer(root: dict, ref: str) -> Any:
    from urllib.parse import unquote
    node: Any = root
    for part in unquote(ref.removeprefix("#")).split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _integer_bounds(node: dict) -> dict:
    """Bounds of an integer schema as whole numbers (`minimum: 2.5` is `minimum: 3`): the grammar takes no
    fractions there, and integers meet a fractional bound exactly when they meet the rounded one."""
    types = _types(node) if "type" in node else None
    if not types or "integer" not in types or "number" in types:
        return node
    for key, bound in (("minimum", math.ceil), ("exclusiveMinimum", lambda v: math.floor(v) + 1),
                       ("maximum", math.floor), ("exclusiveMaximum", lambda v: math.ceil(v) - 1)):
        value = node.get(key)
        if isinstance(value, float) and not (key.startswith("exclusive") and value.is_integer()):
            inclusive = key.removeprefix("exclusive")
            inclusive = inclusive[0].lower() + inclusive[1:]
            node.pop(key)
            rounded = bound(value)
            pick = max if inclusive == "minimum" else min
            node[inclusive] = pick(rounded, node[inclusive]) if inclusive in node else rounded
        elif isinstance(value, float):
            node[key] = int(value)
    return node
