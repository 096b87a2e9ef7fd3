"""Fine-tune and evaluation hand-overs between workers that share no disk (issue #17).

Every task runs as if on its own machine: its own empty ``AIRLOOM_HOME``, deleted once the task is done,
with the artifact store and the registry on moto's S3 server. What one task hands to the next (XCom
results) carries only ``s3://`` URIs and registry refs, never a path of the worker that wrote it, and each
task reads its inputs by staging them from the store.
"""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

import airloom.registry.registry as registry_module
import airloom.training.launcher as launcher
from airloom.airflow.operators.deepspeed import DeepSpeedTrainOperator, TrainingPreflightOperator
from airloom.airflow.operators.evaluation import (
    EvaluateModelOperator,
    EvaluationTrendOperator,
    PartitionEvaluationOperator,
    QualityGateOperator,
)
from airloom.airflow.operators.registry import CanaryOperator, DeployModelOperator, RegisterModelOperator
from airloom.airflow.operators.sweep import SelectBestTrialOperator
from airloom.artifacts import MANIFEST, Artifacts
from airloom.governance.signoff import record_decision, signoff_status
from airloom.registry.registry import ModelRegistry
from airloom.registry.store import S3Store
from tests.unit.evaluation.conftest import tiny_model_dir  # noqa: F401  (the session's tiny Llama)

MODEL = "bot"
BASE = "tiny-base"


def local_paths(value: Any) -> list[str]:
    """Every string in ``value`` (an XCom result) that names a file on some machine's disk."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in local_paths(v)]
    if isinstance(value, list | tuple):
        return [p for v in value for p in local_paths(v)]
    if isinstance(value, str) and (value.startswith("/") or value.startswith("file:")):
        return [value]
    return []


@pytest.fixture
def remote(tmp_path, moto_bucket, moto_endpoint, monkeypatch, aws_default_on_moto) -> SimpleNamespace:
    """Artifact store and registry on moto's S3 (a prefix of this test's own); the aws_default connection
    points there. ``worker(name)`` makes a fresh AIRLOOM_HOME the current one (a new machine);
    ``leave(home)`` deletes it, so nothing later can read what that worker wrote."""
    prefix = f"issue17-{uuid.uuid4().hex[:10]}"
    store = f"s3://{moto_bucket}/{prefix}/artifacts"
    monkeypatch.setenv("AIRLOOM_ARTIFACTS", store)
    monkeypatch.setenv("AIRLOOM_REGISTRY", f"s3://{moto_bucket}/{prefix}/registry")
    monkeypatch.delenv("AIRLOOM_USER", raising=False)
    workers: list[Path] = []

    def worker(name: str) -> Path:
        home = tmp_path / "workers" / f"{len(workers)}-{name}"
        home.mkdir(parents=True)
        monkeypatch.setenv("AIRLOOM_HOME", str(home))
        workers.append(home)
        return home

    def leave(home: Path) -> None:
        shutil.rmtree(home)
        assert not home.exists()

    return SimpleNamespace(
        store=store,
        bucket=moto_bucket,
        registry=ModelRegistry(S3Store(moto_bucket, f"{prefix}/registry")),
        artifacts=lambda: Artifacts(store),
        worker=worker,
        leave=leave,
        workers=workers,
    )


def _records(n: int, seed: int) -> list[dict]:
    from airloom.data.synth import generate_records
    from airloom.prompts import render_prompt

    return [
        {
            "id": r["id"],
            "task": r["task"],
            "instruction": r["instruction"],
            "input": r["input"],
            "prompt": render_prompt(r["instruction"], r["input"]),
            "response": r["response"],
        }
        for r in generate_records(n, seed=seed)
    ]


@pytest.fixture
def dataset(remote) -> dict[str, str]:
    """A prepared dataset (Parquet splits and manifest.json) published to the store by a data worker
    that is then gone; returns the splits' URIs, as the data DAG hands them over."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    home = remote.worker("data")
    folder = home / "datasets" / "demo" / "1"
    folder.mkdir(parents=True)
    sizes = {"train": 48, "validation": 6, "test": 6}
    for seed, (split, n) in enumerate(sizes.items(), start=1):
        pq.write_table(pa.Table.from_pylist(_records(n, seed)), folder / f"{split}.parquet")
    splits = {split: {"file": f"{split}.parquet", "rows": n} for split, n in sizes.items()}
    manifest = {"template": {"kind": "builtin", "name": "alpaca"}, "splits": splits}  # as prepare writes it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    uri = remote.artifacts().publish(folder)
    remote.leave(home)
    return {split: f"{uri}/{split}.parquet" for split in ("train", "validation", "test")}


