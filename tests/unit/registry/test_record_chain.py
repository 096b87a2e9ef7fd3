"""Hash-chained records (sign-offs, alias moves, audit) on both backends, and what ``verify_records`` and
``airloom registry verify`` report when someone edits, removes, reorders or inserts one.

Tampering is done the way an operator with write access to the bucket or folder would: through the store,
byte for byte, never through the registry.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import threading
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

import airloom.registry.registry as registry_module
from airloom.cli import main
from airloom.exceptions import RegistryError
from airloom.governance.promotion import promote, rollback
from airloom.governance.signoff import record_decision, request_signoff
from airloom.registry.records import dumps, self_hash
from airloom.registry.registry import ModelRegistry
from airloom.registry.store import LocalStore, S3Store

AUDIT = "models/bot/audit/"


def make_model(folder, seed: int = 0):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    (folder / "model.safetensors").write_bytes(bytes([seed]) * 512)
    return folder


def uri_of(store) -> str:
    return str(store.root) if isinstance(store, LocalStore) else f"s3://{store.bucket}/{store.prefix}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key(seq: int, prefix: str = AUDIT) -> str:
    return f"{prefix}{seq:08d}.json"


@pytest.fixture
def registry(store, tmp_path):
    """bot/1 and bot/2 registered, production moved twice: an audit stream of 4 chained records."""
    reg = ModelRegistry(store)
    for i in (1, 2):
        reg.register("bot", make_model(tmp_path / f"m{i}", i), metadata={}, actor="ci")
    reg.set_alias("bot", "production", 1, actor="alice")
    reg.set_alias("bot", "production", 2, actor="bob")
    return reg


def problems(reg: ModelRegistry) -> list[tuple[str, str]]:
    return [(f.problem, f.key) for f in reg.verify_records("bot").findings]


def rewrite(store, k: str, **changes) -> None:
    record = json.loads(store.get_bytes(k))
    record.update(changes)
    store.put_bytes(k, json.dumps(record, indent=2, sort_keys=True).encode())


# -- the chain ----------------------------------------------------------------------------------------


def test_each_record_names_its_predecessor_and_head_names_the_newest(registry, store):
    keys = [k for k in store.list(AUDIT)]
    assert keys == [key(s) for s in (1, 2, 3, 4)] + [AUDIT + "HEAD"]
    data = [store.get_bytes(key(s)) for s in (1, 2, 3, 4)]
    records = [json.loads(d) for d in data]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert records[0]["prev_sha256"] is None  # genesis
    assert [r["prev_sha256"] for r in records[1:]] == [sha(d) for d in data[:-1]]
    head = json.loads(store.get_bytes(AUDIT + "HEAD"))
    assert (head["seq"], head["sha256"], head["key"]) == (4, sha(data[-1]), key(4))

    # What the callers see is what is stored, chain fields included; history keeps its order and content.
    history = registry.history("bot")
    assert history == records
    assert [(h["action"], h.get("to")) for h in history] == [
        ("register", None),
        ("register", None),
        ("alias", 1),
        ("alias", 2),
    ]
    report = registry.verify_records()
    assert report.ok, report.findings
    assert [(s.stream, s.chained, s.legacy, s.head_seq) for s in report.streams] == [(AUDIT, 4, 0, 4)]


def test_signoff_records_form_their_own_chain(registry, store):
    request_signoff(registry, "bot", 2, requested_by="trainer", evidence={"rouge_l": 0.4})
    record_decision(registry, "bot", 2, user="reviewer", decision="approve")
    stream = "models/bot/signoffs/2/"
    request, decision = (json.loads(store.get_bytes(key(s, stream))) for s in (1, 2))
    assert (request["kind"], request["seq"], request["prev_sha256"]) == ("request", 1, None)
    assert (decision["kind"], decision["seq"]) == ("decision", 2)
    assert decision["prev_sha256"] == sha(store.get_bytes(key(1, stream)))
    report = registry.verify_records("bot")
    assert report.ok, report.findings
    assert {s.stream: s.chained for s in report.streams} == {AUDIT: 6, stream: 2}


def test_history_ties_follow_the_chain(tmp_path, monkeypatch):
    """Records with the same timestamp (a coarse clock) keep their append order instead of a uuid's."""
    reg = ModelRegistry.from_uri(tmp_path / "reg")
    monkeypatch.setattr(registry_module, "now", lambda: datetime(2026, 11, 17, 8, tzinfo=UTC))
    for i in range(12):
        reg.append_audit("bot", {"action": "note", "n": i})
    assert [h["n"] for h in reg.history("bot")] == list(range(12))


