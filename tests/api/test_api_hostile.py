"""Hostile inputs: random JSON of the right and the wrong shapes, and non-JSON bodies, sent to every route of a real
server (uvicorn on a socket, dummy model) while real requests run beside them. Each class of input has one exact
answer:
- a body that is not a JSON object (bytes, broken or over-nested JSON, a JSON array, string, number or null): 400
  `invalid_request_error` naming no field;
- a valid body with one field of the wrong type: 400 whose `param` is that field (or a path inside it);
- a valid body with one number out of its range: 400 naming that field;
- a valid body naming a model the server does not serve: 404 `model_not_found` on `param: "model"`;
- a valid body with random in-range parameters: 200, streamed to its end when it asks for a stream;
- random bodies of the right shape, many fields at once: an answer those fields explain (200, a 400 naming one of
  them or a field the route requires, a 404 for a wrong model, a 504 for a tiny timeout);
- GET routes with junk query strings and bodies: 200;
- a grammar that cannot be enforced exactly (a JSON Schema keyword the grammar engine would ignore, a grammar that
  matches nothing) or a tool result that answers no call: 400 naming the field; a grammar that runs into a dead end
  after some output: 200, finished with `grammar_dead_end`.
Across all of them: never a 5xx otherwise, never a hang, every error in OpenAI's shape; the real requests finish
normally with all their tokens, and every KV block is back at the end. Bounded (`max_examples`) to stay within a
few minutes on two cores."""
from __future__ import annotations

import json
import math
import time

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from server.api.protocol import PRIORITY_MAX, PRIORITY_MIN
from tests.support.hostile import hostile_client, real_traffic  # noqa: F401  (fixtures pytest finds here)
from tests.support.servers import ThreadServer, make_app, make_engine, wait_until

MODEL = "dummy:tiny"
VOCAB = 49152  # the dummy model's vocabulary: token ids are in [0, VOCAB)
POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/summarize", "/v1/classify", "/tokenize", "/detokenize"]
GET_ROUTES = ["/v1/models", "/health", "/ready", "/metrics", "/version"]
VALID = {  # a small valid body per route
    "/v1/completions": {"prompt": "Hello there", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/v1/summarize": {"input": "A short text about a cat.", "max_tokens": 4},
    "/v1/classify": {"input": "A short text.", "labels": ["good", "bad"], "permutations": 1},
    "/tokenize": {"prompt": "Hello there"},
    "/detokenize": {"tokens": [1, 2, 3]},
}
REQUIRED = {  # what a route refuses by name when it is missing
    "/v1/completions": {"prompt"}, "/v1/chat/completions": {"messages"}, "/v1/summarize": {"input"},
    "/v1/classify": {"input", "labels"}, "/tokenize": set(), "/detokenize": {"tokens"},
}

# -- values of the wrong type, by the type a field expects (pydantic's lax mode takes "3" for 3 and true for 1) ---
WRONG = {
    "int": st.sampled_from(["many", "", "1.5", 1.5, -0.25, [1], [], {"a": 1}]),
    "float": st.sampled_from(["warm", "", "one", [1.0], [], {"a": 1.0}]),
    "bool": st.sampled_from([0, 1, 1.5, "true", "yes", "", None, [], {}]),
    "str": st.sampled_from([5, 1.5, True, [], ["a"], {"a": "b"}]),
    "texts": st.sampled_from([5, 1.5, True, None, [1], [None], [["a"]], {"a": "b"}]),
    "stop": st.sampled_from([5, 1.5, True, [1], [None], {"a": "b"}]),
    "ids": st.sampled_from(["x", 5, [1.5], [True], ["1"], [None], {"a": 1}]),
    "prompt": st.sampled_from([5, 1.5, True, None, {"a": 1}, [1.5], [True], ["a", 1], [[1, "a"]], [{"a": 1}]]),
    "messages": st.sampled_from(["hi", 5, [5], ["hi"], [{"content": "x"}], [{"role": "wizard", "content": "x"}],
                                 [{"role": "user", "content": 5}], {"role": "user", "content": "x"}]),
    "labels": st.sampled_from(["good", 5, [1], [None], [["a"]], {"a": "b"}]),
    "float_map": st.sampled_from(["x", 5, [1], {"a": "b"}, {"a": [1]}]),
    "str_map": st.sampled_from(["x", 5, [1], {"a": 1}, {"a": None}]),
    "examples": st.sampled_from(["x", [1], [{"text": "a"}], [{"label": "a"}], {"text": "a", "label": "b"}]),
    "stream_options": st.sampled_from(["yes", 5, [True], {"include_usage": "yes"}, {"include_usage": None}]),
    "style": st.sampled_from(["haiku", "", 5, None, ["bullets"]]),
}
SAMPLING = {"model": "str", "temperature": "float", "top_p": "float", "top_k": "int", "min_p": "float",
            "presence_penalty": "float", "frequency_penalty": "float", "repetition_penalty": "float", "n": "int",
            "stop": "stop", "stop_token_ids": "ids", "seed": "int", "stream": "bool", "stream_options": "stream_options",
            "ignore_eos": "bool", "include_stop_str_in_output": "bool", "skip_special_tokens": "bool",
            "logit_bias": "float_map", "user": "str", "priority": "int", "timeout": "float", "max_tokens": "int"}
TYPES = {  # each route's fields and the type each expects
    "/v1/completions": {**SAMPLING, "prompt": "prompt", "echo": "bool", "logprobs": "int", "best_of": "int",
                        "suffix": "str"},
    "/v1/chat/completions": {**SAMPLING, "messages": "messages", "logprobs": "bool", "top_logprobs": "int",
                             "max_completion_tokens": "int", "parallel_tool_calls": "bool"},
    "/v1/summarize": {"model": "str", "input": "texts", "max_tokens": "int", "style": "style", "stream": "bool",
                      "chunk_tokens": "int", "timeout": "float"},
    "/v1/classify": {"model": "str", "input": "texts", "labels": "labels", "multi_label": "bool", "calibrate": "bool",
                     "label_descriptions": "str_map", "examples": "examples", "permutations": "int",
                     "timeout": "float"},
    "/tokenize": {"model": "str", "prompt": "str", "messages": "messages", "add_special_tokens": "bool",
                  "add_generation_prompt": "bool"},
    "/detokenize": {"model": "str", "tokens": "ids"},
}


# -- numbers out of their range, per field ----------------------------------------------------------------------
def below(limit: float, inclusive: bool = False):
    """Floats under `limit` (or equal to it, when the range excludes it), NaN and -inf included."""
    values = st.floats(max_value=limit, exclude_max=not inclusive, allow_infinity=True)
    return st.one_of(values, st.just(math.nan))


def above(limit: float, inclusive: bool = False):
    return st.one_of(st.floats(min_value=limit, exclude_min=not inclusive, allow_infinity=True), st.just(math.nan))


def ints_outside(low: int, high: int):
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1),
                     st.sampled_from([low - 1, high + 1, -(10 ** 310), 10 ** 310]).filter(lambda v: not low <= v <= high))


