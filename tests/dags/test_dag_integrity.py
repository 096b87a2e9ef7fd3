"""The DAG files: they import, have the five expected DAGs, documented and owned, and stay cheap to parse."""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
EXPECTED = {"llm_data_quality", "llm_finetune", "llm_eval_backfill", "llm_feedback_monitoring", "llm_model_rollback"}
HEAVY = ("torch", "transformers", "deepspeed", "peft", "datasets", "great_expectations", "evaluate", "pandas")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_the_five_dags(dagbag):
    assert set(dagbag.dag_ids) == EXPECTED


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_dag_is_documented_owned_and_retried(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.doc_md and dag_id in dag.doc_md
    assert "airloom" in dag.tags
    for task in dag.tasks:
        assert task.owner == "airloom", task.task_id
        assert task.retries is not None, task.task_id
    assert any(t.retries > 0 for t in dag.tasks), "at least the idempotent tasks retry"
    # Every run option is a Param with a JSON schema, so the UI trigger form validates input.
    assert dag.params, dag_id
    for name, param in dag.params.items():
        assert param.schema.get("type") or param.schema.get("enum"), f"{dag_id}.{name} has no schema"


def test_empty_params_are_optional_in_the_trigger_form(dagbag):
    """Airflow's params form treats a param as required unless its type allows null, and an empty
    default as missing: such a param would keep the Trigger button disabled (found in a browser)."""
    for dag_id, dag in dagbag.dags.items():
        for name, param in dag.params.items():
            types = param.schema.get("type")
            types = types if isinstance(types, list) else [types]
            if param.value in ("", {}, []) or param.value is None:
                assert "null" in types, f"{dag_id}.{name}: an empty default needs type [\"null\", …]"


def test_params_reject_bad_input(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    params = dagbag.dags["llm_finetune"].params
    params["zero_stage"] = 2  # valid
    with pytest.raises(ParamValidationError):
        params["zero_stage"] = 5
    with pytest.raises(ParamValidationError):
        params["model_name"] = "Bad Name!"


def test_wiring(dagbag):
    ft = dagbag.dags["llm_finetune"]
    order = ["plan_trials", "train", "evaluate_trial", "select_best_trial", "quality_gates", "register_candidate",
             "wait_for_signoff", "deploy", "canary"]
    assert "resolve_dataset" in {t.task_id for t in ft.get_task("train").upstream_list}
    for up, down in zip(order, order[1:], strict=False):
        assert up in {t.task_id for t in ft.get_task(down).upstream_list} or any(
            up in {u.task_id for u in t.upstream_list} for t in ft.get_task(down).upstream_list
        ), f"{up} must run before {down}"
    assert ft.get_task("train").pool == "gpu" and ft.get_task("train").queue == "gpu"
    assert ft.get_task("evaluate_trial").pool == "eval"
    dq = dagbag.dags["llm_data_quality"]
    assert [o.name for o in dq.get_task("prepare").outlets] == ["prepared_dataset"]


def test_no_heavy_imports_at_top_level():
    for path in DAGS.glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("import ", "from ")):
                module = line.split()[1].split(".")[0]
                assert module not in HEAVY, f"{path.name}: top-level import of {module}"


def _parse_seconds(path: Path) -> float:
    code = textwrap.dedent(f"""
        import runpy, sys, time
        t = time.perf_counter()
        runpy.run_path({str(path)!r})
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        print(time.perf_counter() - t, ",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    seconds, _, heavy = out.stdout.strip().splitlines()[-1].partition(" ")
    assert not heavy, f"{path.name} imported {heavy} at parse time"
    return float(seconds)


def test_parse_time_close_to_an_empty_dag(tmp_path):
    empty = tmp_path / "empty_dag.py"
    empty.write_text(textwrap.dedent("""
        from datetime import datetime
        from airflow.sdk import dag, task

        @dag(schedule=None, start_date=datetime(2026, 1, 1))
        def empty():
            @task
            def noop():
                return 1
            noop()

        empty()
    """))
    baseline = statistics.median(_parse_seconds(empty) for _ in range(3))
    for path in sorted(DAGS.glob("*.py")):
        t = min(_parse_seconds(path) for _ in range(2))
        # bench/dag_parse.py measures the ratio precisely; here only a gross regression fails
        # (a heavy import costs seconds, far beyond this margin).
        assert t < baseline * 1.6 + 0.3, f"{path.name}: {t:.2f}s to parse vs {baseline:.2f}s for an empty DAG"


@pytest.mark.parametrize(
    ("dag_id", "task_id", "link", "xcom_key"),
    [
        ("llm_data_quality", "validate", "Data Docs", "_link_DataDocsLink"),
        ("llm_data_quality", "eda_report", "EDA report", "_link_EdaReportLink"),
        ("llm_finetune", "quality_gates", "Eval report", "_link_EvalReportLink"),
    ],
)
def test_serialized_dags_keep_the_report_links(dagbag, dag_id, task_id, link, xcom_key):
    """The API server knows a task's links only from the serialized DAG (name -> XCom key)."""
    import json

    from airflow.serialization.serialized_objects import DagSerialization

    encoded = json.loads(json.dumps(DagSerialization.to_dict(dagbag.dags[dag_id])))
    op = next(t for t in encoded["dag"]["tasks"] if t["__var"]["task_id"] == task_id)["__var"]
    assert op["_operator_extra_links"] == {link: xcom_key}
    served = DagSerialization.from_dict(encoded).get_task(task_id)
    assert served.extra_links == [link]
    assert served.operator_extra_link_dict[link].xcom_key == xcom_key


def test_rendering_leaves_the_canary_prompts_as_the_model_was_trained_on_them(dagbag):
    from airloom.airflow.defaults import CANARY_PROMPTS

    task = dagbag.dags["llm_finetune"].get_task("canary")
    task.render_template_fields({"params": {"model_name": "airloom-demo"}})
    # each ends "### Response:\n" as the training prompts do; Jinja would drop that newline
    assert task.prompts == CANARY_PROMPTS and all(p.endswith("### Response:\n") for p in task.prompts)
    assert task.model_name == "airloom-demo"


def test_rendering_gives_the_data_operators_a_field_map_they_read(dagbag):
    from airloom.data.load import parse_field_map

    dag = dagbag.dags["llm_data_quality"]
    for task_id in ("validate", "eda_report"):
        task = dag.get_task(task_id)
        assert "field_map" in task.template_fields
        for value, expected in ((None, None), ({"question": "instruction"}, {"question": "instruction"})):
            rendered = task.render_template(task.field_map, {"params": {"field_map": value}})
            assert parse_field_map(rendered) == expected, (task_id, rendered)
