"""Who requested a sign-off, for every way a run starts: a person, ``airflow dags test``, a schedule, and
asset events (the upstream run's requester travels in the event's extra). Runs are the Task SDK's own
``DagRun`` model and events its ``AssetEventDagRunReferenceResult``, as a task receives them.

The worker's OS user is never the requester of a scheduled or asset-triggered run, so separation of
duties holds the person behind the upstream run, and neither the worker nor a system identity can
approve.
"""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime, timedelta

import pytest
from airflow.sdk import Asset
from airflow.sdk.api.datamodels._generated import DagRun
from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
from airflow.sdk.execution_time.context import OutletEventAccessors, TriggeringAssetEventsAccessor

from airloom.airflow.assets import PREPARED_DATASET, RETRAINING_REQUEST
from airloom.airflow.operators._base import triggering_user
from airloom.airflow.operators.data import PrepareDatasetOperator
from airloom.airflow.operators.monitoring import RequestRetrainingOperator
from airloom.airflow.operators.registry import RegisterModelOperator
from airloom.airflow.sensors.registry import ModelSignOffSensor
from airloom.exceptions import CheckFailed
from airloom.governance.signoff import SignOffPolicy, record_decision, signoff_status

T0 = datetime(2026, 3, 1, tzinfo=UTC)


class TI:
    def __init__(self, dag_id: str, task_id: str = "task") -> None:
        self.dag_id, self.task_id, self.map_index = dag_id, task_id, -1
        self.pushed: list = []

    def xcom_push(self, key, value) -> None:
        self.pushed.append((key, value))


def run_context(
    dag_id: str, run_type: str, user: str | None = None, events=(), task_id: str = "task"
) -> dict:
    """A task's context as the Task SDK builds it: the run, and the asset events that started it."""
    run_id = f"{run_type}__{T0.isoformat()}"
    dag_run = DagRun(
        dag_id=dag_id,
        run_id=run_id,
        logical_date=T0,
        data_interval_start=T0,
        data_interval_end=T0,
        run_after=T0,
        start_date=T0,
        end_date=None,
        run_type=run_type,
        state="running",
        triggering_user_name=user,
        consumed_asset_events=[],
        partition_key=None,
    )
    return {
        "ti": TI(dag_id, task_id),
        "run_id": run_id,
        "dag_run": dag_run,
        "triggering_asset_events": TriggeringAssetEventsAccessor.build(events),
    }


def event(asset: Asset, extra: dict, source_dag_id: str | None = "llm_data_quality", minutes: int = 0):
    """An asset event as a consumer sees it; ``source_dag_id=None`` is one posted to the REST API."""
    return AssetEventDagRunReferenceResult(
        asset={"name": asset.name, "uri": asset.uri, "extra": {}},
        extra=extra,
        source_task_id="prepare" if source_dag_id else None,
        source_dag_id=source_dag_id,
        source_run_id="manual__upstream" if source_dag_id else None,
        source_map_index=-1 if source_dag_id else None,
        source_aliases=[],
        timestamp=T0 + timedelta(minutes=minutes),
    )


def emitted_extra(operator, context) -> dict:
    """What ``operator`` puts on its outlet's asset event."""
    context["outlet_events"] = OutletEventAccessors()
    operator.execute(context)
    return dict(context["outlet_events"][operator.outlets[0]].extra)


def test_each_way_a_run_starts(monkeypatch):
    monkeypatch.delenv("AIRLOOM_USER", raising=False)
    os_user = getpass.getuser()
    assert triggering_user(run_context("llm_finetune", "manual", "alice")) == "alice"
    assert triggering_user(run_context("llm_finetune", "backfill", "bob")) == "bob"
    # A schedule: nobody; never the worker's OS user.
    assert triggering_user(run_context("llm_eval_backfill", "scheduled")) == "system:llm_eval_backfill"
    assert triggering_user(run_context("llm_finetune", "operator_triggered")) == "system:llm_finetune"
    # `airflow dags test` (Airflow names its runs' user "dag_test") and the CLI: the local user.
    assert triggering_user(run_context("llm_finetune", "manual", "dag_test")) == os_user
    assert triggering_user({"ti": None}) == os_user
    monkeypatch.setenv("AIRLOOM_USER", "svc-airloom")
    assert triggering_user(run_context("llm_finetune", "manual", "dag_test")) == "svc-airloom"
    assert triggering_user(run_context("llm_eval_backfill", "scheduled")) == "system:llm_eval_backfill"


