"""Airflow's real API app for tests: the project's plugins folder, four SimpleAuthManager users and a
migrated metadata database (the session's throwaway AIRFLOW_HOME, tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PASSWORDS = {"admin": "admin-pw", "trainer": "trainer-pw", "reviewer": "reviewer-pw", "viewer": "viewer-pw"}
ROLES = "admin:admin,trainer:user,reviewer:op,viewer:viewer"


_MIGRATED: set[tuple[str, str]] = set()


def _migrate_once() -> None:
    """``airflow db migrate`` of the session's metadata database, once per database and session: the
    modules that use :func:`api_app` share it, and a second migrate would only cost a process start."""
    home = os.environ["AIRFLOW_HOME"]
    key = (home, os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", ""))
    if key in _MIGRATED and (key[1] or (Path(home) / "airflow.db").is_file()):
        return
    subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        env=dict(os.environ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    _MIGRATED.add(key)


def _clear_plugin_caches() -> None:
    from airflow import plugins_manager

    for fn in ("_get_plugins", "_get_ui_plugins", "get_fastapi_plugins", "get_flask_plugins"):
        getattr(plugins_manager, fn).cache_clear()


@contextmanager
def api_app(tmp_path_factory) -> Iterator:
    """``airflow db migrate``, then Airflow's ``core`` API app with the project's plugins and the users
    of :data:`PASSWORDS` (roles :data:`ROLES`); the settings hold until the block ends."""
    pw = tmp_path_factory.mktemp("auth") / "passwords.json"
    pw.write_text(json.dumps(PASSWORDS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", ROLES)
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(pw))
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
        mp.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "airloom-test-secret-" + "x" * 48)
        mp.setenv("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO / "plugins"))
        _migrate_once()
        from airflow import settings
        from airflow.api_fastapi import app as airflow_app

        # Airflow read the plugins folder at import and caches what it loaded: point and reload.
        mp.setattr(settings, "PLUGINS_FOLDER", str(REPO / "plugins"))
        _clear_plugin_caches()
        airflow_app.purge_cached_app()
        try:
            yield airflow_app.create_app("core")
        finally:
            _clear_plugin_caches()
            airflow_app.purge_cached_app()


def bearer_tokens(client) -> dict[str, str]:
    """A JWT from ``POST /auth/token`` for each of the users in :data:`PASSWORDS`."""
    out = {}
    for user, password in PASSWORDS.items():
        r = client.post("/auth/token", json={"username": user, "password": password})
        assert r.status_code == 201, r.text
        out[user] = r.json()["access_token"]
    return out
