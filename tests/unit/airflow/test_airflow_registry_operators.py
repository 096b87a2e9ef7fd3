"""Register, deploy and roll back through the operators, against a real LocalStore registry."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.operators.registry import (
    DeployModelOperator,
    RegisterModelOperator,
    RollbackModelOperator,
)
from airloom.exceptions import CheckFailed
from airloom.governance.signoff import is_approved, record_decision, signoff_status


def register(context, model_dir, **kwargs) -> dict:
    return RegisterModelOperator(
        task_id="register", model_name="bot", model_dir=str(model_dir), **kwargs
    ).execute(context)


def approve(registry, version: int, user: str = "reviewer") -> None:
    record_decision(registry, "bot", version, user=user, decision="approve", comment="ok")


def deploy(context, version, **kwargs) -> dict:
    return DeployModelOperator(task_id="deploy", model_name="bot", version=version, **kwargs).execute(context)


def test_register_creates_version_alias_signoff_and_lineage(registry, model_dir, context, tmp_path):
    report = tmp_path / "eval.json"
    report.write_text('{"rouge_l": 0.41}')
    out = register(
        context,
        model_dir,
        metadata={"metrics": {"rouge_l": 0.41}, "lineage": {"dataset": "/data/v3"}},
        evidence={"eval_report": str(report), "eval_metrics": None},
    )

    mv = registry.get("bot", 1)
    assert out == {"name": "bot", "version": 1, "ref": "bot/1", "uri": mv.uri}
    assert context["ti"].pushed == list(out.items())
    assert {f["path"] for f in mv.files} == {"config.json", "model.safetensors", "metadata.json", "README.md"}
    assert mv.created_by == "trainer"
    assert mv.metadata["metrics"] == {"rouge_l": 0.41}
    lineage = mv.metadata["lineage"]
    assert lineage["dataset"] == "/data/v3"  # caller's lineage kept
    assert {k: lineage[k] for k in ("dag_id", "run_id", "triggered_by")} == {
        "dag_id": "llm_finetune",
        "run_id": "manual__2026-01-02T03:04:05+00:00",
        "triggered_by": "trainer",
    }
    assert lineage["code_version"]

    assert registry.get_alias("bot", "candidate") == 1
    alias_move = [h for h in registry.history("bot") if h["action"] == "alias"][0]
    assert alias_move["actor"] == "trainer"
    assert alias_move["reason"] == "registered by llm_finetune/manual__2026-01-02T03:04:05+00:00"

    status = signoff_status(registry, "bot", 1)
    assert (status["state"], status["requested_by"]) == ("pending", "trainer")
    assert set(status["evidence"]) == {"eval_report"}  # empty evidence values are dropped
    assert status["evidence"]["eval_report"]["size"] == report.stat().st_size


def test_register_without_alias_or_signoff(registry, model_dir, context):
    register(context, model_dir, alias=None, request_signoff=False)
    assert registry.list_aliases("bot") == {}
    assert signoff_status(registry, "bot", 1)["requested_by"] is None
    assert [h["action"] for h in registry.history("bot")] == ["register"]


def test_register_falls_back_to_airloom_user(registry, model_dir, monkeypatch, make_context):
    monkeypatch.setenv("AIRLOOM_USER", "cli-user")
    register(make_context(user=None), model_dir)
    assert registry.get("bot", 1).metadata["lineage"]["triggered_by"] == "cli-user"
    assert signoff_status(registry, "bot", 1)["requested_by"] == "cli-user"


def test_deploy_refuses_unapproved(registry, model_dir, context):
    register(context, model_dir)
    with pytest.raises(
        AirflowFailException,
        match=r"^refusing to point bot@production at version 1: its sign-off is pending \(0 of 1 approvals",
    ):
        deploy(context, 1)
    record_decision(registry, "bot", 1, user="reviewer", decision="reject", comment="no")
    with pytest.raises(
        AirflowFailException,
        match=r"^refusing to point bot@production at version 1: its sign-off was rejected by reviewer "
        r"\('no'\); a rejected version is never deployed",
    ):
        deploy(context, "1")
    assert registry.get_alias("bot", "production") is None


def test_deploy_stays_blocked_when_the_trainer_tries_to_self_approve(registry, model_dir, context):
    """The triggering user is the requester, so separation of duties stops them approving their own model."""
    register(context, model_dir)
    with pytest.raises(CheckFailed, match="separation of duties"):
        approve(registry, 1, user="trainer")
    with pytest.raises(AirflowFailException, match="sign-off is pending"):
        deploy(context, 1)


def test_deploy_refuses_a_corrupted_file_naming_it(registry, model_dir, context):
    register(context, model_dir)
    approve(registry, 1)
    stored = registry.store.path("models/bot/versions/1/model.safetensors")
    stored.write_bytes(stored.read_bytes()[:-1] + b"\xff")
    with pytest.raises(
        AirflowFailException,
        match=r"^refusing to point bot@production at version 1: bot/1: file model.safetensors is corrupt",
    ):
        deploy(context, 1)
    assert registry.get_alias("bot", "production") is None


def test_deploy_refuses_a_missing_file(registry, model_dir, context):
    register(context, model_dir)
    approve(registry, 1)
    registry.store.path("models/bot/versions/1/config.json").unlink()
    with pytest.raises(AirflowFailException, match=r"file config.json listed in MANIFEST.json is missing"):
        deploy(context, 1)


def test_deploy_after_approval_moves_alias_and_records_previous(
    registry, tmp_path, context, make_context, make_model
):
    register(context, make_model(tmp_path / "m1", 1))
    approve(registry, 1)
    first = deploy(context, 1)
    assert first == {"name": "bot", "alias": "production", "version": 1, "previous": None}
    assert context["ti"].pushed[-4:] == list(first.items())

    register(context, make_model(tmp_path / "m2", 2))
    approve(registry, 2)
    ctx = make_context(user="ops", task_id="deploy")
    second = deploy(ctx, "2")  # templated XCom values arrive as strings too
    assert second == {"name": "bot", "alias": "production", "version": 2, "previous": 1}
    assert registry.get_alias("bot", "production") == 2
    move = [h for h in registry.history("bot") if h["action"] == "alias" and h["alias"] == "production"][-1]
    assert (move["from"], move["to"], move["actor"]) == (1, 2, "ops")
    assert move["reason"] == "deploy by llm_finetune/manual__2026-01-02T03:04:05+00:00"


def test_deploy_without_required_approval(registry, model_dir, context):
    register(context, model_dir)
    out = deploy(context, 1, alias="staging", require_approval=False)
    assert (out["alias"], out["version"]) == ("staging", 1)
    assert registry.get_alias("bot", "staging") == 1
    # production is gated whatever the operator is told.
    with pytest.raises(
        AirflowFailException, match=r"^refusing to point bot@production at version 1: its sign-off is pending"
    ):
        deploy(context, 1, require_approval=False)
    assert registry.get_alias("bot", "production") is None


def test_deploy_honours_the_approver_list(registry, model_dir, context):
    register(context, model_dir)
    approve(registry, 1, user="mallory")
    with pytest.raises(
        AirflowFailException,
        match=r"approved by mallory, not an approver under the policy; one of the approvers \['reviewer'\]",
    ):
        deploy(context, 1, policy={"allowed_users": "reviewer"})
    assert deploy(context, 1)["version"] == 1  # the default policy lets anyone but the requester approve


def test_deploy_uses_explicit_registry_uri(tmp_path, model_dir, context):
    from airloom.registry.registry import ModelRegistry

    uri = str(tmp_path / "other-registry")
    RegisterModelOperator(task_id="r", model_name="bot", model_dir=str(model_dir), registry_uri=uri).execute(
        context
    )
    approve(ModelRegistry.from_uri(uri), 1)
    deploy(context, 1, registry_uri=uri)
    assert ModelRegistry.from_uri(uri).get_alias("bot", "production") == 1


@pytest.fixture
def two_deployed(registry, tmp_path, context, make_model):
    """bot/1 deployed, then bot/2 deployed over it; both approved."""
    for n in (1, 2):
        register(context, make_model(tmp_path / f"m{n}", n))
        approve(registry, n)
        deploy(context, n)
    return registry


def rollback(context, **kwargs) -> dict:
    return RollbackModelOperator(task_id="rollback", model_name="bot", **kwargs).execute(context)


def test_rollback_to_the_earlier_approved_version(two_deployed, context):
    out = rollback(context, reason="canary failed")
    assert out == {"name": "bot", "alias": "production", "version": 1, "previous": 2}
    assert context["ti"].pushed[-4:] == list(out.items())
    assert two_deployed.get_alias("bot", "production") == 1
    move = two_deployed.history("bot")[-1]
    assert (move["action"], move["from"], move["to"], move["reason"]) == ("alias", 2, 1, "canary failed")


def test_rollback_to_explicit_version_and_default_reason(two_deployed, context):
    out = rollback(context, to_version="1")
    assert (out["version"], out["previous"]) == (1, 2)
    assert two_deployed.history("bot")[-1]["reason"] == "rollback by manual__2026-01-02T03:04:05+00:00"


@pytest.mark.parametrize("empty", [None, 0])
def test_rollback_treats_an_unset_version_as_default(two_deployed, context, empty):
    assert rollback(context, to_version=empty)["version"] == 1


def test_rollback_refuses_a_version_that_is_not_a_number(two_deployed, context):
    with pytest.raises(AirflowFailException, match=r"^to_version must be an integer or None, got 'None'$"):
        rollback(context, to_version="None")


def test_rollback_refuses_an_unapproved_target(two_deployed, tmp_path, context, make_model):
    register(context, make_model(tmp_path / "m3", 3))
    with pytest.raises(
        AirflowFailException,
        match=r"^refusing to point bot@production at version 3: its sign-off is pending \(0 of 1 approvals",
    ):
        rollback(context, to_version=3)
    assert two_deployed.get_alias("bot", "production") == 2


def test_rollback_refuses_current_version(two_deployed, context):
    with pytest.raises(AirflowFailException, match=r"^bot@production already points to 2$"):
        rollback(context, to_version=2)


def test_rollback_skips_earlier_versions_that_are_not_approved(registry, tmp_path, context, make_model):
    # production: 1 (approved) -> 2 (moved outside the rule, unapproved) -> 3 (approved); rollback skips 2.
    for n in (1, 2, 3):
        register(context, make_model(tmp_path / f"m{n}", n))
        if n == 2:
            registry.set_alias("bot", "production", 2, actor="legacy", reason="before the sign-off gate")
        else:
            approve(registry, n)
            deploy(context, n)
    assert not is_approved(registry, "bot", 2)
    assert rollback(context)["version"] == 1


APPROVERS = {"required_approvals": "1", "allowed_users": "reviewer", "separation_of_duties": "true"}
"""The policy as llm_finetune and llm_model_rollback render it from the airloom_signoff_approvers Variable."""


def test_rollback_refuses_a_version_not_approved_by_an_approver(registry, tmp_path, context, make_model):
    # bot/1 approved by reviewer, bot/2 by mallory (not an approver), bot/3 current.
    for n, approver in ((1, "reviewer"), (2, "mallory"), (3, "reviewer")):
        register(context, make_model(tmp_path / f"m{n}", n))
        approve(registry, n, user=approver)
        deploy(context, n)
    with pytest.raises(
        AirflowFailException,
        match=r"^refusing to point bot@production at version 2: its sign-off is pending \(0 of 1 approvals, "
        r"requested by trainer\); approved by mallory, not an approver under the policy; "
        r"one of the approvers \['reviewer'\] must approve it \(on the sign-off page, Browse -> Model "
        r"sign-off, or with 'airloom signoff approve bot/2 --api-url AIRFLOW_URL'\)$",
    ):
        rollback(context, to_version=2, policy=APPROVERS)
    assert registry.get_alias("bot", "production") == 3
    # The default target skips it too, under the same policy; without the policy mallory's approval counts.
    assert rollback(context, policy=APPROVERS)["version"] == 1
    assert rollback(context, to_version=2)["version"] == 2


def test_cli_deploy_and_rollback_refuse_with_one_message(registry, tmp_path, context, make_model, capsys):
    """The three ways to move production go through governance.promotion and refuse alike."""
    from airloom.cli import main

    for n in (1, 2):
        register(context, make_model(tmp_path / f"m{n}", n))
        approve(registry, n)
        deploy(context, n)
    register(context, make_model(tmp_path / "m3", 3))  # sign-off requested, nobody approved
    message = (
        "refusing to point bot@production at version 3: its sign-off is pending (0 of 1 approvals, "
        "requested by trainer); a reviewer other than trainer must approve it (on the sign-off page, "
        "Browse -> Model sign-off, or with 'airloom signoff approve bot/3 --api-url AIRFLOW_URL')"
    )
    with pytest.raises(AirflowFailException) as deployed:
        deploy(context, 3)
    with pytest.raises(AirflowFailException) as rolled_back:
        rollback(context, to_version=3)
    assert main(["--registry", str(registry.store.uri()), "registry", "promote", "bot/3", "production"]) == 1
    assert str(deployed.value) == str(rolled_back.value) == message
    assert message in capsys.readouterr().err
    assert registry.get_alias("bot", "production") == 2


def test_rollback_with_nothing_to_go_back_to(registry, model_dir, context):
    register(context, model_dir)
    approve(registry, 1)
    deploy(context, 1)
    with pytest.raises(
        AirflowFailException, match=r"^bot@production: no earlier approved version to roll back to$"
    ):
        rollback(context)


def test_register_metadata_is_stored_as_json(registry, model_dir, context):
    register(context, model_dir, metadata={"gates": {"rouge_l": True}})
    stored = json.loads(registry.store.path("models/bot/versions/1/metadata.json").read_text())
    assert stored["gates"] == {"rouge_l": True} and stored["lineage"]["triggered_by"] == "trainer"
