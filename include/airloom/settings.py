"""Where Airloom keeps its files. One place, so the CLI, tasks and tests agree.

``AIRLOOM_HOME`` (default ``<project>/.airloom``) holds generated data, run outputs and, unless
``AIRLOOM_REGISTRY`` says otherwise, the model registry. The project (see :func:`project_dir`) is the
folder with ``dags/``, ``plugins/`` and ``airflow_settings.yaml`` that the embedded Airflow runs; the
package's own data files are found through the package, never through the project.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def source_checkout() -> Path | None:
    """The project checkout this package is imported from (``<checkout>/include/airloom``, as an editable
    install or ``PYTHONPATH=include`` has it), or None when it is installed (site-packages)."""
    package = Path(__file__).resolve().parent
    checkout = package.parents[1]
    return checkout if package.parent.name == "include" and (checkout / "dags").is_dir() else None


def project_dir() -> Path:
    """The project the embedded defaults belong to: ``AIRLOOM_PROJECT_DIR`` when set, else the source
    checkout airloom is imported from, else the working directory (a non-editable install run from the
    project's folder).
    """
    explicit = os.environ.get("AIRLOOM_PROJECT_DIR")
    return Path(explicit).expanduser().resolve() if explicit else source_checkout() or Path.cwd()


def home() -> Path:
    return Path(os.environ.get("AIRLOOM_HOME") or project_dir() / ".airloom").resolve()


def registry_uri() -> str:
    return os.environ.get("AIRLOOM_REGISTRY") or str(home() / "registry")


def run_dir(dag_id: str, run_id: str, *parts: str) -> Path:
    """Output folder of one DAG run: a rerun overwrites its own outputs and nothing else."""
    safe_run = run_id.replace(":", "_").replace("+", "_")
    return home() / "runs" / dag_id / safe_run / Path(*parts)


def airflow_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the embedded Airflow: project-local AIRFLOW_HOME, SQLite, LocalExecutor, the
    api-server on 127.0.0.1 only (its demo users have well-known passwords), and with the LocalExecutor
    as many task processes at once as the machine has cores (Airflow's default is 32).

    Values already set win, so the same commands run against PostgreSQL/Celery when a user
    exports ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` and friends.
    """
    env = dict(os.environ if base is None else base)
    project = project_dir()
    defaults = {
        "AIRFLOW_HOME": str(project / ".airflow"),
        "AIRLOOM_HOME": str(home()),
        "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(project / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,trainer:user,reviewer:op",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(project / ".airflow" / "passwords.json"),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__API_AUTH__JWT_SECRET": "airloom-embedded-default-only-never-use-this-secret-in-production-0123456789",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "TORCH_EXTENSIONS_DIR": str(project / ".cache" / "torch_extensions"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    # one task process per core; a Celery or Kubernetes cluster's parallelism is not this machine's
    if env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor":
        env.setdefault("AIRFLOW__CORE__PARALLELISM", str(max(2, os.cpu_count() or 1)))
    # The virtualenv's `airflow` and `deepspeed` must be found by child processes even when it is not activated.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in [bin_dir, env.get("PATH", "")] if p)
    return env


EMBEDDED_PASSWORDS = {"admin": "admin", "trainer": "trainer", "reviewer": "reviewer"}


def ensure_embedded_airflow_home(env: dict[str, str]) -> None:
    """Create AIRFLOW_HOME and, for the embedded default only, known passwords for its three users.

    A production deployment sets its own auth manager and never reaches this file.
    """
    import json

    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    pw = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    if not pw.exists():
        pw.parent.mkdir(parents=True, exist_ok=True)
        pw.write_text(json.dumps(EMBEDDED_PASSWORDS, indent=2))
