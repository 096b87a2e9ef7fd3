"""prepare: deterministic, deduplicated, scrubbed, stratified splits written all at once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from airloom.data.prepare import prepare
from airloom.data.prompts import render_prompt
from airloom.exceptions import UsageError

TASKS = ["reverse", "upper", "sort", "add"]


def _records(n: int = 400) -> list[dict]:
    rows = []
    for i in range(n):
        task = TASKS[i % 4]
        rows.append(
            {
                "instruction": f"Apply {task} to item {i}",
                "input": "" if i % 3 else f"value {i}",
                "response": f"result {i}",
                "task": task,
                "_line": i + 1,
            }
        )
    return rows


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_gives_identical_files_and_hash(tmp_path):
    a = prepare(_records(), tmp_path / "a", seed=3)
    b = prepare(_records(), tmp_path / "b", seed=3)
    assert a == b
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for split, info in a["splits"].items():
        assert info["sha256"] == hashlib.sha256((tmp_path / "a" / f"{split}.jsonl").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == a

    other = prepare(_records(), tmp_path / "c", seed=4)
    assert other["dataset_hash"] != a["dataset_hash"]
    ids = lambda d, s: {r["id"] for r in _read(tmp_path / d / f"{s}.jsonl")}  # noqa: E731
    assert ids("a", "test") != ids("c", "test")
    assert set().union(*(ids("a", s) for s in ("train", "validation", "test"))) == set().union(
        *(ids("c", s) for s in ("train", "validation", "test"))
    )


def test_splits_are_disjoint_stratified_and_rendered(tmp_path):
    manifest = prepare(_records(), tmp_path / "out", val_fraction=0.1, test_fraction=0.2)
    splits = {s: _read(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    ids = {s: {r["id"] for r in rows} for s, rows in splits.items()}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert sum(len(v) for v in ids.values()) == 400
    # each task has 100 rows: exactly 20 in test and 10 in validation
    for task in TASKS:
        assert manifest["splits"]["test"]["tasks"][task] == 20
        assert manifest["splits"]["validation"]["tasks"][task] == 10
    assert {s: manifest["splits"][s]["rows"] for s in splits} == {"train": 280, "validation": 40, "test": 80}

    row = next(r for r in splits["test"] if r["input"])
    assert list(row) == ["id", "prompt", "response", "task", "instruction", "input"]
    assert row["prompt"] == render_prompt(row["instruction"], row["input"], template="alpaca")
    row = next(r for r in splits["train"] if not r["input"])
    assert row["prompt"] == f"### Instruction:\n{row['instruction']}\n### Response:\n"


def test_dedup_scrub_and_normalise(tmp_path):
    rows = [
        {"id": "a", "instruction": "Name a colour", "input": "", "response": "Red"},
        {"id": "b", "instruction": "Name  a colour ", "input": "", "response": "Red\r\n"},  # same, whitespace
        {"id": "c", "instruction": "Email me", "input": "", "response": "Write to ann@corp.example.com"},
        {
            "id": "d",
            "instruction": "Call",
            "input": "+1 (555) 123-4567",
            "response": "Ask 10.1.2.3 twice: 10.1.2.3",
        },
        {"id": "e", "instruction": "Cafe\u0301 menu", "input": "", "response": "Coffee  \n  indented\n"},
    ]
    manifest = prepare(rows, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    assert manifest["removed_duplicates"] == 1
    assert manifest["scrubbed"] == {"rows": 2, "email": 1, "phone": 1, "ip": 2, "card": 0}
    assert manifest["rows"] == 4 and manifest["input_rows"] == 5
    train = {r["id"]: r for r in _read(tmp_path / "out" / "train.jsonl")}
    assert sorted(train) == ["a", "c", "d", "e"]
    assert train["c"]["response"] == "Write to <EMAIL>"
    assert (train["d"]["input"], train["d"]["response"]) == ("<PHONE>", "Ask <IP> twice: <IP>")
    assert train["e"]["instruction"] == "Caf\u00e9 menu"  # NFC
    assert train["e"]["response"] == "Coffee\n  indented"  # trailing spaces gone, indentation kept

    kept = prepare(rows, tmp_path / "raw", dedup=False, scrub_pii=False, val_fraction=0.0, test_fraction=0.0)
    assert (kept["rows"], kept["removed_duplicates"], kept["scrubbed"]["rows"]) == (5, 0, 0)


def test_ids_fall_back_to_a_content_hash(tmp_path):
    rows = [
        {"instruction": "Name a colour", "input": "", "response": "Red"},
        {"id": 1, "instruction": "Name a fruit", "input": "", "response": "Apple"},
        {"id": 1, "instruction": "Name a planet", "input": "", "response": "Mars"},
    ]
    prepare(rows, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    ids = [r["id"] for r in _read(tmp_path / "out" / "train.jsonl")]
    assert ids[1] == "1" and len(set(ids)) == 3 and len(ids[0]) == len(ids[2]) == 16


def test_a_failed_run_leaves_the_previous_output_untouched(tmp_path):
    out = tmp_path / "out"
    first = prepare(_records(40), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    bad = _records(40) + [{"instruction": "Name a colour", "input": "", "response": None, "_line": 41}]
    with pytest.raises(
        UsageError, match=r"record 41 \(line 41\): instruction and response must not be empty"
    ):
        prepare(bad, out)
    with pytest.raises(UsageError, match=r"unknown prompt template 'chatml'"):
        prepare(_records(40), out, template="chatml")
    with pytest.raises(UsageError, match=r"leaves no training rows"):
        prepare(_records(40), out, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UsageError, match=r"no records to prepare"):
        prepare([], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left

    second = prepare(_records(40), out, seed=1)  # a rerun replaces the output as a whole
    assert second["seed"] == 1 and second["dataset_hash"] != first["dataset_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_crash_while_writing_leaves_no_half_written_output(tmp_path, monkeypatch):
    import airloom.data.prepare as prepare_module

    calls = {"n": 0}
    real = prepare_module.render_prompt

    def fail_on_tenth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "render_prompt", fail_on_tenth)
    with pytest.raises(OSError, match="disk full"):
        prepare(_records(40), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
