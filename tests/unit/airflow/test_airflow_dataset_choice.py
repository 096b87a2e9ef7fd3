"""Which dataset a run uses: the prepare task's asset event names a version, resolve_dataset trains on
the event's (or the param's) dataset and refuses to guess on a manual run, the registered lineage keeps
the reference, and monitoring compares traffic with the served model's own training data."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException
from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
from airflow.sdk.execution_time.context import OutletEventAccessors, TriggeringAssetEventsAccessor

from airloom.airflow.assets import PREPARED_DATASET, RETRAINING_REQUEST
from airloom.airflow.operators.data import PrepareDatasetOperator, ResolveDatasetOperator
from airloom.airflow.operators.monitoring import DriftMonitorOperator, RequestRetrainingOperator
from airloom.airflow.operators.registry import RegisterModelOperator
from airloom.data import catalog
from airloom.data.prepare import prepare

REPO = Path(__file__).resolve().parents[3]
DS = "2026-01-02"
T0 = datetime(2026, 1, 2, tzinfo=UTC)


def _records(n: int, tag: str = "", task: str = "echo") -> list[dict]:
    return [
        {"instruction": f"Echo {i}{tag}", "input": "", "response": f"{i}{tag}", "task": task}
        for i in range(n)
    ]


def _publish(
    name: str, n: int = 20, tag: str = "", task: str = "echo", run_id: str = "r"
) -> catalog.PreparedDataset:
    staged = catalog.staging_dir(name)
    prepare(_records(n, tag, task), staged, near_dedup=None)
    return catalog.publish(staged, name, origin={"dag_id": "llm_data_quality", "run_id": run_id})


def _events(*extras: dict, asset: Asset = PREPARED_DATASET) -> TriggeringAssetEventsAccessor:
    """Triggering events as the Task SDK hands them to a task, the i-th one i minutes after T0."""
    return TriggeringAssetEventsAccessor.build(
        AssetEventDagRunReferenceResult(
            asset={"name": asset.name, "uri": asset.uri, "extra": {}},
            extra=extra,
            source_task_id="prepare",
            source_dag_id="llm_data_quality",
            source_run_id=f"run{i}",
            source_map_index=-1,
            source_aliases=[],
            timestamp=T0 + timedelta(minutes=i),
        )
        for i, extra in enumerate(extras)
    )


def _resolve(context, dataset: str | None = None) -> dict:
    return ResolveDatasetOperator(task_id="resolve_dataset", dataset=dataset).execute(context)


def test_prepare_emits_the_version_it_published(tmp_path, make_context, airloom_env):
    src = tmp_path / "accepted.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _records(20)))
    context = make_context(task_id="prepare")
    context["outlet_events"] = OutletEventAccessors()
    op = PrepareDatasetOperator(
        task_id="prepare",
        input_path=str(src),
        dataset_name="demo",
        near_dedup=None,
        outlets=[PREPARED_DATASET],
    )
    info = op.execute(context)
    extra = context["outlet_events"][PREPARED_DATASET].extra
    assert extra == {
        "name": "demo",
        "version": 1,
        "ref": "demo@1",
        "path": str(airloom_env / "home" / "datasets" / "demo" / "1"),
        "dataset_hash": info["dataset_hash"],
        "requested_by": "trainer",  # this run's requester, for the run the event starts
    }
    assert ("ref", "demo@1") in context["ti"].pushed
    # the retry of the same task: the same version, the same event
    context["outlet_events"] = OutletEventAccessors()
    assert op.execute(context)["ref"] == "demo@1"
    assert context["outlet_events"][PREPARED_DATASET].extra["ref"] == "demo@1"

    with pytest.raises(AirflowFailException, match=r"dataset_name 'My Data' is not a valid name"):
        PrepareDatasetOperator(task_id="prepare", input_path=str(src), dataset_name="My Data").execute(
            context
        )


def test_the_triggering_event_decides_not_the_newest(make_context, airloom_env):
    v1 = _publish("demo", tag="a")
    _publish("demo", tag="b")  # newer, but not what the event names
    context = make_context()
    context["triggering_asset_events"] = _events(
        {k: v1.summary()[k] for k in ("ref", "path", "dataset_hash")}
    )
    out = _resolve(context)
    assert (out["ref"], out["path"], out["source"]) == ("demo@1", str(v1.path), "asset event")
    assert out["train"] == str(v1.path / "train.parquet")
    assert out["data_quality_run"].endswith("runs/llm_data_quality/r")
    assert ("ref", "demo@1") in context["ti"].pushed and ("dataset_hash", v1.dataset_hash) in context[
        "ti"
    ].pushed

    # two queued events: the newest one's dataset
    context["triggering_asset_events"] = _events({"ref": "demo@2"}, {"ref": "demo@1"})
    assert _resolve(context)["ref"] == "demo@1"
    # an event from before names: its path
    context["triggering_asset_events"] = _events({"path": str(v1.path), "dataset_hash": v1.dataset_hash})
    assert _resolve(context)["ref"] == "demo@1"
    # the param wins over the event
    assert _resolve(context, "demo@2")["ref"] == "demo@2"


def test_an_event_whose_files_changed_is_refused(make_context, airloom_env):
    v1 = _publish("demo")
    context = make_context()
    context["triggering_asset_events"] = _events({"path": str(v1.path), "dataset_hash": "0" * 64})
    with pytest.raises(AirflowFailException, match=r"differs from the asset event's 000000000000"):
        _resolve(context)


def test_a_manual_run_without_a_dataset_is_refused_with_the_list(make_context, airloom_env):
    with pytest.raises(AirflowFailException, match=r"(?s)no dataset chosen.*no prepared datasets"):
        _resolve(make_context(), None)
    _publish("demo", n=20)
    _publish("chats", n=30, tag="c")
    for empty in (None, "", "  "):
        with pytest.raises(AirflowFailException) as failed:
            _resolve(make_context(), empty)
        message = str(failed.value)
        assert "name@version" in message and "demo@1: 20 rows" in message and "chats@1: 30 rows" in message
    # a retraining request that names no dataset (its monitor had no lineage to go by) is no choice either
    context = make_context()
    context["triggering_asset_events"] = _events({"reasons": ["x"], "report": "r"}, asset=RETRAINING_REQUEST)
    with pytest.raises(AirflowFailException, match="no dataset chosen"):
        _resolve(context)


@pytest.mark.parametrize(
    "ref, expected",
    [("demo@1", "demo@1"), ("demo@latest", "demo@2"), ("demo", "demo@2")],
)
def test_each_reference_form(make_context, airloom_env, ref, expected):
    _publish("demo", tag="a")
    _publish("demo", tag="b")
    assert _resolve(make_context(), ref)["ref"] == expected


def test_bad_references_fail_without_retry(make_context, airloom_env):
    _publish("demo")
    for ref, message in (
        ("demo@9", r"no version '9' of 'demo'; versions: 1"),
        ("nope@1", r"no prepared dataset named 'nope'.*prepared datasets: demo"),
        (str(airloom_env / "missing"), r"not a prepared dataset \(no manifest.json\)"),
    ):
        with pytest.raises(AirflowFailException, match=message):
            _resolve(make_context(), ref)


def test_registered_lineage_records_the_dataset_ref(make_context, airloom_env, registry, model_dir):
    """What llm_finetune's register_candidate gets from resolve_dataset's outputs."""
    v1 = _publish("demo")
    resolved = _resolve(make_context(), "demo@latest")
    lineage = {k: resolved[k] for k in ("path", "dataset_hash")}
    op = RegisterModelOperator(
        task_id="register_candidate",
        model_name="airloom-demo",
        model_dir=str(model_dir),
        metadata={
            "lineage": {
                "dataset": lineage["path"],
                "dataset_ref": resolved["ref"],
                "dataset_hash": lineage["dataset_hash"],
            }
        },
        request_signoff=False,
    )
    out = op.execute(make_context(task_id="register_candidate"))
    saved = registry.get("airloom-demo", out["version"]).metadata["lineage"]
    assert (saved["dataset_ref"], saved["dataset"], saved["dataset_hash"]) == (
        "demo@1",
        str(v1.path),
        v1.dataset_hash,
    )


# -- monitoring's reference -------------------------------------------------------------------------


def _day(root: Path, rows: list[dict]) -> None:
    part = root / "traffic" / f"ds={DS}" / "part-0.jsonl"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _monitor(root: Path, **kwargs) -> DriftMonitorOperator:
    return DriftMonitorOperator(
        task_id="drift_and_feedback",
        traffic_uri=str(root / "traffic"),
        feedback_uri=str(root / "feedback"),
        reference_file="",
        ds=DS,
        **kwargs,
    )


def _register(registry, make_model, tmp_path, lineage: dict, production: bool = True) -> int:
    mv = registry.register(
        "airloom-demo", make_model(tmp_path / f"m{len(lineage)}"), metadata={"lineage": lineage}, actor="t"
    )
    if production:
        registry.set_alias("airloom-demo", "production", mv.version, actor="t")
    return mv.version


def test_drift_reference_is_the_production_models_training_data(
    tmp_path, context, airloom_env, registry, make_model
):
    trained_on = _publish("demo", n=60, tag="a", task="echo")
    _publish("other", n=60, tag="b", task="shout")  # the newest prepared: another task entirely
    _register(registry, make_model, tmp_path, {"dataset_ref": "demo@1", "dataset": str(trained_on.path)})
    traffic = [{"prompt": r["instruction"], "task": "echo"} for r in _records(60, "a")]
    _day(tmp_path, traffic)
    out = _monitor(tmp_path).execute(context)
    assert out["reference"] == {
        "source": "airloom-demo@production's lineage",
        "lineage_dataset_ref": "demo@1",
        "dataset": "demo@1",
    }
    report = json.loads(Path(out["report"]).read_text())
    assert report["reference"]["dataset"] == "demo@1" and report["psi_task_mix"] < 0.25

    asset = Asset("retraining_request")
    context["outlet_events"] = OutletEventAccessors()
    RequestRetrainingOperator(
        task_id="request_retraining", decision={**out, "retrain": True}, outlets=[asset]
    ).execute(context)
    assert context["outlet_events"][asset].extra["dataset"] == "demo@latest"  # retrain on its newest version


def test_the_version_that_served_the_traffic_wins_over_production(
    tmp_path, context, airloom_env, registry, make_model
):
    _publish("demo", n=40, tag="a")
    _publish("chats", n=40, tag="c")
    served = _register(registry, make_model, tmp_path, {"dataset_ref": "chats@1"}, production=False)
    _register(registry, make_model, tmp_path, {"dataset_ref": "demo@1", "x": 1})
    rows = [{"prompt": "Echo 1", "model_name": "airloom-demo", "model_version": served}] * 30
    _day(tmp_path, rows)
    out = _monitor(tmp_path).execute(context)
    assert out["reference"]["source"] == f"served model airloom-demo/{served}'s lineage"
    assert out["reference"]["dataset"] == "chats@1"


def test_without_lineage_the_newest_dataset_is_a_stated_fallback(
    tmp_path, context, airloom_env, registry, make_model, capsys
):
    _publish("demo", n=40)
    _day(tmp_path, [{"prompt": "Echo 1"}] * 20)
    out = _monitor(tmp_path).execute(context)
    assert out["reference"]["source"] == "newest prepared dataset (fallback)"
    assert "no production alias" in out["reference"]["why"]
    assert "falling back to the newest prepared dataset, demo@1" in capsys.readouterr().out  # Airflow's log
    asset = Asset("retraining_request")
    context["outlet_events"] = OutletEventAccessors()
    RequestRetrainingOperator(
        task_id="request_retraining", decision={**out, "retrain": True}, outlets=[asset]
    ).execute(context)
    assert "dataset" not in context["outlet_events"][asset].extra  # a fallback is no basis for retraining

    _register(registry, make_model, tmp_path, {"dataset_ref": "gone@3"})  # lineage naming a deleted dataset
    out = _monitor(tmp_path).execute(context)
    assert out["reference"]["source"] == "newest prepared dataset (fallback)"
    assert "lineage dataset_ref 'gone@3': no prepared dataset named 'gone'" in out["reference"]["why"]


def test_data_quality_form_names_the_dataset():
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    bag = DagBag(dag_folder=str(REPO / "dags" / "llm_data_quality.py"))
    assert bag.import_errors == {}
    dag = bag.dags["llm_data_quality"]
    params = dag.params
    assert params["dataset_name"] is None
    params["dataset_name"] = "support-chats"
    for bad in ("Support", "a b", "-x", "a@1"):
        with pytest.raises(ParamValidationError):
            params["dataset_name"] = bad
    task = dag.get_task("prepare")
    assert (task.dataset_name, task.source) == ("{{ params.dataset_name }}", "{{ params.source }}")
    assert {"dataset_name", "source"} <= set(task.template_fields)


def test_the_form_proposes_the_prepared_datasets(airloom_env):
    from airflow.sdk import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    from airloom.airflow.operators.data import dataset_param

    empty = dataset_param()
    assert "examples" not in empty.schema and empty.resolve() is None
    _publish("demo", n=20, tag="a")
    _publish("demo", n=30, tag="b")
    param = dataset_param(section="Run")
    assert param.schema["section"] == "Run" and param.schema["examples"] == ["demo@2", "demo@1"]
    assert param.schema["values_display"]["demo@2"].startswith("demo@2: 30 rows")
    params = ParamsDict({"dataset": param})
    for ok in (None, "demo@1", "demo@latest", "/srv/prepared/old"):  # proposals, not a closed list
        params["dataset"] = ok
    with pytest.raises(ParamValidationError):
        params["dataset"] = 3
