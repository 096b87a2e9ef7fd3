"""DriftMonitorOperator on hand-made partitions, and RequestRetrainingOperator's skip/emit decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowSkipException
from airflow.sdk.execution_time.context import OutletEventAccessors

from airloom.airflow.operators.monitoring import DriftMonitorOperator, RequestRetrainingOperator

DS = "2026-01-02"
TASKS = ("qa", "summarize", "classify")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text(word: str, n: int) -> str:
    """``n`` characters of repeated words (words, not one long token, so the EDA sees a vocabulary)."""
    return (word + " ") * (n // (len(word) + 1)) + word[: n % (len(word) + 1)]


def reference_rows() -> list[dict]:
    """Prompts of 20-200 characters, an even task mix: what the model was trained on."""
    return [{"prompt": text("xx", 20 + (i * 7) % 180), "task": TASKS[i % 3]} for i in range(300)]


@pytest.fixture
def data(airloom_env):
    root = airloom_env / "monitoring"
    reference = write_jsonl(root / "train.jsonl", reference_rows())
    return {"root": root, "reference": str(reference)}


def monitor(data, **kwargs) -> DriftMonitorOperator:
    return DriftMonitorOperator(
        **{
            "task_id": "drift_and_feedback",
            "traffic_uri": str(data["root"] / "traffic"),
            "feedback_uri": str(data["root"] / "feedback"),
            "reference_file": data["reference"],
            "ds": DS,
            **kwargs,
        }
    )


def write_day(data, traffic: list[dict], feedback: list[dict] | None = None) -> None:
    # Two files in one partition: the day is their union.
    half = len(traffic) // 2
    write_jsonl(data["root"] / "traffic" / f"ds={DS}" / "part-0.jsonl", traffic[:half])
    write_jsonl(data["root"] / "traffic" / f"ds={DS}" / "part-1.jsonl", traffic[half:])
    if feedback is not None:
        write_jsonl(data["root"] / "feedback" / f"ds={DS}" / "part-0.jsonl", feedback)


def test_shifted_traffic_requests_retraining(data, context, airloom_env):
    write_day(data, [{"prompt": text("yy", 400), "task": "summarize"} for _ in range(100)])
    out = monitor(data).execute(context)

    assert out["retrain"] is True
    assert len(out["reasons"]) == 3
    assert out["reasons"][0].startswith("psi_prompt_length ") and out["reasons"][0].endswith(" > 0.25")
    assert out["reasons"][1].startswith("psi_task_mix ") and out["reasons"][1].endswith(" > 0.25")
    assert out["reasons"][2].startswith("input drift vs training profile ")
    assert "instruction length" in out["reasons"][2]
    report_path = Path(out["report"])
    assert report_path == (
        (airloom_env / "home").resolve()
        / "runs/llm_finetune/manual__2026-01-02T03_04_05_00_00/task/monitoring.json"
    )
    report = json.loads(report_path.read_text())
    assert (report["ds"], report["retrain"], report["reasons"]) == (DS, True, out["reasons"])
    assert (report["reference_rows"], report["current_rows"]) == (300, 100)
    assert report["task_mix"]["current"] == {"summarize": 100}
    assert report["psi_prompt_length"] > 0.25 and report["psi_task_mix"] > 0.25
    assert report["feedback_rows"] == 0 and report["negative_rate"] is None  # no feedback partition


def test_same_distribution_does_not_retrain(data, context):
    write_day(
        data,
        reference_rows(),
        feedback=[{"id": i, "rating": 1} for i in range(9)] + [{"id": 9, "rating": -1}],
    )
    out = monitor(data).execute(context)
    assert (out["retrain"], out["reasons"]) == (False, [])
    report = json.loads(Path(out["report"]).read_text())
    assert report["psi_prompt_length"] == 0 and report["psi_task_mix"] == 0
    assert (report["thumbs_up"], report["thumbs_down"], report["negative_rate"]) == (9, 1, 0.1)


def test_negative_feedback_alone_requests_retraining(data, context):
    feedback = [{"id": i, "rating": -1 if i < 3 else 1} for i in range(4)] + [{"id": 9, "rating": 5}]
    write_day(data, reference_rows(), feedback=feedback)
    # Thresholds arrive as rendered template strings in the DAG.
    out = monitor(data, max_psi="0.25", max_negative_rate="0.5").execute(context)
    assert out["retrain"] is True
    assert out["reasons"] == ["negative feedback rate 0.75 > 0.5"]
    assert json.loads(Path(out["report"]).read_text())["invalid"] == 1


def test_thresholds_decide(data, context):
    # A mild shift: half of the traffic is one task. Below a lax threshold, above a strict one.
    traffic = reference_rows()[:150] + [{"prompt": text("zz", 50), "task": "qa"} for _ in range(150)]
    write_day(data, traffic)
    assert monitor(data, max_psi=5.0).execute(context)["retrain"] is False
    assert monitor(data, max_psi=0.01).execute(context)["retrain"] is True


def test_missing_traffic_partition_skips(data, context):
    with pytest.raises(AirflowSkipException, match=rf"no traffic partition .*traffic/ds={DS}"):
        monitor(data).execute(context)


def test_missing_reference_skips(data, context, airloom_env):
    write_day(data, reference_rows())
    with pytest.raises(AirflowSkipException, match=r"no training reference \(no prepared dataset\)"):
        monitor(data, reference_file="").execute(context)
    with pytest.raises(AirflowSkipException, match=r"no training reference \(.*nope\.jsonl\)"):
        monitor(data, reference_file=str(airloom_env / "nope.jsonl")).execute(context)


def test_empty_reference_uses_the_latest_prepared_dataset(data, context, airloom_env):
    dataset = airloom_env / "home" / "datasets" / "v1"
    write_jsonl(dataset / "train.jsonl", reference_rows())
    (dataset.parent / "latest.json").write_text(json.dumps({"path": str(dataset)}))
    write_day(data, reference_rows())
    out = monitor(data, reference_file="").execute(context)
    assert out["retrain"] is False


def test_request_retraining_skips_without_retrain(context):
    for decision in ({"retrain": False, "reasons": [], "report": "r.json"}, {}, None):
        op = RequestRetrainingOperator(task_id="request_retraining", decision=decision)
        with pytest.raises(AirflowSkipException, match="no drift or feedback threshold crossed"):
            op.execute(context)


def test_request_retraining_emits_reasons_on_the_asset_event(context):
    asset = Asset("airloom://retraining-request")
    decision = {"retrain": True, "reasons": ["psi_task_mix 1.200 > 0.25"], "report": "/runs/monitoring.json"}
    op = RequestRetrainingOperator(task_id="request_retraining", decision=decision, outlets=[asset])
    context["outlet_events"] = OutletEventAccessors()
    assert op.execute(context) == decision
    assert context["outlet_events"][asset].extra == {
        "reasons": ["psi_task_mix 1.200 > 0.25"],
        "report": "/runs/monitoring.json",
        "requested_by": "trainer",
    }


def test_monitor_output_feeds_request_retraining(data, context):
    write_day(data, [{"prompt": text("yy", 400), "task": "summarize"} for _ in range(50)])
    decision = monitor(data).execute(context)
    asset = Asset("airloom://retraining-request")
    context["outlet_events"] = OutletEventAccessors()
    RequestRetrainingOperator(task_id="request_retraining", decision=decision, outlets=[asset]).execute(
        context
    )
    assert context["outlet_events"][asset].extra["report"] == decision["report"]


def served_rows(n: int, seed: int) -> list[dict]:
    from airloom.data.synth import generate_records
    from airloom.prompts import render_prompt

    return [
        {"id": str(i), "prompt": render_prompt(r["instruction"], r["input"]), "response": r["response"]}
        for i, r in enumerate(generate_records(n, seed=seed))
    ]


def test_reference_is_the_newest_datasets_eda_profile(data, context, airloom_env):
    """llm_data_quality's eda_report profile, found through latest.json's dag_id/run_id."""
    from airloom.data.eda import build_profile
    from airloom.data.synth import generate_records
    from airloom.settings import run_dir

    run_id = "manual__2026-01-01T00:00:00+00:00"
    dataset = run_dir("llm_data_quality", run_id, "prepare")
    write_jsonl(dataset / "train.jsonl", reference_rows())
    (dataset.parents[3] / "datasets").mkdir(parents=True, exist_ok=True)
    (dataset.parents[3] / "datasets" / "latest.json").write_text(
        json.dumps({"path": str(dataset), "dag_id": "llm_data_quality", "run_id": run_id})
    )
    profile = run_dir("llm_data_quality", run_id, "eda_report") / "profile.json"
    build_profile(list(generate_records(300, seed=0)), profile.parent, near_duplicate_threshold=None)
    write_day(data, served_rows(40, seed=3))
    out = monitor(data, reference_file="").execute(context)
    report = json.loads(Path(out["report"]).read_text())
    drift = report["input_drift"]
    assert drift["reference_profile"] == str(profile) and drift["reference_rows"] == 300
    assert drift["current_rows"] == 40 and drift["input_psi"] < 0.25
    assert not any(r.startswith("input drift") for r in out["reasons"])
    page = Path(out["dashboard"]).read_text()
    assert "Input drift vs. training data (300 rows → 40 today)" in page
    assert "href='traffic_profile/report.html'" in page

    profile.unlink()  # no EDA profile: the train split is profiled instead
    out = monitor(data, reference_file="").execute(context)
    drift = json.loads(Path(out["report"]).read_text())["input_drift"]
    assert (
        drift["reference_profile"].endswith("reference_profile/profile.json")
        and drift["reference_rows"] == 300
    )


def test_missing_explicit_profile_skips(data, context, airloom_env):
    write_day(data, reference_rows())
    with pytest.raises(AirflowSkipException, match=r"no training reference \(.*gone/profile\.json\)"):
        monitor(data, reference_profile=str(airloom_env / "gone" / "profile.json")).execute(context)


def test_corrections_become_a_dataset_partition_and_an_asset_event(data, context, airloom_env):
    from airloom.airflow.operators.monitoring import PublishFeedbackDatasetOperator

    rows = served_rows(4, seed=1)
    write_day(
        data,
        rows,
        feedback=[
            {
                "id": "f1",
                "response_id": "0",
                "rating": -1,
                "prompt": rows[0]["prompt"],
                "corrected_answer": "fixed",
            },
            {
                "id": "f2",
                "response_id": "0",
                "rating": -1,
                "prompt": rows[0]["prompt"],
                "corrected_answer": "fixed",
            },
            {"id": "f3", "response_id": "1", "rating": 1, "prompt": rows[1]["prompt"]},
        ],
    )
    corrections = airloom_env / "feedback_datasets"
    decision = monitor(data, corrections_uri=str(corrections)).execute(context)
    target = corrections / f"ds={DS}" / "instructions.jsonl"
    assert decision["corrected_dataset"] == str(target)
    (row,) = [json.loads(line) for line in target.read_text().splitlines()]
    assert row["response"] == "fixed" and row["source"] == "feedback"
    entry = decision["feedback_dataset"]
    assert (entry["rows"], entry["dropped"], entry["ds"]) == (1, {"duplicate": 1}, DS)
    import hashlib

    assert entry["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()

    asset = Asset("feedback_dataset")
    context["outlet_events"] = OutletEventAccessors()
    op = PublishFeedbackDatasetOperator(
        task_id="publish_feedback_dataset", decision=decision, outlets=[asset]
    )
    assert op.execute(context) == {"path": str(target), "rows": 1, "sha256": entry["sha256"], "ds": DS}
    assert context["outlet_events"][asset].extra["path"] == str(target)

    # A rerun of the day without corrections leaves no stale version behind, and publishes nothing.
    write_day(
        data, rows, feedback=[{"id": "f3", "response_id": "1", "rating": 1, "prompt": rows[1]["prompt"]}]
    )
    decision = monitor(data, corrections_uri=str(corrections)).execute(context)
    assert decision["corrected_dataset"] is None and not target.exists()
    with pytest.raises(AirflowSkipException, match="no corrected answers"):
        PublishFeedbackDatasetOperator(task_id="publish_feedback_dataset", decision=decision).execute(context)
