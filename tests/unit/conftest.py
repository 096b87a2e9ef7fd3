"""Shared unit-test fixtures: both store backends — a local folder, and S3 served by a real moto server over HTTP."""

from __future__ import annotations

import uuid

import pytest

from airloom.registry.store import LocalStore, ObjectStore, S3Store

BUCKET = "airloom-registry-tests"


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
def s3_store(moto_endpoint) -> S3Store:
    # A fresh prefix per test keeps tests independent while sharing one bucket and server.
    return S3Store(BUCKET, prefix=f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "registry")
    return request.getfixturevalue("s3_store")
