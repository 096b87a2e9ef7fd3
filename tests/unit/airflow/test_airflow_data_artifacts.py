"""The data DAG's hand-overs when workers share no disk: with ``AIRLOOM_ARTIFACTS=s3://…`` (moto's server)
validate → eda_report → prepare → resolve_dataset each run with an AIRLOOM_HOME of their own, the previous
one deleted first; everything they hand over (XCom, the prepared_dataset event) is a URI of the store, each
stages what it reads, and a version whose upload was cut short is invisible."""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
from airflow.sdk.execution_time.context import OutletEventAccessors, TriggeringAssetEventsAccessor

from airloom.airflow.assets import PREPARED_DATASET
from airloom.airflow.operators.data import (
    DataProfileOperator,
    PrepareDatasetOperator,
    ResolveDatasetOperator,
    ValidateDataOperator,
)
from airloom.artifacts import MANIFEST as ARTIFACT_MANIFEST
from airloom.artifacts import Artifacts
from airloom.registry.store import S3Store

RUN_ID = "manual__2026-01-02T03:04:05+00:00"
SAFE_RUN = "manual__2026-01-02T03_04_05_00_00"
ROWS = [
    {"instruction": f"Write the number {i} in words.", "input": "", "response": f"It is {i}."}
    for i in range(40)
]
SUITE = {"max_quarantine_rate": 0.5, "near_duplicate_threshold": None}


class Killed(BaseException):
    """The worker dies (SIGKILL, OOM): nothing of the task's own code runs after it."""


@pytest.fixture
def store(moto_endpoint, moto_bucket, monkeypatch, aws_default_on_moto) -> str:
    """The artifact store on moto under a prefix of its own, reached only through the ``aws_default``
    connection (AWS_ENDPOINT_URL is unset: a client built from the environment would miss it); the raw data
    lies where the DAG's form expects it, ``<store>/data/raw/``, with one unreadable row."""
    import boto3

    prefix = f"dq-{uuid.uuid4().hex[:12]}"
    body = "".join(json.dumps(r) + "\n" for r in ROWS) + "{broken\n"
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.put_object(Bucket=moto_bucket, Key=f"{prefix}/data/raw/part-1.jsonl", Body=body.encode())
    uri = f"s3://{moto_bucket}/{prefix}"
    monkeypatch.setenv("AIRLOOM_ARTIFACTS", uri)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    return uri


class Workers:
    """One AIRLOOM_HOME per task, the previous one deleted before the next task starts."""

    def __init__(self, tmp_path: Path, monkeypatch) -> None:
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self.homes: list[Path] = []

    def next(self, name: str) -> Path:
        if self.homes:
            shutil.rmtree(self.homes[-1], ignore_errors=True)
        home = self.tmp_path / name
        assert not home.exists()
        self.monkeypatch.setenv("AIRLOOM_HOME", str(home))
        self.homes.append(home)
        return home


@pytest.fixture
def workers(tmp_path, monkeypatch) -> Workers:
    return Workers(tmp_path, monkeypatch)


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _assert_only_uris(value: Any, store: str, workers: Workers) -> None:
    """Every location in ``value`` is a URI of the store; no worker's folder shows anywhere."""
    strings = _strings(value)
    assert not [s for s in strings if any(str(home) in s for home in workers.homes)], strings
    locations = [s for s in strings if "/" in s]
    assert locations and all(s.startswith(store + "/") for s in locations), locations


def _context(make_context, task_id: str, dag_id: str = "llm_data_quality") -> dict[str, Any]:
    context = make_context(task_id=task_id)
    context["ti"].dag_id = dag_id
    return context


def _pushed(context) -> dict[str, Any]:
    return dict(context["ti"].pushed)


def _event(extra: dict) -> TriggeringAssetEventsAccessor:
    return TriggeringAssetEventsAccessor.build(
        [
            AssetEventDagRunReferenceResult(
                asset={"name": PREPARED_DATASET.name, "uri": PREPARED_DATASET.uri, "extra": {}},
                extra=extra,
                source_task_id="prepare",
                source_dag_id="llm_data_quality",
                source_run_id=RUN_ID,
                source_map_index=-1,
                source_aliases=[],
                timestamp=datetime(2026, 1, 2, tzinfo=UTC),
            )
        ]
    )