def test_finetune_hand_overs_across_workers(remote, dataset, tiny_model_dir, make_context, monkeypatch):  # noqa: F811
    remote.registry.register(BASE, tiny_model_dir, metadata={}, actor="trainer")

    # preflight: any worker counts the splits it stages
    home = remote.worker("preflight")
    counts = TrainingPreflightOperator(task_id="preflight", splits=dataset).execute(make_context())
    assert counts == {"train": 48, "validation": 6, "test": 6}
    # the counts come from the dataset's manifest: no split was downloaded onto this (CPU) worker
    assert [p.name for p in (home / "cache").rglob("*") if p.is_file() and p.name != ".complete"] == [
        "manifest.json"
    ]
    remote.leave(home)

    # train, on the GPU worker: the splits staged with the dataset's manifest beside them, the run's folder
    # published, the result naming it by URI (and the base model by its pinned registry ref)
    home = remote.worker("gpu")
    context = make_context(task_id="train", map_index=0)
    lines: list[str] = []  # the child's output, as the task log gets it
    launched_run = launcher.TrainingProcess.run
    monkeypatch.setattr(
        launcher.TrainingProcess,
        "run",
        lambda proc, log: launched_run(proc, log=lambda m: [lines.append(m), log(m)]),
    )
    trained = DeepSpeedTrainOperator(
        task_id="train",
        base_model=f"registry:{BASE}",
        train_file=dataset["train"],
        validation_file=dataset["validation"],
        config={
            "launcher": "python",
            "max_steps": 3,
            "batch_size": 4,
            "zero_stage": 0,
            "log_every": 1,
            # checkpoints mirror to the store by default (the child gets the connection's keys), so a
            # retry on another gpu worker resumes
            "checkpoint_every": 2,
        },
    ).execute(context)
    assert any("checkpoint step-00000002 saved" in line for line in lines), lines[-10:]
    launched = json.loads(
        (home / "runs/llm_finetune/manual__2026-01-02T03_04_05_00_00/train/0/train_config.json").read_text()
    )
    assert Path(launched["train_file"]).is_relative_to(home / "cache")  # the ranks read a local copy
    assert (Path(launched["train_file"]).parent / "manifest.json").is_file()
    assert local_paths(trained) == [], local_paths(trained)
    assert context["ti"].pushed == list(trained.items())
    run_uri = f"{remote.store}/runs/llm_finetune/manual__2026-01-02T03_04_05_00_00/train/0"
    assert (trained["model_dir"], trained["output_dir"]) == (f"{run_uri}/model", run_uri)
    assert trained["loss_curve"] == f"{run_uri}/loss_curve.png"
    assert (trained["base_model"], trained["base_model_path"]) == (f"registry:{BASE}/1", f"registry:{BASE}/1")
    assert trained["config"]["train_file"] == dataset["train"]
    assert trained["config"]["checkpoint_uri"] == (
        f"{remote.store}/checkpoints/llm_finetune/manual__2026-01-02T03_04_05_00_00/train/0"
    )
    assert trained["config"]["base_model"] == f"registry:{BASE}/1"
    manifest = json.loads(remote.artifacts().read_bytes(f"{run_uri}/{MANIFEST}"))
    assert {"model/config.json", "train_metrics.json", "loss_curve.png"} <= set(manifest["files"])
    remote.leave(home)

    # each evaluation on a worker of its own: the model folder staged by URI, outputs published
    evaluations = []
    for task in ("evaluate_trial", "evaluate_candidate"):
        home = remote.worker(task)
        result = EvaluateModelOperator(
            task_id=task,
            model=trained["model_dir"],
            dataset_file=dataset["validation" if task == "evaluate_trial" else "test"],
            max_new_tokens=4,
            bias_probes=task == "evaluate_candidate",
        ).execute(make_context(task_id=task))
        assert local_paths(result) == [], local_paths(result)
        assert result["model"] == result["model_path"] == trained["model_dir"]
        assert (
            result["metrics_path"]
            == f"{remote.store}/runs/llm_finetune/manual__2026-01-02T03_04_05_00_00/{task}/metrics.json"
        )
        evaluations.append(result)
        remote.leave(home)
    trial, candidate = evaluations
    assert candidate["bias"].startswith(remote.store)
    assert (
        json.loads(remote.artifacts().read_bytes(candidate["metrics_path"]))["model"] == trained["model_dir"]
    )

    home = remote.worker("select")
    best = SelectBestTrialOperator(
        task_id="select_best_trial", trials=[trained], evaluations=[trial]
    ).execute(make_context(task_id="select_best_trial"))
    assert {k: best[k] for k in trained} == trained  # URIs pass through untouched
    remote.leave(home)

    # nothing at production yet: the baseline is the base model, by the ref training handed over
    home = remote.worker("evaluate_production")
    baseline = EvaluateModelOperator(
        task_id="evaluate_production",
        model=f"registry:{MODEL}@production",
        fallback_model=best["base_model_path"],
        dataset_file=dataset["test"],
        max_new_tokens=4,
    ).execute(make_context(task_id="evaluate_production"))
    assert (baseline["model"], baseline["model_path"]) == (f"registry:{BASE}/1", f"registry:{BASE}/1")
    assert local_paths(baseline) == []
    remote.leave(home)

    home = remote.worker("gates")
    with pytest.raises(AirflowFailException, match="quality gate failed"):
        failing = make_context(task_id="failing_gates")
        QualityGateOperator(
            task_id="failing_gates", candidate=candidate, baseline=baseline, gates="exact_match>=2"
        ).execute(failing)
    (pushed,) = failing["ti"].pushed
    assert pushed[0] == "report" and pushed[1].startswith(remote.store)  # linked from the failed task
    assert b"<html" in remote.artifacts().read_bytes(pushed[1]).lower()
    gates = QualityGateOperator(
        task_id="quality_gates", candidate=candidate, baseline=baseline, gates="exact_match>=0"
    ).execute(make_context(task_id="quality_gates"))
    assert local_paths(gates) == []
    assert json.loads(remote.artifacts().read_bytes(gates["comparison"]))
    remote.leave(home)

    # register: the model folder and the attachments staged; the registry's copy is complete and loads
    home = remote.worker("register")
    registered = RegisterModelOperator(
        task_id="register_candidate",
        model_name=MODEL,
        model_dir=best["model_dir"],
        metadata={"training": best["metrics"], "lineage": {"train_config": best["config"]}},
        evidence={"eval_report": gates["report"], "eval_metrics": candidate["metrics_path"]},
        attachments={
            "evaluation/report.html": gates["report"],
            "evaluation/metrics.json": candidate["metrics_path"],
            "evaluation/comparison.json": gates["comparison"],
        },
    ).execute(make_context(task_id="register_candidate"))
    assert local_paths(registered) == []
    remote.leave(home)
    version = remote.registry.get(MODEL, registered["version"])
    stored = {f["path"] for f in version.files}
    model_files = set(json.loads(remote.artifacts().read_bytes(f"{run_uri}/{MANIFEST}"))["files"])
    assert {f[len("model/") :] for f in model_files if f.startswith("model/")} <= stored
    assert {"evaluation/report.html", "evaluation/metrics.json", "evaluation/comparison.json"} <= stored
    evidence = signoff_status(remote.registry, MODEL, registered["version"])["evidence"]
    assert {e["uri"] for e in evidence.values()} == {gates["report"], candidate["metrics_path"]}
    assert all(len(e["sha256"]) == 64 for e in evidence.values())

    home = remote.worker("check")
    from airloom.evaluation.generation import generate, load_model

    folder = remote.registry.download(MODEL, registered["version"], home / "check")  # verified download
    model, tokenizer = load_model(folder)
    assert isinstance(
        generate(model, tokenizer, ["### Instruction:\nSay hi.\n### Response:\n"], max_new_tokens=4)[0], str
    )
    remote.leave(home)

    # deploy to canary, then the canary asks the test split's prompts (the split staged by URI)
    record_decision(remote.registry, MODEL, registered["version"], user="reviewer", decision="approve")
    home = remote.worker("deploy")
    deployed = DeployModelOperator(
        task_id="deploy", model_name=MODEL, version=registered["version"], alias="canary"
    ).execute(make_context(task_id="deploy"))
    assert local_paths(deployed) == []
    remote.leave(home)
    home = remote.worker("canary")
    canary_context = make_context(task_id="canary")
    try:
        CanaryOperator(
            task_id="canary",
            model_name=MODEL,
            alias="canary",
            version=registered["version"],
            dataset_file=dataset["test"],
            limit=2,
        ).execute(canary_context)
    except AirflowFailException as e:  # a 3-step model may answer nothing; the answers are published first
        assert "failing prompts" in str(e)
    report = dict(canary_context["ti"].pushed)["canary_report"]
    assert report.startswith(remote.store)
    canary = json.loads(remote.artifacts().read_bytes(report.replace("canary.html", "canary.json")))
    assert len(canary["outputs"]) == 2
    assert local_paths(canary_context["ti"].pushed) == []


