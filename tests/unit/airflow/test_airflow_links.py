"""Extra links through the real Airflow path: a DAG run by ``dag.test()`` on a throwaway SQLite database,
where the task runner evaluates each link when the task ends and stores the URL in XCom, and the
serialized operator (what the API server holds) reads it back. Failed tasks keep their link: a failed
suite or gate is when the report matters most. The links of tasks that need a model (day metrics,
loss curve, canary answers) read what their operators push; both halves are tested here, the whole
path by the browser test (day metrics) and the demo pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airloom.airflow.links import (
    CanaryAnswersLink,
    EdaReportLink,
    EvalReportLink,
    EvaluationDayLink,
    LossCurveLink,
    MonitoringDashboardLink,
    TrendChartLink,
    ValidationReportLink,
    files_url,
)
from tests.script_result import run_script
from tests.unit.evaluation.conftest import tiny_model_dir  # noqa: F401  (the session's tiny Llama)

ROW = {"instruction": "Name a colour", "input": "", "response": "Red"}
GOOD_ROWS = [
    {"instruction": "Name a colour of the sky on a clear day.", "input": "", "response": "Blue."},
    {"instruction": "Translate 'thank you' into German.", "input": "", "response": "Danke."},
    {"instruction": "Add the two numbers.", "input": "17 and 25", "response": "42"},
    {
        "instruction": "Write a haiku about autumn leaves.",
        "input": "",
        "response": "Red leaves drift and fall / the cold wind carries them home / branches stand alone",
    },
    {"instruction": "Which planet is known as the red planet?", "input": "", "response": "Mars."},
]


def test_files_url_is_relative_to_airloom_home_and_quoted(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("AIRLOOM_HOME", str(home))
    assert (
        files_url(home / "runs" / "d" / "run 1" / "report.html")
        == "/airloom/files/runs/d/run%201/report.html"
    )
    assert files_url(tmp_path / "elsewhere" / "report.html") == ""  # the route serves AIRLOOM_HOME only
    assert files_url(None) == ""
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://example.com/airflow/")
    assert files_url(home / "a.html") == "/airflow/airloom/files/a.html"


def test_link_names_and_xcom_keys():
    assert [
        (link.name, link.xcom_key, link.path_key)
        for link in (
            ValidationReportLink(),
            EdaReportLink(),
            EvalReportLink(),
            EvaluationDayLink(),
            TrendChartLink(),
            LossCurveLink(),
            CanaryAnswersLink(),
            MonitoringDashboardLink(),
        )
    ] == [
        ("Validation report", "_link_ValidationReportLink", "validation_report"),
        ("EDA report", "_link_EdaReportLink", "report"),
        ("Eval report", "_link_EvalReportLink", "report"),
        ("Day metrics", "_link_EvaluationDayLink", "metrics_path"),
        ("Trend chart", "_link_TrendChartLink", "return_value.plot"),
        ("Loss curve", "_link_LossCurveLink", "loss_curve"),
        ("Canary answers", "_link_CanaryAnswersLink", "canary_report"),
        ("Monitoring dashboard", "_link_MonitoringDashboardLink", "return_value.dashboard"),
    ]


@pytest.mark.parametrize(
    ("link", "xcoms", "url"),
    [
        (
            EvaluationDayLink(),
            {"metrics_path": "{home}/evaluations/m/ds=2026-01-01/v2/metrics.json"},
            "/airloom/evaluation-day/evaluations/m/ds=2026-01-01/v2/metrics.json",
        ),
        (
            LossCurveLink(),
            {"loss_curve": "{home}/runs/llm_finetune/r/train/loss_curve.png"},
            "/airloom/files/runs/llm_finetune/r/train/loss_curve.png",
        ),
        (LossCurveLink(), {"loss_curve": None}, ""),  # the recipe logged no step: no curve, no link
        (
            CanaryAnswersLink(),
            {"canary_report": "{home}/runs/llm_finetune/r/canary/canary.html"},
            "/airloom/files/runs/llm_finetune/r/canary/canary.html",
        ),
        (
            TrendChartLink(),
            {"return_value": {"dates": 2, "plot": "{home}/evaluations/m/trend.png"}},
            "/airloom/files/evaluations/m/trend.png",
        ),
        (TrendChartLink(), {"return_value": {"dates": 0, "plot": None}}, ""),
        (TrendChartLink(), {"return_value": None}, ""),  # skipped or failed: no return value
        (
            MonitoringDashboardLink(),
            {"return_value": {"dashboard": "{home}/runs/mon/r/drift_and_feedback/dashboard.html"}},
            "/airloom/files/runs/mon/r/drift_and_feedback/dashboard.html",
        ),
        (MonitoringDashboardLink(), {"return_value": {"dashboard": "/etc/passwd"}}, ""),  # outside home
    ],
)
def test_each_link_points_at_the_path_its_task_reported(link, xcoms, url, monkeypatch):
    from airflow.sdk.execution_time.xcom import XCom

    from airloom.settings import home

    def get_value(*, ti_key, key):
        value = xcoms.get(key)
        if isinstance(value, dict):
            return {k: v.format(home=home()) if isinstance(v, str) else v for k, v in value.items()}
        return value.format(home=home()) if isinstance(value, str) else value

    monkeypatch.setattr(XCom, "get_value", get_value)
    assert link.get_link(None, ti_key=None) == url


def test_the_canary_writes_its_answers_and_links_them_even_when_it_fails(
    registry, make_context, tmp_path, request
):
    from airflow.sdk.exceptions import AirflowFailException

    from airloom.airflow.operators.registry import CanaryOperator
    from tests.unit.airflow.test_airflow_canary import silenced

    model = request.getfixturevalue("tiny_model_dir")  # the session's tiny Llama, imported above
    registry.register("bot", model, metadata={}, actor="trainer")
    registry.register("bot", silenced(model, tmp_path / "silent"), metadata={}, actor="trainer")
    registry.set_alias("bot", "production", 1, actor="reviewer")
    canary = CanaryOperator(task_id="canary", model_name="bot", prompts=["Sky colour?", "Say nothing"])

    context = make_context(task_id="canary")
    out = canary.execute(context)
    page = dict(context["ti"].pushed)["canary_report"]
    assert page.endswith("/runs/llm_finetune/manual__2026-01-02T03_04_05_00_00/canary/canary.html")
    html = Path(page).read_text()
    assert "Sky colour?" in html and ">answered<" in html
    assert out["outputs"][0]["prompt"] == "Sky colour?" and out["outputs"][0]["output"].strip()

    registry.set_alias("bot", "production", 2, actor="reviewer")  # a version that answers nothing
    context = make_context(task_id="canary")
    with pytest.raises(AirflowFailException, match="empty output for every prompt"):
        canary.execute(context)
    assert dict(context["ti"].pushed) == {"canary_report": page}  # the failed task keeps its link
    assert "empty output for every prompt" in Path(page).read_text()


def _gate_inputs(folder: Path) -> dict:
    folder.mkdir(parents=True)
    predictions = folder / "predictions.jsonl"
    predictions.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"e{i}",
                    "task": "qa",
                    "prompt": f"q{i}",
                    "prediction": "a",
                    "reference": "a" if i % 2 else "b",
                    "exact_match": float(i % 2),
                    "f1": float(i % 2),
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    metrics = folder / "metrics.json"
    metrics.write_text(
        json.dumps(
            {
                "model": "m",
                "n": 4,
                "aggregate": {"exact_match": 0.5, "f1": 0.5},
                "by_task": {"qa": {"exact_match": 0.5, "f1": 0.5, "n": 4}},
            }
        )
    )
    return {"metrics_path": str(metrics), "predictions": str(predictions)}


_RUN_AND_READ_BACK = """
import json, runpy, sys
from airflow.models.serialized_dag import SerializedDagModel

