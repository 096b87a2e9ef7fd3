"""The dataset catalog on a remote artifact store (``AIRLOOM_ARTIFACTS=s3://…``, moto's S3 server): versions
claimed by a create-if-absent object, uploaded manifest last, invisible until complete, found by reference
from a worker with an empty disk; the DAG form's choice list stays off the network."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest

from airloom.artifacts import MANIFEST as ARTIFACT_MANIFEST
from airloom.artifacts import Artifacts
from airloom.data import catalog
from airloom.data.prepare import prepare
from airloom.exceptions import UsageError
from airloom.registry.store import S3Store


def _records(n: int, tag: str = "") -> list[dict]:
    return [{"instruction": f"Echo {i}{tag}", "input": "", "response": f"{i}{tag}"} for i in range(n)]


def _staged(name: str, n: int = 20, tag: str = "") -> Path:
    staged = catalog.staging_dir(name)
    prepare(_records(n, tag), staged, near_dedup=None)
    return staged


def _publish(name: str, n: int = 20, tag: str = "", run_id: str | None = None) -> catalog.PreparedDataset:
    return catalog.publish(_staged(name, n, tag), name, origin={"dag_id": "d", "run_id": run_id or f"r{tag}"})


@pytest.fixture
def remote(moto_bucket, monkeypatch, tmp_path) -> Artifacts:
    """The artifact store on moto under a prefix of its own; this process's AIRLOOM_HOME is ``tmp/a``."""
    uri = f"s3://{moto_bucket}/cat-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AIRLOOM_ARTIFACTS", uri)
    monkeypatch.setenv("AIRLOOM_HOME", str(tmp_path / "a"))
    return Artifacts(uri)


def _move_home(monkeypatch, tmp_path: Path, name: str) -> Path:
    """Another worker: a fresh, empty AIRLOOM_HOME."""
    home = tmp_path / name
    monkeypatch.setenv("AIRLOOM_HOME", str(home))
    return home


def test_publish_claims_uploads_and_resolves_from_another_disk(remote, monkeypatch, tmp_path):
    v1 = _publish("demo", tag="a")
    assert (v1.ref, v1.path) == ("demo@1", remote.uri("datasets/demo/1"))
    keys = remote.list("datasets/")
    assert {"datasets/demo/1/claim.json", "datasets/demo/1/manifest.json", "datasets/latest.json"} <= set(
        keys
    )
    assert f"datasets/demo/1/{ARTIFACT_MANIFEST}" in keys and "datasets/demo/1/train.parquet" in keys
    # the worker's staged copy is gone: the store holds the version, nothing is left on this disk
    assert not any(p.is_file() for p in (tmp_path / "a" / "datasets").rglob("*"))
    manifest = json.loads(remote.read_bytes(f"{v1.path}/manifest.json"))
    assert (manifest["ref"], manifest["origin"]) == ("demo@1", {"dag_id": "d", "run_id": "ra"})

    v2 = _publish("demo", tag="b")
    again = _publish("demo", tag="b", run_id="retry")  # the same content as the newest: reused
    assert (v2.ref, again.ref, again.manifest["origin"]["run_id"]) == ("demo@2", "demo@2", "rb")
    assert _publish("demo", tag="a").ref == "demo@3"  # older content again is news relative to the newest
    assert _publish("other", tag="a").ref == "other@1"
    assert not [k for k in remote.list("datasets/demo/4")]  # the retry minted nothing

    home = _move_home(monkeypatch, tmp_path, "b")
    for ref in ("demo@2", remote.uri("datasets/demo/2"), remote.uri("datasets/demo/2") + "/"):
        found = catalog.resolve(ref)
        assert (found.ref, found.path, found.dataset_hash) == ("demo@2", v2.path, v2.dataset_hash)
    for ref in ("demo", "demo@latest"):
        assert catalog.resolve(ref).path == remote.uri("datasets/demo/3")
    assert [d.ref for d in catalog.list_datasets()][:2] in (["other@1", "demo@3"], ["demo@3", "other@1"])
    assert sorted(d.ref for d in catalog.list_datasets()) == ["demo@1", "demo@2", "demo@3", "other@1"]
    latest = catalog.read_latest()
    assert (latest["ref"], latest["path"]) == ("other@1", remote.uri("datasets/other/1"))
    # the files stage by URI, verified, onto this worker's disk
    train = Artifacts().stage(f"{v2.path}/train.parquet")
    assert train.is_file() and str(train).startswith(str(home))
    import pyarrow.parquet as pq

    assert pq.read_metadata(train).num_rows == v2.rows["train"]


@pytest.mark.parametrize(
    "ref, message",
    [
        ("demo@7", r"dataset 'demo@7': no version '7' of 'demo'; versions: 1 \(or demo@latest\)"),
        ("nope", r"no prepared dataset named 'nope' in s3://.*/datasets; prepared datasets: demo"),
        ("Demo@1", r"dataset name in reference 'Demo@1' 'Demo' is not a valid name"),
    ],
)
def test_remote_resolve_errors_say_what_exists(remote, ref, message):
    _publish("demo")
    with pytest.raises(UsageError, match=message):
        catalog.resolve(ref)