def test_concurrent_appends_give_one_gap_free_chain(store):
    """8 writers × 5 records on one stream, each writer with its own registry (and S3 client)."""
    writers, each = 8, 5
    spec = (
        (lambda: LocalStore(store.root))
        if isinstance(store, LocalStore)
        else (lambda: S3Store(store.bucket, store.prefix))
    )
    barrier = threading.Barrier(writers, timeout=30)
    errors: list[BaseException] = []

    def write(w: int) -> None:
        try:
            reg = ModelRegistry(spec())
            barrier.wait()
            for i in range(each):
                reg.append_audit("bot", {"action": "note", "writer": w, "i": i})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    reg = ModelRegistry(store)
    records = [json.loads(store.get_bytes(k)) for k in store.list(AUDIT) if k.endswith(".json")]
    assert sorted(r["seq"] for r in records) == list(range(1, writers * each + 1))
    assert sorted((r["writer"], r["i"]) for r in records) == [
        (w, i) for w in range(writers) for i in range(each)
    ]
    # Each writer's own records are in its order: nobody chained onto a record it had not seen.
    for w in range(writers):
        mine = sorted((r["seq"], r["i"]) for r in records if r["writer"] == w)
        assert [i for _, i in mine] == list(range(each))
    assert json.loads(store.get_bytes(AUDIT + "HEAD"))["seq"] == writers * each
    report = reg.verify_records("bot")
    assert report.ok, report.findings


def test_record_created_twice_on_moto_is_detected(s3_store, monkeypatch):
    """moto lets two If-None-Match PUTs of one seq both pass; the read-back sends the loser to the next seq."""
    from tests.unit.registry.test_registry_concurrency import _in_threads, _RacingMoto

    ModelRegistry(s3_store).append_audit("bot", {"action": "note", "n": 0})
    _RacingMoto(monkeypatch, key(2))
    writers = [ModelRegistry(S3Store(s3_store.bucket, s3_store.prefix)) for _ in range(2)]
    results = _in_threads(
        *(
            lambda r=r, n=n: r.append_audit("bot", {"action": "note", "n": n})
            for n, r in enumerate(writers, 1)
        )
    )
    assert all(isinstance(r, dict) for r in results), results
    assert sorted(r["seq"] for r in results) == [2, 3]
    stored = [json.loads(s3_store.get_bytes(key(s)))["n"] for s in (1, 2, 3)]
    assert stored[0] == 0 and sorted(stored[1:]) == [1, 2]  # neither record lost
    assert ModelRegistry(s3_store).verify_records("bot").ok


def test_head_cas_won_twice_on_moto_still_ends_at_the_newest(s3_store, monkeypatch):
    """Two head moves from the same etag both "win" on moto; an older head landing last is moved on."""
    from tests.unit.registry.test_registry_concurrency import _in_threads, _RacingMoto

    ModelRegistry(s3_store).append_audit("bot", {"action": "note", "n": 0})
    _RacingMoto(monkeypatch, AUDIT + "HEAD")
    writers = [ModelRegistry(S3Store(s3_store.bucket, s3_store.prefix)) for _ in range(2)]
    results = _in_threads(
        *(
            lambda r=r, n=n: r.append_audit("bot", {"action": "note", "n": n})
            for n, r in enumerate(writers, 1)
        )
    )
    assert sorted(r["seq"] for r in results) == [2, 3], results
    assert json.loads(s3_store.get_bytes(AUDIT + "HEAD"))["seq"] == 3
    assert ModelRegistry(s3_store).verify_records("bot").ok


