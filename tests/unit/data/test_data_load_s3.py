"""load_records on s3:// sources, against moto's S3 server over HTTP: same parsing and findings as a
local file, with the s3:// URI in place of the path; prefixes and globs; precise errors."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest

from airloom.data.load import load_records
from airloom.exceptions import UsageError

BUCKET = "airloom-data-tests"
GOOD = {"instruction": "Name a colour", "input": "", "response": "Red"}
CORRUPT = (
    json.dumps(GOOD).encode()
    + b"\n"
    + b'{"instruction": "Say hi in French", "input": "", "response": "caf\xe9"}\n'  # Latin-1 byte
    + b'{"instruction": "Count to three", "input": "", "response": "1, 2\n'  # truncated
    + b"\n"
    + json.dumps({"instruction": 42, "input": "", "response": "ok"}).encode()
    + b"\n"
    + json.dumps({**GOOD, "source": "web"}).encode()
    + b"\n"
)


@pytest.fixture(scope="module")
def s3(moto_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _put(s3, key: str, body: bytes) -> str:
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return f"s3://{BUCKET}/{key}"


def test_s3_jsonl_gives_the_same_findings_as_the_local_file_with_its_uri(s3, prefix, tmp_path):
    local = tmp_path / "corrupt.jsonl"
    local.write_bytes(CORRUPT)
    uri = _put(s3, f"{prefix}/raw/corrupt.jsonl", CORRUPT)

    from_s3, from_disk = load_records(uri), load_records(local)

    def without_file(findings):
        return [{k: v for k, v in f.to_dict().items() if k != "file"} for f in findings]

    assert without_file(from_s3.findings) == without_file(from_disk.findings)
    assert [(f.line, f.field, f.check) for f in from_s3.findings] == [
        (2, "response", "non_utf8"),
        (3, None, "invalid_json"),
        (4, None, "blank_line"),
        (5, "instruction", "wrong_type"),
        (6, "source", "unknown_field"),
    ]
    assert {f.file for f in from_s3.findings} == {uri}
    assert str(from_s3.findings[1]).startswith(f"{uri}:3: invalid_json:")
    assert (from_s3.rows_read, len(from_s3.records), len(from_s3.rejected)) == (6, 2, 4)
    assert [(r["_file"], r["_line"]) for r in from_s3.records] == [(uri, 1), (uri, 6)]
    assert [r["file"] for r in from_s3.rejected] == [uri] * 4
    assert from_s3.source == uri


def test_s3_prefix_reads_every_data_file_and_globs_match_keys(s3, prefix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = _put(s3, f"{prefix}/data/a.jsonl", (json.dumps(GOOD) + "\n") * 2)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "response": None}]), buf)
    b = _put(s3, f"{prefix}/data/sub/b.parquet", buf.getvalue())
    _put(s3, f"{prefix}/data/notes.txt", b"not data")
    _put(s3, f"{prefix}/data/.hidden/c.jsonl", json.dumps(GOOD).encode())
    _put(s3, f"{prefix}/database.jsonl", json.dumps(GOOD).encode())  # shares the prefix text, not the folder

    for uri in (f"s3://{BUCKET}/{prefix}/data/", f"s3://{BUCKET}/{prefix}/data"):
        result = load_records(uri)
        assert result.rows_read == 4, uri
        assert sorted({r["_file"] for r in result.records}) == [a, b]
        # the Parquet object is parsed like a local Parquet file: row 2 has a null response
        assert [(f.file, f.line, f.field, f.check) for f in result.findings] == [
            (b, 2, "response", "null_field")
        ]

    assert {r["_file"] for r in load_records(f"s3://{BUCKET}/{prefix}/data/*.jsonl").records} == {a}
    assert load_records(f"s3://{BUCKET}/{prefix}/data/**/*.parquet").rows_read == 2
    assert {r["_file"] for r in load_records(f"s3://{BUCKET}/{prefix}/**/*").records} == {
        a,
        b,
        f"s3://{BUCKET}/{prefix}/database.jsonl",
    }


def test_missing_s3_sources_are_usage_errors_naming_the_uri(s3, prefix):
    missing = f"s3://{BUCKET}/{prefix}/missing.jsonl"
    with pytest.raises(UsageError, match=rf"^{missing}: no such S3 object$"):
        load_records(missing)
    with pytest.raises(UsageError, match=r"no such S3 object or prefix"):
        load_records(f"s3://{BUCKET}/{prefix}/nothing/")
    with pytest.raises(UsageError, match=r"the pattern matches no"):
        load_records(f"s3://{BUCKET}/{prefix}/*.csv")
    _put(s3, f"{prefix}/notes.txt", b"x")
    with pytest.raises(UsageError, match=r"notes\.txt: unsupported file type '\.txt'"):
        load_records(f"s3://{BUCKET}/{prefix}/notes.txt")
    with pytest.raises(
        UsageError, match=r"no-such-bucket-here/a\.jsonl: cannot read the object .*NoSuchBucket"
    ):
        load_records("s3://no-such-bucket-here/a.jsonl")
    with pytest.raises(UsageError, match=r"no bucket"):
        load_records("s3:///a.jsonl")


def test_an_explicit_client_is_used(s3, prefix):
    """Airflow tasks pass the client of their connection; the environment is not consulted."""
    uri = _put(s3, f"{prefix}/one.jsonl", json.dumps(GOOD).encode())
    calls = []

    class Recording:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(s3, name)

    assert load_records(uri, s3_client=Recording()).rows_read == 1
    assert calls == ["get_object"]


def test_cli_reads_s3_and_exits_2_on_a_missing_key(s3, prefix, tmp_path, capsys):
    from airloom.cli import main

    uri = _put(s3, f"{prefix}/raw/corrupt.jsonl", CORRUPT)
    assert main(["validate", uri, "--out", str(tmp_path / "v")]) in (0, 1)
    report = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert report["rows_read"] == 6 and report["source"] == uri
    assert {f["file"] for f in report["findings"]} == {uri}

    missing = f"s3://{BUCKET}/{prefix}/missing.jsonl"
    capsys.readouterr()
    assert main(["validate", missing, "--out", str(tmp_path / "m")]) == 2
    assert f"{missing}: no such S3 object" in capsys.readouterr().err
    assert not Path(tmp_path / "m" / "validation.json").exists()
