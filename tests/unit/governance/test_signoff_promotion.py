"""Only approved versions reach ``production``: governance.promotion's rule, through the library and the CLI."""

from __future__ import annotations

import json

import pytest

from airloom.cli import main
from airloom.exceptions import CheckFailed, ConflictError
from airloom.governance.promotion import promote, rollback
from airloom.governance.signoff import SignOffPolicy, record_decision, request_signoff
from airloom.registry.registry import ModelRegistry


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def reg_uri(tmp_path) -> str:
    """A local registry with versions 1-3 of ``bot``, registered by the training pipeline's user."""
    uri = str(tmp_path / "reg")
    reg = ModelRegistry.from_uri(uri)
    for i in range(3):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"v": i}))
        reg.register("bot", folder, metadata={}, actor="trainer")
    return uri


def production(uri: str) -> int | None:
    return ModelRegistry.from_uri(uri).get_alias("bot", "production")


def test_self_approval_refused_and_unapproved_version_not_promoted(reg_uri, capsys):
    reg = ["--registry", reg_uri]
    rc, _, err = run(capsys, *reg, "registry", "promote", "bot/1", "production", "--user", "trainer")
    assert rc == 1
    assert "refusing to point bot@production at version 1: no sign-off was requested" in err
    assert "airloom signoff request bot/1" in err

    assert run(capsys, *reg, "signoff", "request", "bot/1", "--user", "trainer")[0] == 0
    rc, _, err = run(capsys, *reg, "signoff", "approve", "bot/1", "--user", "trainer")
    assert rc == 1 and "'trainer' requested the sign-off of bot/1 and may not approve it" in err

    rc, _, err = run(capsys, *reg, "registry", "promote", "bot/1", "production", "--user", "trainer")
    assert rc == 1
    assert "its sign-off is pending (0 of 1 approvals, requested by trainer)" in err
    assert "a reviewer other than trainer must approve it (on the sign-off page" in err
    assert production(reg_uri) is None

    # Other aliases are not gated: a candidate may be pointed at before sign-off.
    assert run(capsys, *reg, "registry", "promote", "bot/1", "candidate", "--user", "trainer")[0] == 0

    assert run(capsys, *reg, "signoff", "approve", "bot/1", "--user", "reviewer")[0] == 0
    rc, out, err = run(capsys, *reg, "registry", "promote", "bot/1", "production", "--user", "reviewer")
    assert rc == 0, err
    assert "bot@production -> 1 (was None)" in out
    assert production(reg_uri) == 1


def test_rejected_version_cannot_be_promoted(reg_uri, capsys):
    reg = ["--registry", reg_uri]
    assert run(capsys, *reg, "signoff", "request", "bot/2", "--user", "trainer")[0] == 0
    assert run(capsys, *reg, "signoff", "approve", "bot/2", "--user", "alice")[0] == 0
    assert run(capsys, *reg, "signoff", "reject", "bot/2", "--user", "bob", "--comment", "leaks PII")[0] == 0
    rc, _, err = run(capsys, *reg, "registry", "promote", "bot/2", "production", "--user", "alice", "--json")
    assert rc == 1
    assert "its sign-off was rejected by bob ('leaks PII'); a rejected version is never deployed" in err
    assert production(reg_uri) is None
    history = ModelRegistry.from_uri(reg_uri).history("bot")
    assert not [h for h in history if h["action"] == "alias"]  # a refused promotion leaves no trace


def test_rollback_only_to_an_approved_version(reg_uri, capsys):
    registry = ModelRegistry.from_uri(reg_uri)
    reg = ["--registry", reg_uri]
    for version in (1, 2):
        request_signoff(registry, "bot", version, requested_by="trainer", evidence={})
        record_decision(registry, "bot", version, user="reviewer", decision="approve")
        assert (
            run(capsys, *reg, "registry", "promote", f"bot/{version}", "production", "--user", "ops")[0] == 0
        )
    request_signoff(registry, "bot", 3, requested_by="trainer", evidence={})
    record_decision(registry, "bot", 3, user="reviewer", decision="reject", comment="regressed on math")

    # Rolling "back" (or forward) to a never-approved or rejected version is refused like a deploy.
    rc, _, err = run(capsys, *reg, "registry", "promote", "bot/3", "production", "--user", "ops")
    assert rc == 1 and "rejected by reviewer ('regressed on math')" in err
    assert production(reg_uri) == 2

    rc, out, err = run(
        capsys,
        *reg,
        "registry",
        "promote",
        "bot/1",
        "production",
        "--user",
        "ops",
        "--reason",
        "rollback: v2 hallucinates",
        "--json",
    )
    assert rc == 0, err
    record = json.loads(out)
    assert (record["from"], record["to"], record["reason"]) == (2, 1, "rollback: v2 hallucinates")
    assert production(reg_uri) == 1

    # The approval is re-checked at rollback time: a version rejected after its deploy is out for good.
    record_decision(registry, "bot", 2, user="auditor", decision="reject", comment="found a data leak")
    rc, _, err = run(capsys, *reg, "registry", "promote", "bot/2", "production", "--user", "ops")
    assert rc == 1 and "rejected by auditor" in err
    assert production(reg_uri) == 1


