"""The two store primitives the registry relies on, on both backends."""

from __future__ import annotations

import pytest

from airloom.exceptions import ConflictError, RegistryError, UsageError
from airloom.registry.store import LocalStore, S3Store, open_store


def test_put_get_list_and_uri(store, tmp_path):
    etag = store.put_bytes("a/b/c.txt", b"hello")
    assert etag
    store.put_bytes("a/top.txt", b"x")
    src = tmp_path / "big.bin"
    src.write_bytes(b"\0" * 100_000)
    store.put_file("a/b/big.bin", src)
    assert store.get_bytes("a/b/c.txt") == b"hello"
    assert store.list("a/") == ["a/b/big.bin", "a/b/c.txt", "a/top.txt"]
    assert store.list("a/b/c") == ["a/b/c.txt"]
    assert store.list("nothing/") == []
    assert store.exists("a/top.txt") and not store.exists("a/missing.txt")
    store.download_file("a/b/big.bin", tmp_path / "out" / "big.bin")
    assert (tmp_path / "out" / "big.bin").read_bytes() == src.read_bytes()
    assert store.uri("a/top.txt").endswith("a/top.txt")


def test_missing_object_names_its_uri(store, tmp_path):
    with pytest.raises(RegistryError, match=r"no object at .*nope/x\.json"):
        store.get_bytes("nope/x.json")
    with pytest.raises(RegistryError, match=r"no object at .*nope/y"):
        store.download_file("nope/y", tmp_path / "y")
    assert store.get_with_etag("nope/x.json") is None


def test_exclusive_create(store):
    store.put_bytes("claims/1", b"first", if_none_match=True)
    with pytest.raises(ConflictError, match="already exists"):
        store.put_bytes("claims/1", b"second", if_none_match=True)
    assert store.get_bytes("claims/1") == b"first"


def test_compare_and_swap(store):
    store.put_if_match("alias.json", b"v1", None)
    with pytest.raises(ConflictError):
        store.put_if_match("alias.json", b"again", None)  # None means "must not exist"
    data, etag = store.get_with_etag("alias.json")
    assert data == b"v1"
    new_etag = store.put_if_match("alias.json", b"v2", etag)
    with pytest.raises(ConflictError, match="changed since it was read"):
        store.put_if_match("alias.json", b"stale writer", etag)
    assert store.get_with_etag("alias.json") == (b"v2", new_etag)
    with pytest.raises(ConflictError):
        store.put_if_match("gone.json", b"x", new_etag)


def test_bad_keys_are_refused(store):
    for key in ["", "/abs", "a/../b", "a//b", ".airloom-locks/x"]:
        with pytest.raises(UsageError, match="invalid object key"):
            store.put_bytes(key, b"x")


def test_local_store_hides_its_bookkeeping(tmp_path):
    store = LocalStore(tmp_path / "r")
    store.put_if_match("k.json", b"1", None)
    (tmp_path / "r" / ".airloom-tmp-leftover").write_bytes(b"crashed writer")
    assert (tmp_path / "r" / ".airloom-locks").is_dir()
    assert store.list("") == ["k.json"]


def test_open_store(tmp_path, moto_endpoint):
    local = open_store(str(tmp_path / "new" / "reg"))
    assert isinstance(local, LocalStore) and (tmp_path / "new" / "reg").is_dir()
    s3 = open_store("s3://airloom-registry-tests/some/prefix/")
    assert isinstance(s3, S3Store) and s3.prefix == "some/prefix"
    s3.put_bytes("k", b"v")  # default client honours AWS_ENDPOINT_URL
    assert s3.uri("k") == "s3://airloom-registry-tests/some/prefix/k"
    with pytest.raises(UsageError, match="no bucket"):
        open_store("s3:///prefix")
    with pytest.raises(UsageError, match="unsupported storage URI"):
        open_store("gs://bucket/x")
