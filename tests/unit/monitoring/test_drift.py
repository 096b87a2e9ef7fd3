"""Drift (PSI of prompt length and task mix), feedback counts and the retraining decision."""

from __future__ import annotations

import json
import math

import pytest

from airloom.monitoring.drift import (
    LENGTH_BINS,
    decide_retraining,
    drift_report,
    feedback_summary,
    length_histogram,
    psi,
    write_report,
)


def test_psi_is_zero_for_identical_distributions():
    dist = {"a": 10, "b": 30, "c": 60}
    assert psi(dist, dist) == 0.0
    assert psi(dist, {k: v * 7 for k, v in dist.items()}) == pytest.approx(0.0, abs=1e-12)  # scale-free


def test_psi_matches_the_formula():
    expected, actual = {"a": 50, "b": 50}, {"a": 80, "b": 20}
    want = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert psi(expected, actual) == pytest.approx(want)
    assert psi(expected, actual) == pytest.approx(psi(actual, expected))  # symmetric


def test_psi_small_vs_strong_shift():
    base = {"a": 25, "b": 25, "c": 25, "d": 25}
    assert psi(base, {"a": 26, "b": 24, "c": 25, "d": 25}) < 0.1
    assert psi(base, {"a": 70, "b": 10, "c": 10, "d": 10}) > 0.25
    # A bucket that appears from nowhere is a strong shift, not a division by zero.
    assert psi({"a": 100}, {"a": 50, "new": 50}) > 0.25


def test_psi_of_an_empty_side_is_none_not_a_shift():
    assert psi({}, {}) is None
    assert psi({"a": 1}, {}) is None and psi({}, {"a": 1}) is None
    assert psi({"a": 0}, {"a": 3}) is None
    empty_day = drift_report(_records({"add": 3}, 10), [])
    assert empty_day["psi_prompt_length"] is None and decide_retraining(empty_day) == []


def test_psi_is_the_histogram_psi_the_eda_uses():
    from airloom.data.divergence import psi as histogram_psi

    assert psi({"a": 50, "b": 50}, {"b": 20, "a": 80}) == histogram_psi([50, 50], [80, 20])


def test_unlabelled_traffic_has_no_task_mix_psi():
    # airloom serve logs no task: "all unknown" against a labelled training set is not a shift
    report = drift_report(_records({"add": 50, "sort": 50}, 70), [{"prompt": "p" * 70}] * 10)
    assert report["psi_task_mix"] is None and report["psi_prompt_length"] == 0.0
    assert decide_retraining(report) == []


def test_length_histogram_bins():
    prompts = ["x" * 10, "x" * 39, "x" * 40, "x" * 129, "x" * 130, "x" * 5000]
    assert length_histogram(prompts) == {
        "0-40": 2,
        "40-60": 1,
        "100-130": 1,
        "130-170": 1,
        f"250-{LENGTH_BINS[-1]}": 1,
    }
    assert sum(length_histogram(prompts).values()) == len(prompts)


def _records(task_counts: dict[str, int], length: int) -> list[dict]:
    return [{"prompt": "p" * length, "task": t} for t, n in task_counts.items() for _ in range(n)]


def test_drift_report_stable_and_shifted():
    reference = _records({"add": 50, "sort": 50}, length=70)
    same = drift_report(reference, _records({"add": 25, "sort": 25}, length=75))
    assert same["psi_prompt_length"] == 0.0 and same["psi_task_mix"] == 0.0
    assert (same["reference_rows"], same["current_rows"]) == (100, 50)
    assert decide_retraining(same) == []

    shifted = drift_report(reference, _records({"add": 5, "sort": 5, "poetry": 40}, length=200))
    assert shifted["psi_prompt_length"] > 0.25 and shifted["psi_task_mix"] > 0.25
    assert shifted["task_mix"]["current"] == {"add": 5, "sort": 5, "poetry": 40}
    assert shifted["prompt_length"]["current"] == {"170-250": 50}
    reasons = decide_retraining(shifted)
    assert [r.split()[0] for r in reasons] == ["psi_prompt_length", "psi_task_mix"]
    assert all("> 0.25" in r for r in reasons)


def test_records_without_task_count_as_unknown():
    report = drift_report([{"prompt": "a"}], [{"prompt": "b", "task": None}])
    assert report["task_mix"] == {"reference": {"unknown": 1}, "current": {"unknown": 1}}


def test_feedback_summary_counts():
    records = [{"rating": 1}] * 6 + [{"rating": -1}] * 3 + [{"rating": 0}, {"rating": "bad"}, {}]
    assert feedback_summary(records) == {
        "feedback_rows": 12,
        "thumbs_up": 6,
        "thumbs_down": 3,
        "invalid": 3,
        "negative_rate": round(3 / 9, 4),
    }
    assert feedback_summary([{"rating": 5}])["negative_rate"] is None
    assert feedback_summary([]) == {
        "feedback_rows": 0,
        "thumbs_up": 0,
        "thumbs_down": 0,
        "invalid": 0,
        "negative_rate": None,
    }


def test_decide_retraining_reasons_and_thresholds():
    assert decide_retraining({}) == []
    assert decide_retraining({"psi_prompt_length": None, "negative_rate": None}) == []
    assert decide_retraining({"psi_prompt_length": 0.25, "psi_task_mix": 0.1, "negative_rate": 0.3}) == []
    reasons = decide_retraining({"psi_prompt_length": 0.1, "psi_task_mix": 0.4, "negative_rate": 0.5})
    assert reasons == ["psi_task_mix 0.400 > 0.25", "negative feedback rate 0.50 > 0.3"]
    assert decide_retraining({"psi_task_mix": 0.4}, max_psi=0.5) == []
    assert decide_retraining({"negative_rate": 0.2}, max_negative_rate=0.1) == [
        "negative feedback rate 0.20 > 0.1"
    ]


def test_write_report(tmp_path):
    report = {
        **drift_report(_records({"a": 3}, 10), _records({"b": 3}, 10)),
        **feedback_summary([{"rating": -1}]),
    }
    path = write_report(tmp_path / "mon" / "2026-01-01", report)
    assert path.name == "monitoring.json"
    assert json.loads(path.read_text()) == report
