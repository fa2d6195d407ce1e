"""The encoder routes over the dummy generator with all-MiniLM-L6-v2 (float32) and two tiny random classifiers
beside it: /v1/embeddings through the official openai client, /v1/rerank, /v1/score, /v1/classify from a fine-tuned
head (probabilities equal to transformers'), /v1/models, metrics, and the exact errors for bad input."""
from __future__ import annotations

import asyncio
import base64
import math
import struct

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from tests.support.servers import make_app, wait_ready

MINILM = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def enc_client(encoder_engine):
    with TestClient(make_app(encoder_engine)) as c:
        wait_ready(c.get)
        yield c


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def reference(minilm_fp32, hf_minilm, texts: list[str]) -> torch.Tensor:
    batch = minilm_fp32.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = hf_minilm(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_openai_client_strings_lists_token_ids_float_and_base64(enc_client, minilm_fp32, hf_minilm):
    import openai
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=enc_client)
    texts = ["The cat sat on the mat.", "😀🎉", "Quarterly revenue grew by 12 percent."]
    expected = reference(minilm_fp32, hf_minilm, texts)
    one = client.embeddings.create(model=MINILM, input=texts[0], encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert max(abs(a - b) for a, b in zip(one.data[0].embedding, expected[0].tolist())) < 1e-5
    many = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2] and many.model == MINILM
    assert torch.allclose(torch.tensor([d.embedding for d in many.data]), expected, atol=1e-5)
    ids = minilm_fp32.encode_texts(texts)
    assert many.usage.prompt_tokens == many.usage.total_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model=MINILM, input=ids[1], encoding_format="float")
    assert torch.allclose(torch.tensor(by_ids.data[0].embedding), expected[1], atol=1e-5)
    by_lists = client.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    assert torch.allclose(torch.tensor([d.embedding for d in by_lists.data]), expected, atol=1e-5)
    b64 = client.embeddings.create(model=MINILM, input=texts)  # the client asks for base64 and decodes it
    assert torch.allclose(torch.tensor([d.embedding for d in b64.data]), expected, atol=1e-5)
    raw = enc_client.post("/v1/embeddings", json={"input": "hi", "encoding_format": "base64"}).json()
    vector = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-5)
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"


def test_truncation_and_dimensions(enc_client, minilm_fp32):
    long_text = "word " * 600
    err = error(enc_client.post("/v1/embeddings", json={"input": ["ok", long_text]}), 400)
    assert err == {"message": "input[1] has 602 tokens, more than this model's maximum input length (256); shorten "
                              "it or set truncate_prompt_tokens", "type": "invalid_request_error", "param": "input",
                   "code": "context_length_exceeded"}
    full = enc_client.post("/v1/embeddings", json={"input": long_text, "truncate_prompt_tokens": -1}).json()
    cut = enc_client.post("/v1/embeddings", json={"input": long_text, "truncate_prompt_tokens": 10}).json()
    assert full["usage"]["prompt_tokens"] == 256 and cut["usage"]["prompt_tokens"] == 10
    assert error(enc_client.post("/v1/embeddings", json={"input": "x", "truncate_prompt_tokens": 257}), 400)[
        "param"] == "truncate_prompt_tokens"
    assert enc_client.post("/v1/embeddings", json={"input": "x", "dimensions": 384}).status_code == 200
    err = error(enc_client.post("/v1/embeddings", json={"input": "x", "dimensions": 128}), 400)
    assert err["param"] == "dimensions" and "does not support `dimensions`" in err["message"]


