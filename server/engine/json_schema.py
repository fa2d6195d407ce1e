"""Which JSON Schemas structured output can enforce. xgrammar compiles a schema into a grammar but silently ignores
keywords it does not implement (`uniqueItems`, `not`, `if`/`then`, unknown `format`s, ...), which would let output
through that the client's own validator rejects. So every schema is checked here first: it must be a valid JSON
Schema (Draft 2020-12 meta-schema, via the `jsonschema` package) and use only keywords the grammar enforces."""
from __future__ import annotations

from typing import Any

from server.engine.errors import InvalidRequestError

ENFORCED = {
    "type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties", "propertyNames",
    "minProperties", "maxProperties", "unevaluatedProperties", "items", "prefixItems", "minItems", "maxItems",
    "unevaluatedItems", "additionalItems", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
               "writeOnly", "$anchor", "contentMediaType", "contentEncoding", "nullable", "discriminator", "strict"}
FORMATS = {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri",
           "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"}
# keywords whose value is a map of name -> subschema, a list of subschemas, or one subschema
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions"}
_SCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}
_SCHEMA_ONE = {"additionalProperties", "propertyNames", "unevaluatedProperties", "items", "unevaluatedItems",
               "additionalItems"}
MAX_DEPTH = 32


def check_schema(schema: Any, param: str) -> None:
    """Raise InvalidRequestError (naming `param` and the keyword's path) unless `schema` is a valid JSON Schema
    that the grammar can enforce exactly."""
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"the JSON schema must be an object, got {type(schema).__name__}", param)
    from jsonschema import Draft202012Validator, SchemaError
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise InvalidRequestError(f"invalid JSON schema at {where}: {exc.message}", param) from None
    _walk(schema, "#", param, 0)


def _walk(node: Any, path: str, param: str, depth: int) -> None:
    if isinstance(node, bool):
        return
    if depth > MAX_DEPTH:
        raise InvalidRequestError(f"the JSON schema nests deeper than {MAX_DEPTH} levels (at {path})", param)

    def refuse(message: str) -> None:
        raise InvalidRequestError(f"unsupported JSON schema at {path}: {message}", param)

    for key, value in node.items():
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            refuse(f"keyword {key!r} cannot be enforced by structured output")
        if key in _SCHEMA_MAPS:
            for name, sub in value.items():
                _walk(sub, f"{path}/{key}/{name}", param, depth + 1)
        elif key in _SCHEMA_LISTS:
            for i, sub in enumerate(value):
                _walk(sub, f"{path}/{key}/{i}", param, depth + 1)
        elif key in _SCHEMA_ONE:
            _walk(value, f"{path}/{key}", param, depth + 1)
    if "format" in node and node["format"] not in FORMATS:
        refuse(f"format {node['format']!r} is not supported (supported: {', '.join(sorted(FORMATS))})")
    if "pattern" in node and ("minLength" in node or "maxLength" in node):
        refuse("'pattern' together with 'minLength'/'maxLength' is not supported; put the length in the pattern")
    if "allOf" in node and len(node["allOf"]) > 1:
        refuse("'allOf' with more than one subschema is not supported")
    ref = node.get("$ref")
    if ref is not None and not str(ref).startswith("#"):
        refuse(f"only local references ('#/...') are supported, got {ref!r}")
