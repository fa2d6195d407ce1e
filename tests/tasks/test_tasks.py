"""The task layer without HTTP: text chunking, the summarizer's map-reduce path, and the classifier's scoring math
(length normalization, calibration, label orders, multi-label) against a scripted fake engine."""
from __future__ import annotations

import asyncio
import math

import pytest

from server.engine import InvalidRequestError, RequestOutput, TokenLogprob
from server.tasks import Classifier, ClassifyOptions, Summarizer
from server.tasks.chunking import split_text
from server.tasks.classify import label_orders, surface_forms


# -- chunking -------------------------------------------------------------------------------------------------------
def words(text: str) -> int:
    return len(text.split())


def test_split_prefers_paragraphs_then_sentences():
    paragraphs = ["One two three. Four five six.", "Seven eight nine ten.", "Eleven twelve."]
    text = "\n\n".join(paragraphs)
    assert split_text(text, 100, words) == [text]
    assert split_text(text, 6, words) == paragraphs[:1] + paragraphs[1:2] + paragraphs[2:]
    pieces = split_text(text, 4, words)
    assert pieces == ["One two three.", "Four five six.", "Seven eight nine ten.", "Eleven twelve."]
    assert all(words(p) <= 4 for p in pieces)


def test_split_falls_back_to_words_and_hard_cuts():
    assert split_text("a b c d e f g", 3, words) == ["a b c", "d e f", "g"]
    count = len  # characters
    assert split_text("abcdefgh", 3, count, lambda t, n: [t[i:i + n] for i in range(0, len(t), n)]) == \
        ["abc", "def", "gh"]


def test_split_keeps_all_words():
    text = "\n\n".join(f"Paragraph {i}. " + " ".join(f"w{i}x{j}." for j in range(i * 3)) for i in range(12))
    pieces = split_text(text, 10, words)
    assert all(words(p) <= 10 for p in pieces)
    assert " ".join(pieces).split() == text.split()


# -- summarizer -----------------------------------------------------------------------------------------------------
def test_summarizer_map_reduce_on_the_engine(dummy_engine):
    calls = []

    async def generate(ids, params, deadline=None):
        calls.append((len(ids), params.max_tokens))
        async for out in dummy_engine.generate(ids, params):
            yield out

    doc = "\n\n".join(f"Section {i}. " + "The loom weaves threads into cloth. " * 12 for i in range(6))
    s = Summarizer(generate, dummy_engine.tokenizer, dummy_engine.max_model_len, chunk_tokens=96, max_tokens=12)
    assert s.count(doc) > 96 * 4
    result = asyncio.run(s.summarize(doc))
    assert result.done and result.map_calls >= 5
    assert len(calls) == result.usage.requests == result.map_calls + 1
    assert result.usage.completion_tokens <= 12 * len(calls)
    assert max(n for n, _ in calls) <= s._overhead + 96 + 8  # no call took more than a chunk of text
    short = asyncio.run(s.summarize("A short text about looms.", style="bullets"))
    assert short.map_calls == 0 and short.summary.startswith("-")


def test_summarizer_budget_errors(dummy_engine):
    s = Summarizer(dummy_engine.generate, dummy_engine.tokenizer, 512)
    with pytest.raises(InvalidRequestError) as e:
        asyncio.run(s.summarize("text", max_tokens=500))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError):
        asyncio.run(s.summarize("text", style="limerick"))


# -- classifier (scripted engine) -----------------------------------------------------------------------------------
class FakeTokenizer:
    """One token per character; a chat template that ends messages with '|'."""
    has_chat_template = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        out = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        return out + ("<assistant>" if add_generation_prompt else "")


def scripted_generate(score_of):
    """A fake engine whose prompt logprob for the answer's characters is score_of(context, answer) per token."""
    prompts = []

    async def generate(ids, params, deadline=None):
        assert params.max_tokens == 0 and params.prompt_logprobs == 0
        text = "".join(map(chr, ids))
        context, answer = text.rsplit("<assistant>", 1)
        prompts.append(text)
        per_token = score_of(context, answer)
        n_context = len(context) + len("<assistant>")
        lps = [None] + [TokenLogprob(i, -5.0, []) for i in ids[1:n_context]] + \
              [TokenLogprob(i, per_token, []) for i in ids[n_context:]]
        yield RequestOutput("r", 0, prompt_logprobs=lps, finish_reason="length", num_prompt_tokens=len(ids))

    generate.prompts = prompts
    return generate


def test_label_orders_and_surface_forms():
    assert label_orders(["a", "b"], 4) == [["a", "b"], ["b", "a"]]
    orders = label_orders(["a", "b", "c"], 3)
    assert len(orders) == 3 and {o[0] for o in orders} == {"a", "b", "c"}  # each label gets to be first
    assert surface_forms("positive") == ["positive", "Positive"]
    assert surface_forms("Sports") == ["Sports", "sports"]
    assert surface_forms("x", enabled=False) == ["x"]


