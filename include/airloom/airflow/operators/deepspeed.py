"""DeepSpeedTrainOperator: launch the training recipe as a child process.

The operator writes the run's config, starts ``deepspeed`` (or ``torchrun``) on the recipe,
streams the child's progress into the task log and fails with the child's last lines when it
exits non-zero. ``on_kill`` ends the child's whole process group, launcher and ranks alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airloom.airflow.links import LossCurveLink
from airloom.airflow.operators._base import AirloomBaseOperator, push_outputs
from airloom.exceptions import AirloomError


class DeepSpeedTrainOperator(AirloomBaseOperator):
    """Fine-tune ``base_model`` on ``train_file`` with the Airloom recipe.

    :param base_model: a model folder, ``registry:NAME[/N|@ALIAS]``, ``s3://bucket/prefix`` or a hub id.
    :param train_file: a prepared split (Parquet, or JSONL): ``prompt``/``response`` rows, and ``messages``
        for conversations, which train on every assistant turn with the dataset's chat template
        (``config["chat_truncation"]`` says what happens to those longer than ``max_length``).
    :param validation_file: optional split of the same kind, for the validation loss.
    :param config: training options (:class:`airloom.training.config.TrainConfig` fields).
    :param launcher: ``deepspeed``, ``torchrun`` or ``python``.
    :param nproc_per_node: processes (GPUs) per node; also the ``gpu`` pool slots taken by default.
    :param nnodes, node_rank, master_addr, master_port, hostfile: multi-node settings.
    :param env: extra environment for the child (NCCL settings and the like).
    """

    template_fields: Sequence[str] = (
        "base_model",
        "train_file",
        "validation_file",
        "config",
        "output_dir",
        "env",
        "launcher",
        "nproc_per_node",
    )
    template_fields_renderers = {"config": "json", "env": "json"}
    operator_extra_links = (LossCurveLink(),)
    ui_color = "#f2d5a0"

    def __init__(
        self,
        *,
        base_model: str,
        train_file: str,
        validation_file: str | None = None,
        config: dict[str, Any] | None = None,
        launcher: str = "deepspeed",
        nproc_per_node: int = 1,
        nnodes: int = 1,
        node_rank: int = 0,
        master_addr: str = "127.0.0.1",
        master_port: int = 0,
        hostfile: str | None = None,
        env: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("pool", "gpu")
        kwargs.setdefault("queue", "gpu")  # Celery: only GPU workers listen here (ignored by local executors)
        # A templated process count is only known at run time; size the pool claim explicitly then.
        kwargs.setdefault("pool_slots", nproc_per_node if isinstance(nproc_per_node, int) else 1)
        super().__init__(**kwargs)
        self.base_model = base_model
        self.train_file = train_file
        self.validation_file = validation_file
        self.config = config or {}
        self.launcher = launcher
        self.nproc_per_node = nproc_per_node
        self.nnodes = nnodes
        self.node_rank = node_rank
        self.master_addr = master_addr
        self.master_port = master_port
        self.hostfile = hostfile
        self.env = env or {}
        self._process = None

    def execute(self, context) -> dict[str, Any]:
        from airloom.registry.resolve import resolve_model
        from airloom.training.config import TrainConfig
        from airloom.training.launcher import LaunchSpec, TrainingProcess, build_command, child_env
        from airloom.training.recipe import preflight

        out = self.output_folder(context)
        out.mkdir(parents=True, exist_ok=True)
        base = resolve_model(
            self.base_model, registry=self.hook.registry, s3_client=self.s3_client(self.base_model)
        )
        try:
            cfg = TrainConfig.from_dict(
                {
                    **{k: v for k, v in dict(self.config).items() if v is not None},
                    "base_model": base["path"],
                    "train_file": self.train_file,
                    "validation_file": self.validation_file,
                    "output_dir": str(out),
                    "launcher": self.launcher,
                    "nproc_per_node": self.nproc_per_node,
                }
            )
            preflight(cfg)  # e.g. qlora without CUDA: say so before launching anything
        except AirloomError as e:  # bad config: a retry would fail the same way
            raise AirflowFailException(str(e)) from e
        config_path = cfg.save(out / "train_config.json")
        spec = LaunchSpec(
            config_path=config_path,
            launcher=self.launcher,
            nproc_per_node=cfg.nproc_per_node,
            nnodes=int(self.nnodes),
            node_rank=int(self.node_rank),
            master_addr=self.master_addr,
            master_port=int(self.master_port),
            hostfile=self.hostfile,
        )
        threads = max(1, (os.cpu_count() or 1) // cfg.nproc_per_node)
        extra = {"OMP_NUM_THREADS": str(threads)}
        if str(cfg.checkpoint_uri or "").startswith("s3://"):
            from airloom.airflow.hooks.registry import aws_env_for_child

            # the recipe mirrors checkpoints with the connection's credentials
            extra.update(aws_env_for_child(self.aws_conn_id))
        env = child_env({**extra, **{k: str(v) for k, v in self.env.items()}})
        self._process = TrainingProcess(build_command(spec), env, cwd=out)
        try:
            self._process.run(log=self.log.info)
        except Exception as e:
            raise AirflowException(str(e)) from e
        metrics = json.loads((out / "train_metrics.json").read_text())
        metrics.pop("history", None)
        loss_curve = out / "loss_curve.png"  # the recipe draws none when it logged no step
        return push_outputs(
            context,
            {
                "model_dir": str(out / "model"),
                "output_dir": str(out),
                "base_model": base["ref"],
                "base_model_path": base["path"],
                "config": cfg.to_dict(),
                "metrics": metrics,
                "loss_curve": str(loss_curve) if loss_curve.is_file() else None,
            },
        )

    def on_kill(self) -> None:
        if self._process is not None:
            self._process.kill()
