"""Real training runs: the recipe as child processes of the DeepSpeed launcher / torchrun (gloo on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airloom.data.prompts import render_prompt
from airloom.data.synth import generate_records, write_jsonl
from airloom.training.base import BaseModelSpec, build_base_model
from airloom.training.config import TrainConfig
from airloom.training.launcher import LaunchSpec, TrainingProcess, build_command, child_env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_base_model(root / "base", BaseModelSpec(hidden_size=48, num_layers=1, num_heads=2, intermediate_size=96,
                                                  pretrain_lines=2000), log=lambda m: None)
    rows = [{"id": r["id"], "task": r["task"], "prompt": render_prompt(r["instruction"], r["input"]),
             "response": r["response"]} for r in generate_records(256, seed=3)]
    write_jsonl(rows, root / "train.jsonl")
    return root


def _train(tiny: Path, out: Path, launcher: str, nproc: int, zero_stage: int, method: str = "full") -> dict:
    cfg = TrainConfig(base_model=str(tiny / "base"), train_file=str(tiny / "train.jsonl"), output_dir=str(out),
                      validation_file=str(tiny / "train.jsonl"), max_steps=30, batch_size=16, learning_rate=3e-3,
                      warmup_steps=3, zero_stage=zero_stage, launcher=launcher, nproc_per_node=nproc, log_every=5,
                      method=method)
    out.mkdir(parents=True)
    spec = LaunchSpec(config_path=cfg.save(out / "train_config.json"), launcher=launcher, nproc_per_node=nproc)
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
    assert json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == zero_stage
    _check_model(tmp_path / "run")


@pytest.mark.slow
def test_torchrun_lora(tiny, tmp_path):
    metrics = _train(tiny, tmp_path / "run", "torchrun", nproc=1, zero_stage=0, method="lora")
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    _check_model(tmp_path / "run")  # the merged model loads without peft


def test_failing_child_fails_with_its_last_lines(tmp_path):
    from airloom.training.launcher import TrainingFailed

    cfg = TrainConfig(base_model=str(tmp_path / "missing"), train_file=str(tmp_path / "none.jsonl"),
                      output_dir=str(tmp_path / "out"), launcher="python")
    spec = LaunchSpec(config_path=cfg.save(tmp_path / "cfg.json"), launcher="python")
    with pytest.raises(TrainingFailed, match="exited with code 1"):
        TrainingProcess(build_command(spec), child_env()).run(log=lambda m: None)
    assert not (tmp_path / "out" / "model").exists()
