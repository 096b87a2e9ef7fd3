"""SignOffTrigger: exact serialization, and every way its wait can end (run against a real registry)."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
from airflow.triggers.base import TriggerEvent

from airloom.airflow.triggers.registry import SignOffTrigger
from airloom.governance.signoff import record_decision, request_signoff, signoff_status


@pytest.fixture
def registry(registry, model_dir):
    registry.register("bot", model_dir, metadata={}, actor="trainer")
    request_signoff(registry, "bot", 1, requested_by="trainer", evidence={"rouge_l": 0.4})
    return registry


def trigger(registry, **overrides) -> SignOffTrigger:
    kwargs = {
        "registry_uri": registry.store.uri(),
        "aws_conn_id": "aws_default",
        "model_name": "bot",
        "version": 1,
        "policy": {"required_approvals": 1},
        "poll_interval": 0.05,
        "deadline": time.time() + 30,
    }
    return SignOffTrigger(**{**kwargs, **overrides})


def events(trig: SignOffTrigger, timeout: float = 10) -> list[TriggerEvent]:
    """Drive run() to its end: a trigger must yield exactly one event and then stop."""

    async def collect():
        return [e async for e in trig.run()]

    return asyncio.run(asyncio.wait_for(collect(), timeout))


def test_serialize_is_exact_and_round_trips():
    trig = SignOffTrigger(
        registry_uri="s3://models/registry",
        aws_conn_id="minio",
        model_name="support-bot",
        version="3",
        policy={"required_approvals": 2, "allowed_users": ["ann", "bob"]},
        poll_interval=5,
        deadline=1767225600,
    )
    classpath, kwargs = trig.serialize()
    assert classpath == "airloom.airflow.triggers.registry.SignOffTrigger"
    assert kwargs == {
        "registry_uri": "s3://models/registry",
        "aws_conn_id": "minio",
        "model_name": "support-bot",
        "version": 3,
        "policy": {"required_approvals": 2, "allowed_users": ["ann", "bob"]},
        "poll_interval": 5.0,
        "deadline": 1767225600.0,
    }
    assert (type(kwargs["version"]), type(kwargs["poll_interval"]), type(kwargs["deadline"])) == (
        int,
        float,
        float,
    )
    # The triggerer imports the classpath and calls it with the kwargs.
    module, _, name = classpath.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert cls is SignOffTrigger
    assert cls(**kwargs).serialize() == (classpath, kwargs)


def test_serialize_keeps_default_registry_for_the_triggerer_to_resolve():
    _, kwargs = SignOffTrigger(
        registry_uri=None,
        aws_conn_id="aws_default",
        model_name="bot",
        version=1,
        policy={},
        poll_interval=10,
        deadline=0,
    ).serialize()
    assert kwargs["registry_uri"] is None and kwargs["policy"] == {}


def test_approved_yields_approved(registry):
    record_decision(registry, "bot", 1, user="reviewer", decision="approve", comment="lgtm")
    [event] = events(trigger(registry))
    assert event.payload["status"] == "approved"
    assert [a["user"] for a in event.payload["signoff"]["approvals"]] == ["reviewer"]
    assert event.payload["signoff"]["state"] == "approved"


def test_rejected_yields_rejected(registry):
    record_decision(registry, "bot", 1, user="reviewer", decision="reject", comment="rouge too low")
    [event] = events(trigger(registry))
    assert event.payload["status"] == "rejected"
    assert event.payload["signoff"]["rejections"][0]["comment"] == "rouge too low"


def test_past_deadline_while_pending_yields_expired(registry):
    [event] = events(trigger(registry, deadline=time.time() - 1))
    assert event.payload["status"] == "expired"
    assert event.payload["signoff"]["state"] == "pending"
    assert event.payload["signoff"]["requested_by"] == "trainer"


def test_decision_wins_over_passed_deadline(registry):
    record_decision(registry, "bot", 1, user="reviewer", decision="approve")
    [event] = events(trigger(registry, deadline=time.time() - 1))
    assert event.payload["status"] == "approved"


def test_policy_is_applied_in_the_trigger(registry):
    # One approval is not enough under a two-approver policy: still pending, so it expires.
    record_decision(registry, "bot", 1, user="ann", decision="approve")
    [event] = events(trigger(registry, policy={"required_approvals": 2}, deadline=time.time() - 1))
    assert event.payload["status"] == "expired"
    assert len(event.payload["signoff"]["approvals"]) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_name": "Bad Name"}, r"^UsageError: invalid model name 'Bad Name'"),
        (
            {"policy": {"required_approvals": 0}},
            r"^UsageError: SignOffPolicy.required_approvals must be at least 1",
        ),
        ({"policy": {"quorum": 2}}, r"^UsageError: unknown sign-off policy option.*quorum"),
        ({"model_name": "ghost"}, r"^RegistryError: model 'ghost' has no committed version 1 in "),
        (
            {"version": 7},
            r"^RegistryError: model 'bot' has no committed version 7 .*committed versions: \[1\]",
        ),
    ],
)
def test_exception_inside_yields_error_with_message(registry, overrides, message):
    [event] = events(trigger(registry, **overrides))
    assert event.payload["status"] == "error"
    assert set(event.payload) == {"status", "message"}
    assert isinstance(event.payload["message"], str)
    assert re.search(message, event.payload["message"]), event.payload["message"]


def test_pending_then_approved_by_another_thread(registry):
    assert signoff_status(registry, "bot", 1)["state"] == "pending"
    timer = threading.Timer(
        0.3, record_decision, args=(registry, "bot", 1), kwargs={"user": "reviewer", "decision": "approve"}
    )
    start = time.monotonic()
    timer.start()
    try:
        [event] = events(trigger(registry, poll_interval=0.05))
    finally:
        timer.join()
    assert event.payload["status"] == "approved"
    assert event.payload["signoff"]["approvals"][0]["user"] == "reviewer"
    assert time.monotonic() - start >= 0.3  # it really waited for the decision


def test_run_does_not_block_the_event_loop(registry):
    """Registry reads run in a thread: another coroutine keeps ticking while the trigger polls."""
    timer = threading.Timer(
        0.3, record_decision, args=(registry, "bot", 1), kwargs={"user": "reviewer", "decision": "approve"}
    )

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick = asyncio.create_task(ticker())
        event = await anext(trigger(registry).run())
        tick.cancel()
        return event, ticks

    timer.start()
    try:
        event, ticks = asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        timer.join()
    assert event.payload["status"] == "approved"
    assert ticks >= 10
