"""Concurrent writers as separate processes (spawn) on both backends: a local folder and moto's S3 server.

The S3 children get the server's endpoint and fake credentials through their environment, as a
worker on another machine would. One pool of 20 processes serves every test here (spawning is the
expensive part); barriers make the workers' requests collide instead of running one after another.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from airloom.cli import main
from airloom.exceptions import ConflictError, RegistryError
from airloom.registry.registry import ModelRegistry, ModelVersion
from airloom.registry.store import LocalStore, S3Store

WORKERS = 20
_BARRIERS: dict = {}


def _init_worker(barriers: dict) -> None:
    _BARRIERS.update(barriers)


def _spec(store) -> dict:
    """How a child process reopens ``store``: a path, or bucket + prefix + the AWS env it needs."""
    if isinstance(store, LocalStore):
        return {"kind": "local", "root": str(store.root)}
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {"kind": "s3", "bucket": store.bucket, "prefix": store.prefix, "env": env}


def _open(spec: dict) -> ModelRegistry:
    if spec["kind"] == "local":
        return ModelRegistry(LocalStore(spec["root"]))
    os.environ.update(spec["env"])  # AWS_ENDPOINT_URL and the fake credentials
    return ModelRegistry(S3Store(spec["bucket"], spec["prefix"]))


def _register(args: tuple[dict, str, int]) -> tuple[int, int]:
    spec, folder, worker = args
    reg = _open(spec)
    _BARRIERS["all"].wait(timeout=120)  # every process holds a task: 20 writers, truly at once
    mv = reg.register("bot", folder, metadata={"worker": worker}, actor=f"worker-{worker}")
    return mv.version, os.getpid()


def _promote(args: tuple[dict, int, int]) -> tuple[str, str]:
    spec, target, expected = args
    reg = _open(spec)
    _BARRIERS["pair"].wait(timeout=120)
    try:
        reg.set_alias("bot", "production", target, actor=f"promoter-{target}", expected_version=expected)
    except ConflictError as e:
        return "conflict", str(e)
    return "won", str(target)


def _slow_register(spec: dict, folder: str, delay: float) -> None:
    """Register with a slow link: each file upload takes ``delay`` seconds more (killed meanwhile)."""
    reg = _open(spec)
    upload = reg.store.put_file

    def slow_put_file(key, path):
        upload(key, path)
        time.sleep(delay)

    reg.store.put_file = slow_put_file
    reg.register("bot", folder, metadata={}, actor="doomed")


@pytest.fixture(scope="module")
def pool():
    ctx = multiprocessing.get_context("spawn")
    barriers = {"all": ctx.Barrier(WORKERS), "pair": ctx.Barrier(2)}
    with ctx.Pool(WORKERS, initializer=_init_worker, initargs=(barriers,)) as p:
        yield p


def make_model(folder: Path, seed: int) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    (folder / "weights.bin").write_bytes(bytes([seed]) * 20_000)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps({"seed": seed}))
    return str(folder)


def test_20_concurrent_registrations_give_20_distinct_complete_versions(store, pool, tmp_path):
    spec = _spec(store)
    tasks = [(spec, make_model(tmp_path / f"m{i}", i), i) for i in range(WORKERS)]
    results = pool.map(_register, tasks, chunksize=1)
    versions, pids = zip(*results, strict=True)
    assert len(set(pids)) == WORKERS  # 20 processes, not one worker doing them in turn
    assert sorted(versions) == list(range(1, WORKERS + 1))

    reg = ModelRegistry(store)
    listed = reg.list_versions("bot")
    assert [v.version for v in listed] == list(range(1, WORKERS + 1))
    for v in listed:
        reg.verify("bot", v.version)
        worker = v.metadata["worker"]
        assert v.created_by == f"worker-{worker}" and versions[worker] == v.version
        # Each version holds exactly the files of the worker that claimed it, never a mix.
        prefix = f"models/bot/versions/{v.version}/"
        assert store.get_bytes(prefix + "weights.bin") == bytes([worker]) * 20_000
        assert json.loads(store.get_bytes(prefix + "tokenizer/tokenizer.json")) == {"seed": worker}
    registrations = [h["version"] for h in reg.history("bot") if h["action"] == "register"]
    assert sorted(registrations) == list(range(1, WORKERS + 1))
    # 20 processes appended to one audit chain at once: one record per seq, no gap, nothing forked.
    assert sorted(h["seq"] for h in reg.history("bot")) == list(range(1, WORKERS + 1))
    report = reg.verify_records("bot")
    assert report.ok, report.findings
    if isinstance(store, LocalStore):
        assert not list(store.root.rglob(".airloom-tmp-*"))


def test_concurrent_promotions_exactly_one_wins(store, pool, tmp_path):
    reg = ModelRegistry(store)
    for i in range(3):
        reg.register("bot", make_model(tmp_path / f"m{i}", i), metadata={}, actor="ci")
    reg.set_alias("bot", "production", 1, actor="ci", expected_version=None)
    spec = _spec(store)
    current = 1
    for _ in range(3):
        # Both promoters read "production -> current" and race to move it to different versions.
        targets = [v for v in (1, 2, 3) if v != current]
        outcomes = pool.map(_promote, [(spec, t, current) for t in targets], chunksize=1)
        assert sorted(kind for kind, _ in outcomes) == ["conflict", "won"], outcomes
        winner = int(next(detail for kind, detail in outcomes if kind == "won"))
        loser_message = next(detail for kind, detail in outcomes if kind == "conflict")
        assert "bot@production" in loser_message and "re-read the alias" in loser_message
        assert reg.get_alias("bot", "production") == winner
        current = winner
    moves = [h for h in reg.history("bot") if h["action"] == "alias"]
    assert [m["revision"] for m in moves] == [1, 2, 3, 4]  # one audited move per round, no lost update
    assert all(a["to"] == b["from"] for a, b in zip(moves, moves[1:], strict=False))


def test_registration_killed_mid_upload_leaves_no_visible_version(store, tmp_path, capsys):
    reg = ModelRegistry(store)
    reg.register("bot", make_model(tmp_path / "m0", 0), metadata={}, actor="ci")
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(12):
        (folder / f"shard-{i:02d}.bin").write_bytes(bytes([i]) * 1000)
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_slow_register, args=(_spec(store), str(folder), 0.5))
    child.start()
    try:
        deadline = time.time() + 60
        uploaded: list[str] = []
        while not uploaded and time.time() < deadline:
            uploaded = [k for k in store.list("models/bot/versions/2/") if k.endswith(".bin")]
            time.sleep(0.02)
        assert uploaded, "the child never started uploading"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(30)
    assert child.exitcode == -signal.SIGKILL

    # The orphan: claimed, partly uploaded, never committed.
    orphan = store.list("models/bot/versions/2/")
    assert "models/bot/versions/2/CLAIM" in orphan and "models/bot/versions/2/MANIFEST.json" not in orphan
    assert len([k for k in orphan if k.endswith(".bin")]) < 12
    assert [v.version for v in reg.list_versions("bot")] == [1]
    assert reg.resolve("bot").version == 1
    with pytest.raises(RegistryError, match=r"no committed version 2 .*committed versions: \[1\]"):
        reg.verify("bot", 2)

    nxt = reg.register("bot", folder, metadata={}, actor="ci")
    assert nxt.version == 3  # numbers are never reused, the orphan's included
    reg.verify("bot", 3)
    assert [v.version for v in reg.list_versions("bot")] == [1, 3]
    assert [h["version"] for h in reg.history("bot") if h["action"] == "register"] == [1, 3]

    uri = str(store.root) if isinstance(store, LocalStore) else f"s3://{store.bucket}/{store.prefix}"
    assert main(["--registry", uri, "registry", "list", "bot", "--json"]) == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == [1, 3]
    assert main(["--registry", uri, "registry", "verify", "bot/2"]) == 2
    assert "no committed version 2" in capsys.readouterr().err
    assert main(["--registry", uri, "registry", "verify", "bot/3"]) == 0


# -- moto's conditional writes are not atomic; the registry copes -------------------------------------


class _RacingMoto:
    """Make two PUTs to ``key_suffix`` interleave inside moto's server: both pass the If-None-Match /
    If-Match check before either writes, and neither answers before both have written.

    moto 5.2.5 (``S3Response.put_object``) looks the object up, compares, then stores it with no lock
    in between, so this interleaving can happen by chance under load; here it is forced. On a server
    that evaluates the condition atomically (AWS S3) the second PUT would fail its check instead.
    """

    def __init__(self, monkeypatch, key_suffix: str) -> None:
        from moto.s3.responses import S3Response

        self.suffix = key_suffix
        self.slots = 2
        self.checked = threading.Barrier(2, timeout=20)
        self.stored = threading.Barrier(2, timeout=20)
        self.lock = threading.Lock()
        self.local = threading.local()
        put_object, get_checksum = S3Response.put_object, S3Response._get_checksum
        racer = self

        def racing_put_object(self):
            conditional = "If-None-Match" in self.headers or "If-Match" in self.headers
            mine = False
            if conditional and self.parse_key_name().endswith(racer.suffix):
                with racer.lock:
                    mine, racer.slots = racer.slots > 0, racer.slots - 1
            racer.local.racing = mine
            try:
                response = put_object(self)
            finally:
                racer.local.racing = False
            if mine:
                racer.stored.wait()
            return response

        def racing_get_checksum(self, *args, **kwargs):
            if getattr(racer.local, "racing", False):
                racer.checked.wait()  # runs right after moto's precondition check, before the write
            return get_checksum(self, *args, **kwargs)

        monkeypatch.setattr(S3Response, "put_object", racing_put_object)
        monkeypatch.setattr(S3Response, "_get_checksum", racing_get_checksum)


def _in_threads(*calls):
    results: list = [None] * len(calls)

    def run(i, fn):
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_claim_created_twice_on_moto_is_detected(s3_store, monkeypatch, tmp_path):
    _RacingMoto(monkeypatch, "models/bot/versions/1/CLAIM")
    registries = [ModelRegistry(S3Store(s3_store.bucket, s3_store.prefix)) for _ in range(2)]
    folders = [make_model(tmp_path / f"m{i}", i) for i in range(2)]
    results = _in_threads(
        *(
            lambda i=i: registries[i].register("bot", folders[i], metadata={"worker": i}, actor=f"w{i}")
            for i in range(2)
        )
    )
    # Both PUTs of CLAIM 1 "succeeded"; the read-back of the owner token sent one writer to number 2.
    # (Without it both upload into version 1 and the later manifest PUT fails: a lost registration.)
    assert all(isinstance(mv, ModelVersion) for mv in results), results
    assert sorted(mv.version for mv in results) == [1, 2]
    reg = ModelRegistry(s3_store)
    for mv in results:
        reg.verify("bot", mv.version)
        assert (
            s3_store.get_bytes(f"models/bot/versions/{mv.version}/weights.bin")
            == bytes([mv.metadata["worker"]]) * 20_000
        )
    claim = json.loads(s3_store.get_bytes("models/bot/versions/1/CLAIM"))
    winner = next(mv for mv in results if mv.version == 1)
    assert claim["claimed_by"] == winner.created_by


def test_alias_cas_won_twice_on_moto_is_detected(s3_store, monkeypatch, tmp_path):
    reg = ModelRegistry(s3_store)
    for i in range(3):
        reg.register("bot", make_model(tmp_path / f"m{i}", i), metadata={}, actor="ci")
    reg.set_alias("bot", "production", 1, actor="ci", expected_version=None)
    _RacingMoto(monkeypatch, "models/bot/aliases/production.json")
    promoters = [ModelRegistry(S3Store(s3_store.bucket, s3_store.prefix)) for _ in range(2)]
    results = _in_threads(
        *(
            lambda t=t, r=r: r.set_alias("bot", "production", t, actor=f"p{t}", expected_version=1)
            for t, r in zip((2, 3), promoters, strict=True)
        )
    )
    # Both If-Match PUTs "succeeded"; the revision + token read-back tells the earlier writer it lost.
    conflicts = [r for r in results if isinstance(r, ConflictError)]
    wins = [r for r in results if isinstance(r, dict)]
    assert len(conflicts) == 1 and len(wins) == 1, results
    assert "was moved by someone else" in str(conflicts[0])
    assert reg.get_alias("bot", "production") == wins[0]["to"]
    moves = [h for h in reg.history("bot") if h["action"] == "alias"]
    assert [(m["from"], m["to"]) for m in moves] == [(None, 1), (1, wins[0]["to"])]
