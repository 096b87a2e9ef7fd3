"""Test-wide settings: every test gets its own AIRLOOM_HOME, so nothing touches the user's."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "airloom-registry-tests"
# Airflow reads its config at import: point it at a throwaway home before any test imports it.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airloom-test-airflow-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# The virtualenv's bin first on PATH for every process of the session, as airloom.settings.airflow_env puts
# it for Airflow's: torch JIT-builds DeepSpeed's ops with whichever `ninja` PATH finds, and the
# virtualenv's (1.13) and Debian's (1.11) hash build commands differently, so each would rebuild an op
# (60-120 s) the other had built whenever the suite went from Airflow-started training to a test's own.
_BIN = str(Path(sys.executable).parent)
if _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = os.pathsep.join(p for p in (_BIN, os.environ.get("PATH", "")) if p)

# Validation runs Great Expectations in a forked process (airloom.data.validate._GxRunner), which starts
# with whatever its parent imported: import it once here, not in each of the suite's ~100 validations.
import great_expectations  # noqa: E402, F401


@pytest.fixture(autouse=True)
def _airloom_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("airloom_home")
    monkeypatch.setenv("AIRLOOM_HOME", str(home))
    monkeypatch.delenv("AIRLOOM_REGISTRY", raising=False)
    # The deployment's sign-off settings (production sets them): tests that want them set them.
    for key in (
        "AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY",
        "AIRFLOW_VAR_AIRLOOM_SIGNOFF_APPROVERS",
        "AIRFLOW_VAR_AIRLOOM_SIGNOFF_MIN_APPROVALS",
        "AIRLOOM_API_URL",
        "AIRLOOM_API_TOKEN",
    ):
        monkeypatch.delenv(key, raising=False)
    return home


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server in a thread of this process; AWS_* (endpoint, fake credentials) set in the env."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_SESSION_TOKEN", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            _, port = server.get_host_and_port()
            endpoint = f"http://127.0.0.1:{port}"
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def moto_bucket(moto_endpoint) -> str:
    """A bucket on moto's server (shared; give each test its own prefix)."""
    return BUCKET