def test_a_lagging_head_is_caught_up_by_the_next_append(registry, store):
    """A writer that stopped between its record and the head move: verify says so, the next append anchors it."""
    head = store.get_bytes(AUDIT + "HEAD")
    registry.append_audit("bot", {"action": "note"})
    store.put_bytes(AUDIT + "HEAD", head)  # as if the head had never moved past seq 4
    assert problems(registry) == [("unanchored", key(5))]
    registry.append_audit("bot", {"action": "note"})
    assert json.loads(store.get_bytes(key(6)))["prev_sha256"] == sha(store.get_bytes(key(5)))
    assert registry.verify_records("bot").ok


def test_chain_fields_are_the_registry_s(registry):
    from airloom.exceptions import UsageError

    with pytest.raises(UsageError, match=r"record fields \['seq'\] are set by the registry's hash chain"):
        registry.append_audit("bot", {"action": "note", "seq": 1})


# -- tampering ----------------------------------------------------------------------------------------


def test_an_edited_record_is_reported(registry, store):
    rewrite(store, key(3), actor="mallory")  # a naive edit: the record's own hash no longer matches
    findings = registry.verify_records("bot").findings
    assert [(f.problem, f.key) for f in findings] == [("edited", key(3))]
    assert findings[0].uri == store.uri(key(3)) and "record_sha256" in findings[0].detail


def test_an_edit_that_recomputes_the_record_hash_is_caught_by_the_successor(registry, store):
    record = json.loads(store.get_bytes(key(2)))
    record["actor"] = "mallory"
    record["record_sha256"] = self_hash(record)
    store.put_bytes(key(2), dumps(record, "record"))
    findings = registry.verify_records("bot").findings
    assert [(f.problem, f.key) for f in findings] == [("edited", key(2))]
    assert "differs from the one seq 3 names" in findings[0].detail


def test_an_edited_newest_record_is_caught_by_the_head(registry, store):
    record = json.loads(store.get_bytes(key(4)))
    record["to"] = 1
    record["record_sha256"] = self_hash(record)
    store.put_bytes(key(4), dumps(record, "record"))
    findings = registry.verify_records("bot").findings
    assert ("edited", key(4)) in [(f.problem, f.key) for f in findings]
    assert any("HEAD" in f.detail for f in findings)


def test_a_garbled_record_is_reported_not_a_crash(registry, store):
    store.put_bytes(key(3), b"{not json")
    assert problems(registry) == [("edited", key(3))]


def test_a_removed_middle_record_is_reported(registry, store):
    store.delete_prefix(key(2))
    assert problems(registry) == [("removed", key(2))]


def test_a_removed_newest_record_is_reported(registry, store):
    """Removing the last record leaves a consistent chain: only the head says it existed."""
    store.delete_prefix(key(4))
    findings = registry.verify_records("bot").findings
    assert [(f.problem, f.key) for f in findings if f.problem == "truncated-tail"] == [
        ("truncated-tail", key(4))
    ]
    # The alias still points where the removed move put it: that move is now unaudited too.
    assert [f.problem for f in findings] == ["truncated-tail", "unaudited"]


def test_a_removed_head_is_reported(registry, store):
    store.delete_prefix(AUDIT + "HEAD")
    assert problems(registry) == [("truncated-tail", AUDIT + "HEAD")]


def test_a_removed_rejection_is_reported(registry, store):
    """The attack the chain is for: delete the reviewer's rejection so the version looks pending."""
    request_signoff(registry, "bot", 2, requested_by="trainer", evidence={})
    record_decision(registry, "bot", 2, user="reviewer", decision="reject", comment="toxic")
    store.delete_prefix(key(2, "models/bot/signoffs/2/"))
    assert problems(registry) == [("truncated-tail", key(2, "models/bot/signoffs/2/"))]


def test_reordered_records_are_reported(registry, store):
    two, three = store.get_bytes(key(2)), store.get_bytes(key(3))
    store.put_bytes(key(2), three)
    store.put_bytes(key(3), two)
    assert problems(registry) == [("reordered", key(2)), ("reordered", key(3))]


