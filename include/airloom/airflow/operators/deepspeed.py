"""DeepSpeedTrainOperator: launch the training recipe as a child process; TrainingPreflightOperator: refuse
what cannot work before the run waits for a GPU.

The operator writes the run's config, starts ``deepspeed`` (or ``torchrun``) on the recipe,
streams the child's progress into the task log and fails with the child's last lines when it
exits non-zero. ``on_kill`` ends the child's whole process group, launcher and ranks alike.

Workers that share no disk (``AIRLOOM_ARTIFACTS=s3://…``): the splits and a base model handed over by
URI are staged onto this worker before the launch (the child reads local files), and the run's folder
(model, metrics, loss curve) is published to the artifact store when it ends; the result names it by URI.
A one-node run that checkpoints mirrors its checkpoints to ``checkpoints/<dag>/<run>/<task>/`` in the store
unless its config names a ``checkpoint_uri``: a retry on another worker resumes from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airloom.airflow.links import LossCurveLink
from airloom.airflow.operators._base import AirloomBaseOperator, as_given, number, push_outputs
from airloom.exceptions import UsageError
from airloom.training.config import DEFAULT_MASTER_PORT


class DeepSpeedTrainOperator(AirloomBaseOperator):
    """Fine-tune ``base_model`` on ``train_file`` with the Airloom recipe.

    :param base_model: a model folder, ``registry:NAME[/N|@ALIAS]``, ``s3://bucket/prefix`` or a hub id.
    :param train_file: a prepared split (Parquet, or JSONL): ``prompt``/``response`` rows, and ``messages``
        for conversations, which train on every assistant turn with the dataset's chat template
        (``config["chat_truncation"]`` says what happens to those longer than ``max_length``).
    :param validation_file: optional split of the same kind, for the validation loss.
    :param config: training options (:class:`airloom.training.config.TrainConfig` fields).
    :param launcher: ``deepspeed``, ``torchrun`` or ``python``; None: the config's.
    :param nproc_per_node: processes (GPUs) per node, None: the config's; when given as a number, also
        the ``gpu`` pool slots taken by default.
    :param nnodes, node_rank, master_addr, master_port, hostfile: multi-node settings (None: the config's);
        nnodes > 1 needs ``master_addr`` (node 0's address), and a port (None: 29500, torchrun's default)
        every node shares. Node 0 writes the model and returns the run's outputs; another node returns
        only ``node_rank`` and ``output_dir``.
    :param env: extra environment for the child (NCCL settings and the like).

    Before launching, what cannot work is refused without retry (:mod:`airloom.training.preflight`):
    the config, the topology, the method and precision on this machine, empty train/validation
    files, a base model whose config or tokenizer does not load or whose context is below ``max_length``.
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
        "nnodes",
        "node_rank",
        "master_addr",
        "master_port",
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
        launcher: str | None = None,
        nproc_per_node: int | None = None,
        nnodes: int | None = None,
        node_rank: int = 0,
        master_addr: str | None = None,
        master_port: int | None = None,
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
        from airloom.training import preflight
        from airloom.training.config import TrainConfig
        from airloom.training.launcher import LaunchSpec, TrainingProcess, build_command, child_env

        out = self.output_folder(context)
        node_rank = number(self.node_rank, "node_rank")
        # Inputs handed over by URI, on this worker's disk (the launched ranks read local files); the
        # original names go into the result, which another worker reads.
        staged = {
            "train_file": self.stage_split(self.train_file),
            "validation_file": self.stage_split(self.validation_file),
        }
        given = {  # None: the config's
            "launcher": self.launcher,
            "nproc_per_node": self.nproc_per_node,
            "nnodes": number(self.nnodes, "nnodes", optional=True),
            "master_addr": self.master_addr,
            "master_port": number(self.master_port, "master_port", optional=True),
        }
        options = {**dict(self.config), **{k: v for k, v in given.items() if v is not None}}
        try:  # what cannot work fails now, without retry: a retry would fail the same way
            cfg = TrainConfig.from_dict(
                {
                    **{k: v for k, v in options.items() if v is not None},
                    "base_model": self.base_model,
                    **staged,
                    "output_dir": str(out),
                }
            )
            preflight.check_topology(
                nnodes=cfg.nnodes, node_rank=node_rank, master_addr=cfg.master_addr, launcher=cfg.launcher
            )
            if self.artifacts.remote and cfg.checkpoint_every and not cfg.checkpoint_uri and cfg.nnodes == 1:
                # A retry may land on another gpu worker, whose disk has no checkpoint: mirror them to the
                # store, so it resumes from the newest one (the recipe fetches it) instead of step 0.
                cfg.checkpoint_uri = self.artifacts.uri(checkpoint_key(out))
            preflight.check_hardware(cfg)  # e.g. qlora without CUDA, bf16 on a V100
            try:
                preflight.check_splits({"train": cfg.train_file, "validation": cfg.validation_file})
            except UsageError as e:  # name the split as the run was given it, not this worker's copy
                given = {"train_file": self.train_file, "validation_file": self.validation_file}
                raise UsageError(as_given(str(e), given, staged)) from e
            base = self.resolve_model(self.base_model)  # a folder another task published is staged
            cfg.base_model = base["path"]
            preflight.check_base_model(cfg.base_model, cfg.max_length, name=base["ref"])
        except UsageError as e:
            raise AirflowFailException(str(e)) from e
        out.mkdir(parents=True, exist_ok=True)
        config_path = cfg.save(out / "train_config.json")
        spec = LaunchSpec(
            config_path=config_path,
            launcher=cfg.launcher,
            nproc_per_node=cfg.nproc_per_node,
            nnodes=cfg.nnodes,
            node_rank=node_rank,
            master_addr=cfg.master_addr or "127.0.0.1",
            # Every node must agree on the port: a free port is picked only for a single node.
            master_port=cfg.master_port or (0 if cfg.nnodes == 1 else DEFAULT_MASTER_PORT),
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
        config = cfg.to_dict()
        base_model_path = base["path"]
        if self.artifacts.remote:
            # Another worker reads the result: name what this one resolved or staged into its cache as
            # it was given (the pinned registry ref, the URI), never by this worker's path.
            config.update(
                train_file=self.train_file, validation_file=self.validation_file, base_model=base["ref"]
            )
            base_model_path = base["ref"]
        if node_rank > 0:  # node 0 (global rank 0) writes the model and the metrics; this node only trained
            return self.hand_over(context, {"node_rank": node_rank, "output_dir": str(out), "config": config})
        metrics = json.loads((out / "train_metrics.json").read_text())
        metrics.pop("history", None)
        loss_curve = out / "loss_curve.png"  # the recipe draws none when it logged no step
        result = {
            "model_dir": str(out / "model"),
            "output_dir": str(out),
            "base_model": base["ref"],
            "base_model_path": base_model_path,
            "config": config,
            "metrics": metrics,
            "loss_curve": str(loss_curve) if loss_curve.is_file() else None,
        }
        # The run's folder, the model in it, goes to the artifact store (manifest last) before its URI
        # is handed on; nothing moves when the store is local.
        return push_outputs(context, self.hand_over(context, result))

    def on_kill(self) -> None:
        if self._process is not None:
            self._process.kill()


def checkpoint_key(out: Any) -> str:
    """The store's key for a training task's checkpoint mirror: ``checkpoints/<dag>/<run>/<task>[/<map>]``,
    beside the run's published folder, not in it (a finished run deletes its checkpoints)."""
    from airloom.settings import home

    return "checkpoints/" + Path(out).resolve().relative_to(home().resolve() / "runs").as_posix()


class TrainingPreflightOperator(AirloomBaseOperator):
    """Refuse, before the run queues for the ``gpu`` pool, inputs that no retry can fix: an empty split
    of the prepared dataset (training, the validation loss, the trials' and the candidate's evaluation
    each read one) and a multi-node run without a master address.

    A cheap task on any worker: row counts come from Parquet footers. What needs the training
    machine (CUDA, bf16) or the base model is checked by :class:`DeepSpeedTrainOperator` before it launches.

    :param splits: ``{"train": path, "validation": path, "test": path}`` (None entries are skipped).
    :param nnodes, master_addr: the training task's multi-node settings.

    Splits handed over by URI (workers that share no disk) are staged onto this worker to be counted.
    """

    template_fields: Sequence[str] = ("splits", "nnodes", "master_addr")

    def __init__(
        self, *, splits: dict[str, Any], nnodes: int | None = 1, master_addr: str | None = None, **kwargs
    ) -> None:
        kwargs.setdefault("retries", 0)  # it only reads: a failure is the input's
        super().__init__(**kwargs)
        self.splits = splits
        self.nnodes = nnodes
        self.master_addr = master_addr

    def execute(self, context) -> dict[str, int]:
        from airloom.training import preflight

        given = dict(self.splits)
        staged: dict[str, Any] = {}
        try:
            preflight.check_topology(
                nnodes=number(self.nnodes, "nnodes", optional=True) or 1,
                node_rank=0,
                master_addr=self.master_addr,
                launcher=None,
            )
            # A prepared dataset's manifest has the counts: a split on the store is downloaded only when
            # its manifest does not say (this worker does not train; the gpu worker stages what it reads).
            known = {
                split: rows
                for split, loc in given.items()
                if (rows := self._rows_in_manifest(loc)) is not None
            }
            staged = {split: loc if split in known else self.stage(loc) for split, loc in given.items()}
            counts = preflight.check_splits(staged, known)
        except UsageError as e:
            raise AirflowFailException(as_given(str(e), given, staged)) from e
        self.log.info("rows per split: %s", counts)
        return counts

    def _rows_in_manifest(self, location: str | None) -> int | None:
        """The rows of a split on the remote store that its dataset's ``manifest.json`` records, else None."""
        from airloom.artifacts import ArtifactIncomplete, is_remote

        if not location or not is_remote(location) or not self.artifacts.remote:
            return None
        folder, _, name = location.rstrip("/").rpartition("/")
        try:
            manifest = json.loads(self.artifacts.stage(f"{folder}/manifest.json").read_text())
        except (ArtifactIncomplete, UsageError, ValueError):
            return None
        for info in (manifest.get("splits") or {}).values():
            if isinstance(info, dict) and info.get("file") == name and isinstance(info.get("rows"), int):
                return info["rows"]
        return None
