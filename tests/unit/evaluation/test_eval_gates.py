from __future__ import annotations

import pytest

from airloom.evaluation.gates import Gate, check_gates, parse_gates, raise_on_failure
from airloom.exceptions import CheckFailed, UsageError

METRICS = {
    "model": "cand",
    "n": 10,
    "aggregate": {"exact_match": 0.12, "f1": 0.55, "bleu": 20.0, "perplexity": 12.0},
    "by_task": {"qa": {"exact_match": 0.5, "f1": 0.7, "n": 4}},
}
BASELINE = {"aggregate": {"exact_match": 0.2, "f1": 0.6, "bleu": 19.0, "perplexity": 10.0}}


def test_min_gate_pass_and_fail_messages():
    failed, passed = check_gates(METRICS, [Gate("exact_match", min=0.30), Gate("f1", min=0.5)])
    assert failed["passed"] is False
    assert failed["value"] == 0.12 and failed["threshold"] == 0.30
    assert "exact_match 0.12 < min 0.3 (short by 0.18)" in failed["message"]
    assert failed["message"].startswith("gate exact_match>=0.3 failed")
    assert passed["passed"] is True
    assert passed["message"] == "f1 0.55 passes f1>=0.5"
    assert set(passed) == {"gate", "metric", "value", "threshold", "passed", "message"}


def test_drop_vs_baseline():
    (ok,) = check_gates(METRICS, [Gate("f1", max_drop_vs_baseline=0.05)], BASELINE)
    assert ok["passed"] and ok["threshold"] == pytest.approx(0.55)
    (bad,) = check_gates(METRICS, [Gate("f1", max_drop_vs_baseline=0.02)], BASELINE)
    assert not bad["passed"]
    assert (
        "f1 dropped by 0.05 vs baseline (0.6 -> 0.55), more than the allowed 0.02 (over by 0.03)"
        in bad["message"]
    )


def test_perplexity_is_lower_is_better():
    results = check_gates(
        METRICS,
        [Gate("perplexity", max=11.0), Gate("perplexity", max_drop_vs_baseline=1.0)],
        BASELINE,
    )
    assert [r["passed"] for r in results] == [False, False]
    assert "perplexity 12 > max 11 (over by 1)" in results[0]["message"]
    assert "perplexity rose by 2 vs baseline" in results[1]["message"]
    assert results[1]["threshold"] == 11.0


def test_missing_metric_fails_clearly_and_no_baseline_skips_drop_check():
    missing, skipped = check_gates(METRICS, [Gate("accuracy", min=0.5), Gate("f1", max_drop_vs_baseline=0.0)])
    assert not missing["passed"] and missing["value"] is None
    assert (
        "accuracy is missing from the metrics (available: bleu, exact_match, f1, perplexity)"
        in missing["message"]
    )
    assert skipped["passed"] and "drop check skipped: no baseline" in skipped["message"]


def test_dotted_metric_reaches_per_task_scores():
    (r,) = check_gates(METRICS, [Gate("by_task.qa.f1", min=0.8)])
    assert r["value"] == 0.7 and not r["passed"]


def test_parse_gates_from_string_and_dicts():
    assert parse_gates("exact_match>=0.3, f1>=0.5") == [Gate("exact_match", min=0.3), Gate("f1", min=0.5)]
    assert parse_gates("f1>=baseline-0.02;perplexity<=baseline+1.5;perplexity<=50") == [
        Gate("f1", max_drop_vs_baseline=0.02),
        Gate("perplexity", max_drop_vs_baseline=1.5),
        Gate("perplexity", max=50.0),
    ]
    assert parse_gates([{"metric": "f1", "min": 0.5, "max_drop_vs_baseline": 0.01}]) == [
        Gate("f1", min=0.5, max_drop_vs_baseline=0.01)
    ]
    assert parse_gates(None) == []


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("exact_match > 0.3", "cannot parse gate 'exact_match > 0.3'"),
        ("f1>=high", "cannot parse gate 'f1>=high'"),
        ("f1<=baseline+0.1", "a baseline gate on f1 reads 'f1>=baseline-<allowed change>'"),
        ([{"metric": "f1", "minimum": 0.5}], r"gate 0: unknown key\(s\) \['minimum'\]"),
        ([{"min": 0.5}], "gate 0: missing 'metric'"),
        ([{"metric": "f1"}], "sets no threshold"),
        ([{"metric": "f1", "min": "high"}], "min must be a number"),
        (42, "gates must be a list of dicts or a string"),
    ],
)
def test_parse_gates_rejects_nonsense(spec, match):
    with pytest.raises(UsageError, match=match):
        parse_gates(spec)


def test_raise_on_failure_lists_failed_gates():
    results = check_gates(METRICS, parse_gates("exact_match>=0.3,f1>=0.5,bleu>=25"))
    with pytest.raises(CheckFailed, match=r"2 of 3 quality gates failed:\n- gate exact_match>=0.3 failed"):
        raise_on_failure(results)
    raise_on_failure(check_gates(METRICS, parse_gates("f1>=0.5")))
