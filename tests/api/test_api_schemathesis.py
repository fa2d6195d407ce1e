"""Property-based fuzzing of the app against its own OpenAPI schema (schemathesis, in-process over ASGI, dummy
model): valid and invalid bodies alike get no 5xx, only documented status codes and content types, and responses
that match the schema.

(schemathesis' `pytest.from_fixture` reads a pytest-private node attribute that pytest 9 removed, so the
strategies are driven with hypothesis directly, one run per operation and generation mode.)"""
from __future__ import annotations

import asyncio

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.servers import make_app, make_engine

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}


@pytest.fixture(scope="module")
def api_schema(dummy_lm):
    # a short context window keeps generated max_tokens (and so each example) cheap
    engine = make_engine(dummy_lm, max_model_len=128, num_kv_blocks=256)
    app = make_app(engine, summarize_chunk_tokens=64, summarize_max_tokens=8, classify_permutations=1)
    asyncio.run(app.state.lifecycle.warmup())
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.shutdown()


OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"),
              ("GET", "/v1/responses/{response_id}"), ("DELETE", "/v1/responses/{response_id}"),
              ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"),
              ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
              ("POST", "/v1/summarize"),
              ("POST", "/v1/classify"), ("POST", "/v1/embeddings"), ("POST", "/v1/rerank"), ("POST", "/v1/score"),
              ("GET", "/v1/models"), ("GET", "/v1/status"), ("GET", "/health"), ("GET", "/ready"),
              ("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version")]


def test_schema_lists_every_operation(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_server_errors(api_schema, method, path, mode):
    operation = api_schema[path][method]
    if mode is GenerationMode.NEGATIVE and method == "GET":
        pytest.skip("no parameters to break")

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[mode], deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)
    def run(case):
        response = case.call()
        if response.status_code == 504:  # a generated `timeout` that passed: documented, and the right error
            assert response.json()["error"]["code"] == "request_timeout", response.text
            case.validate_response(response, checks=[status_code_conformance, content_type_conformance])
            return
        case.validate_response(response, checks=CHECKS)

    run()