SAMPLING_RANGES = {
    "temperature": st.one_of(below(0.0), above(2.0)), "top_p": st.one_of(below(0.0, inclusive=True), above(1.0)),
    "top_k": ints_outside(-1, 2 ** 31 - 1), "min_p": st.one_of(below(0.0), above(1.0)),
    "presence_penalty": st.one_of(below(-2.0), above(2.0)), "frequency_penalty": st.one_of(below(-2.0), above(2.0)),
    "repetition_penalty": st.one_of(below(0.0, inclusive=True), above(2.0)), "n": ints_outside(1, 16),
    "seed": ints_outside(0, 2 ** 63 - 1), "priority": ints_outside(PRIORITY_MIN, PRIORITY_MAX),
    "timeout": below(0.0, inclusive=True), "max_tokens": st.integers(max_value=-1),
}
RANGES = {
    "/v1/completions": {**SAMPLING_RANGES, "logprobs": ints_outside(0, 20)},
    "/v1/chat/completions": {**SAMPLING_RANGES, "max_completion_tokens": st.integers(max_value=-1),
                             "top_logprobs": ints_outside(0, 20)},
    "/v1/summarize": {"max_tokens": st.integers(max_value=0), "chunk_tokens": st.integers(max_value=63),
                      "timeout": below(0.0, inclusive=True)},
    "/v1/classify": {"permutations": ints_outside(1, 8), "timeout": below(0.0, inclusive=True),
                     "labels": st.sampled_from([[], [f"label {i}" for i in range(65)]])},
    "/detokenize": {"tokens": st.lists(st.integers(0, VOCAB - 1), max_size=3).flatmap(
        lambda ids: st.sampled_from([-1, VOCAB, 10 ** 12]).map(lambda bad: [*ids, bad]))},
}

# -- random bodies of the right shape, many fields at once --------------------------------------------------------
ints = st.one_of(st.integers(-3, 24), st.sampled_from([0, -1, 2 ** 31, 2 ** 63, 10 ** 30, -(10 ** 30), 10 ** 310]))
floats = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1e-50, 1e308, -1e308, float("inf"), float("nan")]))
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "🚀", "\x00", "<|im_end|>", "a" * 3000]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus", ""]),
                                    "content": st.one_of(texts, anything)}), max_size=3),
    anything)