@pytest.mark.parametrize("body,message,param", [
    ({"input": ""}, "input[0] is an empty string", "input"),
    ({"input": ["ok", ""]}, "input[1] is an empty string", "input"),
    ({"input": []}, "input must not be empty", "input"),
    ({"input": [[]]}, "input[0] is an empty list of token ids", "input"),
    ({"input": ["x"] * 10_000}, "at most 2048 inputs per request, not 10000", "input"),
    ({"input": [101, 30522, 102]}, "input 0 has token ids outside the vocabulary [0, 30522)", "input"),
    ({"input": [[101, 102], [101, -1, 102]]}, "input 1 has token ids outside the vocabulary [0, 30522)", "input"),
    ({"input": "x", "model": "nope"}, None, "model"),
    ({"input": "x", "model": "cls-single"}, "the model 'cls-single' is a classifier model, not a embedding model",
     "model"),
])
def test_embeddings_bad_input(enc_client, body, message, param):
    response = enc_client.post("/v1/embeddings", json=body)
    err = error(response, 404 if body.get("model") == "nope" else 400)
    assert err["param"] == param
    if message:
        assert err["message"] == message
    else:
        assert err == {"message": "the model 'nope' does not exist; embedding models served here: "
                                  "'all-MiniLM-L6-v2'", "type": "not_found_error", "param": "model",
                       "code": "model_not_found"}


def test_no_encoder_loaded_answers_404(client):
    for path, body in (("/v1/embeddings", {"input": "x"}), ("/v1/rerank", {"query": "q", "documents": ["d"]}),
                       ("/v1/score", {"text_1": "a", "text_2": "b"})):
        assert error(client.post(path, json=body), 404) == {
            "message": "this server serves no embedding model; start it with --embedding-model default|DIR",
            "type": "not_found_error", "param": "model", "code": "model_not_found"}
    # without --classifier-model, /v1/classify is the zero-shot path; labels are then required
    assert error(client.post("/v1/classify", json={"input": "x"}), 400)["param"] == "labels"


