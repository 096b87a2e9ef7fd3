"""The artifact store (airloom.artifacts) against moto's S3 server: two "workers" are two AIRLOOM_HOMEs with
no path in common; the producer's folder is deleted before the consumer reads, so whatever the consumer
gets came through the store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import boto3
import pytest

from airloom.artifacts import MANIFEST, ArtifactIncomplete, Artifacts
from airloom.exceptions import RegistryError, UsageError


@pytest.fixture
def worker(tmp_path, moto_bucket, monkeypatch):
    """``worker("a")``: become worker a (its own AIRLOOM_HOME) on one shared s3:// store; returns the home."""
    root = f"s3://{moto_bucket}/art-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AIRLOOM_ARTIFACTS", root)

    def become(name: str) -> Path:
        home = tmp_path / name
        home.mkdir(exist_ok=True)
        monkeypatch.setenv("AIRLOOM_HOME", str(home))
        return home.resolve()

    become.root = root  # type: ignore[attr-defined]
    return become


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _cached(reader: Artifacts) -> list[Path]:
    """Everything in a reader's staging cache: entries and any leftover temp folder."""
    return sorted(reader.cache_dir.iterdir()) if reader.cache_dir.exists() else []


def _s3(root: str) -> tuple[str, str]:
    """Bucket and key prefix of an s3:// root."""
    bucket, _, prefix = root[len("s3://") :].partition("/")
    return bucket, prefix


MODEL = {
    "config.json": b'{"hidden": 8}',
    "model.safetensors": os.urandom(4096),
    "tokenizer/tokenizer.json": b'{"vocab": {"a": 0}}',
    "empty.txt": b"",
}


def test_publish_a_folder_and_stage_it_on_another_worker(worker):
    home_a = worker("a")
    out = _write(home_a / "runs" / "llm_finetune" / "manual__1" / "train", MODEL)
    uri = Artifacts().publish(out)
    assert uri == f"{worker.root}/runs/llm_finetune/manual__1/train"

    shutil.rmtree(home_a)  # worker a is gone: b can only read the store
    home_b = worker("b")
    staged = Artifacts().stage(uri)
    assert staged.is_relative_to(home_b / "cache" / "artifacts")
    assert _tree(staged) == MODEL  # byte-equal, and the manifest is not among the staged files
    # The same content again: the cached copy, not a second download (its files are gone from the bucket).
    bucket, prefix = _s3(uri)
    boto3.client("s3").delete_object(Bucket=bucket, Key=f"{prefix}/model.safetensors")
    assert Artifacts().stage(uri) == staged
    assert _tree(staged) == MODEL
    assert len(_cached(Artifacts())) == 1


def test_stage_a_single_file_keeps_its_name_and_suffix(worker):
    out = _write(worker("a") / "runs" / "d" / "r" / "evaluate", {"metrics.json": b'{"em": 0.5}', **MODEL})
    uri = Artifacts().publish(out)
    shutil.rmtree(out)
    worker("b")
    metrics = Artifacts().stage(f"{uri}/metrics.json")
    assert metrics.name == "metrics.json" and metrics.suffix == ".json"
    assert metrics.read_bytes() == b'{"em": 0.5}'
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["metrics.json"]  # only what was asked for
    nested = Artifacts().stage(f"{uri}/tokenizer/tokenizer.json")
    assert nested.name == "tokenizer.json" and nested.read_bytes() == MODEL["tokenizer/tokenizer.json"]
    # A sub-folder of an artifact: its files, relative to it.
    assert _tree(Artifacts().stage(f"{uri}/tokenizer")) == {
        "tokenizer.json": MODEL["tokenizer/tokenizer.json"]
    }
    with pytest.raises(ArtifactIncomplete, match="has no such file or folder"):
        Artifacts().stage(f"{uri}/missing.json")


