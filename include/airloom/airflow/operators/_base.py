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

from airloom.governance.signoff import SYSTEM_PREFIX

if TYPE_CHECKING:
    from airloom.airflow.hooks.registry import RegistryHook
    from airloom.artifacts import Artifacts


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
        """``output_dir``, else the task's run folder (on this worker's disk; :meth:`hand_over` publishes it)."""
        return task_output_dir(context, self.output_dir)

    @cached_property
    def artifacts(self) -> Artifacts:
        """The artifact store (``AIRLOOM_ARTIFACTS``), through this operator's AWS connection."""
        from airloom.artifacts import Artifacts, artifacts_uri

        uri = artifacts_uri()
        return Artifacts(uri, client=self.s3_client(uri))

    def stage(self, location: str | None, beside: tuple[str, ...] = ()) -> str | None:
        """A local path for an input another task handed over: a URI of the artifact store is downloaded
        (verified, cached on this worker; a file with the files named ``beside`` from its folder); a local
        path or anything else (hub id, registry ref) as it is."""
        from airloom.artifacts import is_remote

        if not location or not is_remote(location) or not self.artifacts.remote:
            return location
        if self.artifacts.key_of(location) is None:
            return location  # s3:// data of the user's own, read where it lies
        return str(self.artifacts.stage(location, beside, hold=True))

    def resolve_model(self, ref: str, registry: Any = None) -> dict[str, Any]:
        """:func:`airloom.registry.resolve.resolve_model` on ``ref`` (default: this operator's registry), a
        model folder another task published (a URI of the artifact store) staged first; ``ref`` stays its name."""
        from airloom.registry.resolve import resolve_model

        location = self.stage(ref) or ref
        resolved = resolve_model(
            location,
            registry=registry if registry is not None else self.hook.registry,
            s3_client=self.s3_client(location),
        )
        if location != ref:
            resolved["ref"] = ref
        return resolved

    def stage_split(self, location: str | None) -> str | None:
        """:meth:`stage` for a prepared split: its dataset's ``manifest.json`` (the chat template the readers
        render with) comes beside it; the other splits are not downloaded."""
        return self.stage(location, beside=("manifest.json",))

    def hand_over(self, context, result: Any, *folders: str | os.PathLike[str] | None) -> Any:
        """Publish what this task wrote (its output folder, and any other ``folders``) to the artifact store
        and return ``result`` with URIs in place of this worker's paths: what another worker can read.
        Nothing moves when the store is local (the embedded default)."""
        if not self.artifacts.remote:
            return result
        for folder in (self.output_folder(context), *folders):
            if folder and Path(folder).is_dir() and self.artifacts.key_of(Path(folder).resolve()):
                self.log.info("publishing %s to %s", folder, self.artifacts.uri_of(Path(folder).resolve()))
                self.artifacts.publish(folder)
        return self.artifacts.handover(result)


def as_given(message: str, given: dict[str, Any], staged: dict[str, Any]) -> str:
    """``message`` naming each input as the task was given it (a URI) instead of this worker's staged copy."""
    for key, local in staged.items():
        if local and local != given.get(key):
            message = message.replace(str(local), str(given[key]))
    return message


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


#: ``triggering_user_name`` Airflow gives the runs of ``airflow dags test``.
DAGS_TEST_USER = "dag_test"
#: The key of an asset event's extra that names the person behind the run that emitted it.
REQUESTED_BY = "requested_by"


def triggering_user(context) -> str:
    """Who is responsible for this run: the requester of a sign-off, the actor of what it records.

    - a person started it (the UI, the REST API, ``airflow dags trigger``, a backfill they created): that
      user, as Airflow's auth manager named them;
    - asset events started it: the ``requested_by`` that the producing task put into an event's extra
      (:func:`asset_event_extra`), i.e. the person behind the upstream run, else
      ``system:<upstream dag_id>``; a person named by any of the events wins over a system identity;
    - a schedule (or any other run without a user): ``system:<dag_id>``, an identity that never approves;
    - ``airflow dags test`` or a context without a run (the embedded default's CLI, library callers):
      ``$AIRLOOM_USER``, else the OS user.

    A worker's OS user is never the answer for a scheduled or asset-triggered run: separation of duties
    would then block nobody real.
    """
    dag_run = context.get("dag_run")
    if dag_run is None:
        return _local_user()
    user = getattr(dag_run, "triggering_user_name", None)
    if user == DAGS_TEST_USER:
        return _local_user()
    if user:
        return str(user)
    upstream = _upstream_requester(context)
    if upstream:
        return upstream
    run_type = getattr(dag_run, "run_type", None)
    if run_type is None:  # not a run Airflow made (a hand-built context): as the CLI
        return _local_user()
    ti = context.get("ti")
    dag_id = getattr(dag_run, "dag_id", None) or getattr(ti, "dag_id", None) or "airflow"
    return f"{SYSTEM_PREFIX}{dag_id}"


def _local_user() -> str:
    return os.environ.get("AIRLOOM_USER") or getpass.getuser()


def _upstream_requester(context) -> str | None:
    """The requester the triggering asset events name (newest first, a person before a system identity).

    ``requested_by`` is trusted only on events a task emitted (``source_dag_id`` set): an event posted to
    the REST API carries whatever extra its sender wrote, so it yields ``system:asset:<asset name>``.
    """
    named: list[tuple[bool, str, str]] = []  # (is a person, timestamp, identity)
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            source_dag = getattr(event, "source_dag_id", None)
            claimed = (getattr(event, "extra", None) or {}).get(REQUESTED_BY)
            if source_dag and isinstance(claimed, str) and claimed.strip():
                identity = claimed.strip()
            elif source_dag:
                identity = f"{SYSTEM_PREFIX}{source_dag}"
            else:
                asset = getattr(getattr(event, "asset", None), "name", None) or "unknown"
                identity = f"{SYSTEM_PREFIX}asset:{asset}"
            when = getattr(event, "timestamp", None)
            stamp = when.isoformat() if hasattr(when, "isoformat") else str(when or "")
            named.append((not identity.startswith(SYSTEM_PREFIX), stamp, identity))
    return max(named)[2] if named else None


def asset_event_extra(context, extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` plus ``requested_by``: this run's :func:`triggering_user`, so a run the event starts
    downstream knows whom to hold to separation of duties."""
    return {**extra, REQUESTED_BY: triggering_user(context)}


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
