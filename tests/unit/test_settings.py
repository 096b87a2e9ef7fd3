"""airflow_env: the embedded Airflow's defaults, and values the user set winning over them."""

from __future__ import annotations

import os

from airloom.settings import airflow_env


def test_embedded_api_server_is_local_and_parallelism_fits_the_machine():
    env = airflow_env({})
    # the demo users' passwords are public: nothing but this machine may reach the api-server
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW__CORE__PARALLELISM"] == str(max(2, os.cpu_count() or 1))  # Airflow's default: 32


def test_values_the_user_set_win():
    env = airflow_env({"AIRFLOW__API__HOST": "0.0.0.0", "AIRFLOW__CORE__PARALLELISM": "8"})
    assert (env["AIRFLOW__API__HOST"], env["AIRFLOW__CORE__PARALLELISM"]) == ("0.0.0.0", "8")


def test_no_machine_sized_parallelism_for_a_cluster_executor():
    env = airflow_env({"AIRFLOW__CORE__EXECUTOR": "CeleryExecutor"})
    assert "AIRFLOW__CORE__PARALLELISM" not in env