def test_other_nodes_hand_over_no_paths(remote, dataset, tiny_model_dir, make_context, monkeypatch):  # noqa: F811
    """Node 1 of a two-node run writes no model; its result names its (published) folder by URI too."""

    class Trained:  # node 1's ranks: they train beside node 0, which writes the model
        def __init__(self, cmd, env, cwd=None):
            self.cwd = cwd

        def run(self, log):
            return 0

    monkeypatch.setattr(launcher, "TrainingProcess", Trained)
    remote.registry.register(BASE, tiny_model_dir, metadata={}, actor="trainer")
    home = remote.worker("gpu-2")
    result = DeepSpeedTrainOperator(
        task_id="train_other_nodes",
        base_model=f"registry:{BASE}",
        train_file=dataset["train"],
        validation_file=dataset["validation"],
        config={"launcher": "torchrun", "nnodes": 2, "master_addr": "10.0.0.1", "master_port": 29600},
        node_rank=1,
    ).execute(make_context(task_id="train_other_nodes", map_index=0))
    assert result["node_rank"] == 1
    assert local_paths(result) == [], local_paths(result)
    assert result["output_dir"].startswith(remote.store)
    assert result["config"]["validation_file"] == dataset["validation"]
    remote.leave(home)
    assert remote.artifacts().read_bytes(f"{result['output_dir']}/train_config.json")