def test_scores_are_length_normalized_probabilities():
    # same per-token logprob for a 1-token and a 9-token label: equal scores (mean, not sum)
    gen = scripted_generate(lambda ctx, ans: -1.0)
    c = Classifier(gen, FakeTokenizer(), 4096)
    opts = ClassifyOptions(calibrate=False, permutations=1, surface_forms=False)
    (res,), usage = asyncio.run(c.classify(["text"], ["a", "abcdefghi"], opts))
    assert res.scores == {"a": 0.5, "abcdefghi": 0.5}
    assert usage.requests == 2 and usage.prompt_tokens == sum(map(len, gen.prompts))


def test_calibration_removes_label_bias():
    # the model loves "pos" on every input; on the real text "neg" is only a little less liked than usual
    def score(ctx, ans):
        ans = ans.lower()
        bias = {"pos": -0.5, "neg": -3.0}[ans]
        return bias + (0.4 if "bad movie" in ctx and ans == "neg" else 0.0)

    c = Classifier(scripted_generate(score), FakeTokenizer(), 4096)
    naive, _ = asyncio.run(c.classify(["a bad movie"], ["pos", "neg"], ClassifyOptions(calibrate=False)))
    assert naive[0].label == "pos"
    calibrated, usage = asyncio.run(c.classify(["a bad movie"], ["pos", "neg"], ClassifyOptions()))
    assert calibrated[0].label == "neg" and math.isclose(sum(calibrated[0].scores.values()), 1.0, abs_tol=1e-5)
    assert usage.requests == (1 + 3) * 2 * 2 * 2  # (input + 3 content-free) x 2 labels x 2 orders x 2 spellings
    again, usage = asyncio.run(c.classify(["a bad movie"], ["pos", "neg"], ClassifyOptions()))
    assert again[0].label == "neg" and usage.requests == 1 * 2 * 2 * 2  # the bias is cached


def test_label_order_bias_is_averaged_out():
    # the model prefers whichever label is listed first; the text favours "b" slightly
    def score(ctx, ans):
        listed_first, ans = ctx.split("categories: ")[1].split(",")[0].strip(". "), ans.lower()
        return (-0.5 if ans == listed_first else -2.0) + (0.3 if ans == "b" else 0.0)

    c = Classifier(scripted_generate(score), FakeTokenizer(), 4096)
    one_order, _ = asyncio.run(c.classify(["t"], ["a", "b"], ClassifyOptions(calibrate=False, permutations=1)))
    assert one_order[0].label == "a"
    both, _ = asyncio.run(c.classify(["t"], ["a", "b"], ClassifyOptions(calibrate=False, permutations=2)))
    assert both[0].label == "b"


def test_multi_label_scores_independently():
    def score(ctx, ans):
        relevant = ('"sports"' in ctx and "match" in ctx) or ('"money"' in ctx and "prize" in ctx)
        return {"yes": -0.2 if relevant else -3.0, "no": -3.0 if relevant else -0.2}[ans.lower()]

    gen = scripted_generate(score)
    c = Classifier(gen, FakeTokenizer(), 4096)
    (res,), _ = asyncio.run(c.classify(["the match prize"], ["sports", "money", "weather"],
                                       ClassifyOptions(multi_label=True, calibrate=False)))
    assert set(res.labels) == {"sports", "money"} and res.scores["weather"] < 0.1
    assert all("Answer yes or no" in p for p in gen.prompts)


def test_examples_and_descriptions_reach_the_prompt():
    gen = scripted_generate(lambda ctx, ans: -1.0)
    c = Classifier(gen, FakeTokenizer(), 4096)
    opts = ClassifyOptions(calibrate=False, permutations=1, surface_forms=False, examples=[("great!", "pos")],
                           descriptions={"pos": "happy"})
    asyncio.run(c.classify(["x"], ["pos", "neg"], opts))
    assert all("great!" in p and "<assistant>pos|" in p and "pos: happy" in p for p in gen.prompts)
    with pytest.raises(InvalidRequestError):
        asyncio.run(c.classify(["x"], ["pos", "neg"], ClassifyOptions(examples=[("t", "other")])))


def test_classify_on_the_dummy_engine(dummy_engine):
    """Real engine plumbing: prefill-only requests, all submitted together, blocks returned."""
    c = Classifier(dummy_engine.generate, dummy_engine.tokenizer, dummy_engine.max_model_len)
    results, usage = asyncio.run(c.classify(["good", "bad", "fine"], ["positive", "negative", "neutral"]))
    assert len(results) == 3 and all(math.isclose(sum(r.scores.values()), 1.0, abs_tol=1e-4) for r in results)
    assert usage.completion_tokens == 0 and usage.requests > 0
    s = dummy_engine.stats()
    assert s.free_blocks == s.num_blocks
