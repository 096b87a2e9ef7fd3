"""``airloom registry`` on both backends: verify naming the corrupt file, point-in-time history, CAS promote."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import airloom.registry.registry as registry_module
from airloom.cli import main
from airloom.registry.registry import ModelRegistry
from airloom.registry.store import LocalStore


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def uri_of(store) -> str:
    return str(store.root) if isinstance(store, LocalStore) else f"s3://{store.bucket}/{store.prefix}"


def make_model(folder, seed: int = 0):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    (folder / "model.safetensors").write_bytes(bytes([seed]) * 4096)
    return folder


def test_verify_names_the_corrupt_file_and_exits_1(store, tmp_path, capsys):
    reg = ["--registry", uri_of(store)]
    assert (
        run(capsys, *reg, "registry", "register", "bot", str(make_model(tmp_path / "m")), "--user", "ci")[0]
        == 0
    )
    rc, out, _ = run(capsys, *reg, "registry", "verify", "bot/1", "--json")
    assert rc == 0 and json.loads(out) == {"ref": "bot/1", "ok": True}

    key = "models/bot/versions/1/model.safetensors"
    store.put_bytes(key, b"\xff" + store.get_bytes(key)[1:])  # same size, one byte flipped
    rc, out, err = run(capsys, *reg, "registry", "verify", "bot/1")
    assert rc == 1 and out == ""
    assert err.startswith("airloom: check failed: bot/1: file model.safetensors is corrupt")
    assert store.uri(key) in err

    # Deploying it is refused with the same message, whatever the alias.
    rc, _, err = run(capsys, *reg, "registry", "promote", "bot/1", "candidate", "--user", "ci")
    assert rc == 1 and "file model.safetensors is corrupt" in err
    assert ModelRegistry(store).get_alias("bot", "candidate") is None


def test_history_answers_what_was_in_production_at_a_time(tmp_path, monkeypatch, capsys):
    uri = str(tmp_path / "reg")
    registry = ModelRegistry.from_uri(uri)
    clock = [datetime(2026, 11, 17, 8, tzinfo=UTC)]
    monkeypatch.setattr(registry_module, "now", lambda: clock[0])  # the audit trail's timestamps
    for i in range(3):
        registry.register("bot", make_model(tmp_path / f"m{i}", i), metadata={}, actor="ci")
    for when, version, actor, reason in [
        (datetime(2026, 11, 18, 9, tzinfo=UTC), 1, "alice", "first release"),
        (datetime(2026, 11, 20, 9, tzinfo=UTC), 2, "bob", "better rouge"),
        (datetime(2026, 11, 22, 15, tzinfo=UTC), 1, "carol", "rollback"),
    ]:
        clock[0] = when
        registry.set_alias("bot", "production", version, actor=actor, reason=reason)
    monkeypatch.undo()

    reg = ["--registry", uri, "registry", "history", "bot"]
    rc, out, err = run(capsys, *reg, "--alias", "production", "--at", "2026-11-20T12:00:00")
    assert rc == 0, err
    assert out.strip() == (
        "bot@production at 2026-11-20T12:00:00+00:00: version 2 (set 2026-11-20T09:00:00+00:00 by bob: better rouge)"
    )
    rc, out, _ = run(capsys, *reg, "--alias", "production", "--at", "2026-11-20T12:00:00", "--json")
    assert json.loads(out) == {
        "name": "bot",
        "alias": "production",
        "at": "2026-11-20T12:00:00+00:00",
        "version": 2,
        "set_at": "2026-11-20T09:00:00+00:00",
        "set_by": "bob",
        "reason": "better rouge",
    }
    answers = {}
    for at in ["2026-11-18T08:59:59", "2026-11-19", "2026-11-20T08:30:00-01:00", "2026-11-23T00:00:00Z"]:
        rc, out, _ = run(capsys, *reg, "--at", at, "--json")  # --alias defaults to production
        assert rc == 0
        answers[at] = json.loads(out)["version"]
    assert answers == {
        "2026-11-18T08:59:59": None,
        "2026-11-19": 1,
        "2026-11-20T08:30:00-01:00": 2,
        "2026-11-23T00:00:00Z": 1,
    }
    rc, out, _ = run(capsys, *reg, "--at", "2026-11-18T08:00:00")
    assert rc == 0 and out.strip() == "bot@production at 2026-11-18T08:00:00+00:00: not set yet"

    rc, out, _ = run(capsys, *reg, "--alias", "production", "--json")
    assert [(r["from"], r["to"], r["actor"]) for r in json.loads(out)] == [
        (None, 1, "alice"),
        (1, 2, "bob"),
        (2, 1, "carol"),
    ]

    rc, _, err = run(capsys, *reg, "--at", "last tuesday")
    assert rc == 2 and "--at 'last tuesday' is not an ISO 8601 time" in err
    rc, _, err = run(capsys, "--registry", uri, "registry", "history", "ghost", "--at", "2026-11-20")
    assert rc == 2 and "model 'ghost' has no history" in err and "['bot']" in err


def test_promote_is_compare_and_swap(tmp_path, capsys):
    uri = str(tmp_path / "reg")
    registry = ModelRegistry.from_uri(uri)
    for i in range(3):
        registry.register("bot", make_model(tmp_path / f"m{i}", i), metadata={}, actor="ci")
    reg = ["--registry", uri, "registry", "promote"]
    assert run(capsys, *reg, "bot/1", "staging", "--expect", "none")[0] == 0
    assert run(capsys, *reg, "bot/2", "staging", "--expect", "1")[0] == 0
    # A second promoter who still believes staging -> 1 loses instead of overwriting.
    rc, _, err = run(capsys, *reg, "bot/3", "staging", "--expect", "1")
    assert rc == 2 and "bot@staging points to 2 (expected 1)" in err
    rc, _, err = run(capsys, *reg, "bot/3", "staging", "--expect", "latest")
    assert rc == 2 and "--expect 'latest'" in err
    assert registry.get_alias("bot", "staging") == 2