dag = runpy.run_path(sys.argv[1])["dag"]
run = dag.test()
# What GET .../taskInstances/{task}/links does: the serialized DAG from the DB, the TI from the DB.
served = SerializedDagModel.get_dag(dag.dag_id)
out = {"run_id": run.run_id, "tasks": {}}
for ti in run.get_task_instances():
    task = served.get_task(ti.task_id)
    links = {name: task.get_extra_links(ti, name) for name in task.extra_links}
    out["tasks"][ti.task_id] = {"state": str(ti.state), "links": links}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory):
    """One ``dag.test()`` of validate → eda, a validation that fails, a quality gate that fails, the
    backfill's trend over a day evaluated before, and a day of monitoring.

    It runs in a child process with its own AIRFLOW_HOME and dags folder: Airflow fixes the DAG
    bundle's folder when its configuration is first read, which this test process already did.
    """
    root = tmp_path_factory.mktemp("links")
    home = root / "airloom"
    env = {
        **os.environ,
        "AIRLOOM_HOME": str(home),
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=env
    )
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in GOOD_ROWS))
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps(ROW) + "\n{not json\n")
    candidate = _gate_inputs(root / "candidate")
    day = home / "evaluations" / "m" / "ds=2026-01-01"
    day.mkdir(parents=True)
    (day / "metrics.json").write_text(
        json.dumps({"ds": "2026-01-01", "model_ref": "registry:m/1", "n": 4, "aggregate": {"f1": 0.5}})
    )
    prompts = [{"prompt": f"question number {i} " * (1 + i % 5), "task": "qa"} for i in range(60)]
    reference = root / "train.jsonl"
    reference.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (root / "traffic" / "ds=2026-01-02").mkdir(parents=True)
    (root / "traffic" / "ds=2026-01-02" / "part-0.jsonl").write_text(reference.read_text())
    (root / "dags").mkdir()
    dag_file = root / "dags" / "airloom_links_test.py"
    dag_file.write_text(
        textwrap.dedent(f"""
        from datetime import datetime
        from airflow.sdk import DAG
        from airloom.airflow.operators.data import DataProfileOperator, ValidateDataOperator
        from airloom.airflow.operators.evaluation import EvaluationTrendOperator, QualityGateOperator
        from airloom.airflow.operators.monitoring import DriftMonitorOperator

        with DAG("airloom_links_test", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
            validate = ValidateDataOperator(task_id="validate", source={str(good)!r})
            DataProfileOperator(task_id="eda", input_path=validate.output["accepted"])
            ValidateDataOperator(task_id="validate_fails", source={str(bad)!r}, on_bad_rows="fail")
            QualityGateOperator(task_id="gate_fails", candidate={candidate!r}, gates="exact_match>=0.9",
                                pool="default_pool")
            EvaluationTrendOperator(task_id="trend", model_name="m", output_uri={str(home / "evaluations")!r})
            DriftMonitorOperator(task_id="monitor", ds="2026-01-02", traffic_uri={str(root / "traffic")!r},
                                 feedback_uri={str(root / "feedback")!r}, reference_file={str(reference)!r})
    """)
    )
    return run_script(_RUN_AND_READ_BACK, str(dag_file), env=env), home


