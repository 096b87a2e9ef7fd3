"""Shared fixtures: a real LocalStore registry in tmp_path, a registered tiny model, a minimal task context."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airloom.registry.registry import ModelRegistry


class FakeTI:
    """Just the TaskInstance surface Airloom's operators touch: ids, map_index and xcom_push."""

    def __init__(self, dag_id: str = "llm_finetune", task_id: str = "task", map_index: int = -1) -> None:
        self.dag_id = dag_id
        self.task_id = task_id
        self.map_index = map_index
        self.pushed: list[tuple[str, Any]] = []

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed.append((key, value))


def _make_context(user: str | None = "trainer", task_id: str = "task", map_index: int = -1) -> dict[str, Any]:
    return {
        "ti": FakeTI(task_id=task_id, map_index=map_index),
        "run_id": "manual__2026-01-02T03:04:05+00:00",
        "dag_run": SimpleNamespace(triggering_user_name=user),
    }


@pytest.fixture
def make_context():
    """Factory for contexts of other users/tasks (a fixture, so test modules need not import conftest)."""
    return _make_context


@pytest.fixture
def context():
    return _make_context()


@pytest.fixture
def aws_default_on_moto(moto_endpoint, monkeypatch) -> str:
    """The ``aws_default`` connection pointing at moto's S3 server (the operators' and the plugin's way in)."""
    import json

    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
            }
        ),
    )
    return moto_endpoint


@pytest.fixture
def airloom_env(tmp_path, monkeypatch) -> Path:
    """Point AIRLOOM_HOME/AIRLOOM_REGISTRY at tmp_path, so operators without registry_uri use it."""
    monkeypatch.setenv("AIRLOOM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIRLOOM_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.delenv("AIRLOOM_USER", raising=False)
    return tmp_path


def _make_model(folder: Path, seed: int = 1) -> Path:
    """Any few files are a model folder as far as the registry is concerned."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(f'{{"seed": {seed}}}')
    (folder / "model.safetensors").write_bytes(bytes(range(seed, seed + 64)))
    return folder


@pytest.fixture
def make_model():
    return _make_model


@pytest.fixture
def registry(airloom_env) -> ModelRegistry:
    return ModelRegistry.from_uri(airloom_env / "registry")


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return _make_model(tmp_path / "model")