labels = st.one_of(st.lists(texts, max_size=4), anything)
token_ids = st.one_of(st.lists(ints, max_size=6), st.lists(st.booleans(), max_size=3), anything)
FIELDS = {  # the fields each route knows, each with values of the right type and of wrong ones
    "model": st.one_of(st.just(MODEL), texts, anything),
    "prompt": st.one_of(texts, st.lists(texts, max_size=3), token_ids, anything),
    "messages": messages,
    "input": st.one_of(texts, st.lists(texts, max_size=3), anything),
    "labels": labels,
    "tokens": token_ids,
    "max_tokens": ints, "n": ints, "top_k": ints, "seed": ints, "logprobs": st.one_of(st.booleans(), ints, anything),
    "top_logprobs": ints, "temperature": floats, "top_p": floats, "presence_penalty": floats,
    "frequency_penalty": floats, "repetition_penalty": floats, "timeout": floats, "priority": ints,
    "stream": st.one_of(st.booleans(), anything), "echo": st.one_of(st.booleans(), anything),
    "stop": st.one_of(texts, st.lists(texts, max_size=3), anything),
    "logit_bias": st.one_of(st.dictionaries(st.one_of(texts, ints.map(str)), floats, max_size=3), anything),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), anything),
    "ignore_eos": st.booleans(), "multi_label": st.one_of(st.booleans(), anything),
    "permutations": ints, "add_special_tokens": st.one_of(st.booleans(), anything),
}
right_shape = st.fixed_dictionaries({}, optional=FIELDS)
raw_bodies = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{", b"[]", b"null", b'{"prompt": "\xff"}',
                                                                b'{"a":' * 2000, b"[" * 5000 + b"]" * 5000]))


# -- the server, and real traffic beside the hostile one ------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_server(dummy_lm):
    engine = make_engine(dummy_lm, max_model_len=512, num_kv_blocks=256, max_num_seqs=16)
    app = make_app(engine, summarize_max_input_chars=20000)
    with ThreadServer(app) as srv:
        srv.engine = engine
        yield srv
    engine.shutdown()


