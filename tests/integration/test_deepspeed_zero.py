"""DeepSpeed at a size where ZeRO-3 partitions: 2 processes over gloo on CPU, through the real launcher.

The base model (~3.9M parameters) has every matrix above DeepSpeed's ``stage3_param_persistence_threshold``
(1e5 elements), so under ZeRO-3 each rank really holds half of it. A saved model is checked against the
engine that trained it: its validation loss, recomputed here from the saved folder, must equal the one the
engine measured at the end of training, which fails if the save wrote partitions, empty tensors or the
untrained weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airloom.data.synth import generate_records, write_jsonl
from airloom.prompts import render_prompt
from airloom.training.base import BaseModelSpec, build_base_model
from airloom.training.config import TrainConfig
from airloom.training.launcher import LaunchSpec, TrainingProcess, build_command, child_env

pytestmark = pytest.mark.slow

MAX_LENGTH = 64
PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's default stage3_param_persistence_threshold


def _rows(n: int, seed: int) -> list[dict]:
    return [
        {"prompt": render_prompt(r["instruction"], r["input"]), "response": r["response"]}
        for r in generate_records(n, seed=seed)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    # Random weights, no pre-training: it is only a starting point to fine-tune.
    build_base_model(
        root / "base",
        BaseModelSpec(
            hidden_size=384, intermediate_size=1024, num_layers=2, num_heads=6, pretrain_lines=2000
        ),
        log=lambda m: None,
    )
    write_jsonl(_rows(256, seed=3), root / "train.jsonl")
    # 20 rows in global batches of 8 (4 per rank): rank 1's last slice is empty, yet it must join the forward.
    write_jsonl(_rows(20, seed=11), root / "val.jsonl")
    return root


def _validation_loss(model_dir: Path, val_file: Path) -> float:
    """Mean loss per response token of a saved model, computed here without the engine."""
    import torch

    from airloom.evaluation.generation import load_model
    from airloom.training.recipe import collate, read_examples, tokenize_examples

    model, tokenizer = load_model(model_dir)
    examples = tokenize_examples(read_examples(val_file), tokenizer, MAX_LENGTH)
    total = count = 0.0
    with torch.no_grad():
        for ids, labels in examples:
            input_ids, attn, lab = collate([(ids, labels)], tokenizer.pad_token_id)
            n = int((lab[:, 1:] != -100).sum())
            total += model(input_ids=input_ids, attention_mask=attn, labels=lab).loss.item() * n
            count += n
    return total / count


@pytest.fixture(scope="module")
def base_loss(data) -> float:
    return _validation_loss(data / "base", data / "val.jsonl")


def _train(data: Path, out: Path, **options) -> dict:
    settings = {
        "base_model": str(data / "base"),
        "train_file": str(data / "train.jsonl"),
        "validation_file": str(data / "val.jsonl"),
        "output_dir": str(out),
        "max_steps": 12,
        "batch_size": 8,
        "max_length": MAX_LENGTH,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "launcher": "deepspeed",
        "nproc_per_node": 2,
        "log_every": 2,
    }
    cfg = TrainConfig(**{**settings, **options})
    out.mkdir(parents=True)
    spec = LaunchSpec(config_path=cfg.save(out / "train_config.json"), launcher="deepspeed", nproc_per_node=2)
    lines: list[str] = []
    TrainingProcess(build_command(spec), child_env({"OMP_NUM_THREADS": "1"})).run(log=lines.append)
    assert any("step 12/12" in line for line in lines), lines[-20:]
    return json.loads((out / "train_metrics.json").read_text())


def _check_saved_model(data: Path, out: Path, metrics: dict, base_loss: float) -> None:
    """The saved folder has the base's tensors and shapes, trained values, and the engine's validation loss."""
    from safetensors.torch import load_file

    from airloom.evaluation.generation import generate, load_model

    base = load_file(data / "base" / "model.safetensors")
    saved = load_file(out / "model" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in base.items()}
    assert all(v.abs().sum() > 0 for v in saved.values())
    assert sum(not saved[k].equal(base[k]) for k in base) > len(base) // 2  # trained, not the base copied

    loss = _validation_loss(out / "model", data / "val.jsonl")
    assert loss == pytest.approx(metrics["validation_loss"], rel=1e-3)  # the weights the engine held
    assert loss < base_loss - 0.5, (loss, base_loss)  # fine-tuning learnt

    model, tokenizer = load_model(out / "model")
    [text] = generate(model, tokenizer, [render_prompt("Write the number in words.", "7")], max_new_tokens=8)
    assert isinstance(text, str)


def _check_common(metrics: dict, zero_stage: int) -> None:
    history = metrics["history"]
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == zero_stage
    assert history[-1]["loss"] < history[0]["loss"], history
    assert [r["rank"] for r in metrics["ranks"]] == [0, 1]
    assert all(r["peak_rss_mib"] > 0 for r in metrics["ranks"])


def test_the_model_is_big_enough_to_partition(data):
    from safetensors.torch import load_file

    tensors = load_file(data / "base" / "model.safetensors")
    big = [k for k, v in tensors.items() if v.numel() > PERSISTENCE_THRESHOLD]
    assert sum(v.numel() for v in tensors.values()) > 3_000_000
    assert sum(tensors[k].numel() for k in big) > 0.99 * sum(v.numel() for v in tensors.values())


def test_zero2_with_optimizer_offload_trains(data, tmp_path, base_loss):
    """A torch AdamW is refused by DeepSpeed with offload: the recipe gives it DeepSpeed's CPU Adam."""
    metrics = _train(data, tmp_path / "run", zero_stage=2, offload_optimizer=True)
    _check_common(metrics, 2)
    ds = json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    for rank in metrics["ranks"]:  # ZeRO-2 partitions gradients and optimizer state, not parameters
        assert rank["param_bytes"] == metrics["model_param_bytes"]
    _check_saved_model(data, tmp_path / "run", metrics, base_loss)


@pytest.mark.parametrize(
    "options",
    [{}, {"offload_params": True, "offload_optimizer": True}],
    ids=["zero3", "zero3-offload"],
)
def test_zero3_partitions_the_model_and_saves_it_whole(data, tmp_path, base_loss, options):
    metrics = _train(data, tmp_path / "run", zero_stage=3, **options)
    _check_common(metrics, 3)
    full = metrics["model_param_bytes"]
    assert full > 12_000_000  # ~3.9M fp32 parameters
    for rank in metrics["ranks"]:
        # Built under zero.Init: no rank held the whole model, not even while loading it.
        assert rank["param_bytes_loaded"] < 0.6 * full, rank
        assert rank["param_bytes"] < 0.6 * full, rank
    _check_saved_model(data, tmp_path / "run", metrics, base_loss)


def test_zero3_lora_saves_the_adapter_and_the_merged_model(data, tmp_path, base_loss):
    metrics = _train(data, tmp_path / "run", zero_stage=3, method="lora", lora_r=8, learning_rate=1e-2)
    _check_common(metrics, 3)
    for rank in metrics["ranks"]:
        assert rank["param_bytes"] < 0.6 * metrics["model_param_bytes"], rank
    _check_saved_model(data, tmp_path / "run", metrics, base_loss)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.shape[1] == 8 and v.abs().sum() > 0 for v in lora_b)  # trained from zeros
