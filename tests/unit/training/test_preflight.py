"""Preflight checks: each refusal names what to change, before any expensive work."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from airloom.exceptions import UsageError
from airloom.training import preflight
from airloom.training.config import TrainConfig


def _base(folder: Path, context: int = 128, tokenizer_limit: int = 256) -> Path:
    """A base model's config and tokenizer (the checks never load weights)."""
    from transformers import LlamaConfig

    from airloom.training.base import train_tokenizer

    LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=context,
    ).save_pretrained(folder)
    tokenizer = train_tokenizer(["add 12 and 30", "reverse river"] * 20, vocab_size=300)
    tokenizer.model_max_length = tokenizer_limit
    tokenizer.save_pretrained(folder)
    return folder


# -- method and precision on this machine -------------------------------------------------------------


def test_qlora_without_cuda(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(UsageError, match="method qlora .* needs a CUDA GPU; this machine has none"):
        preflight.check_hardware(TrainConfig(method="qlora", precision="bf16"))


def test_qlora_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(preflight, "_accelerator", lambda: _Accelerator(bf16=True))
    real = preflight.importlib.util.find_spec
    monkeypatch.setattr(
        preflight.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
    )
    with pytest.raises(UsageError, match="method qlora needs the bitsandbytes package"):
        preflight.check_hardware(TrainConfig(method="qlora", precision="bf16"))


class _Accelerator:
    def __init__(self, bf16: bool, fp16: bool = True, device: str = "cuda") -> None:
        self.bf16, self.fp16, self.device = bf16, fp16, device

    def is_bf16_supported(self):
        return self.bf16

    def is_fp16_supported(self):
        return self.fp16

    def device_name(self):
        return self.device


def test_bf16_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(preflight, "_accelerator", lambda: _Accelerator(bf16=False))  # e.g. a V100
    with pytest.raises(
        UsageError,
        match="precision bf16 is not supported on this machine's cuda device .*set precision to fp16",
    ):
        preflight.check_hardware(TrainConfig(precision="bf16"))
    preflight.check_hardware(TrainConfig(precision="fp16"))


def test_fp16_on_a_cpu_without_it(monkeypatch):
    monkeypatch.setattr(preflight, "_accelerator", lambda: _Accelerator(bf16=True, fp16=False, device="cpu"))
    with pytest.raises(
        UsageError,
        match="precision fp16 is not supported on this machine's cpu device .*set precision to fp32",
    ):
        preflight.check_hardware(TrainConfig(precision="fp16"))


def test_this_machine_as_deepspeed_sees_it():
    """DeepSpeed's accelerator answers (the CPU one takes bf16: torch has CPU kernels for it)."""
    preflight.check_hardware(TrainConfig(precision="fp32"))
    accelerator = preflight._accelerator()
    if accelerator.device_name() == "cpu":
        preflight.check_hardware(TrainConfig(precision="bf16"))


# -- topology -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nnodes": 2, "master_addr": None}, "nnodes 2 needs master_addr"),
        ({"nnodes": 2, "master_addr": "  "}, "nnodes 2 needs master_addr"),
        (
            {"nnodes": 2, "master_addr": "10.0.0.1", "launcher": "python"},
            "needs launcher deepspeed or torchrun",
        ),
        ({"nnodes": 2, "node_rank": 2, "master_addr": "10.0.0.1"}, "node_rank in 0..nnodes-1"),
        ({"nnodes": 0}, "nnodes must be >= 1"),
    ],
)
def test_topologies_that_cannot_rendezvous(kwargs, match):
    args = {"nnodes": 1, "node_rank": 0, "master_addr": None, "launcher": "deepspeed", **kwargs}
    with pytest.raises(UsageError, match=match):
        preflight.check_topology(**args)


def test_single_node_needs_no_address():
    preflight.check_topology(nnodes=1, node_rank=0, master_addr=None, launcher="python")
    preflight.check_topology(nnodes=2, node_rank=1, master_addr="10.0.0.1", launcher="torchrun")


# -- splits -------------------------------------------------------------------------------------------


def test_an_empty_split_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["x", "y"]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "test.parquet")
    (tmp_path / "validation.jsonl").write_text('{"prompt": "p"}\n\n')
    splits = {
        s: str(tmp_path / f) for s, f in (("train", "train.parquet"), ("validation", "validation.jsonl"))
    }
    assert preflight.check_splits({**splits, "extra": None}) == {"train": 2, "validation": 1}
    with pytest.raises(UsageError, match=r"test.parquet: the test split is empty"):
        preflight.check_splits({**splits, "test": str(tmp_path / "test.parquet")})
    (tmp_path / "validation.jsonl").write_text("\n  \n")
    with pytest.raises(UsageError, match=r"validation.jsonl: the validation split is empty"):
        preflight.check_splits(splits)


def test_a_missing_or_broken_split_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"train.parquet: no such file"):
        preflight.check_splits({"train": str(tmp_path / "train.parquet")})
    (tmp_path / "train.parquet").write_text("not parquet")
    with pytest.raises(UsageError, match=r"train.parquet: not a readable Parquet file"):
        preflight.check_splits({"train": str(tmp_path / "train.parquet")})


# -- base model ---------------------------------------------------------------------------------------


def test_base_model_that_fits(tmp_path):
    info = preflight.check_base_model(str(_base(tmp_path / "m")), 128)
    assert info == {"context": 128, "tokenizer_max_length": 256}


def test_max_length_beyond_the_models_context(tmp_path):
    base = _base(tmp_path / "m", context=128)
    with pytest.raises(
        UsageError,
        match=r"max_length 256 is longer than base_model tiny takes \(max_position_embeddings = 128 in its config.json\); set max_length <= 128",
    ):
        preflight.check_base_model(str(base), 256, name="tiny")


def test_max_length_beyond_the_tokenizers_limit(tmp_path):
    base = _base(tmp_path / "m", context=4096, tokenizer_limit=1024)
    with pytest.raises(
        UsageError, match=r"longer than the tokenizer of base_model .* \(model_max_length = 1024\)"
    ):
        preflight.check_base_model(str(base), 2048)


def test_a_tokenizer_without_a_limit_is_not_a_limit(tmp_path):
    base = _base(tmp_path / "m", context=4096, tokenizer_limit=int(1e30))
    assert preflight.check_base_model(str(base), 4096) == {"context": 4096, "tokenizer_max_length": None}


def test_base_model_that_does_not_load(tmp_path):
    with pytest.raises(UsageError, match=r"base_model .*nothing: cannot load its config.json"):
        preflight.check_base_model(str(tmp_path / "nothing"), 128)
    base = _base(tmp_path / "m")
    for f in base.iterdir():
        if f.name != "config.json":
            f.unlink()
    with pytest.raises(UsageError, match=r"base_model .*: cannot load its tokenizer"):
        preflight.check_base_model(str(base), 128)


def test_context_field_of_other_architectures():
    assert preflight.model_context(SimpleNamespace(n_positions=1024)) == ("n_positions", 1024)
    assert preflight.model_context(SimpleNamespace()) is None