def test_asset_triggered_run_takes_the_requester_the_event_carries():
    def requester(*events) -> str:
        return triggering_user(run_context("llm_finetune", "asset_triggered", events=events))

    assert requester(event(PREPARED_DATASET, {"ref": "demo@1", "requested_by": "alice"})) == "alice"
    # A producer that stamps no requester: the upstream DAG's system identity.
    assert requester(event(PREPARED_DATASET, {"ref": "demo@1"})) == "system:llm_data_quality"
    # An event posted to the REST API carries whatever its sender wrote: not trusted.
    posted = event(PREPARED_DATASET, {"ref": "demo@1", "requested_by": "carol"}, source_dag_id=None)
    assert requester(posted) == "system:asset:prepared_dataset"
    # Several events: a person behind any of them (the newest such) before a system identity.
    monitoring = event(
        RETRAINING_REQUEST, {"requested_by": "system:llm_feedback_monitoring"}, "llm_feedback_monitoring", 5
    )
    assert requester(event(PREPARED_DATASET, {"requested_by": "alice"}), monitoring) == "alice"
    assert (
        requester(
            event(PREPARED_DATASET, {"requested_by": "alice"}),
            event(PREPARED_DATASET, {"requested_by": "dan"}, minutes=1),
        )
        == "dan"
    )
    assert requester(monitoring) == "system:llm_feedback_monitoring"


def test_asset_triggered_training_holds_the_upstream_user_to_separation_of_duties(
    registry, model_dir, tmp_path, airloom_env
):
    """alice prepares data by hand → the event starts llm_finetune on a worker → alice may not approve its
    model, nor may the worker's OS user or any system identity; a reviewer on the page may."""
    src = tmp_path / "accepted.jsonl"
    src.write_text(
        "".join(
            json.dumps({"instruction": f"Echo {i}", "input": "", "response": str(i)}) + "\n"
            for i in range(20)
        )
    )
    prepare = PrepareDatasetOperator(
        task_id="prepare",
        input_path=str(src),
        dataset_name="demo",
        near_dedup=None,
        outlets=[PREPARED_DATASET],
    )
    extra = emitted_extra(prepare, run_context("llm_data_quality", "manual", "alice", task_id="prepare"))
    assert extra["requested_by"] == "alice" and extra["ref"] == "demo@1"

    context = run_context(
        "llm_finetune", "asset_triggered", events=[event(PREPARED_DATASET, extra)], task_id="register"
    )
    RegisterModelOperator(task_id="register", model_name="bot", model_dir=str(model_dir)).execute(context)
    status = signoff_status(registry, "bot", 1)
    assert (status["requested_by"], status["requested_via"]) == ("alice", "task")
    assert registry.get("bot", 1).metadata["lineage"]["triggered_by"] == "alice"

    production = SignOffPolicy(
        allowed_users=["alice", "reviewer", getpass.getuser()], authenticated_only=True
    )
    with pytest.raises(CheckFailed, match="'alice' requested the sign-off of bot/1 and may not approve it"):
        record_decision(registry, "bot", 1, user="alice", decision="approve", policy=production, via="plugin")
    with pytest.raises(CheckFailed, match="only through authenticated paths"):  # the worker's OS user
        record_decision(registry, "bot", 1, user=getpass.getuser(), decision="approve", policy=production)
    with pytest.raises(CheckFailed, match="system identity"):
        record_decision(
            registry, "bot", 1, user="system:llm_finetune", decision="approve", policy=production, via="api"
        )
    assert signoff_status(registry, "bot", 1, production)["state"] == "pending"
    record_decision(registry, "bot", 1, user="reviewer", decision="approve", policy=production, via="plugin")
    assert signoff_status(registry, "bot", 1, production)["state"] == "approved"


def test_scheduled_monitoring_requests_retraining_as_a_system_identity(registry, model_dir, airloom_env):
    """Nobody started the daily monitoring run: its retraining request, and the training it starts, are
    ``system:llm_feedback_monitoring``'s; any approver may approve, the system never; the sensor agrees."""
    decision = {"retrain": True, "reasons": ["psi 1.2 > 0.25"], "report": "/runs/monitoring.json"}
    monitor = run_context("llm_feedback_monitoring", "scheduled", task_id="request_retraining")
    op = RequestRetrainingOperator(
        task_id="request_retraining", decision=decision, outlets=[RETRAINING_REQUEST]
    )
    extra = emitted_extra(op, monitor)
    assert extra["requested_by"] == "system:llm_feedback_monitoring"

    context = run_context(
        "llm_finetune",
        "asset_triggered",
        events=[event(RETRAINING_REQUEST, extra, "llm_feedback_monitoring")],
        task_id="register",
    )
    RegisterModelOperator(task_id="register", model_name="bot", model_dir=str(model_dir)).execute(context)
    assert signoff_status(registry, "bot", 1)["requested_by"] == "system:llm_feedback_monitoring"
    assert registry.get("bot", 1).created_by == "system:llm_feedback_monitoring"

    policy = {"allowed_users": "reviewer", "required_approvals": 1}
    sensor = ModelSignOffSensor(task_id="wait", model_name="bot", version=1, policy=policy, deferrable=False)
    for user in ("system:llm_feedback_monitoring", "system:llm_finetune"):
        with pytest.raises(CheckFailed, match="never signs off"):
            record_decision(
                registry, "bot", 1, user=user, decision="approve", policy=SignOffPolicy.from_params(policy)
            )
    assert sensor.poke(context) is False
    record_decision(registry, "bot", 1, user="reviewer", decision="approve", via="plugin")
    assert sensor.poke(context) is True
