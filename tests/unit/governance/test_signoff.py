"""Sign-off: requests with fingerprinted evidence, decisions under a policy, and the resulting state."""

from __future__ import annotations

import hashlib
import json

import pytest

from airloom.exceptions import CheckFailed, RegistryError, UsageError
from airloom.governance.signoff import (
    SignOffPolicy,
    is_approved,
    record_decision,
    request_signoff,
    signoff_status,
)
from airloom.registry.registry import ModelRegistry


@pytest.fixture
def registry(store, tmp_path):
    reg = ModelRegistry(store)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    reg.register("bot", folder, metadata={}, actor="trainer-dag")
    return reg


@pytest.fixture
def evidence(tmp_path):
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"rouge_l": 0.41}))
    checks = tmp_path / "data_checks"
    checks.mkdir()
    (checks / "train.json").write_text('{"success": true}')
    return {"eval_report": str(report), "data_checks": str(checks), "rouge_l": 0.41}


def test_request_fingerprints_evidence_and_is_audited(registry, evidence, tmp_path):
    req = request_signoff(registry, "bot", 1, requested_by="carol", evidence=evidence)
    ev = req["evidence"]
    assert ev["eval_report"]["sha256"] == hashlib.sha256((tmp_path / "eval.json").read_bytes()).hexdigest()
    assert ev["data_checks"]["files"] == 1 and len(ev["data_checks"]["sha256"]) == 64
    assert ev["rouge_l"] == {"value": 0.41}
    status = signoff_status(registry, "bot", 1)
    assert (status["state"], status["requested_by"], status["approvals"]) == ("pending", "carol", [])
    assert [h["action"] for h in registry.history("bot")] == ["register", "signoff_request"]

    with pytest.raises(UsageError, match=r"evidence 'missing': .*nope\.json does not exist"):
        request_signoff(
            registry, "bot", 1, requested_by="carol", evidence={"missing": str(tmp_path / "nope.json")}
        )
    with pytest.raises(RegistryError, match="no committed version 9"):
        request_signoff(registry, "bot", 9, requested_by="carol", evidence={})


def test_self_approval_is_refused(registry, evidence):
    request_signoff(registry, "bot", 1, requested_by="carol", evidence=evidence)
    with pytest.raises(CheckFailed, match=r"'carol' requested the sign-off of bot/1 and may not approve it"):
        record_decision(registry, "bot", 1, user="carol", decision="approve")
    assert signoff_status(registry, "bot", 1)["state"] == "pending"
    # Without separation of duties the requester may approve (e.g. a single-person sandbox).
    solo = SignOffPolicy(separation_of_duties=False)
    record_decision(registry, "bot", 1, user="carol", decision="approve", policy=solo)
    assert is_approved(registry, "bot", 1, solo)
    assert not is_approved(registry, "bot", 1)  # the default policy ignores that approval


def test_reject_wins(registry, evidence):
    request_signoff(registry, "bot", 1, requested_by="carol", evidence=evidence)
    record_decision(registry, "bot", 1, user="dave", decision="approve")
    record_decision(registry, "bot", 1, user="erin", decision="reject", comment="toxic answers in sample 12")
    status = signoff_status(registry, "bot", 1)
    assert status["state"] == "rejected"
    assert [r["comment"] for r in status["rejections"]] == ["toxic answers in sample 12"]
    assert not is_approved(registry, "bot", 1)
    # A new request (new evidence) starts a fresh round.
    request_signoff(registry, "bot", 1, requested_by="carol", evidence=evidence)
    assert signoff_status(registry, "bot", 1)["state"] == "pending"


def test_approval_by_allowed_users(registry, evidence):
    policy = SignOffPolicy(required_approvals=2, allowed_users=["dave", "erin", "frank"])
    request_signoff(registry, "bot", 1, requested_by="carol", evidence=evidence)
    with pytest.raises(CheckFailed, match=r"'mallory' may not sign off bot/1: the policy allows only"):
        record_decision(registry, "bot", 1, user="mallory", decision="approve", policy=policy)
    record_decision(registry, "bot", 1, user="dave", decision="approve", policy=policy)
    with pytest.raises(CheckFailed, match=r"'dave' already approved bot/1 \(1 of 2 approvals\)"):
        record_decision(registry, "bot", 1, user="dave", decision="approve", policy=policy)  # counts once
    assert signoff_status(registry, "bot", 1, policy)["state"] == "pending"
    record_decision(registry, "bot", 1, user="erin", decision="approve", comment="lgtm", policy=policy)
    status = signoff_status(registry, "bot", 1, policy)
    assert status["state"] == "approved"
    assert [a["user"] for a in status["approvals"]] == ["dave", "erin"]
    assert is_approved(registry, "bot", 1, policy)
    decisions = [h for h in registry.history("bot") if h["action"] == "signoff_decision"]
    assert [(d["actor"], d["decision"]) for d in decisions] == [("dave", "approve"), ("erin", "approve")]


def test_decision_preconditions(registry):
    with pytest.raises(CheckFailed, match=r"no sign-off was requested; call request_signoff first"):
        record_decision(registry, "bot", 1, user="dave", decision="approve")
    with pytest.raises(CheckFailed, match=r"cannot sign off bot/5: no such committed version"):
        record_decision(registry, "bot", 5, user="dave", decision="approve")
    with pytest.raises(UsageError, match="decision must be one of"):
        record_decision(registry, "bot", 1, user="dave", decision="lgtm")
    assert signoff_status(registry, "bot", 1)["requested_by"] is None


def test_policy_validation():
    with pytest.raises(UsageError, match="required_approvals must be at least 1"):
        SignOffPolicy(required_approvals=0)
    with pytest.raises(UsageError, match="allowed_users must be a list of user names"):
        SignOffPolicy(allowed_users="dave")
    with pytest.raises(UsageError, match=r"needs 2 approvals but allows only 1 user"):
        SignOffPolicy(required_approvals=2, allowed_users=["dave"])
    assert SignOffPolicy(allowed_users=("dave",)).allowed_users == ["dave"]


def test_policy_from_params_reads_text_values():
    from airloom.exceptions import UsageError
    from airloom.governance.signoff import SignOffPolicy

    p = SignOffPolicy.from_params(
        {"allowed_users": " reviewer, lead ,", "required_approvals": "2", "separation_of_duties": "True"}
    )
    assert (p.allowed_users, p.required_approvals, p.separation_of_duties) == (["reviewer", "lead"], 2, True)
    assert SignOffPolicy.from_params({"allowed_users": ""}).allowed_users is None
    assert SignOffPolicy.from_params({"allowed_users": ["a"]}).allowed_users == ["a"]
    assert SignOffPolicy.from_params(None) == SignOffPolicy()
    with pytest.raises(UsageError, match="unknown sign-off policy option"):
        SignOffPolicy.from_params({"approvers": "x"})
    with pytest.raises(UsageError, match="required_approvals must be an integer"):
        SignOffPolicy.from_params({"required_approvals": "two"})
