"""Two "nodes" on one machine: two DeepSpeed launcher invocations, nnodes=2, no SSH, gloo."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from airloom.data.prompts import render_prompt
from airloom.data.synth import generate_records, write_jsonl
from airloom.training.base import BaseModelSpec, build_base_model
from airloom.training.config import TrainConfig
from airloom.training.launcher import (
    LaunchSpec,
    TrainingFailed,
    TrainingProcess,
    build_command,
    child_env,
    free_port,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_base_model(
        root / "base",
        BaseModelSpec(hidden_size=48, num_layers=1, num_heads=2, intermediate_size=96, pretrain_lines=2000),
        log=lambda m: None,
    )
    rows = [
        {
            "id": r["id"],
            "task": r["task"],
            "prompt": render_prompt(r["instruction"], r["input"]),
            "response": r["response"],
        }
        for r in generate_records(128, seed=3)
    ]
    write_jsonl(rows, root / "train.jsonl")
    return root


def _node(tiny: Path, out: Path, node_rank: int, port: int, timeout_s: int = 120) -> TrainingProcess:
    cfg = TrainConfig(
        base_model=str(tiny / "base"),
        train_file=str(tiny / "train.jsonl"),
        output_dir=str(out),
        max_steps=10,
        batch_size=8,
        warmup_steps=2,
        zero_stage=2,
        nproc_per_node=1,
        nnodes=2,
        master_addr="127.0.0.1",
        rendezvous_timeout_s=timeout_s,
        log_every=5,
        checkpoint_every=5,  # each node marks and drops its own checkpoints
    )
    out.mkdir(parents=True)
    spec = LaunchSpec(
        config_path=cfg.save(out / "train_config.json"),
        nproc_per_node=1,
        nnodes=2,
        node_rank=node_rank,
        master_addr="127.0.0.1",
        master_port=port,
    )
    return TrainingProcess(build_command(spec), child_env({"OMP_NUM_THREADS": "1"}))


@pytest.mark.slow
def test_two_nodes_without_ssh_train_and_save_once(tiny, tmp_path):
    """Two launcher invocations (node_rank 0 and 1, one process each, the same master address and
    port, separate output folders as on two machines): both finish, node 0 alone writes the model."""
    port = free_port()
    nodes = [_node(tiny, tmp_path / f"node{rank}", rank, port) for rank in (0, 1)]
    logs: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            nodes[rank].run(log=logs[rank].append)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    metrics = json.loads((tmp_path / "node0" / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 10
    assert (tmp_path / "node0" / "model" / "config.json").is_file()
    assert not (tmp_path / "node1" / "model").exists()
    assert not (tmp_path / "node1" / "train_metrics.json").exists()
    assert any("checkpoint step-00000005 saved" in line for line in logs[0]), logs[0][-20:]
    for rank in (0, 1):  # the finished model supersedes the checkpoints, on each node's disk
        assert not (tmp_path / f"node{rank}" / "checkpoints").exists()


@pytest.mark.slow
def test_a_node_that_never_joins_fails_the_run_with_a_clear_message(tiny, tmp_path):
    node0 = _node(tiny, tmp_path / "node0", 0, free_port(), timeout_s=15)
    with pytest.raises(TrainingFailed, match="rendezvous at 127.0.0.1:[0-9]+ timed out after 15 s"):
        node0.run(log=lambda line: None)
    assert not (tmp_path / "node0" / "model").exists()
