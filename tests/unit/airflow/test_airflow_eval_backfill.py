"""PartitionEvaluationOperator across an alias move: each day scored by the version live that day.

Two registered versions of a tiny real model; ``production`` moves v1 -> v2 in the middle of a day
(the registry's clock is set, so the audit trail says when). Each day is then evaluated as a daily
backfill would, through the operator with the DAG's default ``model_version=of_the_day``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

import airloom.registry.registry as registry_module
from airloom.airflow.operators.evaluation import EvaluationTrendOperator, PartitionEvaluationOperator
from tests.unit.evaluation.conftest import tiny_model_dir  # noqa: F401  (the session's tiny Llama)

MODEL = "bot"
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]


@pytest.fixture
def history(airloom_env) -> Path:
    root = airloom_env / "history"
    for ds in ["2025-12-31", *DAYS]:
        part = root / f"ds={ds}" / "part-0.jsonl"
        part.parent.mkdir(parents=True)
        rows = [
            {
                "id": f"{ds}-{i}",
                "prompt": "### Instruction:\nName a colour.\n### Response:\n",
                "response": "Red",
            }
            for i in range(2)
        ]
        part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def moved(registry, tiny_model_dir):  # noqa: F811
    """v1 at production from 2026-01-01 12:00 UTC, v2 from 2026-01-03 09:00 UTC (mid-day)."""
    for _ in range(2):
        registry.register(MODEL, tiny_model_dir, metadata={}, actor="trainer")
    for version, at in [(1, datetime(2026, 1, 1, 12, tzinfo=UTC)), (2, datetime(2026, 1, 3, 9, tzinfo=UTC))]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(registry_module, "now", lambda at=at: at)  # the audit trail's clock
            registry.set_alias(MODEL, "production", version, actor="reviewer", reason="test")
    return registry


def evaluate(history, airloom_env, ds, **kwargs) -> PartitionEvaluationOperator:
    return PartitionEvaluationOperator(
        task_id="evaluate_partition",
        model_name=MODEL,
        ds=ds,
        history_uri=str(history),
        output_uri=str(airloom_env / "evaluations"),
        **kwargs,
    )


def test_model_of_the_day_across_an_alias_move(history, moved, airloom_env, make_context):
    out = airloom_env / "evaluations" / MODEL

    with pytest.raises(AirflowSkipException, match=r"no version of bot was at production when ds=2025-12-31"):
        evaluate(history, airloom_env, "2025-12-31").execute(make_context())
    results = {ds: evaluate(history, airloom_env, ds).execute(make_context()) for ds in DAYS}

    # Days before the move: v1; the day of the move (v2 when it ended) and after: v2.
    assert {ds: r["version"] for ds, r in results.items()} == {
        "2026-01-01": 1,
        "2026-01-02": 1,
        "2026-01-03": 2,
        "2026-01-04": 2,
    }
    for ds, r in results.items():
        metrics = json.loads(Path(r["metrics_path"]).read_text())
        assert Path(r["metrics_path"]) == out / f"ds={ds}" / f"v{r['version']}" / "metrics.json"
        assert (metrics["model_ref"], metrics["live_version"], metrics["n"]) == (
            f"registry:bot/{r['version']}",
            r["version"],
            2,
        )

    # Today's production version scores an old day next to the one live then; both stay.
    current = evaluate(history, airloom_env, "2026-01-01", model_version="current").execute(make_context())
    assert (current["version"], current["live_version"]) == (2, 1)
    assert sorted(p.name for p in (out / "ds=2026-01-01").iterdir()) == ["v1", "v2"]

    # A rerun rewrites its own day and version only.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    rerun = evaluate(history, airloom_env, "2026-01-02").execute(make_context())
    after = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    assert [p for p in after if after[p] != before[p]] == [Path(rerun["metrics_path"])]
    assert after.keys() == before.keys()

    trend = EvaluationTrendOperator(task_id="trend", model_name=MODEL, output_uri=str(out.parent)).execute(
        make_context()
    )
    assert trend["changes"] == [{"ds": "2026-01-03", "from": 1, "to": 2}]
    rows = json.loads((out / "trend.json").read_text())["rows"]
    assert [(r["ds"], r["version"]) for r in rows] == [
        ("2026-01-01", 1),
        ("2026-01-01", 2),
        ("2026-01-02", 1),
        ("2026-01-03", 2),
        ("2026-01-04", 2),
    ]


def test_pinned_version_wins_and_bad_choice_fails(history, moved, airloom_env, make_context):
    pinned = evaluate(history, airloom_env, "2026-01-04", version=1).execute(make_context())
    assert (pinned["version"], pinned["live_version"]) == (1, 2)
    with pytest.raises(
        AirflowFailException, match=r"model_version must be 'of_the_day' or 'current', got 'latest'"
    ):
        evaluate(history, airloom_env, "2026-01-04", model_version="latest").execute(make_context())


def test_a_day_that_has_not_ended_is_skipped(history, airloom_env, make_context):
    today = datetime.now(UTC).date().isoformat()
    with pytest.raises(AirflowSkipException, match=rf"ds={today} has not ended yet"):
        evaluate(history, airloom_env, today).execute(make_context())