def _prepare(raw: str, accepted: str, **kwargs) -> PrepareDatasetOperator:
    return PrepareDatasetOperator(
        task_id="prepare",
        input_path=accepted,
        dataset_name=None,  # named after the source: raw
        source=raw,
        tokenizer=None,
        near_dedup=None,
        outlets=[PREPARED_DATASET],
        **kwargs,
    )


def test_the_data_dag_hands_over_uris_between_workers_without_a_shared_disk(
    store, workers, make_context, monkeypatch
):
    raw = f"{store}/data/raw/"
    runs = f"{store}/runs/llm_data_quality/{SAFE_RUN}"

    workers.next("validate")
    context = _context(make_context, "validate")
    validated = ValidateDataOperator(task_id="validate", source=raw, suite=SUITE).execute(context)
    assert (validated["rows_read"], validated["accepted_rows"], validated["quarantined_rows"]) == (41, 40, 1)
    assert validated["accepted"] == f"{runs}/validate/accepted.jsonl"
    assert validated["scan"] == f"{runs}/validate/scan" and validated["data_docs"].startswith(
        f"{runs}/validate/"
    )
    _assert_only_uris(validated, store, workers)
    assert _pushed(context) == validated

    # eda_report on another worker renders validation's scan, staged by URI: the data is not read again
    workers.next("eda")
    context = _context(make_context, "eda_report")
    with monkeypatch.context() as mp:
        mp.setattr("airloom.data.load.iter_chunks", lambda *a, **k: pytest.fail("read the data again"))
        profiled = DataProfileOperator(
            task_id="eda_report", input_path=raw, scan_dir=validated["scan"]
        ).execute(context)
    assert profiled["report"] == f"{runs}/eda_report/report.html"
    _assert_only_uris(profiled, store, workers)
    assert _pushed(context) == profiled

    home = workers.next("prepare")
    context = _context(make_context, "prepare")
    context["outlet_events"] = OutletEventAccessors()
    prepared = _prepare(raw, validated["accepted"]).execute(context)
    # the accepted rows were staged (verified against validate's manifest) into this worker's cache
    assert [p.name for p in (home / "cache" / "artifacts").rglob("*.jsonl")] == ["accepted.jsonl"]
    assert (prepared["ref"], prepared["path"]) == ("raw@1", f"{store}/datasets/raw/1")
    assert sum(prepared["splits"].values()) == validated["accepted_rows"]
    assert prepared["source"] == raw and prepared["run_id"] == RUN_ID
    _assert_only_uris(prepared, store, workers)
    extra = context["outlet_events"][PREPARED_DATASET].extra
    assert {k: extra[k] for k in ("ref", "path", "dataset_hash")} == {
        "ref": "raw@1",
        "path": f"{store}/datasets/raw/1",
        "dataset_hash": prepared["dataset_hash"],
    }
    _assert_only_uris(extra, store, workers)
    assert not [p for p in workers.homes[-1].rglob("*") if p.is_file() and "datasets" in p.parts]

    # llm_finetune's resolve_dataset, started by that event, on yet another worker
    workers.next("resolve")
    context = _context(make_context, "resolve_dataset", "llm_finetune")
    context["triggering_asset_events"] = _event(extra)
    resolved = ResolveDatasetOperator(task_id="resolve_dataset").execute(context)
    assert resolved == {
        "path": f"{store}/datasets/raw/1",
        "ref": "raw@1",
        "name": "raw",
        "version": 1,
        "dataset_hash": prepared["dataset_hash"],
        "source": "asset event",
        "data_quality_run": runs,
        **{split: f"{store}/datasets/raw/1/{split}.parquet" for split in ("train", "validation", "test")},
    }
    _assert_only_uris(resolved, store, workers)

    # a third empty home: by name@version, and the split stages from the store (verified) to read
    home = workers.next("trainer")
    op = ResolveDatasetOperator(task_id="resolve_dataset", dataset="raw@1")
    again = op.execute(_context(make_context, "resolve_dataset", "llm_finetune"))
    assert (again["ref"], again["train"], again["source"]) == ("raw@1", resolved["train"], "param")
    train = Path(op.stage(again["train"]))
    assert train.is_relative_to(home)
    import pyarrow.parquet as pq

    assert pq.read_metadata(train).num_rows == prepared["splits"]["train"]
    # what the reports say is readable there too
    report = json.loads(op.artifacts.read_bytes(validated["validation"]))
    assert report["source"] == raw
    assert json.loads(op.artifacts.read_bytes(profiled["profile"]))["rows"] == profiled["rows"] > 0


