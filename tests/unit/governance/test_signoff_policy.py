"""Who may sign off: system identities never, the two-person rule counts distinct people other than the
requester, and a production policy counts only decisions that came through an authenticated path."""

from __future__ import annotations

import pytest

from airloom.exceptions import CheckFailed, UsageError
from airloom.governance.promotion import promote, rollback
from airloom.governance.signoff import (
    SignOffPolicy,
    record_decision,
    request_signoff,
    signoff_status,
    waiting_for,
    why_not_decide,
)
from airloom.registry.registry import ModelRegistry


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    reg = ModelRegistry.from_uri(tmp_path / "registry")
    for v in (1, 2):
        folder = tmp_path / f"model{v}"
        folder.mkdir()
        (folder / "config.json").write_text(f'{{"v": {v}}}')
        reg.register("bot", folder, metadata={}, actor="trainer")
    return reg


def _approve(registry, user, version=1, policy=None, via="plugin"):
    return record_decision(registry, "bot", version, user=user, decision="approve", policy=policy, via=via)


# -- system identities ------------------------------------------------------------------------------


def test_a_system_identity_never_approves_under_any_policy(registry):
    request_signoff(registry, "bot", 1, requested_by="alice", evidence={}, via="task")
    for policy in (SignOffPolicy(), SignOffPolicy(separation_of_duties=False)):
        with pytest.raises(
            CheckFailed, match=r"'system:llm_finetune' is a system identity .* never signs off"
        ):
            _approve(registry, "system:llm_finetune", policy=policy)
    with pytest.raises(UsageError, match=r"allowed_users names system identities \['system:cron'\]"):
        SignOffPolicy(allowed_users=["reviewer", "system:cron"])
    assert not SignOffPolicy().allows("system:llm_finetune")


def test_system_requester_means_any_approver_never_the_system(registry):
    """A scheduled or asset-triggered run nobody can be named for: every listed approver may approve."""
    policy = SignOffPolicy(allowed_users=["reviewer", "lead"])
    request_signoff(
        registry, "bot", 1, requested_by="system:llm_feedback_monitoring", evidence={}, via="task"
    )
    status = signoff_status(registry, "bot", 1, policy)
    assert waiting_for(status, policy) == (
        "waiting for 1 more approval from one of lead, reviewer "
        "(the requester system:llm_feedback_monitoring is a system identity and never approves)"
    )
    with pytest.raises(CheckFailed, match="system identity"):
        _approve(registry, "system:llm_feedback_monitoring", policy=policy)
    # A system approval written straight into the registry (not through record_decision) does not count.
    registry.append_record(
        f"{registry.model_prefix('bot')}signoffs/1/",
        {
            "kind": "decision",
            "request_id": status["request_id"],
            "user": "system:llm_finetune",
            "decision": "approve",
            "via": "plugin",
        },
    )
    assert signoff_status(registry, "bot", 1)["state"] == "pending"  # not even when anyone may approve
    forged = signoff_status(registry, "bot", 1, policy)
    assert forged["state"] == "pending" and forged["approvals"] == []
    assert [(d["user"], d["reason"]) for d in forged["not_counted"]] == [
        ("system:llm_finetune", "a system identity never signs off")
    ]
    _approve(registry, "reviewer", policy=policy)
    assert signoff_status(registry, "bot", 1, policy)["state"] == "approved"


# -- the two-person rule ----------------------------------------------------------------------------


def test_two_person_rule_counts_distinct_people_other_than_the_requester(registry):
    policy = SignOffPolicy.from_params({"min_approvals": "2", "allowed_users": "trainer, reviewer, lead"})
    assert (policy.min_approvals, policy.required_approvals) == (2, 2)
    request_signoff(registry, "bot", 1, requested_by="trainer", evidence={}, via="task")

    # The requester does not count, even though the approver list names them.
    with pytest.raises(
        CheckFailed, match=r"'trainer' requested the sign-off of bot/1 .*separation of duties"
    ):
        _approve(registry, "trainer", policy=policy)
    _approve(registry, "reviewer", policy=policy)
    status = signoff_status(registry, "bot", 1, policy)
    assert (status["state"], len(status["approvals"]), status["required_approvals"]) == ("pending", 1, 2)
    assert waiting_for(status, policy) == "waiting for 1 more approval from one of lead"

    # The same person twice does not count: refused when recorded, ignored when forged into the registry.
    with pytest.raises(CheckFailed, match=r"'reviewer' already approved bot/1 \(1 of 2 approvals\)"):
        _approve(registry, "reviewer", policy=policy)
    registry.append_record(
        f"{registry.model_prefix('bot')}signoffs/1/",
        {
            "kind": "decision",
            "request_id": status["request_id"],
            "user": "reviewer",
            "decision": "approve",
            "via": "plugin",
        },
    )
    status = signoff_status(registry, "bot", 1, policy)
    assert status["state"] == "pending" and [a["user"] for a in status["approvals"]] == ["reviewer"]
    assert status["not_counted"][-1]["reason"] == "already counted: a person's approval counts once"
    with pytest.raises(CheckFailed, match=r"pending \(1 of 2 approvals, requested by trainer\)"):
        promote(registry, "bot", 1, "production", actor="ops", reason="", policy=policy)

    # A second, distinct approver completes it; deploy under the same policy object moves the alias.
    _approve(registry, "lead", policy=policy)
    status = signoff_status(registry, "bot", 1, policy)
    assert status["state"] == "approved" and [a["user"] for a in status["approvals"]] == ["reviewer", "lead"]
    promote(registry, "bot", 1, "production", actor="ops", reason="two approvals", policy=policy)
    assert registry.get_alias("bot", "production") == 1


