"""Typed training config, validated once at the edge (when the DAG run starts, not mid-training)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from airloom.exceptions import UsageError

METHODS = ("full", "lora", "qlora")
CHAT_TRUNCATIONS = ("keep_last_turns", "drop")  # see airloom.training.chat
LAUNCHERS = ("deepspeed", "torchrun", "python")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_MASTER_PORT = 29500  # torchrun's; a multi-node run's nodes must agree on one


def check_topology(*, nnodes: int, node_rank: int, master_addr: str | None, launcher: str | None) -> None:
    """Multi-node settings that cannot rendezvous (``launcher`` None: not known yet, not checked)."""
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UsageError(
            f"nnodes must be >= 1 and node_rank in 0..nnodes-1, got nnodes={nnodes}, node_rank={node_rank}"
        )
    if nnodes == 1:
        return
    if launcher == "python":
        raise UsageError(f"nnodes {nnodes} needs launcher deepspeed or torchrun ('python' runs one process)")
    if not (master_addr or "").strip():
        raise UsageError(
            f"nnodes {nnodes} needs master_addr: the address of node 0 that every node can reach"
        )


_NUMERIC = {"float": float, "int": int, "float | None": float, "int | None": int}


def _coerce(name: str, value: Any) -> Any:
    """YAML 1.1 reads ``2e-3`` as a string: convert numbers by field type. Flags must be booleans (text
    such as "False" would be true)."""
    declared = str(TrainConfig.__dataclass_fields__[name].type)  # annotations are text (__future__)
    if declared == "bool" and not isinstance(value, bool):
        raise UsageError(f"training option {name} must be true or false, got {value!r}")
    kind = _NUMERIC.get(declared)
    if kind is None or value is None or isinstance(value, bool) or not isinstance(value, str | int | float):
        return value
    try:
        return kind(value) if kind is float or not isinstance(value, float) else value
    except ValueError:
        raise UsageError(f"training option {name} must be a number, got {value!r}") from None


@dataclass
class TrainConfig:
    """What the recipe needs. Paths are filled in per run by the operator or the CLI."""

    base_model: str = ""
    train_file: str = ""
    output_dir: str = ""
    validation_file: str | None = None
    method: str = "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # Which layers get adapters: peft's "all-linear" (every linear layer but the output head), or module
    # names as a list or comma-separated text ("q_proj,v_proj").
    lora_target_modules: str | list[str] = "all-linear"
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None
    max_seconds: float | None = None
    max_length: int = 128
    # Pack several examples per row of max_length tokens (batch_size then counts rows, not examples).
    packing: bool = False
    # A conversation longer than max_length tokens: "keep_last_turns" keeps its system turn and the latest
    # whole user/assistant exchanges that fit (the row goes when not even the last one fits); "drop"
    # drops the row. Instruction rows are cut at max_length, as always.
    chat_truncation: str = "keep_last_turns"
    attn_implementation: str = "sdpa"
    seed: int = 0
    precision: str = "fp32"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only: parameters live in CPU memory between uses
    launcher: str = "deepspeed"
    nproc_per_node: int = 1
    # Multi-node without SSH: one launcher per node (an Airflow task or a pod each), all meeting at node
    # 0's master_addr:master_port. A node that has not joined within rendezvous_timeout_s fails every
    # node (the same bound holds for each collective later, as DeepSpeed's default 10 minutes does).
    nnodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    rendezvous_timeout_s: float = 600.0
    log_every: int = 10
    # Every N optimizer steps a DeepSpeed checkpoint under output_dir/checkpoints; a rerun resumes from
    # the newest complete one. 0 = never.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # Also copy each complete checkpoint here (s3://bucket/prefix or a folder), so a retry on another
    # machine resumes too. One per run: a finished run deletes what it left there.
    checkpoint_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"training method {self.method!r} is not one of {METHODS}")
        if self.launcher not in LAUNCHERS:
            raise UsageError(f"launcher {self.launcher!r} is not one of {LAUNCHERS}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.chat_truncation not in CHAT_TRUNCATIONS:
            raise UsageError(
                f"chat_truncation {self.chat_truncation!r} is not one of {CHAT_TRUNCATIONS}: keep_last_turns "
                "keeps the latest whole turns that fit max_length, drop drops the conversation"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise UsageError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.launcher == "python" and self.nproc_per_node != 1:
            raise UsageError(
                "launcher 'python' runs one process; use deepspeed or torchrun for nproc_per_node > 1"
            )
        if self.method == "qlora" and (self.zero_stage == 3 or self.precision == "fp32"):
            raise UsageError(
                "qlora needs zero_stage 0-2 and precision bf16 or fp16 (4-bit weights, half compute)"
            )
        if self.offload_params and self.zero_stage != 3:
            raise UsageError("offload_params needs zero_stage 3 (only ZeRO-3 partitions the parameters)")
        check_topology(nnodes=self.nnodes, node_rank=0, master_addr=self.master_addr, launcher=self.launcher)
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise UsageError(f"master_port must be 1-65535, got {self.master_port}")
        if self.rendezvous_timeout_s <= 0:
            raise UsageError(f"rendezvous_timeout_s must be > 0, got {self.rendezvous_timeout_s}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise UsageError(
                "offload_optimizer needs zero_stage 1, 2 or 3 (ZeRO owns the optimizer state it moves to "
                "CPU); set zero_stage or turn offload_optimizer off"
            )
        if not self.peft_target_modules():
            raise UsageError("lora_target_modules is empty: give all-linear or module names (q_proj,v_proj)")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise UsageError(
                f"LoRA needs lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1, got r={self.lora_r}, "
                f"alpha={self.lora_alpha}, dropout={self.lora_dropout}"
            )
        if self.warmup_steps < 0 or self.gradient_accumulation_steps < 1 or self.nproc_per_node < 1:
            raise UsageError(
                "warmup_steps must be >= 0, gradient_accumulation_steps and nproc_per_node >= 1, got "
                f"{self.warmup_steps}, {self.gradient_accumulation_steps}, {self.nproc_per_node}"
            )
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise UsageError("checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        for name in ("learning_rate", "batch_size", "max_length", "epochs"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: _coerce(k, v) for k, v in data.items()})

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        from airloom.configfile import load_yaml_mapping

        data = load_yaml_mapping(path, "training config")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def peft_target_modules(self) -> str | list[str]:
        """``lora_target_modules`` as peft's ``LoraConfig(target_modules=...)`` takes it."""
        value = self.lora_target_modules
        if not isinstance(value, str | list):
            raise UsageError(f"lora_target_modules must be text or a list of names, got {value!r}")
        names = value.split(",") if isinstance(value, str) else [str(v) for v in value]
        names = [n.strip() for n in names if n.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def deepspeed_config(self, world_size: int = 1) -> dict[str, Any]:
        """The DeepSpeed JSON config for this run; written next to the outputs as an artifact."""
        per_device = max(1, self.batch_size // max(1, world_size))
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": per_device,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_clipping": self.max_grad_norm,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
            "steps_per_print": 10**9,  # the recipe logs progress itself
            "wall_clock_breakdown": False,
        }
        if self.offload_optimizer and self.zero_stage > 0:
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if self.offload_params:
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": False}
        return cfg

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path