@pytest.mark.parametrize(
    ("task_id", "link", "state", "relative"),
    [
        ("validate", "Validation report", "success", "validate/validation.html"),
        ("eda", "EDA report", "success", "eda/report.html"),
        ("validate_fails", "Validation report", "failed", "validate_fails/validation.html"),
        ("gate_fails", "Eval report", "failed", "gate_fails/report.html"),
        ("monitor", "Monitoring dashboard", "success", "monitor/dashboard.html"),
    ],
)
def test_the_ui_reads_each_link_stored_when_the_task_ended(dag_run, task_id, link, state, relative):
    result, home = dag_run
    task = result["tasks"][task_id]
    assert task["state"] == state
    assert list(task["links"]) == [link]
    url = task["links"][link]
    run_folder = result["run_id"].replace(":", "_").replace("+", "_")
    assert url == f"/airloom/files/runs/airloom_links_test/{run_folder}/{relative}"
    # the URL names a file the task wrote, under AIRLOOM_HOME, where the plugin's route serves it
    assert (home / url.removeprefix("/airloom/files/")).is_file()


def test_the_trend_task_links_its_chart(dag_run):
    result, home = dag_run
    task = result["tasks"]["trend"]
    assert task["state"] == "success"
    assert task["links"] == {"Trend chart": "/airloom/files/evaluations/m/trend.png"}
    assert (home / "evaluations" / "m" / "trend.png").is_file()