def test_two_person_rule_from_the_environment_reaches_rollback(registry, monkeypatch):
    """The CLI's policy: the Variables' environment form; rollback judges the target under it too."""
    monkeypatch.setenv("AIRFLOW_VAR_AIRLOOM_SIGNOFF_MIN_APPROVALS", "2")
    monkeypatch.setenv("AIRFLOW_VAR_AIRLOOM_SIGNOFF_APPROVERS", "reviewer,lead")
    policy = SignOffPolicy.from_environment()
    assert (policy.required_approvals, policy.allowed_users) == (2, ["reviewer", "lead"])
    one = SignOffPolicy()
    for v in (1, 2):
        request_signoff(registry, "bot", v, requested_by="trainer", evidence={}, via="task")
        _approve(registry, "reviewer", version=v, policy=one)
    promote(registry, "bot", 1, "production", actor="ops", reason="", policy=one)
    promote(registry, "bot", 2, "production", actor="ops", reason="", policy=one)
    # Version 1 had one approval: not enough under the two-person rule, so there is nothing to go back to.
    with pytest.raises(CheckFailed, match="no earlier approved version to roll back to"):
        rollback(registry, "bot", "production", actor="ops", reason="bad canary", policy=policy)
    _approve(registry, "lead", version=1, policy=policy)
    rollback(registry, "bot", "production", actor="ops", reason="bad canary", policy=policy)
    assert registry.get_alias("bot", "production") == 1


# -- authenticated paths only (production) ----------------------------------------------------------


def test_production_policy_refuses_and_ignores_local_cli_decisions(registry):
    embedded, production = SignOffPolicy(), SignOffPolicy(authenticated_only=True)
    request_signoff(registry, "bot", 1, requested_by="trainer", evidence={}, via="task")
    # The embedded default keeps the demo's local approval: recorded as such.
    record = _approve(registry, "reviewer", policy=embedded, via="local-cli")
    assert record["via"] == "local-cli"
    assert registry.history("bot")[-1]["via"] == "local-cli"
    assert signoff_status(registry, "bot", 1, embedded)["state"] == "approved"
    # Production does not count it, and refuses a new one with a sentence that says what to do.
    status = signoff_status(registry, "bot", 1, production)
    assert status["state"] == "pending"
    assert status["not_counted"][0]["reason"] == "made through the local-cli path, not an authenticated one"
    with pytest.raises(
        CheckFailed, match=r"accepts sign-off decisions only through authenticated paths .*--api-url"
    ):
        _approve(registry, "lead", policy=production, via="local-cli")
    with pytest.raises(CheckFailed, match="its sign-off is pending"):
        promote(registry, "bot", 1, "production", actor="ops", reason="", policy=production)
    # The same reviewer through the page counts.
    _approve(registry, "reviewer", policy=production, via="plugin")
    assert signoff_status(registry, "bot", 1, production)["approvals"][0]["via"] == "plugin"
    promote(registry, "bot", 1, "production", actor="ops", reason="", policy=production)


def test_authenticated_only_is_the_deployments_setting(monkeypatch):
    assert SignOffPolicy().authenticated_only is False  # the embedded default
    monkeypatch.setenv("AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY", "1")
    assert SignOffPolicy().authenticated_only is True
    assert SignOffPolicy.from_params({"allowed_users": ""}).authenticated_only is True
    assert SignOffPolicy.from_params({"authenticated_only": "false"}).authenticated_only is False
    monkeypatch.setenv("AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY", "maybe")
    with pytest.raises(UsageError, match="AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY must be true or false"):
        SignOffPolicy()


def test_policy_params_round_trip_and_refuse_contradictions():
    policy = SignOffPolicy.from_params(
        {"min_approvals": 2, "allowed_users": "a,b", "separation_of_duties": "yes", "authenticated_only": 1}
    )
    assert SignOffPolicy.from_params(policy.to_params()) == policy
    assert policy.to_params() == {
        "required_approvals": 2,
        "allowed_users": ["a", "b"],
        "separation_of_duties": True,
        "authenticated_only": True,
    }
    # Unset Variables render as "": the defaults apply (one approval, separation of duties on).
    assert (
        SignOffPolicy.from_params(
            {"required_approvals": "", "allowed_users": "", "separation_of_duties": True}
        )
        == SignOffPolicy()
    )
    with pytest.raises(UsageError, match="min_approvals 2 and required_approvals 1 disagree"):
        SignOffPolicy.from_params({"min_approvals": 2, "required_approvals": 1})
    with pytest.raises(UsageError, match="separation_of_duties must be true or false"):
        SignOffPolicy.from_params({"separation_of_duties": "perhaps"})


def test_why_not_decide_names_each_reason_plainly(registry):
    policy = SignOffPolicy(allowed_users=["reviewer", "lead"], required_approvals=2)
    request_signoff(registry, "bot", 1, requested_by="reviewer", evidence={}, via="task")
    status = signoff_status(registry, "bot", 1, policy)

    def reason(user, decision="approve", via="plugin", p=policy):
        refusal = why_not_decide(status, p, user, decision, via=via)
        return None if refusal is None else refusal.reason

    assert reason("mallory") == "'mallory' may not sign off bot/1: the policy allows only reviewer, lead"
    assert "separation of duties" in reason("reviewer")
    assert reason("reviewer", "reject") is None  # a requester may withdraw
    assert reason("lead") is None
    assert "system identity" in reason("system:llm_finetune")
    assert "not through the local-cli" in reason(
        "lead", via="local-cli", p=SignOffPolicy(authenticated_only=True)
    )
