"""Real training runs: the recipe as child processes of the DeepSpeed launcher / torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from airloom.data.synth import generate_records, write_jsonl
from airloom.prompts import render_prompt
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
        for r in generate_records(256, seed=3)
    ]
    write_jsonl(rows, root / "train.jsonl")
    return root


def _train(tiny: Path, out: Path, launcher: str, nproc: int, zero_stage: int, method: str = "full") -> dict:
    cfg = TrainConfig(
        base_model=str(tiny / "base"),
        train_file=str(tiny / "train.jsonl"),
        output_dir=str(out),
        validation_file=str(tiny / "train.jsonl"),
        max_steps=30,
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=3,
        zero_stage=zero_stage,
        launcher=launcher,
        nproc_per_node=nproc,
        log_every=5,
        method=method,
    )
    out.mkdir(parents=True)
    spec = LaunchSpec(
        config_path=cfg.save(out / "train_config.json"), launcher=launcher, nproc_per_node=nproc
    )
    lines: list[str] = []
    proc = TrainingProcess(build_command(spec), child_env({"OMP_NUM_THREADS": "1"}))
    proc.run(log=lines.append)
    assert any("step 30/30" in line for line in lines), lines[-20:]
    return json.loads((out / "train_metrics.json").read_text())


def _check_model(out: Path) -> None:
    from airloom.evaluation.generation import generate, load_model

    model, tokenizer = load_model(out / "model")
    [text] = generate(model, tokenizer, [render_prompt("Write the number in words.", "7")], max_new_tokens=8)
    assert isinstance(text, str)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_launcher_two_processes(tiny, tmp_path, zero_stage):
    metrics = _train(tiny, tmp_path / "run", "deepspeed", nproc=2, zero_stage=zero_stage)
    history = metrics["history"]
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == zero_stage
    assert history[-1]["loss"] < history[0]["loss"] * 0.8, history
    assert (
        json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())["zero_optimization"]["stage"]
        == zero_stage
    )
    _check_model(tmp_path / "run")


@pytest.mark.slow
def test_torchrun_lora(tiny, tmp_path):
    metrics = _train(tiny, tmp_path / "run", "torchrun", nproc=1, zero_stage=0, method="lora")
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    _check_model(tmp_path / "run")  # the merged model loads without peft


def test_failing_child_fails_with_its_last_lines(tmp_path):
    cfg = TrainConfig(
        base_model=str(tmp_path / "missing"),
        train_file=str(tmp_path / "none.jsonl"),
        output_dir=str(tmp_path / "out"),
        launcher="python",
    )
    spec = LaunchSpec(config_path=cfg.save(tmp_path / "cfg.json"), launcher="python")
    with pytest.raises(TrainingFailed, match="exited with code 1"):
        TrainingProcess(build_command(spec), child_env()).run(log=lambda m: None)
    assert not (tmp_path / "out" / "model").exists()


def test_packed_training_learns_with_full_rows(tiny, tmp_path):
    out = tmp_path / "packed"
    cfg = TrainConfig(
        base_model=str(tiny / "base"),
        train_file=str(tiny / "train.jsonl"),
        output_dir=str(out),
        max_steps=30,
        batch_size=4,
        learning_rate=3e-3,
        warmup_steps=3,
        zero_stage=2,
        launcher="python",
        log_every=5,
        packing=True,
        max_length=256,
    )
    out.mkdir()
    spec = LaunchSpec(config_path=cfg.save(out / "train_config.json"), launcher="python")
    TrainingProcess(build_command(spec), child_env({"OMP_NUM_THREADS": "1"})).run(log=lambda line: None)
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["non_pad_share"] > 0.9, metrics  # the last, partly filled row weighs on 31 rows
    assert metrics["rows"] < metrics["examples"] / 4
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]


def test_a_model_trained_with_a_template_file_is_served_with_it(tiny, tmp_path):
    """A user's Jinja2 template renders in the sandbox, not as a Hugging Face chat template, so the model
    folder carries the file and evaluation/serving/canary prompts are rendered with it, as training did."""
    from airloom.data.prepare import prepare
    from airloom.evaluation.chat import chat_prompt
    from airloom.evaluation.generation import load_model
    from airloom.prompts import MODEL_TEMPLATE_FILE, load_template

    template = tmp_path / "turns.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[ASSISTANT] {% endif %}",
        encoding="utf-8",
    )
    records = list(generate_records(64, seed=5))
    chats = [
        {"messages": [{"role": "user", "content": a["instruction"]}, {"role": "assistant", "content": a["response"]},
                      {"role": "user", "content": b["instruction"]}, {"role": "assistant", "content": b["response"]}]}
        for a, b in zip(records[::2], records[1::2], strict=True)
    ]  # fmt: skip
    manifest = prepare(chats, tmp_path / "data", template=str(template), val_fraction=0.0, test_fraction=0.0)
    assert manifest["template"]["kind"] == "file"
    out = tmp_path / "run"
    cfg = TrainConfig(
        base_model=str(tiny / "base"),
        train_file=str(tmp_path / "data" / "train.parquet"),
        output_dir=str(out),
        max_steps=3,
        batch_size=4,
        launcher="python",
        max_length=256,
    )
    out.mkdir()
    spec = LaunchSpec(config_path=cfg.save(out / "train_config.json"), launcher="python")
    TrainingProcess(build_command(spec), child_env({"OMP_NUM_THREADS": "1"})).run(log=lambda line: None)

    assert (out / "model" / MODEL_TEMPLATE_FILE).read_text(encoding="utf-8") == template.read_text(
        encoding="utf-8"
    )
    _, tokenizer = load_model(out / "model")
    turns = chats[0]["messages"][:3]
    assert chat_prompt(turns, tokenizer) == load_template(str(template)).render_turns(turns, True)
    assert chat_prompt(turns, tokenizer).endswith("[ASSISTANT] ")


def _start_until(cmd, env, marker: str, timeout: float = 240) -> subprocess.Popen:
    """Start the run and return once ``marker`` appears in its output (the run keeps going)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return proc
        if time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"never saw {marker!r}; last lines:\n{''.join(seen[-20:])}")


