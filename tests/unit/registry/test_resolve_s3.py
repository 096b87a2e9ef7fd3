"""Base models from ``s3://`` (moto's server): downloaded once into the cache, refused if not a model folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from airloom.exceptions import UsageError
from airloom.registry.resolve import resolve_model


def test_s3_model_folder_is_downloaded_once(s3_store, tmp_path):
    for key, data in {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": b"w" * 100,
        "tokenizer/tokenizer.json": b"{}",
    }.items():
        s3_store.put_bytes(key, data)
    uri = s3_store.uri()
    first = resolve_model(uri, cache_dir=tmp_path / "cache", s3_client=s3_store.client)
    path = tmp_path / "cache" / "s3"
    assert first["ref"] == uri and first["path"].startswith(str(path))
    folder = Path(first["path"])
    assert (folder / "model.safetensors").read_bytes() == b"w" * 100
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    s3_store.put_bytes("model.safetensors", b"changed")  # the cache is not re-read from S3
    assert (
        resolve_model(uri, cache_dir=tmp_path / "cache", s3_client=s3_store.client)["path"] == first["path"]
    )


def test_s3_prefix_without_config_is_not_a_model(s3_store, tmp_path):
    s3_store.put_bytes("weights.bin", b"x")
    with pytest.raises(UsageError, match="not a model folder .no config.json among 1 objects"):
        resolve_model(s3_store.uri(), cache_dir=tmp_path, s3_client=s3_store.client)
