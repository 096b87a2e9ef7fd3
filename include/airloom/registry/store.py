"""A tiny object store with two backends: a local folder and S3.

The registry needs only two atomic primitives, and both backends give them natively:
*create-if-absent* (claims, manifests, append-only records) and *compare-and-swap* (aliases).
Everything else is plain put/get/list. Keys are ``/``-separated relative paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from airloom.exceptions import ConflictError, RegistryError, UsageError

if TYPE_CHECKING:
    from collections.abc import Iterator

# Names the local backend uses for its own bookkeeping; list() never returns them.
_LOCK_DIR = ".airloom-locks"
_TMP_PREFIX = ".airloom-tmp-"
_CHUNK = 1 << 20


@runtime_checkable
class ObjectStore(Protocol):
    """What the registry needs from a storage backend."""

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> str:
        """Write ``data``; with ``if_none_match`` atomically refuse (ConflictError) if ``key`` exists."""
        ...

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Upload a file without reading it into memory (multipart on S3)."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """Read an object; a missing key raises RegistryError naming its URI."""
        ...

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        """Read an object and the etag to pass to :meth:`put_if_match`; None if missing."""
        ...

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        """Compare-and-swap: write only if the object still has ``etag`` (None: must not exist)."""
        ...

    def download_file(self, key: str, dest_path: str | os.PathLike[str]) -> None:
        """Stream an object to a local file."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (training checkpoints; registry versions are never deleted)."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix`` (recursive), sorted."""
        ...

    def uri(self, key: str = "") -> str:
        """Human-usable location of ``key``, for messages and lineage."""
        ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise UsageError(
            f"invalid object key {key!r}: use a relative '/'-separated path without '..' or '//'"
        )
    if parts[0] == _LOCK_DIR or any(p.startswith(_TMP_PREFIX) for p in parts):
        raise UsageError(f"invalid object key {key!r}: names starting with '.airloom-' are reserved")
    return key


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Streamed sha256 and size of a file (model shards are gigabytes)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def json_default(obj: Any) -> Any:
    """``json.dumps`` default of the registry and the model card: numpy scalars, datetimes and paths
    go through; anything else is a caller bug."""
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        return obj.item()
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class LocalStore:
    """An object store in a local (or network-mounted POSIX) folder, safe across processes.

    Readers never see half-written objects: data goes to a temp file in the target folder first,
    then is published with ``os.link`` (fails if the key exists: exclusive create) or ``os.replace``.
    The etag is the content's sha256; CAS holds a per-key ``flock`` across read-compare-replace.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file behind ``key`` (lets callers hash big files in place instead of copying)."""
        return self.root / _check_key(key)

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    # -- writing ---------------------------------------------------------------------------------

    def _temp_for(self, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"

    def _write_temp(self, target: Path, data: bytes) -> Path:
        tmp = self._temp_for(target)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _publish(self, tmp: Path, target: Path, key: str, *, exclusive: bool) -> None:
        try:
            if exclusive:
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    raise ConflictError(
                        f"object {self.uri(key)} already exists; it is created once and never overwritten"
                    ) from None
            else:
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        lock_dir = self.root / _LOCK_DIR
        lock_dir.mkdir(exist_ok=True)
        # One lock file per key, never deleted: deleting lock files reopens the race they close.
        lock_path = lock_dir / (hashlib.sha256(key.encode()).hexdigest() + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> str:
        target = self.path(key)
        tmp = self._write_temp(target, data)
        if if_none_match:
            self._publish(tmp, target, key, exclusive=True)
        else:
            with self._locked(key):
                self._publish(tmp, target, key, exclusive=False)
        return hashlib.sha256(data).hexdigest()

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        target = self.path(key)
        tmp = self._temp_for(target)
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise RegistryError(f"cannot copy {path} to {self.uri(key)}: {exc}") from exc
        with self._locked(key):
            self._publish(tmp, target, key, exclusive=False)

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        target = self.path(key)
        tmp = self._write_temp(target, data)
        try:
            with self._locked(key):
                current = self.get_with_etag(key)
                if etag is None and current is not None:
                    raise ConflictError(f"{self.uri(key)} was created by someone else; re-read it and retry")
                if etag is not None and (current is None or current[1] != etag):
                    raise ConflictError(f"{self.uri(key)} changed since it was read; re-read it and retry")
                self._publish(tmp, target, key, exclusive=False)
        finally:
            tmp.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    # -- reading ---------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise RegistryError(f"no object at {self.uri(key)}") from None

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return data, hashlib.sha256(data).hexdigest()

    def download_file(self, key: str, dest_path: str | os.PathLike[str]) -> None:
        src = self.path(key)
        if not src.is_file():
            raise RegistryError(f"no object at {self.uri(key)}")
        Path(dest_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest_path)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.path(key).unlink(missing_ok=True)
        return len(keys)

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != _LOCK_DIR]
                rel_dir = ""
            for fname in filenames:
                if fname.startswith(_TMP_PREFIX):
                    continue
                key = f"{rel_dir}/{fname}" if rel_dir else fname
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


class S3Store:
    """An object store in an S3 bucket (or any S3 API that supports conditional writes).

    Exclusive create uses ``If-None-Match: *`` and CAS uses ``If-Match: <etag>``; S3 evaluates
    both atomically server-side (since 2024), so no lock service is needed.
    """

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        if not bucket:
            raise UsageError("S3Store needs a bucket name, e.g. s3://my-bucket/airloom")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
        self.client = client

    def __repr__(self) -> str:
        return f"S3Store({self.uri()!r})"

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str = "") -> str:
        full = self._key(key) if key else self.prefix
        return f"s3://{self.bucket}/{full}" if full else f"s3://{self.bucket}"

    @staticmethod
    def _code(exc: Exception) -> str:
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code or str(status or "")

    def _error(self, exc: Exception, key: str, doing: str) -> RegistryError:
        return RegistryError(f"S3 {doing} {self.uri(key)} failed: {exc}")

    def _put(self, key: str, data: bytes, **conditions: str) -> str:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **conditions)
        except ClientError as exc:
            code = self._code(exc)
            # 412: condition failed; 409: a concurrent conditional write won; 404 on If-Match: object gone.
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or (
                "IfMatch" in conditions and code in ("NoSuchKey", "404")
            ):
                what = "already exists" if "IfNoneMatch" in conditions else "changed since it was read"
                raise ConflictError(f"{self.uri(key)} {what}; re-read it and retry") from exc
            raise self._error(exc, key, "put") from exc
        return resp["ETag"]

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> str:
        return self._put(key, data, **({"IfNoneMatch": "*"} if if_none_match else {}))

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        return self._put(key, data, **({"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError

        try:
            self.client.upload_file(str(path), self.bucket, self._key(key))
        except (ClientError, S3UploadFailedError, OSError) as exc:
            raise self._error(exc, key, f"upload of {path} to") from exc

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, key, "get") from exc
        return resp["Body"].read(), resp["ETag"]

    def get_bytes(self, key: str) -> bytes:
        got = self.get_with_etag(key)
        if got is None:
            raise RegistryError(f"no object at {self.uri(key)}")
        return got[0]

    def download_file(self, key: str, dest_path: str | os.PathLike[str]) -> None:
        from botocore.exceptions import ClientError

        Path(dest_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(dest_path))
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                raise RegistryError(f"no object at {self.uri(key)}") from None
            raise self._error(exc, key, "download of") from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._error(exc, key, "head") from exc
        return True

    def list(self, prefix: str = "") -> list[str]:
        from botocore.exceptions import ClientError

        base = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix
            ):
                keys.extend(obj["Key"][len(base) :] for obj in page.get("Contents", []))
        except ClientError as exc:
            raise RegistryError(f"S3 list of {self.uri()}/{prefix} failed: {exc}") from exc
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)


def open_store(uri: str | os.PathLike[str], client: Any = None) -> ObjectStore:
    """``s3://bucket/prefix`` → :class:`S3Store` (through ``client``, else boto3's default chain); anything
    else is a local folder (created if missing)."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise UsageError(f"storage URI {text!r} has no bucket; write it as s3://<bucket>/<prefix>")
        return S3Store(parsed.netloc, parsed.path.strip("/"), client=client)
    if "://" in text and not text.startswith("file://"):
        raise UsageError(f"unsupported storage URI {text!r}: use s3://bucket/prefix or a local path")
    return LocalStore(text.removeprefix("file://"))