def test_run_killed_after_a_checkpoint_resumes_from_it(tiny, tmp_path):
    """SIGKILL the whole launcher group after the step-20 checkpoint; the rerun continues at step 20
    and ends where an uninterrupted run ends."""

    def config(out: Path) -> Path:
        out.mkdir()
        return TrainConfig(
            base_model=str(tiny / "base"),
            train_file=str(tiny / "train.jsonl"),
            output_dir=str(out),
            max_steps=40,
            batch_size=16,
            learning_rate=3e-3,
            warmup_steps=3,
            zero_stage=2,
            launcher="deepspeed",
            log_every=10,
            checkpoint_every=10,
        ).save(out / "train_config.json")

    env = child_env({"OMP_NUM_THREADS": "1"})
    # The uninterrupted reference run (one process, one thread) trains on the other core meanwhile.
    straight = tmp_path / "straight"
    reference_run = TrainingProcess(
        build_command(LaunchSpec(config_path=config(straight), launcher="deepspeed")), env
    )
    reference_errors: list[BaseException] = []

    def run_reference() -> None:
        try:
            reference_run.run(log=lambda line: None)
        except BaseException as e:  # noqa: BLE001 - reported below
            reference_errors.append(e)

    reference_thread = threading.Thread(target=run_reference)
    reference_thread.start()
    killed = tmp_path / "killed"
    cmd = build_command(LaunchSpec(config_path=config(killed), launcher="deepspeed"))
    try:
        proc = _start_until(cmd, env, "checkpoint step-00000020 saved")
    except BaseException:
        reference_thread.join(timeout=600)
        raise
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "step-00000020" / "COMPLETE").is_file()
    assert not (killed / "model").exists() and not (killed / "train_metrics.json").exists()
    (killed / "checkpoints" / "step-00000030").mkdir()  # as a save cut short would leave it: no marker

    lines: list[str] = []
    TrainingProcess(cmd, env).run(log=lines.append)
    assert any("resuming from checkpoint step-00000020 (step 20/40)" in line for line in lines), lines[-30:]
    resumed = json.loads((killed / "train_metrics.json").read_text())
    assert resumed["steps"] == 40 and resumed["resumed_from_step"] == 20
    assert [h["step"] for h in resumed["history"]] == [10, 20, 30, 40]
    assert not (killed / "checkpoints").exists()  # superseded by the saved model

    reference_thread.join(timeout=600)
    assert not reference_thread.is_alive() and not reference_errors, reference_errors
    reference = json.loads((straight / "train_metrics.json").read_text())
    assert resumed["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-4)


def test_retry_on_another_machine_resumes_from_the_s3_mirror(tiny, tmp_path, moto_bucket):
    """Checkpoints mirrored to S3 (moto's server): with the local folder gone, the rerun fetches the
    newest complete checkpoint and resumes; a finished run leaves nothing behind in the mirror."""
    import boto3

    prefix = f"ckpt-{tmp_path.name}"
    uri = f"s3://{moto_bucket}/{prefix}"
    out = tmp_path / "run"
    out.mkdir()
    config = TrainConfig(
        base_model=str(tiny / "base"),
        train_file=str(tiny / "train.jsonl"),
        output_dir=str(out),
        max_steps=30,
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=3,
        zero_stage=2,
        launcher="deepspeed",
        log_every=10,
        checkpoint_every=10,
        checkpoint_uri=uri,
    ).save(out / "train_config.json")
    env = child_env({"OMP_NUM_THREADS": "1"})  # AWS_ENDPOINT_URL and credentials: set by moto_endpoint
    cmd = build_command(LaunchSpec(config_path=config, launcher="deepspeed"))
    proc = _start_until(cmd, env, "checkpoint step-00000020 saved")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shutil.rmtree(out / "checkpoints")  # the retry runs on a machine that never saw them

    lines: list[str] = []
    TrainingProcess(cmd, env).run(log=lines.append)
    assert any(f"fetched checkpoint step-00000020 from {uri}" in line for line in lines), lines[-30:]
    assert any("resuming from checkpoint step-00000020 (step 20/30)" in line for line in lines)
    assert json.loads((out / "train_metrics.json").read_text())["resumed_from_step"] == 20
    listing = boto3.client("s3").list_objects_v2(Bucket=moto_bucket, Prefix=prefix)
    assert listing.get("KeyCount", 0) == 0


# -- two "nodes" on one machine: two launcher invocations, nnodes=2, no SSH, gloo --------------------


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
    # Node 1 never starts, so node 0 waits out the whole timeout: a short one fails it just the same.
    node0 = _node(tiny, tmp_path / "node0", 0, free_port(), timeout_s=3)
    with pytest.raises(TrainingFailed, match="rendezvous at 127.0.0.1:[0-9]+ timed out after 3 s"):
        node0.run(log=lambda line: None)
    assert not (tmp_path / "node0" / "model").exists()
