"""Where tasks leave what the next task reads: the artifact store.

One setting, ``AIRLOOM_ARTIFACTS``: a local folder (default: ``AIRLOOM_HOME``, the embedded default, where
nothing is copied) or ``s3://bucket/prefix`` (production: workers share no disk). Keys mirror the layout
under ``AIRLOOM_HOME`` (``runs/<dag_id>/<run_id>/<task_id>/…``, ``datasets/<name>/<version>/…``,
``data/traffic/…``), so a task writes into its usual local folder and :meth:`Artifacts.publish` uploads it to
the same relative key; a path under ``AIRLOOM_HOME`` and its URI name the same artifact.

Two rules make hand-overs safe between machines:

- **Manifest last.** :meth:`Artifacts.publish` uploads every file of a folder, then writes
  ``_airloom_artifact.json`` (each file's size and sha256). A reader finds an artifact only through its
  manifest, so an upload cut short (a worker killed mid-way) is invisible; the retry publishes again
  and the manifest appears when every file is there.
- **Staged, verified, bounded.** :meth:`Artifacts.stage` downloads what a URI names (a file or a folder of an
  artifact) into a local cache keyed by the content's hashes, verifies size and sha256 of every file, and
  moves it into place in one rename; a second task on the worker that needs the same content reuses it.
  The cache is kept under ``AIRLOOM_CACHE_MAX_GB`` (default 50) by evicting what was used least recently.

The credentials are the caller's boto3 client (operators: the ``aws_default`` connection; the CLI: the
default chain and ``AWS_ENDPOINT_URL``). No Airflow imports.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airloom.exceptions import RegistryError, UsageError
from airloom.registry.store import ObjectStore, open_store, sha256_file
from airloom.settings import home

ARTIFACTS_ENV = "AIRLOOM_ARTIFACTS"
CACHE_ENV = "AIRLOOM_CACHE_MAX_GB"
MANIFEST = "_airloom_artifact.json"
_COMPLETE = ".complete"  # beside the files, so a staged model folder holds only the model's files
_FILES = "files"
TRANSFERS = 8  # files moved at once by publish and stage


def artifacts_uri() -> str:
    """The artifact store: ``$AIRLOOM_ARTIFACTS``, else ``AIRLOOM_HOME`` (local, nothing copied)."""
    return os.environ.get(ARTIFACTS_ENV) or str(home())


def is_remote(uri: str | os.PathLike[str] | None) -> bool:
    return str(uri or "").startswith("s3://")


class ArtifactIncomplete(RegistryError):
    """The URI names no complete artifact: never published, or an upload that was cut short."""


@dataclass(frozen=True)
class _Entry:
    key: str  # the object's key, relative to the store
    rel: str  # its path relative to what was asked for (a file: its own name)
    sha256: str
    size: int


class Artifacts:
    """The artifact store of this process: :func:`artifacts_uri` unless a URI is given.

    :param client: the boto3 S3 client to use for an ``s3://`` store (the connection's); None: boto3's default.
    :param cache_dir: where staged artifacts go; default ``$AIRLOOM_HOME/cache/artifacts`` (the worker's own disk).
    :param cache_max_bytes: the cache's bound; default ``$AIRLOOM_CACHE_MAX_GB`` (50 GB).
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        client: Any = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
    ) -> None:
        self.root = (uri or artifacts_uri()).rstrip("/")
        self.remote = is_remote(self.root)
        self.store: ObjectStore = open_store(self.root, client)
        self.cache_dir = Path(cache_dir) if cache_dir else home() / "cache" / "artifacts"
        if cache_max_bytes is None:
            cache_max_bytes = int(float(os.environ.get(CACHE_ENV) or 50) * 1e9)
        self.cache_max_bytes = cache_max_bytes

    def __repr__(self) -> str:
        return f"Artifacts({self.root!r})"

    # -- naming ------------------------------------------------------------------------------------

    def uri(self, key: str) -> str:
        return self.store.uri(key)

    def key_of(self, location: str | os.PathLike[str]) -> str | None:
        """The key a URI of this store, or a path under ``AIRLOOM_HOME``, names; None for anything else."""
        text = os.fspath(location).rstrip("/")
        for base in {self.root, str(home())}:
            if text.startswith(base + "/"):
                return text[len(base) + 1 :]
        return None

    def uri_of(self, path: str | os.PathLike[str]) -> str:
        """Where a local path under ``AIRLOOM_HOME`` lives in the store (itself when the store is local)."""
        key = self.key_of(path)
        if key is None or not self.remote:
            return os.fspath(path)
        return self.uri(key)

    def handover(self, value: Any) -> Any:
        """``value`` (an XCom result: dicts, lists, strings) with every path under ``AIRLOOM_HOME`` written
        as its URI in the store: what another worker can read. Unchanged for a local store."""
        if not self.remote:
            return value
        if isinstance(value, dict):
            return {k: self.handover(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.handover(v) for v in value)
        if isinstance(value, str) and value.startswith(str(home()) + "/"):
            return self.uri_of(value)
        return value

    # -- writing -----------------------------------------------------------------------------------

    def publish(self, folder: str | os.PathLike[str], key: str | None = None) -> str:
        """Upload every file under ``folder`` to ``key`` (default: the folder's place under
        ``AIRLOOM_HOME``), the manifest last; returns the artifact's URI. A local store holding the folder
        already gets only the manifest. Publishing again (a retry) replaces the artifact."""
        src = Path(folder)
        if not src.is_dir():
            raise UsageError(f"cannot publish {src}: not a folder")
        key = key or self.key_of(src.resolve())
        if not key:
            raise UsageError(f"cannot publish {src}: not under {home()}; name the key to publish it as")
        key = key.strip("/")
        in_place = not self.remote and Path(self.store.uri(key)).resolve() == src.resolve()
        # Readers must not pair an old manifest with new files: take it down first.
        if self.store.exists(f"{key}/{MANIFEST}"):
            self.store.delete_prefix(f"{key}/{MANIFEST}")
        paths = sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST)

        def upload(path: Path) -> tuple[str, dict[str, Any]]:
            rel = path.relative_to(src).as_posix()
            digest, size = sha256_file(path)
            if not in_place:
                self.store.put_file(f"{key}/{rel}", path)
            return rel, {"sha256": digest, "size": size}

        # Files go up side by side (a model is a few shards and many small files: request latency adds up).
        with ThreadPoolExecutor(max_workers=TRANSFERS) as pool:
            files = dict(pool.map(upload, paths))
        manifest = {
            "files": files,
            "bytes": sum(f["size"] for f in files.values()),
            "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.store.put_bytes(f"{key}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
        return self.uri(key)

    def put_json(self, key: str, data: Any) -> str:
        """One small JSON object (an index, a batch of records): a single PUT is atomic on S3."""
        self.store.put_bytes(key, json.dumps(data, indent=1, sort_keys=True, default=str).encode())
        return self.uri(key)

    # -- reading -----------------------------------------------------------------------------------

    def manifest(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """The artifact that holds ``key`` (itself or an ancestor folder): its key and manifest."""
        parts = key.strip("/").split("/")
        for depth in range(len(parts), 0, -1):
            base = "/".join(parts[:depth])
            got = self.store.get_with_etag(f"{base}/{MANIFEST}")
            if got is not None:
                return base, json.loads(got[0])
        return None

    def entries(self, location: str, beside: tuple[str, ...] = ()) -> list[_Entry]:
        """The files ``location`` (a URI of this store or a path under ``AIRLOOM_HOME``) names, from its
        artifact's manifest; ArtifactIncomplete when no complete artifact holds it. For a file, ``beside``
        adds the files of those names in its folder that the artifact has (a split's ``manifest.json``)."""
        key = self.key_of(location)
        if key is None:
            raise UsageError(f"{location} is not in the artifact store {self.root}")
        found = self.manifest(key)
        if found is None:
            raise ArtifactIncomplete(
                f"{self.uri(key)}: no complete artifact holds it (no {MANIFEST} beside or above it): "
                "it was never published, or its upload was cut short and its task has not yet been retried"
            )
        base, manifest = found
        sub = key[len(base) + 1 :] if key != base else ""
        files = manifest.get("files") or {}
        if sub in files:
            folder = sub.rpartition("/")[0]
            names = [sub.rpartition("/")[2], *(n for n in beside if f"{folder}/{n}".lstrip("/") in files)]
            return [
                _Entry(f"{base}/{rel}", name, files[rel]["sha256"], int(files[rel]["size"]))
                for name in dict.fromkeys(names)
                for rel in [f"{folder}/{name}".lstrip("/")]
            ]
        prefix = f"{sub}/" if sub else ""
        chosen = [
            _Entry(f"{base}/{rel}", rel[len(prefix) :], info["sha256"], int(info["size"]))
            for rel, info in sorted(files.items())
            if rel.startswith(prefix)
        ]
        if not chosen:
            raise ArtifactIncomplete(
                f"{self.uri(key)}: the artifact at {self.uri(base)} has no such file or folder"
            )
        return chosen

    def stage(
        self, location: str | os.PathLike[str], beside: tuple[str, ...] = (), *, hold: bool = False
    ) -> Path:
        """A local path with what ``location`` names. A local path (or a local store) comes back as it is;
        a URI of an ``s3://`` store is downloaded once into the cache, verified, and reused after. A file
        comes with the files named ``beside`` from its folder next to it (when its artifact has them).
        ``hold``: this process keeps a shared lock on the entry until it exits, so another task on the worker
        that makes room in the cache never deletes what this one is still reading (a task process is
        short-lived; the operators hold what they stage)."""
        text = os.fspath(location)
        if not is_remote(text):
            return Path(text)
        if not self.remote or self.key_of(text) is None:
            raise UsageError(f"{text} is not in the artifact store {self.root} ({ARTIFACTS_ENV})")
        chosen = self.entries(text, beside)
        single = self.key_of(text) == chosen[0].key
        digest = hashlib.sha256(
            json.dumps([[e.rel, e.sha256] for e in chosen] + [single]).encode()
        ).hexdigest()[:32]
        entry = self.cache_dir / digest
        for _ in range(3):  # an entry evicted between the check and the lock is staged again
            if (entry / _COMPLETE).is_file():
                os.utime(entry / _COMPLETE)  # recently used: evicted last
            else:
                self._download(chosen, entry)
                self._evict(keep=entry)
            if not hold or _hold(entry):
                break
        return entry / _FILES / chosen[0].rel if single else entry / _FILES

    def _download(self, chosen: list[_Entry], entry: Path) -> None:
        tmp = self.cache_dir / f".tmp-{uuid.uuid4().hex}"

        def fetch(e: _Entry) -> None:
            dest = tmp / _FILES / e.rel
            self.store.download_file(e.key, dest)
            digest, size = sha256_file(dest)
            if (digest, size) != (e.sha256, e.size):
                raise RegistryError(
                    f"{self.uri(e.key)}: downloaded {size} bytes with sha256 {digest[:12]}…, its manifest "
                    f"says {e.size} bytes {e.sha256[:12]}…; the object was changed after it was published"
                )

        try:
            with ThreadPoolExecutor(max_workers=TRANSFERS) as pool:
                list(pool.map(fetch, chosen))  # list(): the first failure raises here
            (tmp / _COMPLETE).write_text(json.dumps([e.key for e in chosen]))
            try:
                tmp.rename(entry)
            except OSError:  # another task on this worker staged the same content first
                if not (entry / _COMPLETE).is_file():
                    shutil.rmtree(entry, ignore_errors=True)
                    tmp.rename(entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used entries until the cache fits its bound (never ``keep``)."""
        if not self.cache_dir.is_dir():
            return
        entries = []
        for child in self.cache_dir.iterdir():
            marker = child / _COMPLETE
            if child == keep or child.name.startswith(".tmp-") or not marker.is_file():
                continue  # (.tmp-*: being staged or deleted by another task)
            size = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
            entries.append((marker.stat().st_mtime, size, child))
        total = sum(size for _, size, _ in entries) + sum(
            p.stat().st_size for p in keep.rglob("*") if p.is_file()
        )
        for _, size, child in sorted(entries):
            if total <= self.cache_max_bytes:
                break
            if _remove_unused(child):
                total -= size

    def read_bytes(self, location: str | os.PathLike[str]) -> bytes:
        """A small file named by a path or URI of this store, read without the cache."""
        text = os.fspath(location)
        if not is_remote(text):
            return Path(text).read_bytes()
        key = self.key_of(text)
        if key is None:
            raise UsageError(f"{text} is not in the artifact store {self.root}")
        return self.store.get_bytes(key)

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (manifests and every file)."""
        return self.store.list(prefix)


#: Shared locks on the cache entries this process uses (see :meth:`Artifacts.stage`'s ``hold``); the
#: kernel releases them when the process exits.
_HELD: list[int] = []


def _hold(entry: Path) -> bool:
    """Take a shared lock on ``entry`` for the rest of this process; False when it was evicted meanwhile."""
    try:
        fd = os.open(entry / _COMPLETE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    fcntl.flock(fd, fcntl.LOCK_SH)
    if not (entry / _COMPLETE).is_file():  # removed while we waited for the lock
        os.close(fd)
        return False
    _HELD.append(fd)
    return True


def _remove_unused(entry: Path) -> bool:
    """Delete a cache entry unless a process holds it; it leaves the cache in one rename first, so nobody
    finds it complete while it is being deleted."""
    try:
        fd = os.open(entry / _COMPLETE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a task on this worker is reading it
    else:
        trash = entry.with_name(f".tmp-{uuid.uuid4().hex}")
        entry.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True
    finally:
        os.close(fd)
