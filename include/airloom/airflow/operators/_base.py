"""Shared bits of Airloom's operators: the base class (connection, registry, output folder), who
triggered the run, and the one check of numeric template fields."""

from __future__ import annotations

import getpass
import os
import sys
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

if TYPE_CHECKING:
    from airloom.airflow.hooks.registry import RegistryHook


class AirloomBaseOperator(BaseOperator):
    """Base of the operators that reach S3, the model registry or a run folder, in the way of the Amazon
    provider's ``AwsBaseOperator``: subclasses' ``__init__`` store only their own arguments, and nothing
    connects before ``execute``.

    :param aws_conn_id: the Airflow connection with S3 credentials (``s3://`` data, registry, checkpoints).
    :param registry_uri: the model registry, a folder or ``s3://bucket/prefix``; empty = Airloom's default.
    :param output_dir: where a task that writes files writes them; empty = its run folder
        (:func:`task_output_dir`).
    """

    def __init__(
        self,
        *,
        aws_conn_id: str | None = "aws_default",
        registry_uri: str | None = None,
        output_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.aws_conn_id = aws_conn_id
        self.registry_uri = registry_uri
        self.output_dir = output_dir

    def pre_execute(self, context) -> None:
        disable_progress_bars()

    @cached_property
    def hook(self) -> RegistryHook:
        from airloom.airflow.hooks.registry import RegistryHook

        return RegistryHook(registry_uri=self.registry_uri, aws_conn_id=self.aws_conn_id)

    def s3_client(self, uri: str) -> Any:
        """For an ``s3://`` URI, the boto3 client of the connection (its extra ``endpoint_url`` points at
        MinIO or moto); None otherwise."""
        if not str(uri).startswith("s3://"):
            return None
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=self.aws_conn_id).get_conn()

    def output_folder(self, context) -> Path:
        """``output_dir``, else the task's run folder."""
        return task_output_dir(context, self.output_dir)


def task_output_dir(context, explicit: str | None = None) -> Path:
    """``$AIRLOOM_HOME/runs/<dag_id>/<run_id>/<task_id>[/<map_index>]``: a rerun overwrites only its own output."""
    if explicit:
        return Path(explicit)
    from airloom.settings import run_dir

    ti = context["ti"]
    parts = [ti.task_id] + ([str(ti.map_index)] if getattr(ti, "map_index", -1) >= 0 else [])
    return run_dir(ti.dag_id, context["run_id"], *parts)


#: Progress bars write to stderr, which Airflow logs at ERROR, one line per refresh. The variables reach
#: libraries imported later in the task and the processes it starts (the training launcher's ranks).
PROGRESS_BAR_SWITCHES = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def disable_progress_bars() -> None:
    """Turn progress bars off for this task process and its children; a value the user set stays."""
    for key, value in PROGRESS_BAR_SWITCHES.items():
        os.environ.setdefault(key, value)
    # libraries already imported (``airflow dags test`` runs every task in one process) read them at import
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars as hub_off

        hub_off()
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        from datasets.utils import disable_progress_bars as datasets_off

        datasets_off()


def skip_task(log, reason: str) -> AirflowSkipException:
    """Log why the task skips, at INFO, and return the exception to raise: Airflow logs the exception's
    message only inside the collapsed "Post Execute" group of the task log, where nobody looks."""
    log.info("skipping: %s", reason)
    return AirflowSkipException(reason)


def triggering_user(context) -> str:
    """Who started the run: the UI/API user, else the OS user (CLI, ``dags test``, schedules)."""
    dag_run = context.get("dag_run")
    user = getattr(dag_run, "triggering_user_name", None) if dag_run is not None else None
    return user or os.environ.get("AIRLOOM_USER") or getpass.getuser()


def push_outputs(context, result: dict) -> dict:
    """Also push each key of ``result`` as its own XCom, so DAGs can wire ``op.output["key"]``."""
    ti = context["ti"]
    for key, value in result.items():
        ti.xcom_push(key=key, value=value)
    return result


def number(value: Any, name: str, kind: type[int] | type[float] = int, *, optional: bool = False) -> Any:
    """A numeric template field as ``kind``, checked once in the operator.

    The DAGs render templates as native objects, so a param arrives as its own type (None when unset);
    numeric text (an operator built by hand) is converted too. Anything else fails the task, naming the field.
    """
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        what = ("an integer" if kind is int else "a number") + (" or None" if optional else "")
        raise AirflowFailException(f"{name} must be {what}, got {value!r}") from None