# -- sending, and reading the answer --------------------------------------------------------------------------------
class Answer:
    """A response read to its end: status, JSON body (None for a stream), SSE events (for a stream)."""

    def __init__(self, r: httpx.Response, text: str):
        self.status = r.status_code
        self.stream = r.headers.get("content-type", "").startswith("text/event-stream")
        self.text = text
        self.events = [line[6:] for line in text.splitlines() if line.startswith("data: ")] if self.stream else []
        self.body = None if self.stream else json.loads(text)

    @property
    def error(self) -> dict:
        assert self.status >= 400 and not self.stream, (self.status, self.text[:500])
        assert set(self.body) == {"error"}, self.body
        err = self.body["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
        return err

    def stream_errors(self) -> list[dict]:
        """A stream's in-band errors; it must end with [DONE]."""
        assert self.events and self.events[-1] == "[DONE]", self.text[-500:]
        return [e["error"] for e in map(json.loads, self.events[:-1]) if "error" in e]


def send(client: httpx.Client, path: str, content: bytes) -> Answer:
    started = time.monotonic()
    with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        text = r.read().decode("utf-8")  # a stream is read to its end: it must end, within the client's timeout
    assert time.monotonic() - started < 30
    return Answer(r, text)


def post(client: httpx.Client, path: str, body) -> Answer:
    return send(client, path, json.dumps(body, allow_nan=True).encode())


def expect_400(answer: Answer, field: str | None) -> dict:
    """A 400 invalid_request_error naming `field` (or a path inside it: `messages.0.role`), or no field."""
    assert answer.status == 400, (answer.status, answer.text[:500])
    err = answer.error
    assert err["type"] == "invalid_request_error", err
    if field is None:
        assert err["param"] is None, err
    else:
        assert err["param"] == field or str(err["param"]).startswith(field + "."), (field, err)
    return err


HYPOTHESIS = settings(deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def is_json_object(content: bytes) -> bool:
    try:
        return isinstance(json.loads(content), dict)
    except (ValueError, RecursionError):
        return False


# -- the classes of input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", POST_ROUTES)
@settings(HYPOTHESIS, max_examples=20)
@given(content=raw_bodies)
def test_a_body_that_is_no_json_object_is_400_naming_no_field(client, traffic, path, content):
    assume(not is_json_object(content))
    err = expect_400(send(client, path, content), None)
    assert err["code"] is None


@pytest.mark.parametrize("path", POST_ROUTES)
@settings(HYPOTHESIS, max_examples=20)
@given(value=anything.filter(lambda v: not isinstance(v, dict)))
def test_json_that_is_no_object_is_400_naming_no_field(client, traffic, path, value):
    err = expect_400(post(client, path, value), None)
    assert err["code"] is None


@pytest.mark.parametrize("path", POST_ROUTES)
@settings(HYPOTHESIS, max_examples=80)
@given(data=st.data())
def test_a_field_of_the_wrong_type_is_400_naming_it(client, traffic, path, data):
    field = data.draw(st.sampled_from(sorted(TYPES[path])), label="field")
    value = data.draw(WRONG[TYPES[path][field]], label="value")
    err = expect_400(post(client, path, {**VALID[path], field: value}), field)
    assert err["code"] is None


@pytest.mark.parametrize("path", sorted(RANGES))
@settings(HYPOTHESIS, max_examples=80)
@given(data=st.data())
def test_a_number_out_of_range_is_400_naming_it(client, traffic, path, data):
    field = data.draw(st.sampled_from(sorted(RANGES[path])), label="field")
    value = data.draw(RANGES[path][field], label="value")
    err = expect_400(post(client, path, {**VALID[path], field: value}), field)
    assert err["code"] is None


@pytest.mark.parametrize("path", POST_ROUTES)
@settings(HYPOTHESIS, max_examples=10)
@given(model=st.one_of(st.text(max_size=20), st.sampled_from(["", "gpt-4o", MODEL.upper(), MODEL + " "])))
def test_an_unknown_model_is_404(client, traffic, path, model):
    assume(model != MODEL)
    answer = post(client, path, {**VALID[path], "model": model})
    assert answer.status == 404, (answer.status, answer.text[:500])
    err = answer.error
    assert (err["type"], err["code"], err["param"]) == ("not_found_error", "model_not_found", "model"), err


def sampling(n: int):
    """In-range sampling parameters (n > 1 needs sampling: temperature above 0)."""
    unit = st.floats(0.01, 1.0)
    return st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0.1 if n > 1 else 0.0, 2.0), "top_p": unit, "top_k": st.integers(-1, 2 ** 31 - 1),
        "min_p": st.floats(0.0, 1.0), "presence_penalty": st.floats(-2.0, 2.0),
        "frequency_penalty": st.floats(-2.0, 2.0), "repetition_penalty": st.floats(0.01, 2.0),
        "seed": st.integers(0, 2 ** 63 - 1), "priority": st.integers(PRIORITY_MIN, PRIORITY_MAX),
        "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3), "ignore_eos": st.booleans(),
        "timeout": st.floats(60, 1e6), "stream": st.booleans(), "model": st.just(MODEL),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    }).map(lambda body: {**body, "n": n, "max_tokens": 3})


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@settings(HYPOTHESIS, max_examples=25)
@given(body=st.integers(1, 3).flatmap(sampling),
       text=st.text(alphabet=st.characters(categories=["L", "N", "P", "Zs"]), min_size=1, max_size=40))
def test_in_range_parameters_are_answered(client, traffic, path, body, text):
    prompt = {"prompt": text} if path == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    answer = post(client, path, {**prompt, **body})
    assert answer.status == 200, (answer.status, answer.text[:500])
    if answer.stream:
        assert answer.stream_errors() == []
        finished = {c["index"] for e in answer.events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]}
    else:
        finished = {c["index"] for c in answer.body["choices"] if c["finish_reason"]}
    assert finished == set(range(body["n"]))


@settings(HYPOTHESIS, max_examples=20)
@given(text=st.text(max_size=60), ids=st.lists(st.integers(0, VOCAB - 1), max_size=8))
def test_tokenize_and_detokenize_answer_any_text_and_ids(client, traffic, text, ids):
    answer = post(client, "/tokenize", {"prompt": text})
    assert answer.status == 200 and answer.body["count"] == len(answer.body["tokens"]), answer.text[:500]
    answer = post(client, "/detokenize", {"tokens": ids})
    assert answer.status == 200 and isinstance(answer.body["prompt"], str), answer.text[:500]