def test_rerank_and_score(enc_client, minilm_fp32, hf_minilm):
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "France's capital city is Paris."]
    query = "What is the capital of France?"
    vectors = reference(minilm_fp32, hf_minilm, [query, *docs])
    expected = (vectors[1:] @ vectors[0]).tolist()
    body = enc_client.post("/v1/rerank", json={"query": query, "documents": docs, "top_n": 2}).json()
    assert [r["index"] for r in body["results"]] == sorted(range(3), key=lambda i: -expected[i])[:2]
    assert body["results"][0]["document"] == {"text": docs[body["results"][0]["index"]]}
    for r in body["results"]:
        assert math.isclose(r["relevance_score"], expected[r["index"]], abs_tol=1e-5)
    assert body["usage"]["total_tokens"] > 0 and body["model"] == MINILM
    bare = enc_client.post("/v1/rerank", json={"query": query, "documents": docs, "return_documents": False}).json()
    assert len(bare["results"]) == 3 and all(r["document"] is None for r in bare["results"])
    scores = enc_client.post("/v1/score", json={"text_1": query, "text_2": docs}).json()
    assert scores["object"] == "list" and [d["index"] for d in scores["data"]] == [0, 1, 2]
    assert all(math.isclose(d["score"], e, abs_tol=1e-5) for d, e in zip(scores["data"], expected))
    pairs = enc_client.post("/v1/score", json={"text_1": [query, docs[1]], "text_2": [docs[0], docs[1]]}).json()
    assert math.isclose(pairs["data"][1]["score"], 1.0, abs_tol=1e-5)
    err = error(enc_client.post("/v1/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}), 400)
    assert err["message"] == "text_1 has 2 texts and text_2 3: give one text_1, or as many as text_2"
    assert error(enc_client.post("/v1/rerank", json={"query": "q", "documents": []}), 400)["param"] == "documents"


@pytest.mark.parametrize("key,name", [("single", "cls-single"), ("multi", "cls-multi")])
def test_classify_from_a_fine_tuned_head_matches_transformers(enc_client, tiny_classifiers, key, name):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = tiny_classifiers[key]
    hf = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    texts = ["I loved it", "a longer text about the match last night and the election results", "🙂"]
    with torch.inference_mode():
        logits = hf(**tok(texts, padding=True, return_tensors="pt")).logits
    probs = torch.sigmoid(logits) if key == "multi" else torch.softmax(logits, -1)
    body = {"input": texts} if key == "single" else {"input": texts, "model": name}
    response = enc_client.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["model"] == name and out["object"] == "classification"
    labels = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
    for row, item in zip(probs.tolist(), out["data"]):
        assert list(item["scores"]) == labels
        assert max(abs(item["scores"][lab] - p) for lab, p in zip(labels, row)) < 1e-5
        assert item["label"] == labels[max(range(len(row)), key=row.__getitem__)]
        if key == "multi":
            assert item["labels"] == [lab for lab, p in zip(labels, row) if p >= 0.5]
    if key == "single":  # a subset of the labels: renormalized over it
        sub = enc_client.post("/v1/classify", json={"input": texts[0], "labels": ["positive", "negative"]}).json()
        p = dict(zip(labels, probs[0].tolist()))
        total = p["positive"] + p["negative"]
        assert math.isclose(sub["data"][0]["scores"]["positive"], p["positive"] / total, abs_tol=1e-5)
        assert list(sub["data"][0]["scores"]) == ["positive", "negative"]


def test_classify_label_not_in_the_model(enc_client):
    err = error(enc_client.post("/v1/classify", json={"input": "x", "labels": ["positive", "sarcastic"]}), 400)
    assert err == {"message": "labels ['sarcastic'] are not labels of the model 'cls-single'; its labels are "
                              "['negative', 'neutral', 'positive']", "type": "invalid_request_error",
                   "param": "labels", "code": None}
    # the generator's name still reaches the zero-shot path
    zero_shot = enc_client.post("/v1/classify", json={"input": "x", "labels": ["a", "b"], "model": "dummy:tiny"})
    assert zero_shot.status_code == 200 and zero_shot.json()["model"] == "dummy:tiny"


def test_models_lists_what_each_serves(enc_client):
    cards = {m["id"]: m for m in enc_client.get("/v1/models").json()["data"]}
    assert cards[MINILM]["capabilities"] == ["embeddings", "rerank", "score"] and cards[MINILM]["max_model_len"] == 256
    assert cards["cls-single"]["capabilities"] == ["classify"]
    assert "classify" not in cards["dummy:tiny"]["capabilities"] and "chat" in cards["dummy:tiny"]["capabilities"]


def test_concurrent_requests_share_batches_and_metrics_count_them(enc_client, encoder_engine):
    async def burst():
        transport = httpx.ASGITransport(app=enc_client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            return await asyncio.gather(*(ac.post("/v1/embeddings", json={"input": [f"text number {i}"] * 3})
                                          for i in range(16)))
    seen = []
    encoder_engine.add_encode_observer(seen.append)
    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert sum(s.num_seqs for s in seen) == 48 and max(s.num_seqs for s in seen) > 3  # requests were batched
    metrics = enc_client.get("/metrics").text
    assert 'loom_encoder_requests_total{endpoint="embeddings",model="all-MiniLM-L6-v2",outcome="ok"}' in metrics
    assert 'loom_encoder_batch_size_bucket{le="1.0",model="all-MiniLM-L6-v2"}' in metrics
    assert 'loom_encoder_tokens_total{model="all-MiniLM-L6-v2"}' in metrics


def test_timeout_answers_504(enc_client):
    err = error(enc_client.post("/v1/embeddings", json={"input": ["x"] * 64, "timeout": 1e-6}), 504)
    assert err["code"] == "request_timeout"


def test_big_inputs_are_tokenized_off_the_event_loop(enc_client, encoder_engine, monkeypatch):
    """A request with many long texts is tokenized on a worker thread (the event loop keeps answering /health);
    a small one stays on the loop, where a thread hop would cost more than the work."""
    import threading
    enc = encoder_engine.encoders["all-MiniLM-L6-v2"]
    threads = []
    original = enc.encode_texts

    def spy(texts, truncate=None):
        threads.append(threading.current_thread().name)
        return original(texts, truncate)

    monkeypatch.setattr(enc, "encode_texts", spy)
    loop_thread = enc_client.portal.call(lambda: threading.current_thread().name)
    assert enc_client.post("/v1/embeddings", json={"input": "short"}).status_code == 200
    big = enc_client.post("/v1/embeddings", json={"input": ["word " * 400] * 8, "truncate_prompt_tokens": -1})
    assert big.status_code == 200 and len(big.json()["data"]) == 8
    assert threads[0] == loop_thread and threads[1] != loop_thread
