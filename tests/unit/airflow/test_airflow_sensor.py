"""ModelSignOffSensor: finish at once on a decision, defer while pending, and handle every trigger event."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from airloom.airflow.sensors.registry import ModelSignOffSensor
from airloom.airflow.triggers.registry import SignOffTrigger
from airloom.governance.signoff import record_decision, request_signoff, signoff_status


@pytest.fixture
def registry(registry, model_dir):
    registry.register("bot", model_dir, metadata={}, actor="trainer")
    request_signoff(registry, "bot", 1, requested_by="trainer", evidence={})
    return registry


def sensor(**kwargs) -> ModelSignOffSensor:
    return ModelSignOffSensor(
        **{"task_id": "wait_for_signoff", "model_name": "bot", "version": "1", "timeout": 3600, **kwargs}
    )


def test_execute_when_approved_returns_the_status(registry, context):
    record_decision(registry, "bot", 1, user="reviewer", decision="approve", comment="ok")
    status = sensor().execute(context)
    assert status == signoff_status(registry, "bot", 1)
    assert (status["state"], [a["user"] for a in status["approvals"]]) == ("approved", ["reviewer"])


def test_execute_when_rejected_fails_naming_who_and_why(registry, context):
    record_decision(registry, "bot", 1, user="reviewer", decision="reject", comment="toxic answers in eval")
    with pytest.raises(
        AirflowFailException, match=r"^bot/1 was rejected \(reviewer: toxic answers in eval\)$"
    ):
        sensor().execute(context)


def test_rejection_without_comment_says_so(registry, context):
    record_decision(registry, "bot", 1, user="reviewer", decision="reject")
    with pytest.raises(AirflowFailException, match=r"\(reviewer: no comment\)"):
        sensor().execute(context)


def test_execute_when_pending_defers_to_the_trigger(registry, context):
    before = time.time()
    with pytest.raises(TaskDeferred) as exc:
        sensor(
            registry_uri=registry.store.uri(),
            aws_conn_id="minio",
            policy={"required_approvals": 1, "separation_of_duties": True},
            poll_interval=5,
            timeout=timedelta(hours=2),
        ).execute(context)
    deferred = exc.value
    assert deferred.method_name == "execute_complete"
    assert isinstance(deferred.trigger, SignOffTrigger)
    classpath, kwargs = deferred.trigger.serialize()
    assert classpath == "airloom.airflow.triggers.registry.SignOffTrigger"
    deadline = kwargs.pop("deadline")
    assert kwargs == {
        "registry_uri": registry.store.uri(),
        "aws_conn_id": "minio",
        "model_name": "bot",
        "version": 1,
        # resolved by the sensor, deployment defaults included: the triggerer applies the same policy
        "policy": {
            "required_approvals": 1,
            "allowed_users": None,
            "separation_of_duties": True,
            "authenticated_only": False,
        },
        "poll_interval": 5.0,
    }
    assert before + 7200 <= deadline <= time.time() + 7200


def test_policy_is_honoured_before_deferring(registry, context):
    # "ann" approved, but the policy only accepts "bob": still pending, so the sensor defers.
    record_decision(registry, "bot", 1, user="ann", decision="approve")
    with pytest.raises(TaskDeferred):
        sensor(policy={"allowed_users": ["bob"]}).execute(context)
    assert sensor(policy={"allowed_users": ["ann"]}).execute(context)["state"] == "approved"


def test_missing_version_fails_instead_of_waiting(registry, context):
    from airloom.exceptions import RegistryError

    with pytest.raises(
        RegistryError, match=r"model 'bot' has no committed version 5 .*committed versions: \[1\]"
    ):
        sensor(version=5).execute(context)


def test_poke_reports_each_state(registry, context):
    assert sensor().poke(context) is False
    record_decision(registry, "bot", 1, user="reviewer", decision="approve")
    assert sensor().poke(context) is True
    record_decision(registry, "bot", 1, user="second", decision="reject", comment="changed my mind")
    with pytest.raises(AirflowFailException, match=r"bot/1 was rejected \(second: changed my mind\)"):
        sensor().poke(context)


def test_execute_complete_approved_returns_the_signoff(registry, context):
    record_decision(registry, "bot", 1, user="reviewer", decision="approve")
    status = signoff_status(registry, "bot", 1)
    assert sensor().execute_complete(context, {"status": "approved", "signoff": status}) == status


def test_execute_complete_rejected_fails(registry, context):
    record_decision(registry, "bot", 1, user="ann", decision="reject", comment="too slow")
    record_decision(registry, "bot", 1, user="bob", decision="reject", comment="")
    event = {"status": "rejected", "signoff": signoff_status(registry, "bot", 1)}
    with pytest.raises(
        AirflowFailException, match=r"^bot/1 was rejected \(ann: too slow; bob: no comment\)$"
    ):
        sensor().execute_complete(context, event)


def test_execute_complete_expired_fails_and_audits(registry, context):
    event = {"status": "expired", "signoff": signoff_status(registry, "bot", 1)}
    with pytest.raises(
        AirflowFailException, match=r"^bot/1: no sign-off decision within 3600s; request expired$"
    ):
        sensor().execute_complete(context, event)
    last = registry.history("bot")[-1]
    assert {k: last[k] for k in ("action", "name", "version", "actor", "timeout_s")} == {
        "action": "signoff_expired",
        "name": "bot",
        "version": 1,
        "actor": "airflow",
        "timeout_s": 3600.0,
    }


def test_execute_complete_error_fails_with_the_message(registry, context):
    event = {"status": "error", "message": "RegistryError: model 'bot' has no committed version 5"}
    with pytest.raises(
        AirflowFailException,
        match=r"^sign-off wait failed: RegistryError: model 'bot' has no committed version 5$",
    ):
        sensor().execute_complete(context, event)
    assert [h["action"] for h in registry.history("bot")] == ["register", "signoff_request"]


def test_execute_complete_unknown_status_fails(registry, context):
    with pytest.raises(AirflowFailException, match=r"unexpected sign-off state 'pending'"):
        sensor().execute_complete(context, {"status": "pending", "signoff": {}})


def test_defer_then_trigger_then_resume(registry, context):
    """The whole deferral: execute defers, the trigger sees the approval, execute_complete returns it."""
    op = sensor(poll_interval=0.05)
    with pytest.raises(TaskDeferred) as exc:
        op.execute(context)
    record_decision(registry, "bot", 1, user="reviewer", decision="approve")
    classpath, kwargs = exc.value.trigger.serialize()
    event = asyncio.run(asyncio.wait_for(anext(SignOffTrigger(**kwargs).run()), 10))
    resumed = sensor(poll_interval=0.05)  # a fresh instance, as on the worker that resumes the task
    result = getattr(resumed, exc.value.method_name)(context, event.payload)
    assert result["state"] == "approved" and result["approvals"][0]["user"] == "reviewer"