def test_handover_rewrites_only_paths_under_airloom_home(worker):
    home = worker("a")
    model = home / "runs" / "d" / "r" / "train" / "model"
    result = {
        "model_dir": str(model),
        "metrics": [str(home / "evaluations" / "m" / "metrics.json"), 3, None],
        "pair": (str(home / "datasets" / "demo" / "2"), "org/hub-model"),
        "nested": {"report": str(home / "runs" / "d" / "r" / "eda" / "report.html"), "rows": 12},
        "base_model": "registry:airloom-tiny-base",
        "elsewhere": "/data/raw/chats.jsonl",
        "sibling": f"{home}-other/runs/x",  # starts with the home's text but is not under it
        "user_s3": "s3://someone-elses-bucket/raw.jsonl",
    }
    out = Artifacts().handover(result)
    root = worker.root
    assert out == {
        "model_dir": f"{root}/runs/d/r/train/model",
        "metrics": [f"{root}/evaluations/m/metrics.json", 3, None],
        "pair": (f"{root}/datasets/demo/2", "org/hub-model"),
        "nested": {"report": f"{root}/runs/d/r/eda/report.html", "rows": 12},
        "base_model": "registry:airloom-tiny-base",
        "elsewhere": "/data/raw/chats.jsonl",
        "sibling": f"{home}-other/runs/x",
        "user_s3": "s3://someone-elses-bucket/raw.jsonl",
    }
    assert isinstance(out["pair"], tuple)
    assert result["model_dir"] == str(model)  # the caller's value is not changed in place


def test_an_unpublished_or_cut_short_upload_is_incomplete(worker):
    home_a = worker("a")
    out = _write(home_a / "runs" / "d" / "r" / "prepare", MODEL)
    store = Artifacts()
    uri = store.uri_of(out)
    with pytest.raises(ArtifactIncomplete, match="never published"):
        store.stage(uri)
    # Cut short: some files uploaded, no manifest.
    key = store.key_of(out)
    store.store.put_file(f"{key}/config.json", out / "config.json")
    store.store.put_file(f"{key}/model.safetensors", out / "model.safetensors")
    worker("b")
    reader = Artifacts()
    for location in (uri, f"{uri}/config.json"):
        with pytest.raises(ArtifactIncomplete, match="upload was cut short"):
            reader.stage(location)
    assert _cached(reader) == []


@pytest.mark.parametrize("tamper", ["other size", "same size"])
def test_a_tampered_object_fails_verification_and_leaves_nothing_cached(worker, tamper):
    out = _write(worker("a") / "runs" / "d" / "r" / "train", MODEL)
    uri = Artifacts().publish(out)
    bucket, prefix = _s3(uri)
    original = MODEL["model.safetensors"]
    changed = b"x" * 10 if tamper == "other size" else bytes([original[0] ^ 1]) + original[1:]
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=changed)

    worker("b")
    reader = Artifacts()
    with pytest.raises(
        RegistryError, match="model.safetensors: downloaded .* the object was changed after it was"
    ):
        reader.stage(uri)
    assert _cached(reader) == []  # no entry, no leftover temp folder
    # The untouched files of the same artifact still stage.
    assert reader.stage(f"{uri}/config.json").read_bytes() == MODEL["config.json"]


def test_the_cache_stays_under_its_bound_evicting_the_least_recently_used(worker):
    home_a = worker("a")
    blobs = {name: {"blob.bin": os.urandom(1000)} for name in ("one", "two", "three")}
    uris = {
        name: Artifacts().publish(_write(home_a / "runs" / "d" / "r" / name, blob))
        for name, blob in blobs.items()
    }
    worker("b")
    # Room for two artifacts (1000 bytes and a small marker each), not three.
    reader = Artifacts(cache_max_bytes=2600)
    one = reader.stage(uris["one"])
    two = reader.stage(uris["two"])
    # Make the order of use unambiguous (file times can tick coarser than two quick stages), then use
    # "one" again: "two" is now the least recently used.
    os.utime(one.parent / ".complete", (1_000, 1_000))
    os.utime(two.parent / ".complete", (2_000, 2_000))
    assert reader.stage(uris["one"]) == one
    three = reader.stage(uris["three"])
    assert one.is_dir() and three.is_dir()
    assert not two.parent.exists()
    assert sum(p.stat().st_size for p in reader.cache_dir.rglob("*") if p.is_file()) <= 2600
    # What was evicted stages again (downloaded anew), and something else makes room for it.
    assert _tree(reader.stage(uris["two"])) == blobs["two"]
    assert len(_cached(reader)) == 2


