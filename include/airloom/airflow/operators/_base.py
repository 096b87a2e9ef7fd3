"""Shared bits of Airloom's operators: where a task writes, who triggered the run."""

from __future__ import annotations

import getpass
import os
from pathlib import Path


def task_output_dir(context, explicit: str | None = None) -> Path:
    """``$AIRLOOM_HOME/runs/<dag_id>/<run_id>/<task_id>[/<map_index>]``: a rerun overwrites only its own output."""
    if explicit:
        return Path(explicit)
    from airloom.settings import run_dir

    ti = context["ti"]
    parts = [ti.task_id] + ([str(ti.map_index)] if getattr(ti, "map_index", -1) >= 0 else [])
    return run_dir(ti.dag_id, context["run_id"], *parts)


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
