"""Test-wide settings: every test gets its own AIRLOOM_HOME, so nothing touches the user's."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Airflow reads its config at import: point it at a throwaway home before any test imports it.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airloom-test-airflow-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(autouse=True)
def _airloom_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("airloom_home")
    monkeypatch.setenv("AIRLOOM_HOME", str(home))
    monkeypatch.delenv("AIRLOOM_REGISTRY", raising=False)
    return home
