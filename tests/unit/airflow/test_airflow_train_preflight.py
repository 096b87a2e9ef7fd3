"""DeepSpeedTrainOperator refuses what cannot work before it launches anything, without retry
(AirflowFailException), naming the field or file; the preflight task does the same for empty splits."""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.operators.deepspeed import DeepSpeedTrainOperator, TrainingPreflightOperator


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Config and tokenizer of a tiny Llama with a 128-token context (the checks load no weights)."""
    from transformers import LlamaConfig

    from airloom.training.base import train_tokenizer

    folder = tmp_path_factory.mktemp("base")
    LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=128,
    ).save_pretrained(folder)
    train_tokenizer(["add 12 and 30", "reverse river"] * 20, vocab_size=300).save_pretrained(folder)
    return folder


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if the operator gets as far as starting the training process."""
    import airloom.training.launcher as launcher

    def refuse(*args, **kwargs):
        raise AssertionError("the training process was started")

    monkeypatch.setattr(launcher, "TrainingProcess", refuse)


def _splits(tmp_path: Path, train_rows: int = 3) -> dict[str, str]:
    row = '{"prompt": "p", "response": "r"}\n'
    (tmp_path / "train.jsonl").write_text(row * train_rows)
    (tmp_path / "validation.jsonl").write_text(row)
    return {
        "train_file": str(tmp_path / "train.jsonl"),
        "validation_file": str(tmp_path / "validation.jsonl"),
    }


@pytest.mark.parametrize(
    ("config", "kwargs", "match"),
    [
        ({"method": "qlora", "precision": "bf16"}, {}, "method qlora .* needs a CUDA GPU"),
        ({"zero_stage": 0, "offload_optimizer": True}, {}, "offload_optimizer needs zero_stage 1, 2 or 3"),
        ({}, {"nnodes": 2}, "nnodes 2 needs master_addr"),
        (
            {"max_length": 256},
            {},
            r"max_length 256 is longer than base_model .* \(max_position_embeddings = 128",
        ),
        ({"learning_rat": 0.1}, {}, r"unknown training option\(s\) \['learning_rat'\]"),
    ],
)
def test_refused_before_launch(
    airloom_env, context, base, no_launch, tmp_path, monkeypatch, config, kwargs, match
):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    op = DeepSpeedTrainOperator(
        task_id="train",
        base_model=str(base),
        config=config,
        output_dir=str(tmp_path / "run"),
        **_splits(tmp_path),
        **kwargs,
    )
    with pytest.raises(AirflowFailException, match=match):
        op.execute(context)
    assert not (tmp_path / "run" / "train_config.json").exists()


def test_empty_train_file_refused_before_launch(airloom_env, context, base, no_launch, tmp_path):
    op = DeepSpeedTrainOperator(task_id="train", base_model=str(base), **_splits(tmp_path, train_rows=0))
    with pytest.raises(AirflowFailException, match=r"train.jsonl: the train split is empty"):
        op.execute(context)


def test_base_model_that_does_not_load(airloom_env, context, no_launch, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")  # no model_type: transformers cannot place it
    op = DeepSpeedTrainOperator(task_id="train", base_model=str(tmp_path / "broken"), **_splits(tmp_path))
    with pytest.raises(AirflowFailException, match=r"base_model .*broken: cannot load its config.json"):
        op.execute(context)


def test_preflight_task_names_the_empty_split(tmp_path):
    (tmp_path / "test.jsonl").write_text("")
    op = TrainingPreflightOperator(task_id="preflight", splits={"test": str(tmp_path / "test.jsonl")})
    with pytest.raises(AirflowFailException, match=r"test.jsonl: the test split is empty"):
        op.execute(context={})
    assert op.retries == 0