@pytest.mark.parametrize("path", POST_ROUTES)
@settings(HYPOTHESIS, max_examples=150)
@given(body=right_shape)
def test_random_bodies_get_an_answer_their_fields_explain(client, traffic, path, body):
    answer = post(client, path, body)
    if answer.status == 200:
        if answer.stream:  # only a tiny timeout may end a stream that started
            for err in answer.stream_errors():
                assert err["code"] == "request_timeout" and "timeout" in body, err
        return
    err = answer.error
    if answer.status == 404:
        assert (err["code"], err["param"]) == ("model_not_found", "model") and body.get("model") != MODEL, err
    elif answer.status == 504:
        assert err["code"] == "request_timeout" and "timeout" in body, err
    else:
        assert answer.status == 400, (answer.status, err)
        assert err["type"] == "invalid_request_error", err
        if err["param"] is None:  # only /tokenize refuses a whole object: neither or both of prompt and messages
            assert path == "/tokenize", err
        else:  # max_tokens has a default (16) that a long prompt can leave no room for
            known = set(body) | REQUIRED[path] | ({"max_tokens"} if path == "/v1/completions" else set())
            assert err["param"].split(".")[0] in known, (err, sorted(body))


@pytest.mark.parametrize("path", GET_ROUTES)
@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3), body=st.binary(max_size=32))
def test_get_routes_ignore_junk(client, traffic, path, query, body):
    r = client.request("GET", path, params=query, content=body)
    assert r.status_code == 200, r.text[:500]


def schema_format(schema) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


UNENFORCEABLE = [  # (the request's grammar fields, the field its 400 names)
    *[(schema_format(schema), "response_format.json_schema.schema") for schema in [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]},
        {"type": "integer", "allOf": [{"minimum": 0}]}, {"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n",
                                                          "maximum": 3},
        {"type": "number", "multipleOf": 0.1}, {"oneOf": [{"type": "integer"}, {"type": "number"}]},
        {"type": "object", "propertyNames": {"maxLength": 2}, "minProperties": 3},
        {"type": "string", "pattern": "^(?=a)\\w+$"}, {"type": "string", "pattern": "^(a)\\1$"},
        {"minimum": 1}, {"type": "string", "enum": [1, 2]}, {"type": "string", "format": "hostname"}]],
    ({"structured_outputs": {"regex": "[^\\s\\S]"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "(?<=a)b"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= root"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": {"type": "array", "contains": {"const": 1}}}}, "structured_outputs.json"),
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
UNANSWERED = [  # (messages, the index of the tool message named)
    ([{"role": "tool", "content": "x", "tool_call_id": "call_1"}], 0),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}], 1),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [CALL]},
      {"role": "tool", "content": "x", "tool_call_id": "call_9"}], 2),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [CALL]},
      {"role": "tool", "content": "x", "tool_call_id": "call_1"},
      {"role": "tool", "content": "y", "tool_call_id": "call_1"}], 3),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [CALL]}, {"role": "user", "content": "b"},
      {"role": "tool", "content": "x", "tool_call_id": "call_1"}], 3),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@settings(HYPOTHESIS, max_examples=8)
@given(case=st.sampled_from(UNENFORCEABLE))
def test_grammars_that_cannot_be_enforced_are_400_naming_them(client, traffic, path, case):
    fields, param = case
    err = expect_400(post(client, path, {**VALID[path], **fields}), param)
    assert err["param"] == param, err


@settings(HYPOTHESIS, max_examples=5)
@given(case=st.sampled_from(UNANSWERED))
def test_tool_results_that_answer_no_call_are_400_naming_them(client, traffic, case):
    messages, index = case
    err = expect_400(post(client, "/v1/chat/completions", {**VALID["/v1/chat/completions"], "messages": messages}),
                     f"messages.{index}.tool_call_id")
    assert err["param"] == f"messages.{index}.tool_call_id", err


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_grammar_dead_end_is_a_clean_finish(client, traffic, path):
    body = {**VALID[path], "max_tokens": 8, "temperature": 1.0, "structured_outputs": {"regex": "ab[^\\s\\S]"}}
    answer = post(client, path, body)
    assert answer.status == 200, answer.text
    (choice,) = answer.body["choices"]
    assert (choice.get("text", choice.get("message", {}).get("content")), choice["finish_reason"]) == \
        ("ab", "grammar_dead_end"), choice


def test_real_requests_unharmed_and_every_block_back(hostile_server, traffic):
    """Runs last in this module: the traffic that ran beside the hostile requests finished normally."""
    traffic.stop.set()
    traffic.thread.join(60)
    assert len(traffic.results) >= 4, traffic.results
    assert all(r == (200, "length", 24) for r in traffic.results), traffic.results
    engine = hostile_server.engine
    assert wait_until(lambda: (s := engine.stats()).running == 0 and s.waiting == 0
                      and s.free_blocks == s.num_blocks, timeout=30), engine.stats()
    metrics = httpx.get(hostile_server.url + "/metrics", timeout=10).text
    assert "loom_kv_cache_usage_ratio 0.0" in metrics
    assert 'status="500"' not in metrics and engine.healthy
