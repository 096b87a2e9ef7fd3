"""Extra links (Validation report, EDA report, Eval report) through the real Airflow path: a DAG run by
``dag.test()`` on a throwaway SQLite database, where the task runner evaluates each link when the
task ends and stores the URL in XCom, and the serialized operator (what the API server holds) reads
it back. Failed tasks keep their link: a failed suite or gate is when the report matters most."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airloom.airflow.links import EdaReportLink, EvalReportLink, ValidationReportLink, files_url

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
        for link in (ValidationReportLink(), EdaReportLink(), EvalReportLink())
    ] == [
        ("Validation report", "_link_ValidationReportLink", "validation_report"),
        ("EDA report", "_link_EdaReportLink", "report"),
        ("Eval report", "_link_EvalReportLink", "report"),
    ]


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
    """One ``dag.test()`` of validate → eda, a validation that fails and a quality gate that fails.

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
    (root / "dags").mkdir()
    dag_file = root / "dags" / "airloom_links_test.py"
    dag_file.write_text(
        textwrap.dedent(f"""
        from datetime import datetime
        from airflow.sdk import DAG
        from airloom.airflow.operators.data import DataProfileOperator, ValidateDataOperator
        from airloom.airflow.operators.evaluation import QualityGateOperator

        with DAG("airloom_links_test", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
            validate = ValidateDataOperator(task_id="validate", source={str(good)!r})
            DataProfileOperator(task_id="eda", input_path=validate.output["accepted"])
            ValidateDataOperator(task_id="validate_fails", source={str(bad)!r}, on_bad_rows="fail")
            QualityGateOperator(task_id="gate_fails", candidate={candidate!r}, gates="exact_match>=0.9",
                                pool="default_pool")
    """)
    )
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_AND_READ_BACK, str(dag_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT ")), home


@pytest.mark.parametrize(
    ("task_id", "link", "state", "relative"),
    [
        ("validate", "Validation report", "success", "validate/validation.html"),
        ("eda", "EDA report", "success", "eda/report.html"),
        ("validate_fails", "Validation report", "failed", "validate_fails/validation.html"),
        ("gate_fails", "Eval report", "failed", "gate_fails/report.html"),
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