def test_an_artifact_larger_than_the_bound_is_kept_while_it_is_used(worker):
    home_a = worker("a")
    big = Artifacts().publish(_write(home_a / "runs" / "d" / "r" / "big", {"blob.bin": os.urandom(5000)}))
    small = Artifacts().publish(_write(home_a / "runs" / "d" / "r" / "small", {"blob.bin": b"s" * 100}))
    worker("b")
    reader = Artifacts(cache_max_bytes=10)
    staged_big = reader.stage(big)
    assert (staged_big / "blob.bin").stat().st_size == 5000  # never evicts the one just staged
    staged_small = reader.stage(small)
    assert (staged_small / "blob.bin").read_bytes() == b"s" * 100
    assert not staged_big.exists()


def test_an_entry_a_task_holds_is_not_evicted_until_that_task_ends(worker):
    """Another task on the worker making room never deletes what a running task staged (its process holds
    a shared lock on the entry until it exits)."""
    import subprocess
    import sys

    home_a = worker("a")
    uris = [
        Artifacts().publish(_write(home_a / "runs" / "d" / "r" / name, {"blob.bin": os.urandom(1000)}))
        for name in ("held", "two", "three")
    ]
    worker("b")
    holder = subprocess.Popen(  # a task that staged "held" and is still training on it
        [
            sys.executable,
            "-c",
            "import sys; from airloom.artifacts import Artifacts; "
            f"print(Artifacts().stage({uris[0]!r}, hold=True), flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = Path(holder.stdout.readline().strip())
        assert (held / "blob.bin").stat().st_size == 1000
        reader = Artifacts(cache_max_bytes=1500)  # room for one entry
        os.utime(held.parent / ".complete", (1_000, 1_000))  # the least recently used
        reader.stage(uris[1])
        assert held.is_dir()  # over the bound rather than pulled from under the running task
    finally:
        holder.communicate("", timeout=60)
    # The task ended (its lock went with it): the next stage that needs room evicts it.
    reader.stage(uris[2])
    assert not held.exists()
    assert len(_cached(reader)) == 1


def test_republishing_replaces_the_manifest(worker):
    home_a = worker("a")
    out = _write(home_a / "runs" / "d" / "r" / "train", {"a.txt": b"first", "gone.txt": b"old"})
    store = Artifacts()
    uri = store.publish(out)
    # The retry wrote other content: a.txt changed, gone.txt removed, new.txt added.
    (out / "gone.txt").unlink()
    _write(out, {"a.txt": b"second", "new.txt": b"new"})
    assert store.publish(out) == uri
    manifest = json.loads(store.read_bytes(f"{uri}/{MANIFEST}"))
    assert sorted(manifest["files"]) == ["a.txt", "new.txt"]
    assert manifest["bytes"] == len(b"second") + len(b"new")
    shutil.rmtree(home_a)
    worker("b")
    assert _tree(Artifacts().stage(uri)) == {"a.txt": b"second", "new.txt": b"new"}


def test_a_retry_cut_short_does_not_pair_the_old_manifest_with_new_files(worker, monkeypatch):
    out = _write(worker("a") / "runs" / "d" / "r" / "train", {"a.txt": b"first", "b.txt": b"first"})
    store = Artifacts()
    uri = store.publish(out)
    _write(out, {"a.txt": b"second", "b.txt": b"second"})
    put_file = store.store.put_file
    calls = []

    def dies_after_one(key, path):
        if calls:
            raise KeyboardInterrupt("worker killed")
        calls.append(key)
        put_file(key, path)

    monkeypatch.setattr(store.store, "put_file", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        store.publish(out)
    worker("b")
    with pytest.raises(ArtifactIncomplete):
        Artifacts().stage(uri)  # the new a.txt is there, beside the old b.txt: no manifest vouches for it


def test_local_mode_stages_nothing_and_copies_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("AIRLOOM_ARTIFACTS", raising=False)
    home = Path(os.environ["AIRLOOM_HOME"]).resolve()
    out = _write(home / "runs" / "d" / "r" / "train", MODEL)
    store = Artifacts()
    assert not store.remote and store.root == str(home)
    assert store.publish(out) == str(out)
    assert _tree(home / "runs") == {
        **{f"d/r/train/{rel}": data for rel, data in MODEL.items()},
        f"d/r/train/{MANIFEST}": (out / MANIFEST).read_bytes(),  # the only file it wrote
    }
    assert sorted(p.name for p in home.iterdir() if not p.name.startswith(".airloom-")) == ["runs"]
    assert store.stage(out) == out
    assert store.stage(str(out / "config.json")) == out / "config.json"
    result = {"model_dir": str(out), "n": [1, str(out)]}
    assert store.handover(result) == result
    assert not (home / "cache").exists()
    with pytest.raises(UsageError, match="not in the artifact store"):
        store.stage("s3://bucket/runs/x")


# -- a worker killed in the middle of an upload ------------------------------------------------------

_PUBLISHER = textwrap.dedent(
    """
    import sys
    from airloom.artifacts import Artifacts
    print("publishing", flush=True)
    Artifacts().publish(sys.argv[1])
    print("published", flush=True)
    """
)


def _publish_and_kill(folder: Path, env: dict[str, str], bucket: str, key_prefix: str, log: Path):
    """Run a child that publishes ``folder``; SIGKILL it as soon as the first of its objects is in the bucket.
    Returns the child's exit status, the keys in the bucket after it ended, and its output."""
    s3 = boto3.client("s3")
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", _PUBLISHER, str(folder)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 120
            while child.poll() is None and time.monotonic() < deadline:
                if s3.list_objects_v2(Bucket=bucket, Prefix=key_prefix, MaxKeys=1).get("KeyCount"):
                    child.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=60)
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix)
        for obj in page.get("Contents", [])
    ]
    return child.returncode, keys, log.read_text(errors="replace")


