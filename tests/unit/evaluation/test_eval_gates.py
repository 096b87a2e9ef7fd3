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


def _rows(values, prefix="e"):
    return [{"id": f"{prefix}{i}", "exact_match": v, "f1": v} for i, v in enumerate(values)]


def test_parse_ci_gates():
    assert parse_gates("f1:ci_low>=baseline-0.05, exact_match:ci_low >= 0.3") == [
        Gate("f1", max_drop_vs_baseline=0.05, use_ci_low=True),
        Gate("exact_match", min=0.3, use_ci_low=True),
    ]
    assert parse_gates([{"metric": "f1", "max_drop_vs_baseline": 0.05, "use_ci_low": True}]) == [
        Gate("f1", max_drop_vs_baseline=0.05, use_ci_low=True)
    ]
    assert Gate("f1", max_drop_vs_baseline=0.05, use_ci_low=True).describe() == "f1:ci_low>=baseline-0.05"
    with pytest.raises(UsageError, match="a CI gate reads 'f1:ci_low>=<value>'"):
        parse_gates("f1:ci_low<=0.9")
    with pytest.raises(UsageError, match="use_ci_low applies to per-example, higher-is-better metrics"):
        Gate("perplexity", max_drop_vs_baseline=1.0, use_ci_low=True)
    with pytest.raises(UsageError, match="use_ci_low needs min or max_drop_vs_baseline"):
        Gate("f1", max=0.9, use_ci_low=True)


def test_ci_gate_is_stricter_than_the_point_estimate_on_a_small_noisy_set():
    # 20 examples; the candidate loses 2 and wins 1: a drop of 0.05, within a 0.06 allowance,
    # but the interval's lower bound is well below -0.06.
    base = [1.0] * 10 + [0.0] * 10
    cand = [1.0] * 8 + [0.0, 0.0] + [1.0] + [0.0] * 9
    cand_metrics = {"aggregate": {"f1": sum(cand) / 20}}
    base_metrics = {"aggregate": {"f1": sum(base) / 20}}
    point, ci = check_gates(
        cand_metrics,
        parse_gates("f1>=baseline-0.06, f1:ci_low>=baseline-0.06"),
        base_metrics,
        candidate_examples=_rows(cand),
        baseline_examples=_rows(base),
    )
    assert point["passed"] and "ci" not in point
    assert not ci["passed"]
    assert ci["ci"]["vs_baseline"]["delta"] == pytest.approx(-0.05)
    assert ci["ci"]["vs_baseline"]["low"] < -0.06
    assert ci["threshold"] == pytest.approx(0.44)  # baseline 0.5 - 0.06
    assert "f1 change vs baseline has CI lower bound -0.2" in ci["message"]
    assert (
        "below the allowed -0.06" in ci["message"] and "95% CI" in ci["message"] and "n=20" in ci["message"]
    )


def test_ci_gate_passes_a_clear_improvement_and_reads_per_example_from_metrics():
    base = [0.0] * 30 + [1.0] * 10
    cand = [1.0] * 30 + [1.0] * 10
    cand_metrics = {"aggregate": {"exact_match": 1.0}, "per_example": _rows(cand)}
    base_metrics = {"aggregate": {"exact_match": 0.25}, "per_example": _rows(base)}
    (r,) = check_gates(cand_metrics, parse_gates("exact_match:ci_low>=baseline"), base_metrics)
    assert r["passed"] and r["ci"]["vs_baseline"]["low"] > 0.5
    assert r["message"].startswith(
        "exact_match 1 passes exact_match:ci_low>=baseline-0 (change +0.75, 95% CI"
    )


def test_absolute_ci_gate_uses_the_candidates_own_interval():
    rows = _rows([1.0] * 4 + [0.0] * 6)  # mean 0.4 on only 10 examples
    metrics = {"aggregate": {"exact_match": 0.4}}
    plain, ci = check_gates(
        metrics, parse_gates("exact_match>=0.3, exact_match:ci_low>=0.3"), candidate_examples=rows
    )
    assert plain["passed"] and not ci["passed"]
    assert ci["ci"]["mean"]["low"] < 0.3 < ci["ci"]["mean"]["high"]
    assert "exact_match CI lower bound" in ci["message"] and "< min 0.3" in ci["message"]


def test_ci_gate_without_per_example_scores_fails_and_without_baseline_skips():
    metrics = {"aggregate": {"f1": 0.5}}
    (missing,) = check_gates(metrics, parse_gates("f1:ci_low>=baseline-0.05"), {"aggregate": {"f1": 0.5}})
    assert not missing["passed"]
    assert "needs the candidate's per-example f1 scores with ids" in missing["message"]
    (base_missing,) = check_gates(
        metrics,
        parse_gates("f1:ci_low>=baseline-0.05"),
        {"aggregate": {"f1": 0.5}},
        candidate_examples=_rows([0.5]),
    )
    assert "needs the baseline's per-example f1 scores" in base_missing["message"]
    (first,) = check_gates(
        metrics, parse_gates("f1:ci_low>=baseline-0.05"), None, candidate_examples=_rows([0.5])
    )
    assert first["passed"] and "drop check skipped: no baseline" in first["message"]
    (disjoint,) = check_gates(
        metrics,
        parse_gates("f1:ci_low>=baseline-0.05"),
        {"aggregate": {"f1": 0.5}},
        candidate_examples=_rows([0.5]),
        baseline_examples=_rows([0.5], prefix="other"),
    )
    assert "share no example ids" in disjoint["message"] and not disjoint["passed"]
