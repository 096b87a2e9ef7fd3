"""airflow_settings.yaml -> Airflow CLI import files, and one real apply against a throwaway Airflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airloom.airflow.settings_file import apply_settings, load_settings, main, to_import_files
from airloom.exceptions import UsageError

REPO = Path(__file__).resolve().parents[3]
AIRFLOW_BIN = str(Path(sys.executable).parent / "airflow")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "airflow_settings.yaml"
    path.write_text(text)
    return path


def test_repo_settings_file_converts_to_cli_import_json(tmp_path):
    settings = load_settings(REPO / "airflow_settings.yaml")
    files = to_import_files(settings, tmp_path / "out")

    assert set(files) == {"connections", "pools", "variables"}
    pools = json.loads(files["pools"].read_text())
    assert pools["gpu"] == {
        "slots": 1,
        "description": "training slots: one per GPU",
        "include_deferred": False,
    }
    assert pools["eval"]["slots"] == 2
    assert json.loads(files["variables"].read_text()) == {
        "airloom_registry": "",
        "airloom_signoff_approvers": "reviewer",
        "airloom_signoff_min_approvals": "",
    }
    aws = json.loads(files["connections"].read_text())["aws_default"]
    assert aws["conn_type"] == "aws"
    # The embedded default must leave the endpoint to boto3's chain (AWS_ENDPOINT_URL / real S3).
    assert "endpoint_url" not in json.loads(aws["extra"])
    assert oct(files["connections"].stat().st_mode & 0o777) == "0o600"


def test_astro_fields_map_to_connection_fields_and_values_to_text(tmp_path):
    path = write(
        tmp_path,
        """
airflow:
  connections:
    - conn_id: pg
      conn_type: postgres
      conn_host: db
      conn_schema: airflow
      conn_login: me
      conn_password: 1234
      conn_port: "5432"
      conn_extra: '{"sslmode": "disable"}'
    - conn_id: by_uri
      conn_uri: http://example.invalid:80
  pools:
    - pool_name: p
      pool_slot: 0
  variables:
    - variable_name: limits
      variable_value: {max: 3}
    - variable_name: unset
""",
    )
    files = to_import_files(load_settings(path), tmp_path)
    conns = json.loads(files["connections"].read_text())
    assert conns["pg"] == {
        "conn_type": "postgres",
        "host": "db",
        "schema": "airflow",
        "login": "me",
        "password": "1234",
        "port": 5432,
        "extra": '{"sslmode": "disable"}',
    }
    assert conns["by_uri"] == "http://example.invalid:80"
    assert json.loads(files["pools"].read_text())["p"]["description"] == ""
    assert json.loads(files["variables"].read_text()) == {"limits": '{"max": 3}', "unset": ""}


def test_empty_sections_write_no_files(tmp_path):
    path = write(tmp_path, "airflow:\n  pools:\n    - {pool_name: gpu, pool_slot: 1}\n")
    assert set(to_import_files(load_settings(path), tmp_path / "out")) == {"pools"}
    assert load_settings(write(tmp_path, "")) == {"connections": [], "pools": [], "variables": []}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("pools: []\n", r"top level must be a mapping with the single key 'airflow'"),
        ("airflow:\n  queues: []\n", r"unknown section\(s\) under 'airflow': queues"),
        ("airflow:\n  pools: {gpu: 1}\n", r"airflow\.pools must be a list"),
        (
            "airflow:\n  pools:\n    - pool_name: gpu\n      slots: 1\n",
            r"airflow_settings\.yaml:3: airflow\.pools\[0\] \(gpu\): unknown key\(s\) slots",
        ),
        (
            "airflow:\n  pools:\n    - {pool_name: gpu, pool_slot: 1}\n    - {pool_name: gpu, pool_slot: -2}\n",
            r":4: airflow\.pools\[1\] \(gpu\): 'pool_slot' must be an integer >= 0",
        ),
        (
            "airflow:\n  pools:\n    - {pool_name: gpu, pool_slot: 1}\n    - {pool_name: gpu, pool_slot: 2}\n",
            r":4: airflow\.pools\[1\]: duplicate pool_name 'gpu'",
        ),
        (
            "airflow:\n  connections:\n    - conn_type: aws\n",
            r"airflow\.connections\[0\]: 'conn_id' is required",
        ),
        ("airflow:\n  connections:\n    - conn_id: x\n", r"\(x\): 'conn_type' is required"),
        (
            "airflow:\n  connections:\n    - {conn_id: x, conn_type: aws, conn_extra: '{nope'}\n",
            r"'conn_extra' is a string but not JSON",
        ),
        (
            "airflow:\n  connections:\n    - {conn_id: x, conn_uri: 'aws://', conn_host: h}\n",
            r"'conn_uri' cannot be combined with conn_host",
        ),
        (
            "airflow:\n  connections:\n    - {conn_id: x, conn_type: pg, conn_port: abc}\n",
            r"'conn_port' must be",
        ),
        ("airflow:\n  variables:\n    - variable_value: 1\n", r"'variable_name' is required"),
        ("airflow: [unclosed\n", r"not valid YAML"),
    ],
)
def test_invalid_files_name_the_entry(tmp_path, text, match):
    with pytest.raises(UsageError, match=match):
        load_settings(write(tmp_path, text))


def test_missing_file_and_missing_airflow_binary(tmp_path):
    with pytest.raises(UsageError, match=r"nope\.yaml: cannot read settings file"):
        load_settings(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match=r"cannot run '/no/such/airflow': not found"):
        apply_settings(REPO / "airflow_settings.yaml", airflow_bin="/no/such/airflow")


def test_main_out_dir_writes_files_and_bad_file_exits_2(tmp_path, capsys):
    assert main([str(REPO / "airflow_settings.yaml"), "--out-dir", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "pools.json").exists()
    assert main([str(write(tmp_path, "airflow: {pools: 3}\n"))]) == 2
    assert "airflow.pools must be a list" in capsys.readouterr().err


def test_apply_against_a_throwaway_airflow_overwrites_existing(tmp_path, monkeypatch):
    for key in [
        k for k in os.environ if k.startswith(("AIRFLOW__DATABASE__", "AIRFLOW_CONN_", "AIRFLOW_VAR_"))
    ]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "home"))  # fresh SQLite DB there
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

    def airflow(*args: str) -> str:
        return subprocess.run(
            [AIRFLOW_BIN, *args], capture_output=True, text=True, check=True, timeout=120
        ).stdout

    airflow("db", "migrate")
    stale = write(
        tmp_path,
        "airflow:\n  connections:\n    - conn_id: aws_default\n      conn_type: aws\n"
        "      conn_extra: {endpoint_url: 'http://stale:9000'}\n",
    )
    apply_settings(stale, airflow_bin=AIRFLOW_BIN)
    apply_settings(REPO / "airflow_settings.yaml", airflow_bin=AIRFLOW_BIN)

    pools = {p["pool"]: p for p in json.loads(airflow("pools", "list", "--output", "json"))}
    assert int(pools["gpu"]["slots"]) == 1
    assert pools["gpu"]["description"] == "training slots: one per GPU"
    assert int(pools["eval"]["slots"]) == 2
    assert airflow("variables", "get", "airloom_signoff_approvers").strip() == "reviewer"
    conn = json.loads(airflow("connections", "get", "aws_default", "--output", "json"))[0]
    assert conn["conn_type"] == "aws"
    assert "stale" not in json.dumps(conn), "connections import must overwrite the existing aws_default"
