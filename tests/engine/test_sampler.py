"""Sampler against plain per-row references: top-k / top-p / min-p sets, penalties, seeded reproducibility
regardless of batch composition, logprobs."""
import math

import pytest
import torch

from server.engine.sampler import Sampler, apply_penalties, filter_logits
from server.engine.sampling_params import InvalidRequestError, SamplingParams
from tests.support.models import make_seq

VOCAB = 50


def reference_allowed(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Tokens a plain, one-row-at-a-time implementation keeps."""
    probs = logits.softmax(-1).tolist()
    keep = set(range(len(probs)))
    if min_p > 0:
        keep = {i for i in keep if probs[i] >= min_p * max(probs)}
    ranked = sorted(keep, key=lambda i: -logits[i].item())
    if top_k > 0:
        ranked = ranked[:top_k]
    if top_p < 1:
        sub = torch.tensor([logits[i].item() for i in ranked]).softmax(-1).tolist()
        kept, mass = [], 0.0
        for i, p in zip(ranked, sub):
            if mass >= top_p:
                break
            kept.append(i)
            mass += p
        ranked = kept
    return set(ranked)


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.2),
                                               (10, 0.8, 0.05), (1, 0.9, 0.0), (0, 0.01, 0.0)])
def test_filter_matches_reference(top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB) * 3
    n = logits.shape[0]
    out = filter_logits(logits, torch.full((n,), top_k), torch.full((n,), top_p), torch.full((n,), min_p))
    for row in range(n):
        kept = set(torch.isfinite(out[row]).nonzero().flatten().tolist())
        assert kept == reference_allowed(logits[row], top_k, top_p, min_p)
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)])


def test_rows_keep_their_own_parameters():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    out = filter_logits(logits, torch.tensor([0, 3, 0]), torch.tensor([1.0, 1.0, 0.3]), torch.tensor([0.0, 0.0, 0.0]))
    assert torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1]).sum() == 3
    assert set(torch.isfinite(out[2]).nonzero().flatten().tolist()) == reference_allowed(logits[2], 0, 0.3, 0)


def test_penalties_match_reference():
    torch.manual_seed(2)
    logits = torch.randn(2, VOCAB)
    a = make_seq([1, 2, 3], 0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3)
    a.token_ids += [4, 4, 1]
    b = make_seq([5], 1)  # no penalties: untouched
    out = apply_penalties(logits, [a, b])
    expected = logits[0].clone()
    for tok in range(VOCAB):
        count = a.output_token_ids.count(tok)
        expected[tok] -= 0.25 * count + 0.5 * (count > 0)
        if tok in a.token_ids:
            expected[tok] = expected[tok] / 1.3 if expected[tok] > 0 else expected[tok] * 1.3
    torch.testing.assert_close(out[0], expected)
    assert torch.equal(out[1], logits[1])


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    torch.manual_seed(3)
    logits = torch.randn(4, VOCAB)
    seqs = [make_seq([1], i, temperature=0.0, logprobs=3) for i in range(4)]
    result = Sampler()(logits, seqs)
    assert result.token_ids == logits.argmax(-1).tolist()
    lsm = logits.log_softmax(-1)
    for row, lp in enumerate(result.logprobs):
        assert math.isclose(lp.logprob, lsm[row].max().item(), rel_tol=1e-6)
        assert [t for t, _ in lp.top] == lsm[row].topk(3).indices.tolist()


def test_seeded_sampling_ignores_batch_composition():
    torch.manual_seed(4)
    logits = torch.randn(3, VOCAB)

    def draw(rows, seqs, steps=20):
        sampler = Sampler(seed=123)
        return [sampler(logits[rows], seqs).token_ids for _ in range(steps)]

    alone = draw([1], [make_seq([1], 0, temperature=1.0, seed=42)])
    crowd = draw([0, 1, 2], [make_seq([1], 1, temperature=0.7), make_seq([1], 2, temperature=1.0, seed=42),
                             make_seq([1], 3, temperature=1.0, top_k=3)])
    assert [a[0] for a in alone] == [c[1] for c in crowd]
    assert len({a[0] for a in alone}) > 1, "20 draws at temperature 1 should not all be equal"


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-9] * (VOCAB - 3)]))
    sampler = Sampler(seed=0)
    seq = make_seq([1], 0, temperature=1.0)
    counts = torch.bincount(torch.tensor([sampler(logits, [seq]).token_ids[0] for _ in range(3000)]), minlength=3)
    assert abs(counts[0].item() / 3000 - 0.7) < 0.04 and abs(counts[2].item() / 3000 - 0.1) < 0.03


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -1, "temperature"), ("top_p", 0.0, "top_p"), ("top_k", -5, "top_k"), ("min_p", 1.5, "min_p"),
    ("max_tokens", -1, "max_tokens"), ("n", 0, "n must be"), ("logprobs", 21, "logprobs"),
    ("presence_penalty", 3, "presence_penalty"), ("repetition_penalty", 0, "repetition_penalty"),
    ("stop", [""], "stop"), ("seed", -1, "seed")])
def test_invalid_parameters_are_named(field, value, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


@pytest.mark.parametrize("params", [dict(temperature=1e-50), dict(temperature=1e-6),
                                    dict(temperature=1.0, top_p=1e-46), dict(temperature=0.7, top_p=1e-7)])
def test_vanishing_temperature_or_top_p_picks_the_most_likely_token(params):
    """A temperature below GREEDY_BELOW is greedy, and a top_p that float32 would round to 0 still keeps the most
    likely token (before: garbage tokens from inf/NaN logits or an empty nucleus)."""
    torch.manual_seed(5)
    logits = torch.randn(3, VOCAB) * 4
    seqs = [make_seq([1], i, **params) for i in range(3)]
    assert Sampler(seed=0)(logits, seqs).token_ids == logits.argmax(-1).tolist()