def test_preflight_names_an_empty_split_by_its_uri(remote, make_context):
    home = remote.worker("data")
    folder = home / "datasets" / "empty" / "1"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (folder / "test.jsonl").write_text("")
    uri = remote.artifacts().publish(folder)
    remote.leave(home)
    remote.worker("preflight")
    with pytest.raises(AirflowFailException, match=rf"^{uri}/test.jsonl: the test split is empty"):
        TrainingPreflightOperator(
            task_id="preflight", splits={"train": f"{uri}/train.jsonl", "test": f"{uri}/test.jsonl"}
        ).execute(make_context())


# -- the daily evaluation backfill -------------------------------------------------------------------

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]


def _history_rows(ds: str) -> str:
    rows = [
        {"id": f"{ds}-{i}", "prompt": "### Instruction:\nName a colour.\n### Response:\n", "response": "Red"}
        for i in range(2)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def deployed(remote, tiny_model_dir):  # noqa: F811
    """v1 at production from 2026-01-01 12:00 UTC, v2 from 2026-01-03 09:00 UTC, in the S3 registry."""
    for _ in range(2):
        remote.registry.register(MODEL, tiny_model_dir, metadata={}, actor="trainer")
    for version, at in [(1, datetime(2026, 1, 1, 12, tzinfo=UTC)), (2, datetime(2026, 1, 3, 9, tzinfo=UTC))]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(registry_module, "now", lambda at=at: at)
            remote.registry.set_alias(MODEL, "production", version, actor="reviewer", reason="test")


@pytest.fixture
def history(remote) -> str:
    """The history partitions in the store: the first two days published as one artifact (manifest), the
    third written as plain objects by another tool (no manifest), as a team's pipeline would drop them."""
    home = remote.worker("history")
    root = home / "data" / "history"
    for ds in DAYS[:2]:
        (root / f"ds={ds}").mkdir(parents=True)
        (root / f"ds={ds}" / "records.jsonl").write_text(_history_rows(ds))
    uri = remote.artifacts().publish(root)
    remote.artifacts().store.put_bytes(
        f"data/history/ds={DAYS[2]}/part-0.jsonl", _history_rows(DAYS[2]).encode()
    )
    remote.leave(home)
    return uri


def test_backfill_from_different_workers_trends_over_every_day(remote, deployed, history, make_context):
    results = {}
    for n, ds in enumerate(DAYS):
        home = remote.worker(f"eval-{ds}")
        # The DAG's defaults name folders under AIRLOOM_HOME: on a worker they name its keys in the store.
        # A URI of the store says the same; both are used.
        where = {"history_uri": history, "output_uri": f"{remote.store}/evaluations"}
        if n % 2:
            where = {"history_uri": str(home / "data" / "history"), "output_uri": str(home / "evaluations")}
        results[ds] = PartitionEvaluationOperator(
            task_id="evaluate_partition", model_name=MODEL, ds=ds, **where
        ).execute(make_context(task_id="evaluate_partition"))
        remote.leave(home)
    assert {ds: r["version"] for ds, r in results.items()} == dict(zip(DAYS, [1, 1, 2], strict=True))
    for ds, r in results.items():
        assert local_paths(r) == [], local_paths(r)
        assert r["metrics_path"] == f"{remote.store}/evaluations/{MODEL}/ds={ds}/v{r['version']}/metrics.json"
        assert r["n"] == 2
    keys = remote.artifacts().list(f"evaluations/{MODEL}/")
    assert {k for k in keys if k.endswith(MANIFEST)} == {
        f"evaluations/{MODEL}/ds={ds}/v{r['version']}/{MANIFEST}" for ds, r in results.items()
    }

    # An upload cut short (files, no manifest) is no day for the trend.
    remote.artifacts().store.put_bytes(
        f"evaluations/{MODEL}/ds=2026-01-04/v2/metrics.json", json.dumps({"aggregate": {}}).encode()
    )

    home = remote.worker("trend")
    context = make_context(task_id="trend")
    trend = EvaluationTrendOperator(
        task_id="trend", model_name=MODEL, output_uri=f"{remote.store}/evaluations"
    ).execute(context)
    assert local_paths(trend) == []
    assert trend["dates"] == 3
    assert trend["changes"] == [{"ds": "2026-01-03", "from": 1, "to": 2}]
    assert (
        trend["plot"] == f"{remote.store}/runs/llm_finetune/manual__2026-01-02T03_04_05_00_00/trend/trend.png"
    )
    remote.leave(home)
    stored = json.loads(remote.artifacts().read_bytes(trend["plot"].replace("trend.png", "trend.json")))
    assert [(r["ds"], r["version"]) for r in stored["rows"]] == [
        (ds, r["version"]) for ds, r in results.items()
    ]
    assert stored["model_root"] == f"{remote.store}/evaluations/{MODEL}"
    assert remote.artifacts().read_bytes(trend["plot"]).startswith(b"\x89PNG")
    for name in ("trend.json", "trend.png"):  # the latest trend, beside the days as on disk
        beside = remote.artifacts().read_bytes(f"{remote.store}/evaluations/{MODEL}/{name}")
        assert beside == remote.artifacts().read_bytes(trend["plot"].replace("trend.png", name))


def test_a_day_without_a_partition_in_the_store_is_skipped(remote, deployed, history, make_context):
    from airflow.sdk.exceptions import AirflowSkipException

    remote.worker("eval")
    with pytest.raises(AirflowSkipException, match="no partition"):
        PartitionEvaluationOperator(
            task_id="evaluate_partition",
            model_name=MODEL,
            ds="2026-01-05",
            history_uri=history,
            output_uri=f"{remote.store}/evaluations",
        ).execute(make_context())


def test_output_outside_the_store_fails_clearly(remote, deployed, history, make_context, tmp_path):
    remote.worker("eval")
    with pytest.raises(AirflowFailException, match=r"output_uri .* is neither in the artifact store"):
        PartitionEvaluationOperator(
            task_id="evaluate_partition",
            model_name=MODEL,
            ds=DAYS[0],
            history_uri=history,
            output_uri=str(tmp_path / "elsewhere"),
        ).execute(make_context())
