"""Every JSON Schema keyword, decided: enforced (outputs generated from random weights at temperature 1 over several
seeds validate against the schema with the `jsonschema` package, formats included where it can check them),
accepted as an annotation that constrains nothing, or refused with a 400 that names it. The table must cover every
keyword of the Draft 2020-12 vocabularies, so that none is ever silently ignored."""
from __future__ import annotations

import datetime
import json
import re

import pytest
from jsonschema import Draft202012Validator
from jsonschema_specifications import REGISTRY

from server.engine import EngineCore, EngineSettings, InvalidRequestError, SamplingParams
from server.engine.grammar import GrammarSpec
from server.engine.grammar_compiler import GrammarCompiler
from server.engine.offline import generate

SEEDS = range(3)
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
SHORT = {"type": "string", "maxLength": 2}
ANNOTATED = {"type": "boolean", "title": "t", "description": "d", "default": True, "examples": [True],
             "deprecated": False, "readOnly": True, "writeOnly": False, "$comment": "c", "$anchor": "flag",
             "$dynamicAnchor": "node", "$id": "https://example.com/flag", "contentMediaType": "text/plain",
             "contentEncoding": "base64", "contentSchema": {"type": "string"}, "$vocabulary": {},
             "$schema": "https://json-schema.org/draft/2020-12/schema"}