def test_promote_gates_production_and_records_the_move(reg_uri):
    registry = ModelRegistry.from_uri(reg_uri)
    record = promote(registry, "bot", 1, "staging", actor="ci", reason="smoke")  # not a gated alias
    assert (record["action"], record["from"], record["to"], record["actor"]) == ("alias", None, 1, "ci")
    with pytest.raises(
        CheckFailed, match=r"^refusing to point bot@staging at version 2: no sign-off was requested"
    ):
        promote(registry, "bot", 2, "staging", actor="ci", reason="", require_approval=True)
    with pytest.raises(
        CheckFailed, match=r"^refusing to point bot@production at version 1: no sign-off was requested"
    ):
        promote(registry, "bot", 1, "production", actor="ops", reason="")
    request_signoff(registry, "bot", 1, requested_by="trainer", evidence={})
    record_decision(registry, "bot", 1, user="reviewer", decision="approve")
    assert promote(registry, "bot", 1, "production", actor="ops", reason="release")["to"] == 1
    assert registry.history("bot")[-1]["reason"] == "release"


def test_promote_applies_the_approver_list_and_separation_of_duties(reg_uri):
    registry = ModelRegistry.from_uri(reg_uri)
    request_signoff(registry, "bot", 1, requested_by="trainer", evidence={})
    record_decision(
        registry,
        "bot",
        1,
        user="trainer",
        decision="approve",
        policy=SignOffPolicy(separation_of_duties=False),
    )
    record_decision(registry, "bot", 1, user="mallory", decision="approve")
    approvers = SignOffPolicy(allowed_users=["reviewer", "trainer"])
    with pytest.raises(
        CheckFailed,
        match=r"\(0 of 1 approvals, requested by trainer\); approved by mallory, not an approver under the "
        r"policy; one of the approvers \['reviewer'\] must approve it",
    ):
        promote(registry, "bot", 1, "production", actor="ops", reason="", policy=approvers)
    assert registry.get_alias("bot", "production") is None


def test_promote_reads_the_alias_before_checking(reg_uri, monkeypatch):
    """An alias moved while the version is verified makes the compare-and-swap refuse, not overwrite."""
    registry = ModelRegistry.from_uri(reg_uri)
    verify = registry.verify

    def verify_while_someone_moves_it(name, version):
        verify(name, version)
        registry.set_alias("bot", "staging", 3, actor="someone-else")

    monkeypatch.setattr(registry, "verify", verify_while_someone_moves_it)
    with pytest.raises(ConflictError, match=r"bot@staging points to 3 \(expected None\)"):
        promote(registry, "bot", 1, "staging", actor="ci", reason="")
    assert registry.get_alias("bot", "staging") == 3


def test_rollback_library(reg_uri):
    registry = ModelRegistry.from_uri(reg_uri)
    with pytest.raises(CheckFailed, match=r"^bot@production: no earlier approved version to roll back to$"):
        rollback(registry, "bot", "production", actor="ops", reason="")
    for version in (1, 2):
        request_signoff(registry, "bot", version, requested_by="trainer", evidence={})
        record_decision(registry, "bot", version, user="reviewer", decision="approve")
        promote(registry, "bot", version, "production", actor="ops", reason="")
    with pytest.raises(CheckFailed, match=r"^bot@production already points to 2$"):
        rollback(registry, "bot", "production", actor="ops", reason="", to_version=2)
    with pytest.raises(
        CheckFailed, match=r"^refusing to point bot@production at version 1: its sign-off is pending"
    ):
        rollback(
            registry,
            "bot",
            "production",
            actor="ops",
            reason="",
            to_version=1,
            policy=SignOffPolicy(allowed_users=["lead"]),
        )
    record = rollback(registry, "bot", "production", actor="ops", reason="canary failed")
    assert (record["from"], record["to"], record["reason"]) == (2, 1, "canary failed")
