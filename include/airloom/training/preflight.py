"""What a training run needs, checked before any expensive work: each check raises
:class:`~airloom.exceptions.UsageError` naming the field or file to change.

Nothing here is fixed by trying again, so the Airflow operators turn these errors into failures
without retry. Config-only rules (e.g. offload without ZeRO) live in
:class:`~airloom.training.config.TrainConfig`; these are the ones that need the machine, the data or
the base model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from airloom.exceptions import UsageError
from airloom.training.config import TrainConfig, check_topology

__all__ = ["check_base_model", "check_hardware", "check_splits", "check_topology", "count_rows"]

# Tokenizers without a real limit report this sentinel (transformers' VERY_LARGE_INTEGER, 1e30).
_NO_LIMIT = 10**9
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _accelerator():
    """DeepSpeed's view of this machine: it decides which precisions the engine accepts."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def check_hardware(cfg: TrainConfig) -> None:
    """Refuse a method or precision this machine cannot run (call it on the training machine)."""
    import torch

    if cfg.method == "qlora":
        if not torch.cuda.is_available():
            raise UsageError(
                "method qlora loads 4-bit weights with bitsandbytes and needs a CUDA GPU; this "
                "machine has none. Use method lora (same adapter, full-precision base) or run on "
                "the gpu queue."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError(
                "method qlora needs the bitsandbytes package on the training machine (pip install bitsandbytes)"
            )
    if cfg.precision == "fp32":
        return
    accelerator = _accelerator()
    supported = (
        accelerator.is_bf16_supported() if cfg.precision == "bf16" else accelerator.is_fp16_supported()
    )
    if not supported:
        # DeepSpeed's CPU accelerator takes bf16 (torch has CPU kernels) and fp16 only where oneDNN
        # has fp16; on CUDA, bf16 needs compute capability 8.0 (Ampere) or newer.
        device = accelerator.device_name()
        other = "fp16" if cfg.precision == "bf16" and device != "cpu" else "fp32"
        raise UsageError(
            f"precision {cfg.precision} is not supported on this machine's {device} device "
            f"(DeepSpeed refuses it); set precision to {other}"
        )


def count_rows(path: str | Path) -> int:
    """Rows of a split file without reading it: Parquet's footer, or the non-blank lines of JSONL."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError with the reason
            raise UsageError(f"{path}: not a readable Parquet file ({e})") from e
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def check_splits(splits: dict[str, str | None], known: dict[str, int] | None = None) -> dict[str, int]:
    """Each given split file has rows (None entries are skipped); returns the row counts. ``known``: counts
    already known (a prepared dataset's manifest records them), used instead of reading those files."""
    counts = {}
    for split, path in splits.items():
        if path is None:
            continue
        counts[split] = known[split] if known and split in known else count_rows(path)
        if counts[split] == 0:
            raise UsageError(
                f"{path}: the {split} split is empty; prepare a dataset with enough rows that every "
                "split gets some (training, the validation loss and evaluation each read one)"
            )
    return counts


def model_context(config: Any) -> tuple[str, int] | None:
    """The longest sequence a model config allows and the field that says so (it varies by architecture)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in CONTEXT_FIELDS:
        value = getattr(text_config, field, None)
        if isinstance(value, int) and value > 0:
            return field, value
    return None


def check_base_model(path: str, max_length: int, *, name: str | None = None) -> dict[str, Any]:
    """The base model's config and tokenizer load (no weights) and their context fits ``max_length``."""
    from transformers import AutoConfig, AutoTokenizer

    name = name or path
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"base_model {name}: cannot load its config.json ({e})") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"base_model {name}: cannot load its tokenizer ({e})") from e
    context = model_context(config)
    if context is not None and max_length > context[1]:
        field, value = context
        raise UsageError(
            f"max_length {max_length} is longer than base_model {name} takes "
            f"({field} = {value} in its config.json); set max_length <= {value}"
        )
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < _NO_LIMIT and max_length > limit:
        raise UsageError(
            f"max_length {max_length} is longer than the tokenizer of base_model {name} takes "
            f"(model_max_length = {limit}); set max_length <= {limit}"
        )
    return {
        "context": context[1] if context else None,
        "tokenizer_max_length": limit if isinstance(limit, int) and limit < _NO_LIMIT else None,
    }