def test_a_prepare_killed_mid_upload_leaves_no_visible_version(store, workers, make_context, monkeypatch):
    raw = f"{store}/data/raw/"
    workers.next("validate")
    validated = ValidateDataOperator(task_id="validate", source=raw, suite=SUITE).execute(
        _context(make_context, "validate")
    )
    workers.next("prepare")
    context = _context(make_context, "prepare")
    context["outlet_events"] = OutletEventAccessors()
    first = _prepare(raw, validated["accepted"]).execute(context)

    # other splits (another seed), and the worker dies while uploading the last split file: the catalog's
    # manifest.json is up already, the artifact manifest is not
    workers.next("prepare-killed")
    real_put = S3Store.put_file

    def killed(self, key, path):
        if key.endswith("/validation.parquet"):
            raise Killed
        return real_put(self, key, path)

    monkeypatch.setattr(S3Store, "put_file", killed)
    context = _context(make_context, "prepare")
    context["outlet_events"] = OutletEventAccessors()
    with pytest.raises(Killed):
        _prepare(raw, validated["accepted"], seed=7).execute(context)
    monkeypatch.setattr(S3Store, "put_file", real_put)
    keys = Artifacts(store, client=_client()).list("datasets/raw/2/")
    assert "datasets/raw/2/manifest.json" in keys and f"datasets/raw/2/{ARTIFACT_MANIFEST}" not in keys

    workers.next("reader")
    resolve = ResolveDatasetOperator(task_id="resolve_dataset", dataset="raw@latest")
    assert resolve.execute(_context(make_context, "resolve_dataset", "llm_finetune"))["ref"] == "raw@1"
    with pytest.raises(AirflowFailException, match=r"no version '2' of 'raw'; versions: 1"):
        ResolveDatasetOperator(task_id="resolve_dataset", dataset="raw@2").execute(
            _context(make_context, "resolve_dataset", "llm_finetune")
        )
    with pytest.raises(AirflowFailException, match=r"(?s)no dataset chosen.*raw@1"):
        ResolveDatasetOperator(task_id="resolve_dataset").execute(
            _context(make_context, "resolve_dataset", "llm_finetune")
        )

    # the retry completes a version (the next number: 2 stays taken) and the event names it
    workers.next("prepare-retry")
    context = _context(make_context, "prepare")
    context["outlet_events"] = OutletEventAccessors()
    retried = _prepare(raw, validated["accepted"], seed=7).execute(context)
    assert retried["ref"] == "raw@3" and retried["dataset_hash"] != first["dataset_hash"]
    assert context["outlet_events"][PREPARED_DATASET].extra["path"] == f"{store}/datasets/raw/3"
    # and a retry of that (same content) reuses it
    context["outlet_events"] = OutletEventAccessors()
    assert _prepare(raw, validated["accepted"], seed=7).execute(context)["ref"] == "raw@3"


def test_a_failed_validation_still_hands_over_its_reports_and_scan(store, workers, make_context):
    raw = f"{store}/data/raw/"
    workers.next("validate")
    context = _context(make_context, "validate")
    with pytest.raises(AirflowFailException, match="data validation failed"):
        ValidateDataOperator(task_id="validate", source=raw, suite=SUITE, on_bad_rows="fail").execute(context)
    reports = _pushed(context)
    assert set(reports) == {"validation", "validation_report", "data_docs", "scan"}
    _assert_only_uris(reports, store, workers)

    workers.next("eda")  # trigger_rule all_done: the EDA task renders the failed run's scan elsewhere
    profiled = DataProfileOperator(task_id="eda_report", input_path=raw, scan_dir=reports["scan"]).execute(
        _context(make_context, "eda_report")
    )
    assert profiled["rows"] > 0
    _assert_only_uris(profiled, store, workers)


def _client():
    """A boto3 client of the connection (the test's own look at the store)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id="aws_default").get_conn()


def test_the_trigger_form_lists_no_remote_datasets_at_parse_time(store, monkeypatch):
    from airloom.airflow.operators.data import dataset_param

    built = []
    monkeypatch.setattr("airloom.registry.store.S3Store.__init__", lambda *a, **k: built.append(a))
    param = dataset_param(section="Run")
    assert "examples" not in param.schema and "values_display" not in param.schema
    assert param.schema["type"] == ["null", "string"] and built == []  # free text; no store was built