# keyword -> schemas whose generated outputs must validate (the keyword enforced, alone and in company)
ENFORCED = {
    "type": [{"type": ["boolean", "null"]}, {"type": ["integer", "null"], "minimum": 0, "maximum": 3}],
    "enum": [{"enum": ["a", 1, None, [1], {"k": True}]},
             {"type": "string", "enum": [1, "a", None, "bbb"], "maxLength": 2}],  # siblings filter the values
    "const": [{"const": {"a": [1, 2]}}],
    "properties": [{"type": "object", "properties": {"a": DIGIT, "b": {"type": "boolean"}}, "required": ["a"],
                    "additionalProperties": False}],
    "required": [{"type": "object", "properties": {"a": DIGIT, "b": {"type": "null"}}, "required": ["a", "b"]}],
    "additionalProperties": [{"type": "object", "propertyNames": {"enum": ["a", "b"]},
                              "additionalProperties": DIGIT}],
    "patternProperties": [{"type": "object", "patternProperties": {"^x[0-9]$": {"type": "boolean"}},
                           "additionalProperties": False, "maxProperties": 2}],
    "propertyNames": [{"type": "object", "propertyNames": {"maxLength": 1}, "additionalProperties": DIGIT,
                       "maxProperties": 2}],
    "maxProperties": [{"type": "object", "propertyNames": {"enum": ["a", "b", "c"]}, "additionalProperties": DIGIT,
                       "maxProperties": 1}],
    "minProperties": [{"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}},
                       "required": ["a", "b"], "minProperties": 2}],
    "unevaluatedProperties": [{"type": "object", "properties": {"a": {"type": "boolean"}},
                               "unevaluatedProperties": False}],
    "items": [{"type": "array", "items": DIGIT, "maxItems": 3}],
    "minItems": [{"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3}],
    "maxItems": [{"type": "array", "items": {"type": "null"}, "maxItems": 2}],
    "prefixItems": [{"type": "array", "prefixItems": [{"type": "boolean"}, {"const": "x"}], "items": False}],
    "unevaluatedItems": [{"type": "array", "prefixItems": [{"type": "boolean"}], "unevaluatedItems": False}],
    "uniqueItems": [{"type": "array", "items": {"type": "boolean"}, "uniqueItems": False, "maxItems": 2}],
    "anyOf": [{"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 5}]}],
    "oneOf": [{"oneOf": [DIGIT, SHORT]},  # disjoint by type; by a required discriminator
              {"oneOf": [{"type": "object", "properties": {"k": {"const": "cat"}}, "required": ["k"]},
                         {"type": "object", "properties": {"k": {"const": "dog"}, "n": {"type": "boolean"}},
                          "required": ["k", "n"]}]}],
    "allOf": [{"allOf": [{"type": "integer", "minimum": 0, "maximum": 5}]}],
    "$ref": [{"$defs": {"b": {"type": "boolean"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/b"}},
              "required": ["x"]},
             {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"},
                                                                        "maxItems": 1}}, "required": ["c"]}},
              "$ref": "#/$defs/n"}],
    "$defs": [{"$defs": {"d": DIGIT}, "$ref": "#/$defs/d"}],
    "definitions": [{"definitions": {"d": {"enum": [1, 2]}}, "$ref": "#/definitions/d"}],
    "minLength": [{"type": "string", "minLength": 2, "maxLength": 3}],
    "maxLength": [SHORT],
    "pattern": [{"type": "string", "pattern": "^[a-c]{2}x$"}, {"type": "string", "pattern": "^a(?:b[0-9]{1,2})?$"}],
    "format": [{"type": "string", "format": f} for f in ("date", "time", "date-time", "duration", "ipv4", "ipv6",
                                                          "uuid")],
    "minimum": [{"type": "integer", "minimum": 2.5, "maximum": 6.5}, {"type": "number", "minimum": 0.5, "maximum": 2}],
    "maximum": [{"type": "integer", "minimum": -3, "maximum": -1}],
    "exclusiveMinimum": [{"type": "integer", "exclusiveMinimum": 2, "exclusiveMaximum": 6}],
    "exclusiveMaximum": [{"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}],
    "multipleOf": [{"type": "integer", "multipleOf": 3, "minimum": 0, "maximum": 20}],
}
ANNOTATIONS = {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment",
               "$anchor", "$dynamicAnchor", "$id", "$schema", "$vocabulary", "contentMediaType", "contentEncoding",
               "contentSchema"}
ENFORCED["title"] = [ANNOTATED]  # annotations: accepted, and the schema beside them still enforced

# keyword -> schemas refused with a 400 whose message names the keyword
REFUSED = {
    "not": [{"not": {"type": "string"}}],
    "if": [{"if": {"type": "string"}, "then": {"maxLength": 2}, "else": {"type": "null"}}],
    "then": [{"then": {"maxLength": 2}}],
    "else": [{"else": {"maxLength": 2}}],
    "contains": [{"type": "array", "contains": {"const": 1}}],
    "minContains": [{"type": "array", "minContains": 2}],
    "maxContains": [{"type": "array", "maxContains": 2}],
    "dependentRequired": [{"type": "object", "dependentRequired": {"a": ["b"]}}],
    "dependentSchemas": [{"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}],
    "dependencies": [{"type": "object", "dependencies": {"a": ["b"]}}],
    "uniqueItems": [{"type": "array", "uniqueItems": True}],
    "$dynamicRef": [{"$dynamicRef": "#node"}],
    "$recursiveRef": [{"$recursiveRef": "#"}],
    "$recursiveAnchor": [{"$recursiveAnchor": True, "type": "boolean"}],
    "required": [{"type": "object", "properties": {"a": DIGIT}, "required": ["a", "b"]},
                 {"type": "object", "properties": {"a": DIGIT}, "required": ["b"], "additionalProperties": False},
                 {"type": "object", "patternProperties": {"^b$": DIGIT}, "required": ["b"]}],
    "allOf": [{"type": "string", "allOf": [{"maxLength": 3}]}, {"allOf": [DIGIT, {"maximum": 5}]}],
    "anyOf": [{"type": "string", "anyOf": [{"maxLength": 2}, {"minLength": 4}]}],
    "$ref": [{"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s", "maxLength": 3},
             {"$ref": "https://example.com/schema.json"}],
    "oneOf": [{"oneOf": [{"type": "integer"}, {"type": "number"}]},
              {"oneOf": [{"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]},
                         {"type": "object", "properties": {"k": {"const": "dog"}}, "required": ["k"]}]}],
    "multipleOf": [{"type": "number", "multipleOf": 0.5}, {"type": "integer", "multipleOf": 2.5},
                   {"multipleOf": 3}],
    "minProperties": [{"type": "object", "additionalProperties": DIGIT, "minProperties": 2}],
    "pattern": [{"type": "string", "pattern": "^(?!abc)[a-c]{3}$"}, {"type": "string", "pattern": "^(a|b)\\1$"},
                {"type": "string", "pattern": "^[a-c]+$", "maxLength": 3}],
    "patternProperties": [{"type": "object", "patternProperties": {"^(?=x)": DIGIT}}],
    "format": [{"type": "string", "format": "credit-card"}, {"type": "string", "format": "hostname"},
               {"type": "string", "format": "date", "maxLength": 4},
               {"type": "string", "format": "date", "pattern": "^2"}],
    "minimum": [{"minimum": 0, "maximum": 3}],
    "maxLength": [{"maxLength": 2}],
    "enum": [{"type": "integer", "enum": ["a", "b"]}],
    "const": [{"type": "integer", "const": "a"}, {"const": 5, "maximum": 3}],
    "x-custom": [{"type": "string", "x-custom": 1}],
}


FORMATS = Draft202012Validator.FORMAT_CHECKER  # date, email, ipv4, ipv6, uuid; the rest from the standard library:
FORMATS.checks("time", ValueError)(datetime.time.fromisoformat)
FORMATS.checks("date-time", ValueError)(lambda text: "T" in text and datetime.datetime.fromisoformat(text))
FORMATS.checks("duration")(re.compile(r"P(?:\d+W|(?=\d|T(?=\d))(?:\d+Y)?(?:\d+M)?(?:\d+D)?"
                                      r"(?:T(?=\d)(?:\d+H)?(?:\d+M)?(?:\d+S)?)?)").fullmatch)
# formats whose values are long: checked on samples instead (valid ones accepted, invalid ones refused)
SAMPLES = {
    "email": (["a@b.co", '"x y"@b.com'], ["a..b@c.com", ".a@b.com", "a b@c.com", "a@-b.com"]),
    "uri": (["http://a.b/c?d#e", "urn:isbn:0451450523"], ["no scheme", "http://a b", "1http://x"]),
    "uri-reference": (["/a/b", "#f"], ["a b", "%zz"]),
    "uri-template": (["/a/{b}", "{+x}"], ["/a/{b", "a}b"]),
    "json-pointer": (["", "/a/0", "/a~1b"], ["a", "/a~2"]),
    "relative-json-pointer": (["0", "1/a", "0#"], ["01", "-1"]),
    "date": (["2024-02-28"], ["2024-02-30", "2023-04-31", "0000-01-01"]),
    "ipv4": (["1.2.3.4", "255.0.0.1"], ["01.2.3.4", "256.1.1.1"]),
}


def vocabulary() -> set[str]:
    """Every keyword of the Draft 2020-12 vocabularies, and the legacy ones its meta-schema still names."""
    keywords = set(Draft202012Validator.META_SCHEMA["properties"])
    for uri in REGISTRY:
        if "draft/2020-12/meta/" in uri:
            keywords |= set(REGISTRY[uri].contents.get("properties", {}))
    return keywords


def keywords_in(schema) -> set[str]:
    found = set()
    if isinstance(schema, dict):
        found |= set(schema)
        for value in schema.values():
            found |= keywords_in(value)
    elif isinstance(schema, list):
        for value in schema:
            found |= keywords_in(value)
    return found


def test_the_table_decides_every_keyword():
    decided = set(ENFORCED) | set(REFUSED) | ANNOTATIONS
    assert vocabulary() - decided == set()
    for keyword, schemas in [*ENFORCED.items(), *REFUSED.items()]:
        for schema in schemas:
            assert keyword in keywords_in(schema), (keyword, schema)
    assert ANNOTATIONS <= keywords_in(ANNOTATED)


@pytest.fixture(scope="module")
def compiler(dummy_lm):
    compiler = GrammarCompiler(dummy_lm.tokenizer, dummy_lm.config.vocab_size, timeout=60)
    yield compiler
    compiler.shutdown()


@pytest.mark.parametrize("keyword, schema", [(k, s) for k, schemas in REFUSED.items() for s in schemas])
def test_refused_keywords_are_named(compiler, keyword, schema):
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(GrammarSpec.json_schema(schema), param="response_format")
    assert info.value.param == "response_format" and keyword in str(info.value), str(info.value)


def test_enforced_keywords_hold_over_seeds_at_temperature_1(dummy_lm, compiler):
    cases = [(k, s) for k, schemas in ENFORCED.items() for s in schemas]
    grammars = [compiler.compile(GrammarSpec.json_schema(s)) for _, s in cases]
    core = EngineCore(dummy_lm, EngineSettings(num_kv_blocks=512, max_model_len=256, max_num_seqs=128))
    prompt = dummy_lm.tokenizer.encode("Some JSON: ")
    params = [SamplingParams(max_tokens=48, temperature=1.0, seed=seed, grammar=g) for g in grammars for seed in SEEDS]
    results = generate(core, [prompt] * len(params), params)
    finished = 0
    for i, ((completion,),) in enumerate(zip(results)):
        keyword, schema = cases[i // len(SEEDS)]
        if completion.finish_reason == "length":  # cut short: nothing to validate, but it must be a prefix
            continue
        assert completion.finish_reason == "stop", (keyword, completion)
        validator = Draft202012Validator(schema, format_checker=FORMATS)
        errors = [e.message for e in validator.iter_errors(json.loads(completion.text))]
        assert not errors, (keyword, schema, completion.text, errors)
        finished += 1
    assert finished >= 0.9 * len(params), f"only {finished} of {len(params)} outputs finished"


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_formats_accept_valid_values_and_refuse_invalid_ones(compiler, fmt):
    import xgrammar as xgr
    grammar = compiler.compile(GrammarSpec.json_schema({"type": "string", "format": fmt}))
    valid, invalid = SAMPLES[fmt]
    accepts = [xgr.GrammarMatcher(grammar.compiled).accept_string(json.dumps(v)) for v in valid + invalid]
    assert accepts == [True] * len(valid) + [False] * len(invalid)


def test_optional_groups_keep_their_start(compiler):
    """xgrammar skipped the start of an optional group ending in a repetition; the schema is compiled so it cannot."""
    import xgrammar as xgr
    grammar = compiler.compile(GrammarSpec.json_schema({"type": "string", "pattern": "^0(?:xy+)?(?:[.][0-9]{1,2})?$"}))
    accepts = [xgr.GrammarMatcher(grammar.compiled).accept_string(json.dumps(t)) for t in ["0xy.5", "0", "0y", "05"]]
    assert accepts == [True, True, False, False]


def test_strings_never_hold_raw_control_characters(compiler):
    """Length-bounded strings and property names, and tool arguments: only what JSON allows in a string."""
    import xgrammar as xgr
    schemas = [{"type": "string", "maxLength": 3}, {"type": "string", "minLength": 1},
               {"type": "object", "propertyNames": {"maxLength": 2}, "additionalProperties": DIGIT}]
    for schema, text in zip(schemas, ['"a\tb"', '"\x01"', '{"\x1f": 1}']):
        grammar = compiler.compile(GrammarSpec.json_schema(schema))
        assert not xgr.GrammarMatcher(grammar.compiled).accept_string(text), schema
