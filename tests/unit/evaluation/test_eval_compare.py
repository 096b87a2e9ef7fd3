from __future__ import annotations

import random

import numpy as np
import pytest

from airloom.evaluation.compare import bootstrap_mean, paired_bootstrap, paired_comparison, scores_by_id
from airloom.exceptions import UsageError


def _scores(n: int, p: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.random() < p) for _ in range(n)]


def test_clear_improvement_has_an_interval_above_zero():
    base = _scores(200, 0.4, seed=1)
    cand = [1.0 if b == 1.0 or i % 3 == 0 else 0.0 for i, b in enumerate(base)]  # fixes a third of the misses
    result = paired_bootstrap(cand, base)
    assert set(result) == {"delta", "low", "high", "p_value", "n"}
    assert result["delta"] == pytest.approx(np.mean(cand) - np.mean(base))
    assert 0 < result["low"] < result["delta"] < result["high"]
    assert result["p_value"] < 0.01 and result["n"] == 200


def test_no_difference_is_not_significant_and_identical_scores_give_a_point():
    base = _scores(100, 0.5, seed=2)
    shuffled = _scores(100, 0.5, seed=3)
    noisy = paired_bootstrap(shuffled, base)
    assert noisy["low"] < 0 < noisy["high"] and noisy["p_value"] > 0.5
    same = paired_bootstrap(base, base)
    assert same == {"delta": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "n": 100}


def test_interval_matches_a_plain_numpy_bootstrap_and_is_deterministic():
    cand, base = _scores(50, 0.6, seed=4), _scores(50, 0.5, seed=5)
    result = paired_bootstrap(cand, base, n_resamples=500, seed=7, confidence=0.9)
    rng = np.random.default_rng(7)
    diff = np.array(cand) - np.array(base)
    means = diff[rng.integers(0, 50, size=(500, 50))].mean(axis=1)
    assert result["low"] == pytest.approx(np.quantile(means, 0.05))
    assert result["high"] == pytest.approx(np.quantile(means, 0.95))
    assert paired_bootstrap(cand, base, n_resamples=500, seed=7, confidence=0.9) == result
    assert paired_bootstrap(cand, base, n_resamples=500, seed=8, confidence=0.9) != result
    # A wider confidence gives a wider interval.
    wide = paired_bootstrap(cand, base, n_resamples=500, seed=7, confidence=0.99)
    assert wide["low"] <= result["low"] and wide["high"] >= result["high"]


def test_pairs_by_id_whatever_the_order():
    cand = {"a": 1.0, "b": 0.0, "c": 1.0, "only-candidate": 1.0}
    base = {"c": 0.0, "b": 0.0, "a": 0.0}
    result = paired_bootstrap(cand, base, n_resamples=200)
    assert result["n"] == 3 and result["delta"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("cand", "base", "kwargs", "match"),
    [
        ([1.0], [1.0, 0.0], {}, "got 1 candidate but 2 baseline scores"),
        ({"a": 1.0}, {"b": 1.0}, {}, "share no example ids"),
        ({"a": 1.0}, [1.0], {}, "pass both score sets keyed by example id"),
        ([], [], {}, "evaluation set is empty"),
        ([1.0], [0.0], {"confidence": 95}, "confidence must be between 0 and 1"),
        ([1.0], [0.0], {"n_resamples": 0}, "n_resamples must be at least 1"),
    ],
)
def test_bad_inputs(cand, base, kwargs, match):
    with pytest.raises(UsageError, match=match):
        paired_bootstrap(cand, base, **kwargs)


def test_bootstrap_mean_brackets_the_mean():
    scores = _scores(80, 0.3, seed=6)
    result = bootstrap_mean(scores)
    assert result["mean"] == pytest.approx(np.mean(scores))
    assert result["low"] < result["mean"] < result["high"]
    assert result["n"] == 80


def test_paired_comparison_covers_each_shared_per_example_metric():
    cand = [{"id": f"e{i}", "exact_match": float(i % 2), "f1": 0.8, "rougeL": 0.5} for i in range(10)]
    base = [{"id": f"e{i}", "exact_match": 0.0, "f1": 0.6} for i in range(10)]
    base[0]["math_exact_match"] = 1.0  # one side only: not compared
    result = paired_comparison(cand, base, n_resamples=100)
    assert set(result) == {"exact_match", "f1"}
    assert result["f1"]["delta"] == pytest.approx(0.2) and result["f1"]["low"] == pytest.approx(0.2)
    assert result["exact_match"]["delta"] == pytest.approx(0.5)


def test_scores_by_id_rejects_rows_without_or_with_repeated_ids():
    assert scores_by_id([{"id": 1, "f1": 0.5}, {"id": 2}], "f1") == {1: 0.5}
    with pytest.raises(UsageError, match="candidate: row 0 has no 'id'"):
        scores_by_id([{"f1": 0.5}], "f1", "candidate")
    with pytest.raises(UsageError, match="id 'x' appears twice"):
        scores_by_id([{"id": "x", "f1": 0.5}, {"id": "x", "f1": 0.1}], "f1")
