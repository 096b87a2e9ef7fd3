"""Shared unit-test fixtures: both store backends — a local folder, and S3 served by a real moto server over HTTP
(``moto_endpoint``, in tests/conftest.py)."""

from __future__ import annotations

import uuid

import pytest

from airloom.registry.store import LocalStore, ObjectStore, S3Store


@pytest.fixture
def s3_store(moto_bucket) -> S3Store:
    # A fresh prefix per test keeps tests independent while sharing one bucket and server.
    return S3Store(moto_bucket, prefix=f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "registry")
    return request.getfixturevalue("s3_store")
