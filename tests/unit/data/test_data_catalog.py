"""The dataset catalog: names, monotonic versions, content reuse, every reference form, the listing and the
refusal message a run without a chosen dataset shows."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from airloom.data import catalog
from airloom.data.prepare import prepare
from airloom.exceptions import UsageError


def _records(n: int, tag: str = "") -> list[dict]:
    return [
        {"instruction": f"Echo {i}{tag}", "input": "", "response": f"{i}{tag}", "task": "echo"}
        for i in range(n)
    ]


def _publish(root: Path, name: str, n: int = 20, tag: str = "", origin: dict | None = None):
    staged = catalog.staging_dir(name, root)
    prepare(_records(n, tag), staged, near_dedup=None)
    return catalog.publish(staged, name, origin=origin or {"dag_id": "d", "run_id": f"r{tag}"}, root=root)


@pytest.mark.parametrize("name", ["demo", "support-chats", "v2.1_mix", "0day"])
def test_valid_names(name):
    assert catalog.check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Demo", "-x", ".hidden", "a/b", "a@1", "with space", "latest.json", None, 3]
)
def test_invalid_names_are_refused_naming_the_field(name):
    with pytest.raises(UsageError, match=r"dataset_name .* is not a valid name"):
        catalog.check_name(name, "dataset_name")


@pytest.mark.parametrize(
    "source, name",
    [
        ("/home/me/.airloom/data/raw", "raw"),
        ("/data/raw/", "raw"),
        ("s3://bucket/exports/Chats 2026.jsonl", "chats-2026"),
        ("data/dolly.jsonl.gz", "dolly"),
        ("/srv/exports/*.parquet", "exports"),
        ("/srv/exports/2026-*/part.csv", "exports"),
        ("*.jsonl", "dataset"),
    ],
)
def test_name_from_source(source, name):
    assert catalog.name_from_source(source) == name


def test_versions_count_up_per_name_and_same_content_reuses_the_newest(tmp_path):
    v1 = _publish(tmp_path, "demo", tag="a")
    assert (v1.ref, v1.path) == ("demo@1", tmp_path / "demo" / "1")
    manifest = json.loads((v1.path / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("name", "version", "ref")} == {
        "name": "demo",
        "version": 1,
        "ref": "demo@1",
    }
    assert manifest["origin"] == {"dag_id": "d", "run_id": "ra"} and manifest["created_at"].endswith("+00:00")
    assert manifest["dataset_hash"] == v1.dataset_hash and manifest["counts"]["output"] == 20

    v2 = _publish(tmp_path, "demo", tag="b")
    assert v2.ref == "demo@2" and v2.dataset_hash != v1.dataset_hash
    assert _publish(tmp_path, "other", tag="a").ref == "other@1"  # numbered per name

    again = _publish(tmp_path, "demo", tag="b", origin={"run_id": "retry"})  # a retry: no new version
    assert again.ref == "demo@2" and again.manifest["origin"]["run_id"] == "rb"
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["1", "2"]  # staging removed
    back = _publish(tmp_path, "demo", tag="a")  # older content again is news relative to the newest
    assert back.ref == "demo@3" and back.dataset_hash == v1.dataset_hash

    latest = catalog.read_latest(tmp_path)
    assert (latest["ref"], latest["path"], latest["run_id"]) == ("demo@3", str(back.path), "ra")


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    staged = []
    for tag in "abcd":
        folder = catalog.staging_dir("demo", tmp_path)
        prepare(_records(10, tag), folder, near_dedup=None)
        staged.append(folder)
    got, barrier = [], threading.Barrier(len(staged))

    def publish(folder):
        barrier.wait()
        got.append(catalog.publish(folder, "demo", root=tmp_path).version)

    threads = [threading.Thread(target=publish, args=(f,)) for f in staged]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["1", "2", "3", "4"]


def test_a_broken_version_number_stays_taken(tmp_path):
    (tmp_path / "demo" / "1").mkdir(parents=True)  # a half-written folder without a manifest
    (tmp_path / "demo" / "1" / "x").write_text("x")
    assert _publish(tmp_path, "demo").ref == "demo@2"
    assert catalog.resolve("demo", tmp_path).version == 2


def test_resolve_every_reference_form(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRLOOM_HOME", str(tmp_path / "home"))
    root = catalog.root_dir()
    v1, v2 = _publish(root, "demo", tag="a"), _publish(root, "demo", tag="b")
    assert catalog.resolve("demo@1").path == v1.path
    for ref in ("demo@2", "demo@latest", "demo", " demo@latest "):
        found = catalog.resolve(ref)
        assert (found.ref, found.path, found.dataset_hash) == ("demo@2", v2.path, v2.dataset_hash)
    assert catalog.resolve(str(v1.path)).ref == "demo@1"  # a catalog folder by path keeps its identity

    old = tmp_path / "old"  # prepared with --out, before names: a folder, no ref
    prepare(_records(12), old, near_dedup=None)
    found = catalog.resolve(str(old))
    assert (found.ref, found.name, found.path) == (None, None, old) and found.rows["train"] > 0
    monkeypatch.chdir(tmp_path)
    assert catalog.resolve("./old").path == Path("./old")


@pytest.mark.parametrize(
    "ref, message",
    [
        ("demo@7", r"dataset 'demo@7': no version '7' of 'demo'; versions: 1 \(or demo@latest\)"),
        ("demo@first", r"no version 'first' of 'demo'"),
        ("nope", r"no prepared dataset named 'nope' in .*; prepared datasets: demo"),
        ("Demo@1", r"dataset name in reference 'Demo@1' 'Demo' is not a valid name"),
        ("", r"dataset reference must be name@version, name or a folder"),
        ("/no/such/folder", r"/no/such/folder: not a prepared dataset \(no manifest.json\)"),
    ],
)
def test_resolve_errors_say_what_exists(tmp_path, ref, message):
    _publish(tmp_path, "demo")
    with pytest.raises(UsageError, match=message):
        catalog.resolve(ref, tmp_path)


def test_listing_choices_and_the_refusal_message(tmp_path):
    assert catalog.list_datasets(tmp_path) == [] and catalog.choices(root=tmp_path) == {}
    assert "no prepared datasets in" in catalog.no_choice_message(tmp_path)
    _publish(tmp_path, "demo", n=20, tag="a")
    _publish(tmp_path, "chats", n=30, tag="b")
    listed = catalog.list_datasets(tmp_path)
    assert [d.ref for d in listed] == ["chats@1", "demo@1"] or [d.ref for d in listed] == [
        "demo@1",
        "chats@1",
    ]
    choices = catalog.choices(root=tmp_path)
    assert set(choices) == {"demo@1", "chats@1"}
    assert choices["chats@1"].startswith("chats@1: 30 rows (train ") and "by rb" in choices["chats@1"]
    message = catalog.no_choice_message(tmp_path)
    assert "no dataset chosen" in message and "name@version" in message
    assert "demo@1: 20 rows" in message and "chats@1: 30 rows" in message
    (tmp_path / "demo" / "1" / "manifest.json").write_text("{broken")  # a broken version is left out
    assert [d.ref for d in catalog.list_datasets(tmp_path)] == ["chats@1"]


def test_cli_prepare_by_name_and_list(tmp_path, monkeypatch, capsys):
    from airloom.cli import main

    monkeypatch.setenv("AIRLOOM_HOME", str(tmp_path / "home"))
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _records(20)))
    args = ["prepare", str(src), "--name", "demo", "--tokenizer", "", "--near-dedup", "off"]
    assert main(args) == 0
    assert "prepared demo@1 (" in capsys.readouterr().out
    assert main(args) == 0  # the same content again: the same version
    assert "prepared demo@1 (" in capsys.readouterr().out
    assert main(["datasets"]) == 0
    assert capsys.readouterr().out.startswith("demo@1: 20 rows (train ")
    assert main(["datasets", "demo@latest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(tmp_path / "home" / "datasets" / "demo" / "1")
    assert main(["datasets", "demo@4"]) == 2
    assert "no version '4' of 'demo'" in capsys.readouterr().err
    assert main(["prepare", str(src), "--name", "Bad Name", "--tokenizer", ""]) == 2
    assert "--name 'Bad Name' is not a valid name" in capsys.readouterr().err
