"""``pip install .`` (not editable) works: the installed copy finds its data files through the package and
the embedded defaults through the working directory, never through ``site-packages/..``.

The project is installed with ``pip --target`` into a folder of its own and run from another, with the
checkout off ``sys.path`` (``PYTHONPATH`` is that folder only; the dependencies come from this venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "include" / "airloom"
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("installed")
    src, site, work = root / "src", root / "site", root / "work"
    # Build from a copy of what the build reads, so its build/ and *.egg-info stay out of the checkout.
    shutil.copytree(PACKAGE, src / "include" / "airloom", ignore=JUNK)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--no-compile",
            "--target",
            str(site),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    work.mkdir()
    return {"site": site, "work": work}


def run(
    installed: dict[str, Path], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python *args`` in the work folder, importing airloom only from the installed copy."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRLOOM_", "AIRFLOW", "PYTHON", "TORCH_EXTENSIONS"))
    }
    clean.update(PYTHONPATH=str(installed["site"]), **(env or {}))
    return subprocess.run(
        [sys.executable, *args], cwd=installed["work"], env=clean, capture_output=True, text=True, timeout=120
    )


def test_every_file_of_the_package_is_installed(installed):
    def files(top: Path) -> set[str]:
        return {
            str(p.relative_to(top))
            for p in top.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        }

    missing = files(PACKAGE) - files(installed["site"] / "airloom")
    assert not missing, f"not installed (add their kind to [tool.setuptools.package-data]): {sorted(missing)}"


def test_installed_copy_finds_package_data_and_defaults_to_the_working_directory(installed):
    script = """
import json
from importlib.resources import files
import airloom
from airloom import settings
from airloom.evaluation.bias import load_bias_templates
from airloom.evaluation.modules import MODULES_DIR
from airloom.training.config import TrainConfig
from airloom.training.launcher import child_env

config = TrainConfig.from_file(str(files("airloom.training") / "configs/tiny_llama/0.5m_full_1proc.yaml"))
print(json.dumps({
    "airloom": airloom.__file__, "home": str(settings.home()),
    "dags": settings.airflow_env()["AIRFLOW__CORE__DAGS_FOLDER"],
    "child_pythonpath": child_env().get("PYTHONPATH"), "config": type(config).__name__,
    "bias_templates": len(load_bias_templates()["templates"]),
    "rouge_module": (MODULES_DIR / "airloom_rouge" / "airloom_rouge.py").is_file(),
}))
"""
    proc = run(installed, "-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    work, site = installed["work"], installed["site"]
    assert got["airloom"] == str(site / "airloom" / "__init__.py")
    assert got["home"] == str(work / ".airloom")
    assert got["dags"] == str(work / "dags")
    assert got["child_pythonpath"] == str(site)  # nothing of a checkout added for the training child
    assert got["config"] == "TrainConfig" and got["bias_templates"] > 0 and got["rouge_module"]

    other = work / "elsewhere"
    proc = run(
        installed,
        "-c",
        "from airloom import settings; print(settings.home())",
        env={"AIRLOOM_PROJECT_DIR": str(other)},
    )
    assert proc.returncode == 0 and proc.stdout.strip() == str(other / ".airloom"), proc.stderr[-3000:]


def test_installed_cli_runs_commands(installed):
    proc = run(installed, "-m", "airloom.cli", "--help")
    assert proc.returncode == 0 and "validate" in proc.stdout, proc.stderr[-3000:]

    work = installed["work"]
    rows = [
        {"instruction": "Say hi.", "input": "", "response": "hi"},
        {"instruction": "Add 2 and 3.", "input": "", "response": "5"},
        {"instruction": "Name a colour.", "input": "", "response": "blue"},
    ]
    (work / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run(installed, "-m", "airloom.cli", "eda", "tiny.jsonl", "--out", "eda")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 rows" in proc.stdout and (work / "eda" / "report.html").stat().st_size > 0

    # The embedded Airflow belongs to the project folder (here: the working directory), not to site-packages.
    proc = run(installed, "-m", "airloom.cli", "airflow", "config", "get-value", "core", "dags_folder")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(work / "dags")
    assert (work / ".airflow" / "passwords.json").is_file()
