"""load_records: every bad row becomes a precise finding and the read goes on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from airloom.data.load import Finding, load_records
from airloom.exceptions import UsageError


def _jsonl(path: Path, lines: list[bytes | str | dict]) -> Path:
    out = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        out += (line.encode() if isinstance(line, str) else line) + b"\n"
    path.write_bytes(out)
    return path


def _triples(findings: list[Finding]) -> list[tuple[int, str | None, str, str]]:
    return [(f.line, f.field, f.check, f.severity) for f in findings]


def test_corrupt_jsonl_reports_each_bad_line_and_keeps_the_good_ones(tmp_path):
    path = _jsonl(
        tmp_path / "corrupt.jsonl",
        [
            {"instruction": "Name a colour", "input": "", "response": "Red"},
            b'{"instruction": "Say hi in French", "input": "", "response": "caf\xe9"}',  # Latin-1 byte
            '{"instruction": "Count to three", "input": "", "response": "1, 2',  # truncated
            '["Name a fruit", "apple"]',
            {"instruction": 42, "input": "", "response": "ok"},
            "",
            {"instruction": "Name a planet", "input": ""},
            {"instruction": "Name a fruit", "input": "", "response": "Apple", "source": "web"},
            {"instruction": "Say bye", "input": None, "response": "Bye"},
            {"id": 7, "instruction": "Add 2 and 2", "input": "2 + 2", "response": "4", "task": "add"},
        ],
    )
    result = load_records(path)

    assert _triples(result.findings) == [
        (2, "response", "non_utf8", "error"),
        (3, None, "invalid_json", "error"),
        (4, None, "not_object", "error"),
        (5, "instruction", "wrong_type", "error"),
        (6, None, "blank_line", "error"),
        (7, "response", "missing_field", "error"),
        (9, "input", "null_field", "error"),
        (8, "source", "unknown_field", "warning"),
    ]
    assert all(f.file == str(path) for f in result.findings)
    assert "0xE9" in result.findings[0].message
    assert "truncated" in result.findings[1].message
    assert "a list" in result.findings[2].message
    assert "a number (42)" in result.findings[3].message
    assert result.rows_read == 10
    assert [r["_line"] for r in result.records] == [1, 8, 10]
    assert [r["line"] for r in result.rejected] == [2, 3, 4, 5, 6, 7, 9]
    assert result.rows_read == len(result.records) + len(result.rejected)
    assert result.records[1] == {
        "instruction": "Name a fruit",
        "input": "",
        "response": "Apple",
        "_file": str(path),
        "_line": 8,
        "_chars": 20,  # every text value of the row, the ignored "source" key's included
        "_longest": "instruction",
    }
    assert result.records[2]["id"] == "7" and result.records[2]["task"] == "add"
    # the rejected row keeps its text (bad bytes shown as U+FFFD) for the quarantine file
    assert "caf\ufffd" in result.rejected[0]["raw"]
    assert result.findings[0].to_dict() == {
        "file": str(path),
        "line": 2,
        "field": "response",
        "check": "non_utf8",
        "message": result.findings[0].message,
        "severity": "error",
    }


def test_one_layout_per_file_so_a_stray_key_name_is_reported(tmp_path):
    good = {"instruction": "Name a colour", "input": "", "response": "Red"}
    path = _jsonl(
        tmp_path / "mixed.jsonl", [good, good, {"prompt": "Name a fruit", "input": "", "response": "Apple"}]
    )
    result = load_records(path)
    assert len(result.records) == 2
    assert _triples(result.findings) == [
        (3, "instruction", "missing_field", "error"),
        (3, "prompt", "unknown_field", "warning"),
    ]
    assert "rename it to 'instruction'" in result.findings[0].message


def test_dolly_alpaca_and_prompt_completion_layouts_are_mapped(tmp_path):
    dolly = _jsonl(
        tmp_path / "dolly.jsonl",
        [
            {
                "instruction": "Who wrote it?",
                "context": "Hamlet, by Shakespeare.",
                "response": "Shakespeare",
                "category": "closed_qa",
            }
        ],
    )
    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Echo", "input": "x", "output": "x"}])

    (d,) = load_records(dolly).records
    assert (d["instruction"], d["input"], d["response"], d["task"]) == (
        "Who wrote it?",
        "Hamlet, by Shakespeare.",
        "Shakespeare",
        "closed_qa",
    )
    (p,) = load_records(pc).records
    assert (p["instruction"], p["input"], p["response"]) == ("2+2=", "", "4")
    (a,) = load_records(alpaca).records
    assert a["response"] == "x"
    assert not load_records(dolly).findings and not load_records(pc).findings


def test_explicit_field_map(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "Capital of France?", "answer": "Paris", "id": "q1"}])
    result = load_records(path, field_map={"question": "instruction", "answer": "response"})
    assert not result.findings
    (rec,) = result.records
    assert (rec["id"], rec["instruction"], rec["input"], rec["response"]) == (
        "q1",
        "Capital of France?",
        "",
        "Paris",
    )
    with pytest.raises(UsageError, match=r"maps 'answer' to 'reply'"):
        load_records(path, field_map={"answer": "reply"})


def test_json_array_lines_are_index_plus_one_and_a_broken_array_is_salvaged(tmp_path):
    rows = [
        {"instruction": "Name a colour", "input": "", "response": "Red"},
        {"instruction": "Name a number", "input": "", "response": 5},
    ]
    good = tmp_path / "array.json"
    good.write_text(json.dumps(rows, indent=2))
    result = load_records(good)
    assert [r["_line"] for r in result.records] == [1]
    assert _triples(result.findings) == [(2, "response", "wrong_type", "error")]
    assert "starts at line 7" in result.findings[0].message

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([rows[0], rows[0], rows[0]], indent=2)[:-40])
    result = load_records(broken)
    assert [r["_line"] for r in result.records] == [1, 2]
    assert _triples(result.findings) == [(3, None, "invalid_json", "error")]
    assert result.rows_read == 3


def test_csv_rows_are_numbered_from_the_first_data_row(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "response"])
        w.writerow(["Write a haiku", "", "Old pond\nfrog jumps in\nsplash"])  # spans three file lines
        w.writerow(["Too", "many", "columns", "here"])
        w.writerow(["Name a colour", "", "Red"])
    result = load_records(path)
    assert [r["_line"] for r in result.records] == [1, 3]
    assert result.records[0]["response"] == "Old pond\nfrog jumps in\nsplash"
    assert _triples(result.findings) == [(2, None, "wrong_column_count", "error")]
    assert "file line 5" in result.findings[0].message


def test_parquet_rows_with_type_faults(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    table = pa.table(
        {
            "instruction": ["Name a colour", "Name a fruit", "Name a planet"],
            "input": ["", None, ""],
            "response": ["Red", "Apple", None],
        }
    )
    pq.write_table(table, path)
    result = load_records(path)
    assert [r["_line"] for r in result.records] == [1]
    assert _triples(result.findings) == [
        (2, "input", "null_field", "error"),
        (3, "response", "null_field", "error"),
    ]

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UsageError, match=r"bad\.parquet: cannot read the Parquet file"):
        load_records(bad)


def test_folder_and_glob_read_every_file(tmp_path):
    row = {"instruction": "Name a colour", "input": "", "response": "Red"}
    _jsonl(tmp_path / "a.jsonl", [row])
    (tmp_path / "sub").mkdir()
    _jsonl(tmp_path / "sub" / "b.jsonl", [row, row])
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_records(tmp_path).rows_read == 3
    result = load_records(tmp_path / "*.jsonl")
    assert result.rows_read == 1 and result.source == str(tmp_path / "*.jsonl")
    assert {r["_file"] for r in load_records(tmp_path / "**" / "*.jsonl").records} == {
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "sub" / "b.jsonl"),
    }


def test_unreadable_inputs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match=r"missing\.jsonl: no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(UsageError, match=r"data\.txt: unsupported file type '\.txt'"):
        load_records(tmp_path / "data.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"empty: the folder holds no"):
        load_records(tmp_path / "empty")
    with pytest.raises(UsageError, match=r"the pattern matches no"):
        load_records(tmp_path / "*.csv")


def test_field_maps_as_users_give_them(tmp_path, capsys):
    from airloom.cli import main
    from airloom.data.load import parse_field_map

    wanted = {"question": "instruction", "answer": "response"}
    assert parse_field_map("question=instruction, answer=response") == wanted
    assert parse_field_map('{"question": "instruction", "answer": "response"}') == wanted
    assert parse_field_map(wanted) == wanted
    assert all(parse_field_map(v) is None for v in (None, "", "{}", {}))
    for bad, says in (
        ("question", "source=field pairs"),
        ("q=prompt", "not a record field"),
        ("{oops", "JSON"),
        ("None", "source=field pairs"),
    ):
        with pytest.raises(UsageError, match=says):
            parse_field_map(bad)

    source = tmp_path / "qa.jsonl"
    source.write_text(
        "".join(json.dumps({"question": f"Say {w}.", "answer": w}) + "\n" for w in ("hi", "yo"))
    )
    assert (
        main(
            [
                "validate",
                str(source),
                "--out",
                str(tmp_path / "v"),
                "--field-map",
                "question=instruction,answer=response",
            ]
        )
        == 0
    )
    accepted = [json.loads(line) for line in (tmp_path / "v" / "accepted.jsonl").read_text().splitlines()]
    assert accepted == [
        {"instruction": "Say hi.", "input": "", "response": "hi"},
        {"instruction": "Say yo.", "input": "", "response": "yo"},
    ]
    assert main(["validate", str(source), "--out", str(tmp_path / "bad"), "--field-map", "question"]) == 2
