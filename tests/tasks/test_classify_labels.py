"""The label math of classification, without a model: a fine-tuned head's probabilities restricted to the labels
asked for, and the decision from calibrated zero-shot scores (softmax, or a sigmoid per label with the multi-label
threshold)."""
import math

import pytest

from server.tasks import head_classification
from server.tasks.classify import MULTI_LABEL_THRESHOLD, decide

OWN = ["negative", "neutral", "positive"]


def test_a_subset_of_a_single_label_head_is_renormalized():
    result = head_classification([0.2, 0.2, 0.6], OWN, ["positive", "negative"], multi_label=False)
    assert result.scores == pytest.approx({"positive": 0.75, "negative": 0.25})
    assert result.label == "positive" and result.labels is None


def test_all_labels_of_a_single_label_head_are_kept_as_they_are():
    result = head_classification([0.1, 0.3, 0.6], OWN, OWN, multi_label=False)
    assert result.scores == {"negative": 0.1, "neutral": 0.3, "positive": 0.6}


def test_a_multi_label_head_keeps_each_probability_and_picks_those_over_the_threshold():
    result = head_classification([0.9, MULTI_LABEL_THRESHOLD, 0.2], OWN, ["positive", "neutral", "negative"],
                                 multi_label=True)
    assert result.scores == {"positive": 0.2, "neutral": 0.5, "negative": 0.9}  # not renormalized
    assert result.label == "negative" and result.labels == ["neutral", "negative"]


def test_decide_single_label_is_a_softmax_of_the_scores():
    result = decide(["a", "b"], [0.0, math.log(3)], multi_label=False)
    assert result.scores == {"a": 0.25, "b": 0.75} and result.label == "b" and result.labels is None


def test_decide_multi_label_is_a_sigmoid_of_each_log_odds():
    result = decide(["a", "b", "c"], [math.log(4), 0.0, -1000.0], multi_label=True)
    assert result.scores == {"a": 0.8, "b": 0.5, "c": 0.0}
    assert result.label == "a" and result.labels == ["a", "b"]
