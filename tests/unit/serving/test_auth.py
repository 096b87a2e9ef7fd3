"""API key sources and checks of ``airloom serve`` (no server: the HTTP side is in test_server.py)."""

from __future__ import annotations

import json
import logging

import pytest

from airloom.exceptions import UsageError
from airloom.serving.auth import ApiKeys, check_exposure, is_loopback, load_api_keys


def test_keys_from_a_file_the_env_list_and_the_airflow_connection(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# serving keys\nsk-file-1\n\n  sk-file-2  \n")
    conn = {
        "conn_type": "generic",
        "password": "sk-conn",
        "extra": {"api_keys": ["sk-extra-1", "sk-extra-2"]},
    }
    keys = load_api_keys(
        keys_file,
        environ={"AIRLOOM_API_KEYS": "sk-env-1, sk-env-2,", "AIRFLOW_CONN_AIRLOOM_SERVING": json.dumps(conn)},
    )
    assert len(keys) == 7
    assert keys.sources == [str(keys_file), "AIRLOOM_API_KEYS", "connection airloom_serving"]
    for key in ("sk-file-1", "sk-file-2", "sk-env-1", "sk-env-2", "sk-conn", "sk-extra-1", "sk-extra-2"):
        assert keys.check(f"Bearer {key}") and keys.check(f"bearer  {key} ")
    assert not keys.check("Bearer # serving keys") and not keys.check("Bearer sk-file")
    # only digests are kept, and describe() (what start-up logs) names sources, not keys
    assert "sk-file-1" not in repr(vars(keys)) and "sk-" not in keys.describe()


def test_file_from_the_env_and_connection_forms():
    assert load_api_keys(environ={}) is None
    uri = "generic://:s3cr%40t@/?api_keys=k1%2Ck2"
    keys = load_api_keys(environ={"AIRFLOW_CONN_AIRLOOM_SERVING": uri})
    assert keys.check("Bearer s3cr@t") and keys.check("Bearer k1") and keys.check("Bearer k2")
    # extra as a JSON string (how Airflow's JSON form often carries it), no password
    conn = json.dumps({"conn_type": "generic", "extra": json.dumps({"api_keys": "a,b"})})
    keys = load_api_keys(environ={"AIRFLOW_CONN_AIRLOOM_SERVING": conn})
    assert len(keys) == 2 and keys.check("Bearer b")
    extra_uri = "generic://?__extra__=" + json.dumps({"api_keys": ["c"]})
    assert load_api_keys(environ={"AIRFLOW_CONN_AIRLOOM_SERVING": extra_uri}).check("Bearer c")


@pytest.mark.parametrize(
    ("environ", "match"),
    [
        ({"AIRLOOM_API_KEYS": " , "}, "AIRLOOM_API_KEYS is set but holds no key"),
        ({"AIRFLOW_CONN_AIRLOOM_SERVING": "generic://host"}, "neither a password nor extra api_keys"),
        ({"AIRFLOW_CONN_AIRLOOM_SERVING": "{not json"}, "not valid JSON"),
        ({"AIRLOOM_API_KEYS_FILE": "/nonexistent/keys"}, "/nonexistent/keys: cannot read"),
    ],
)
def test_a_configured_source_without_keys_is_an_error(environ, match):
    with pytest.raises(UsageError, match=match):
        load_api_keys(environ=environ)


def test_an_empty_keys_file_is_an_error(tmp_path):
    (tmp_path / "keys").write_text("# none yet\n\n")
    with pytest.raises(UsageError, match=r"keys: the API keys file has no key"):
        load_api_keys(tmp_path / "keys", environ={})


def test_bearer_parsing():
    keys = ApiKeys(["sk-a"], ["test"])
    for bad in (None, "", "Bearer", "Bearer ", "sk-a", "Token sk-a", "Bearer sk-a2", "Bearer sk-"):
        assert not keys.check(bad), bad
    assert keys.check("Bearer sk-a")


def test_exposure_policy(caplog):
    keys = ApiKeys(["sk-a"], ["test"])
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    with caplog.at_level(logging.WARNING, logger="airloom.serving"):
        check_exposure("127.0.0.1", None)
    assert "no API key configured" in caplog.text
    check_exposure("0.0.0.0", keys)
    with pytest.raises(UsageError, match="--host 0.0.0.0 is reachable from other machines"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", None, insecure_no_auth=True)
    with pytest.raises(UsageError, match="contradicts"):
        check_exposure("0.0.0.0", keys, insecure_no_auth=True)