def test_inserted_records_are_reported(registry, store):
    # An old-style record (no chain fields) dated now, as the pre-chain code wrote them.
    forged = {
        "at": datetime.now(UTC).isoformat(),
        "id": "forged",
        "action": "signoff_decision",
        "actor": "boss",
    }
    store.put_bytes(AUDIT + "20991231T000000.000000Z-forged.json", json.dumps(forged).encode())
    # A copy of a chained record under a name outside the chain's keys.
    store.put_bytes(AUDIT + "00000002-copy.json", store.get_bytes(key(2)))
    # A record past the head.
    record = {**json.loads(store.get_bytes(key(4))), "seq": 5, "prev_sha256": sha(store.get_bytes(key(4)))}
    record["record_sha256"] = self_hash(record)  # a careful forger
    store.put_bytes(key(5), dumps(record, "record"))
    assert sorted(problems(registry)) == [
        ("inserted", AUDIT + "00000002-copy.json"),
        ("inserted", AUDIT + "20991231T000000.000000Z-forged.json"),
        ("unanchored", key(5)),
    ]


def test_a_hand_moved_alias_is_reported(registry, store):
    alias_key = "models/bot/aliases/production.json"
    doc = json.loads(store.get_bytes(alias_key))
    store.put_bytes(alias_key, json.dumps({**doc, "version": 1}).encode())
    findings = registry.verify_records("bot").findings
    assert [(f.problem, f.key) for f in findings] == [("unaudited", alias_key)]
    assert "points to version 1 (revision 2) but its last audited move set version 2" in findings[0].detail


# -- records written before chaining -------------------------------------------------------------------


def _legacy(store, prefix: str, at: str, **fields) -> str:
    """A record exactly as append_record wrote it before chaining."""
    stem = (
        datetime.fromisoformat(at).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + hashlib.md5(at.encode()).hexdigest()
    )
    record = {"at": at, "id": stem, **fields}
    k = f"{prefix}{stem}.json"
    store.put_bytes(k, json.dumps(record, indent=2, sort_keys=True).encode(), if_none_match=True)
    return k


@pytest.fixture
def legacy_registry(store):
    """A registry whose audit trail began before chaining: two unchained records, then chained ones."""
    reg = ModelRegistry(store)
    old = [
        _legacy(store, AUDIT, "2026-01-01T10:00:00+00:00", name="bot", action="note", n=0),
        _legacy(store, AUDIT, "2026-01-02T10:00:00+00:00", name="bot", action="note", n=1),
    ]
    for n in (2, 3):
        reg.append_audit("bot", {"action": "note", "n": n})
    return reg, old


def test_legacy_records_read_and_verify_as_unchained(legacy_registry, store, capsys):
    reg, old = legacy_registry
    assert [h["n"] for h in reg.history("bot")] == [0, 1, 2, 3]
    first = json.loads(store.get_bytes(key(1)))
    assert first["legacy_records"]["count"] == 2  # the chain pins what came before it
    report = reg.verify_records("bot")
    assert report.ok, report.findings
    assert [(s.chained, s.legacy) for s in report.streams] == [(2, 2)]
    assert main(["--registry", uri_of(store), "registry", "verify", "--model", "bot"]) == 0
    assert "2 chained record(s), 2 unchained (legacy)" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["edit", "remove"])
def test_a_tampered_legacy_record_is_reported(legacy_registry, store, how):
    reg, old = legacy_registry
    if how == "edit":
        rewrite(store, old[0], actor="mallory")
    else:
        store.delete_prefix(old[0])
    findings = reg.verify_records("bot").findings
    assert [(f.problem, f.key) for f in findings] == [("edited" if how == "edit" else "removed", AUDIT)]
    assert f"{key(1)} pinned" in findings[0].detail


# -- who approved, what executed ---------------------------------------------------------------------


def test_alias_moves_name_approvers_and_executor_apart_from_the_actor(registry):
    request_signoff(registry, "bot", 1, requested_by="trainer", evidence={})
    record_decision(registry, "bot", 1, user="reviewer", decision="approve")
    run = {"dag_id": "llm_finetune", "run_id": "asset_triggered__2026", "task_id": "deploy"}
    # production points to 2 (unapproved); roll back to the approved 1.
    record = rollback(
        registry, "bot", "production", actor="trainer", reason="canary", to_version=1, executed_by=run
    )
    assert (record["actor"], record["approved_by"], record["executed_by"]) == ("trainer", ["reviewer"], run)
    staging = promote(registry, "bot", 2, "staging", actor="ci", reason="smoke", executed_by="cli:ops")
    assert (staging["approved_by"], staging["executed_by"]) == (None, "cli:ops")  # not a gated alias
    assert registry.history("bot")[-1] == staging
    assert registry.verify_records("bot").ok

    from airloom.exceptions import UsageError

    with pytest.raises(UsageError, match="executed_by must name the run"):
        promote(registry, "bot", 2, "staging", actor="ci", reason="", executed_by={"dag_id": ""})


