"""The data operators read s3:// sources with the boto3 client of their Airflow connection
(endpoint and credentials from the connection, not from the environment), against moto's server."""

from __future__ import annotations

import json

import pytest

from airloom.airflow.operators.data import DataProfileOperator, ValidateDataOperator

BUCKET = "airloom-operator-tests"
ROWS = [
    {"instruction": "Name a colour of the sky on a clear day.", "input": "", "response": "Blue."},
    {"instruction": "Translate 'thank you' into German.", "input": "", "response": "Danke."},
    {"instruction": "Which planet is known as the red planet?", "input": "", "response": "Mars."},
]


@pytest.fixture
def s3_source(moto_endpoint, monkeypatch):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    body = "".join(json.dumps(r) + "\n" for r in ROWS) + "{broken\n"
    client.put_object(Bucket=BUCKET, Key="raw/part-1.jsonl", Body=body.encode())
    # Only the connection knows where S3 is: a client built from the environment would miss it.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv(
        "AIRFLOW_CONN_AIRLOOM_S3",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
            }
        ),
    )
    return f"s3://{BUCKET}/raw/"


def test_validate_reads_s3_through_the_connection(s3_source, tmp_path, make_context):
    # one bad row in four is above the default 5% quarantine limit
    op = ValidateDataOperator(
        task_id="validate",
        source=s3_source,
        aws_conn_id="airloom_s3",
        suite={"max_quarantine_rate": 0.5},
        output_dir=str(tmp_path / "validate"),
    )
    context = make_context(task_id="validate")
    out = op.execute(context)
    assert (out["rows_read"], out["accepted_rows"], out["quarantined_rows"]) == (4, 3, 1)
    report = json.loads((tmp_path / "validate" / "validation.json").read_text())
    assert report["source"] == s3_source
    assert [(f["file"], f["line"], f["check"]) for f in report["findings"]] == [
        (f"s3://{BUCKET}/raw/part-1.jsonl", 4, "invalid_json")
    ]
    assert dict(context["ti"].pushed)["data_docs"] == out["data_docs"]

    profile = DataProfileOperator(
        task_id="eda",
        input_path=f"s3://{BUCKET}/raw/*.jsonl",
        aws_conn_id="airloom_s3",
        output_dir=str(tmp_path / "eda"),
    ).execute(make_context(task_id="eda"))
    assert profile["rows"] == 3