def test_a_worker_killed_mid_upload_leaves_nothing_visible_and_the_retry_completes_it(
    worker, moto_bucket, tmp_path
):
    home_a = worker("a")
    env = {**os.environ, "AIRLOOM_HOME": str(home_a), "AIRLOOM_ARTIFACTS": worker.root}
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")  # the child talks to this test's moto
    # The kill comes when the first object lands, so the child cannot finish 200 uploads first; should it
    # ever, try again with more files rather than pass without having killed anything.
    for count in (200, 1000):
        files = {f"shard-{i:04d}.bin": os.urandom(2048) for i in range(count)}
        out = _write(home_a / "runs" / "llm_finetune" / "manual__1" / f"train-{count}" / "model", files)
        uri = Artifacts().uri_of(out)
        key_prefix = _s3(uri)[1] + "/"
        status, keys, output = _publish_and_kill(
            out, env, moto_bucket, key_prefix, tmp_path / f"child-{count}.log"
        )
        if status != 0:
            break
    assert status == -signal.SIGKILL, f"the publisher was not killed mid-upload (exit {status}):\n{output}"
    uploaded = [k for k in keys if not k.endswith("/" + MANIFEST)]
    assert f"{key_prefix}{MANIFEST}" not in keys, (
        f"the upload was killed with {len(uploaded)} of {count} files in the bucket, yet its manifest is there: "
        "readers would take half an artifact for a whole one"
    )
    assert 1 <= len(uploaded) < count, f"not a half-upload: {len(uploaded)} of {count} files in the bucket"

    worker("b")
    reader = Artifacts()
    with pytest.raises(ArtifactIncomplete, match="cut short"):
        reader.stage(uri)
    with pytest.raises(ArtifactIncomplete):
        reader.stage(f"{uri}/{uploaded[0].rsplit('/', 1)[-1]}")  # one that is there
    assert _cached(reader) == []

    # The retry (Airflow runs the task again, here on the same worker) publishes it whole.
    worker("a")
    assert Artifacts().publish(out) == uri
    shutil.rmtree(home_a)
    worker("b")
    assert _tree(Artifacts().stage(uri)) == files
