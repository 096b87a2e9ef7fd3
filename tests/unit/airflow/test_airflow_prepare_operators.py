"""The preparation glue: PrepareDatasetOperator's templated arguments, split lookup (Parquet, else the
JSONL of older datasets), ResolveDatasetOperator, the monitoring reference, and the DAG's params."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.operators.data import PrepareDatasetOperator, ResolveDatasetOperator, dataset_file

REPO = Path(__file__).resolve().parents[3]


def _accepted(tmp_path: Path, n: int = 30) -> Path:
    path = tmp_path / "accepted.jsonl"
    # every third row holds an e-mail address
    rows = [
        {
            "id": f"r{i}",
            "instruction": f"Echo {i}",
            "input": "",
            "task": "echo",
            "response": f"{i} at a{i}@corp.example.com" if i % 3 == 0 else f"{i}",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _old_dataset(folder: Path) -> Path:
    """A dataset as prepared before Parquet: JSONL splits and a format-1 manifest."""
    folder.mkdir(parents=True)
    row = {
        "id": "1",
        "prompt": "### Instruction:\nHi\n### Response:\n",
        "response": "Hello",
        "task": None,
        "instruction": "Hi",
        "input": "",
    }
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps({"format": "airloom.prepared/1", "dataset_hash": "abc"}))
    return folder


def test_prepare_operator_takes_native_params_and_publishes_parquet(tmp_path, make_context, airloom_env):
    # The DAG renders params as native objects: an unset max_seq_len arrives as None.
    op = PrepareDatasetOperator(
        task_id="prepare",
        input_path=str(_accepted(tmp_path)),
        dataset_name=None,  # the form left empty: named after the source
        source=str(tmp_path / "exports" / "Support.jsonl"),
        seed=2,
        val_fraction=0.1,
        test_fraction=0.1,
        template="chatml",
        pii_policy="drop",
        max_seq_len=None,
        tokenizer="registry:airloom-tiny-base",
    )
    context = make_context(task_id="prepare")
    info = op.execute(context)
    out = Path(info["path"])
    assert (info["ref"], out) == ("support@1", airloom_env / "home" / "datasets" / "support" / "1")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pii_policy"] == "drop" and manifest["counts"]["pii_dropped"] == 10
    assert info["splits"] == {"train": 16, "validation": 2, "test": 2}
    assert (manifest["template"]["name"], manifest["seed"], manifest["max_seq_len"]) == ("chatml", 2, None)
    assert manifest["tokenizer"] is None  # not needed, so the registry reference was never resolved
    assert manifest["origin"]["source"].endswith("Support.jsonl")
    latest = json.loads((airloom_env / "home" / "datasets" / "latest.json").read_text())
    assert latest["path"] == str(out) and latest["dataset_hash"] == manifest["dataset_hash"]

    from airloom.airflow.operators.monitoring import DriftMonitorOperator

    monitor = DriftMonitorOperator(
        task_id="monitor", traffic_uri="t", feedback_uri="f", reference_file="", ds="2026-01-01"
    )
    split, _, chosen = monitor._reference([])
    # no model lineage to ask: the newest split, said so
    assert split == str(out / "train.parquet") and chosen["source"] == "newest prepared dataset (fallback)"

    resolved = ResolveDatasetOperator(task_id="resolve_dataset", dataset="support").execute(make_context())
    assert resolved["path"] == str(out) and resolved["ref"] == "support@1"
    assert {s: resolved[s] for s in ("train", "validation", "test")} == {
        s: str(out / f"{s}.parquet") for s in ("train", "validation", "test")
    }


def test_prepare_operator_fails_without_retry_on_bad_arguments(tmp_path, make_context, airloom_env):
    src = str(_accepted(tmp_path))
    with pytest.raises(AirflowFailException, match=r"unknown prompt template 'chatlm'"):
        PrepareDatasetOperator(task_id="p", input_path=src, template="chatlm").execute(make_context())
    for bad in ("long", "None"):  # "None" is what a DAG rendering params as text would pass
        with pytest.raises(
            AirflowFailException, match=f"max_seq_len must be an integer or None, got '{bad}'"
        ):
            PrepareDatasetOperator(task_id="p", input_path=src, max_seq_len=bad).execute(make_context())
    with pytest.raises(AirflowFailException, match=r"max_seq_len=64 needs a tokenizer"):
        PrepareDatasetOperator(task_id="p", input_path=src, max_seq_len="64", tokenizer="").execute(
            make_context()
        )


def test_dataset_file_prefers_parquet_and_reads_older_jsonl_datasets(tmp_path, make_context):
    old = _old_dataset(tmp_path / "old")
    assert dataset_file(str(old), "train") == str(old / "train.jsonl")
    resolved = ResolveDatasetOperator(task_id="resolve_dataset", dataset=str(old)).execute(make_context())
    assert resolved["test"] == str(old / "test.jsonl") and resolved["dataset_hash"] == "abc"

    (old / "train.parquet").write_bytes(b"")  # both present: Parquet is the current format
    assert dataset_file(str(old), "train") == str(old / "train.parquet")
    (old / "test.jsonl").unlink()
    with pytest.raises(AirflowFailException, match=r"split 'test' missing from prepared dataset .*no \.parq"):
        dataset_file(str(old), "test")


def test_data_quality_dag_params_validate_the_preparation_options():
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    bag = DagBag(dag_folder=str(REPO / "dags" / "llm_data_quality.py"))
    assert bag.import_errors == {}
    params = bag.dags["llm_data_quality"].params
    assert {k: params[k] for k in ("template", "pii_policy", "max_seq_len", "tokenizer")} == {
        "template": "auto",  # alpaca for instruction rows, a chat template for conversations
        "pii_policy": "mask",
        "max_seq_len": None,
        "tokenizer": "registry:airloom-tiny-base",
    }
    params["template"] = "/srv/templates/mine.j2"  # a path is allowed
    params["max_seq_len"] = 512
    params["max_seq_len"] = None
    for key, bad in (("pii_policy", "scrub"), ("max_seq_len", 0), ("max_seq_len", "long"), ("template", "")):
        with pytest.raises(ParamValidationError):
            params[key] = bad
    prepare = bag.dags["llm_data_quality"].get_task("prepare")
    assert {"template", "pii_policy", "max_seq_len", "tokenizer"} <= set(prepare.template_fields)
    assert prepare.max_seq_len == "{{ params.max_seq_len }}"
