"""The one reader of record files: JSONL errors name the file and line; a missing file is a UsageError."""

from __future__ import annotations

import pytest

from airloom.data.splits import read_jsonl, read_split
from airloom.exceptions import UsageError


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2\n')
    with pytest.raises(UsageError, match=r"eval.jsonl:3: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"id": 1}\n\n[1]\n')
    with pytest.raises(UsageError, match=r"eval.jsonl:3: expected a JSON object"):
        read_jsonl(path)
    path.write_text('{"id": 1}\n\n{"id": 2}\n')
    assert read_jsonl(path) == read_split(path) == [{"id": 1}, {"id": 2}]


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_missing_split_names_the_file(tmp_path, suffix):
    with pytest.raises(UsageError, match=rf"cannot read .*missing\.{suffix}"):
        read_split(tmp_path / f"missing.{suffix}")


def test_messages_come_back_as_turns_from_parquet_and_jsonl(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0}]
    stored = json.dumps(turns)
    pq.write_table(pa.table({"id": ["a", "b"], "messages": [stored, None]}), tmp_path / "train.parquet")
    assert read_split(tmp_path / "train.parquet") == [
        {"id": "a", "messages": turns},
        {"id": "b", "messages": None},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": stored}) + "\n" + json.dumps({"messages": turns}) + "\n")
    assert read_split(path) == [{"messages": turns}, {"messages": turns}]
    path.write_text(json.dumps({"messages": "[{"}) + "\n")
    with pytest.raises(UsageError, match=r"train\.jsonl: row 1: messages is not JSON"):
        read_split(path)
    path.write_text(json.dumps({"messages": '{"role": "user"}'}) + "\n")
    with pytest.raises(UsageError, match=r"row 1: messages must be a list of turns, got dict"):
        read_split(path)