def test_an_upload_cut_short_is_invisible_and_its_number_stays_taken(remote, monkeypatch):
    v1 = _publish("demo", tag="a")
    real_put = S3Store.put_bytes

    def killed(self, key, data, **kw):  # the worker dies just before the artifact manifest
        if key.endswith(ARTIFACT_MANIFEST):
            raise KeyboardInterrupt("worker killed")
        return real_put(self, key, data, **kw)

    monkeypatch.setattr(S3Store, "put_bytes", killed)
    staged = _staged("demo", tag="b")
    with pytest.raises(KeyboardInterrupt):
        catalog.publish(staged, "demo", origin={"run_id": "rb"})
    monkeypatch.setattr(S3Store, "put_bytes", real_put)
    assert not staged.exists()
    # every file and the catalog's own manifest.json are there, but not the artifact manifest
    assert "datasets/demo/2/manifest.json" in remote.list("datasets/demo/2/")
    assert f"datasets/demo/2/{ARTIFACT_MANIFEST}" not in remote.list("datasets/demo/2/")
    assert catalog.resolve("demo@latest").ref == "demo@1"
    with pytest.raises(UsageError, match=r"no version '2' of 'demo'; versions: 1"):
        catalog.resolve("demo@2")
    with pytest.raises(UsageError, match=r"not a prepared dataset .*upload was cut short"):
        catalog.resolve(remote.uri("datasets/demo/2"))
    assert [d.ref for d in catalog.list_datasets()] == ["demo@1"]
    assert catalog.read_latest()["ref"] == "demo@1"
    assert "demo@1" in catalog.no_choice_message() and "demo@2" not in catalog.no_choice_message()

    retry = _publish("demo", tag="b")  # the task's retry: the next number, complete this time
    assert retry.ref == "demo@3" and retry.dataset_hash != v1.dataset_hash
    assert catalog.resolve("demo").ref == "demo@3"


def test_a_claimed_number_is_skipped(remote):
    # another writer holds 1 (claimed, still uploading): this one gets 2
    remote.store.put_bytes("datasets/demo/1/claim.json", b"{}", if_none_match=True)
    assert _publish("demo").ref == "demo@2"


def test_concurrent_remote_publishers_get_distinct_versions(remote):
    staged = [_staged("demo", n=10, tag=tag) for tag in "abcd"]
    got, barrier = [], threading.Barrier(len(staged))

    def publish(folder):
        barrier.wait()
        got.append(catalog.publish(folder, "demo").version)

    threads = [threading.Thread(target=publish, args=(f,)) for f in staged]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [1, 2, 3, 4]
    claims = [k for k in remote.list("datasets/demo/") if k.endswith("/claim.json")]
    assert len(claims) == 4


def test_the_form_lists_nothing_for_a_remote_catalog_without_touching_the_network(remote, monkeypatch):
    _publish("demo")
    local = catalog.root_dir()  # and a stale local catalog on this worker's disk: not the catalog now
    staged = catalog.staging_dir("old", local)
    prepare(_records(10), staged, near_dedup=None)
    catalog.publish(staged, "old", root=local)
    built = []
    monkeypatch.setattr("airloom.artifacts.Artifacts.__init__", lambda *a, **k: built.append(a))
    monkeypatch.setattr("airloom.registry.store.S3Store.__init__", lambda *a, **k: built.append(a))
    assert catalog.choices() == {}
    assert built == []  # no store was even built
    assert list(catalog.choices(root=local)) == ["old@1"]  # a local root named: listed as before


def test_a_local_root_stays_local_under_a_remote_store(remote, tmp_path):
    staged = catalog.staging_dir("demo", tmp_path / "cat")
    prepare(_records(10), staged, near_dedup=None)
    found = catalog.publish(staged, "demo", root=tmp_path / "cat")
    assert found.path == tmp_path / "cat" / "demo" / "1"
    assert catalog.resolve("demo@1", tmp_path / "cat").path == found.path
    assert remote.list("datasets/") == []


def test_cli_prepare_and_datasets_on_the_store(remote, monkeypatch, tmp_path, capsys):
    from airloom.cli import main

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _records(20)))
    assert main(["datasets"]) == 0
    assert f"no prepared datasets in {remote.uri('datasets')}" in capsys.readouterr().out
    assert main(["prepare", str(src), "--name", "demo", "--tokenizer", "", "--near-dedup", "off"]) == 0
    assert f"prepared demo@1 ({remote.uri('datasets/demo/1')})" in capsys.readouterr().out
    _move_home(monkeypatch, tmp_path, "b")
    assert main(["datasets"]) == 0
    assert capsys.readouterr().out.startswith("demo@1: 20 rows")
    assert main(["datasets", "demo@1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == remote.uri("datasets/demo/1")