def test_deploy_operator_records_the_task_that_moved_the_alias(tmp_path):
    from airloom.airflow.operators.registry import DeployModelOperator, RollbackModelOperator

    store = LocalStore(tmp_path / "registry")
    reg = ModelRegistry(store)
    for i in (1, 2):
        reg.register("bot", make_model(tmp_path / f"m{i}", i), metadata={}, actor="trainer")
        request_signoff(reg, "bot", i, requested_by="trainer", evidence={})
        record_decision(reg, "bot", i, user="reviewer", decision="approve")

    def context(task_id: str) -> dict:
        ti = SimpleNamespace(dag_id="llm_finetune", task_id=task_id, map_index=-1, xcom_push=lambda **_: None)
        return {"ti": ti, "run_id": "manual__1", "dag_run": SimpleNamespace(triggering_user_name="trainer")}

    for version in (1, 2):
        DeployModelOperator(
            task_id="deploy", model_name="bot", version=version, registry_uri=str(store.root)
        ).execute(context("deploy"))
    RollbackModelOperator(task_id="rollback", model_name="bot", registry_uri=str(store.root)).execute(
        context("rollback")
    )
    moves = [h for h in reg.history("bot") if h["action"] == "alias"]
    assert [(m["to"], m["actor"], m["approved_by"], m["executed_by"]["task_id"]) for m in moves] == [
        (1, "trainer", ["reviewer"], "deploy"),
        (2, "trainer", ["reviewer"], "deploy"),
        (1, "trainer", ["reviewer"], "rollback"),
    ]
    assert moves[0]["executed_by"] == {"dag_id": "llm_finetune", "run_id": "manual__1", "task_id": "deploy"}


# -- the CLI -------------------------------------------------------------------------------------------


def test_cli_verify_exit_codes(registry, store, tmp_path, capsys):
    uri = uri_of(store)
    assert main(["--registry", uri, "registry", "promote", "bot/1", "staging", "--user", "ops"]) == 0
    staging = registry.history("bot")[-1]
    assert (staging["actor"], staging["executed_by"]) == ("ops", f"cli:{getpass.getuser()}")
    capsys.readouterr()

    assert main(["--registry", uri, "registry", "verify"]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("OK: 1 stream(s), 5 chained record(s)")
        and f"{store.uri(AUDIT.rstrip('/'))}/: 5 record(s)" in out
    )

    store.delete_prefix(key(2))
    rewrite(store, key(4), actor="mallory")
    assert main(["--registry", uri, "registry", "verify", "--model", "bot", "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert not report["ok"]
    assert [(f["problem"], f["key"]) for f in report["findings"]] == [("edited", key(4)), ("removed", key(2))]
    assert "2 tampered record finding(s)" in captured.err
    assert main(["--registry", uri, "registry", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"removed: {store.uri(key(2))}: missing from the chain" in out
    assert f"edited: {store.uri(key(4))}" in out

    assert main(["--registry", uri, "registry", "verify", "--model", "ghost"]) == 2
    assert "model 'ghost' has no records" in capsys.readouterr().err
    assert main(["--registry", uri, "registry", "verify", "bot/1", "--model", "bot"]) == 2
    assert main(["--registry", uri, "registry", "verify", "bot/1"]) == 0  # the files are untouched


def test_unreadable_head_refuses_appends(registry, store):
    store.put_bytes(AUDIT + "HEAD", b"not json")
    with pytest.raises(
        RegistryError, match=r"the stream head is unreadable .* run 'airloom registry verify'"
    ):
        registry.append_audit("bot", {"action": "note"})
    assert problems(registry) == [("edited", AUDIT + "HEAD")]
