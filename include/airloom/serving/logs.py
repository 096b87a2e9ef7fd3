"""Traffic and feedback records as daily JSONL partitions, PII masked before anything is written.

Layout (the one ``llm_eval_backfill`` reads with :func:`airloom.evaluation.backfill.read_partition` and
``llm_feedback_monitoring`` with :class:`airloom.data.partitions.DailyPartitions`)::

    <traffic-root>/ds=YYYY-MM-DD/<file>.jsonl     one line per generated choice
    <feedback-root>/ds=YYYY-MM-DD/<file>.jsonl    one line per feedback post

``ds`` is the UTC date the record was created. Where the lines go depends on the root:

- **a folder** (the embedded default, ``AIRLOOM_HOME/data/traffic``): one file per server process and
  day, ``part-<pid>.jsonl``, appended line by line under a lock, so several workers never interleave
  inside a line.
- **s3://bucket/prefix** (the artifact store on S3, ``AIRLOOM_ARTIFACTS``: production): records are
  buffered in memory and written as one object per batch, ``ds=<date>/<host>-<pid>-<token>-<seq>.jsonl``
  (:class:`BatchedObjectWriter`), by a background thread: requests never wait on S3. A batch is cut when
  it holds ``records`` records or ``seconds`` after its first record, whichever comes first, and on
  shutdown (:meth:`PartitionedJsonl.close`). Each object is one conditional PUT: a reader never sees half
  a batch, and a retry after a lost answer never writes a batch twice. While S3 is down, batches are
  retried with backoff and kept in memory up to ``buffer_bytes``; beyond that new records are dropped,
  counted (``/metrics``, ``/healthz``) and logged at ERROR. What is still unsent when a shutdown gives up
  waiting is written to ``AIRLOOM_HOME/data/unsent/`` and logged at ERROR with the path.

A traffic line has ``id``, ``prompt`` (what the model saw) and ``response`` (what it answered) —
the fields the backfill needs — plus ``response_id`` (the API id feedback refers to), ``model``
(``NAME/VERSION``), ``latency_ms``, ``prompt_tokens``, ``completion_tokens``, ``finish_reason``,
``created`` and ``pii_masked`` (replacements per field and kind). Note that ``response`` is the served
output, not a reference answer: evaluating traffic measures agreement with what was served; the
corrected answers in feedback are the references.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def scrub(record: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """Mask PII in ``fields`` (strings, or lists of chat messages) with the data stage's scrubber."""
    from airloom.data.text import scrub_pii

    out = dict(record)
    masked: dict[str, dict[str, int]] = {}

    for name in fields:
        counts: dict[str, int] = {}

        def one(text: str, counts=counts) -> str:
            clean, found = scrub_pii(text)
            for kind, n in found.items():
                counts[kind] = counts.get(kind, 0) + n
            return clean

        value = out.get(name)
        if isinstance(value, str):
            out[name] = one(value)
        elif isinstance(value, list):
            out[name] = [
                {**m, "content": one(m["content"])}
                if isinstance(m, dict) and isinstance(m.get("content"), str)
                else one(m)
                if isinstance(m, str)
                else m
                for m in value
            ]
        if counts:
            masked[name] = counts
    # Per field, so monitoring can tell a PII leak in an answer from PII a user typed.
    out["pii_masked"] = masked
    return out


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Batching:
    """How records go to an ``s3://`` log root (ignored for a folder).

    :param records: a batch is written once it holds this many records ...
    :param seconds: ... or this long after its first record, whichever comes first.
    :param buffer_bytes: the most the log keeps in memory (batches not yet written, S3 down included);
        records beyond it are dropped and counted.
    """

    records: int = 1000
    seconds: float = 60.0
    buffer_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        from airloom.exceptions import UsageError

        if self.records < 1 or self.seconds <= 0 or self.buffer_bytes < 1:
            raise UsageError(
                f"log batching needs records >= 1, seconds > 0 and a buffer of at least 1 byte; got {self}"
            )


class BatchedObjectWriter:
    """Records buffered in memory and written to ``store`` as one object per batch and day, by a thread
    of its own (started with the first record), so the caller never waits on the store.

    Object keys are ``ds=<date>/<host>-<pid>-<token>-<seq>.jsonl``: the random token keeps a restarted
    process (pid 1 again in a container) from reusing a name. A batch's key and bytes are fixed when it is
    cut; the PUT is conditional (If-None-Match), so a retry whose first try did land finds the object
    there and counts it written, never duplicated. Batches are written in order; a failed PUT is retried
    with backoff (1 s doubling to 30 s) while later records queue behind it, up to ``buffer_bytes``.
    """

    def __init__(
        self,
        store: Any,
        batching: Batching | None = None,
        *,
        name: str = "log",
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.store = store
        self.batching = batching or Batching()
        self.name = name
        self._spill_dir = Path(spill_dir) if spill_dir else None
        self._cond = threading.Condition()
        self._open: dict[str, list[bytes]] = {}  # ds -> lines of the batch being filled
        self._open_records = 0
        self._open_since: float | None = None  # monotonic time of the open batch's first record
        self._ready: deque[tuple[str, bytes, int]] = deque()  # (key, data, records) cut, not yet written
        self._bytes = 0  # open + ready: what the buffer bound counts
        self._seq = itertools.count()
        self._token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_drop_log = 0.0
        self.stats: dict[str, Any] = {
            "objects_written": 0,
            "records_written": 0,
            "records_dropped": 0,
            "upload_failures": 0,
            "last_error": None,
        }

    # -- the caller's side (request handlers): memory only ------------------------------------------

    def add(self, records: list[dict[str, Any]], ds: str) -> None:
        lines = [(json.dumps(r, ensure_ascii=False) + "\n").encode() for r in records]
        size = sum(len(line) for line in lines)
        with self._cond:
            if self._closed or self._bytes + size > self.batching.buffer_bytes:
                self._drop(len(lines), "the log is closed" if self._closed else "the buffer is full")
                return
            self._open.setdefault(ds, []).extend(lines)
            self._open_records += len(lines)
            self._bytes += size
            if self._open_since is None:
                self._open_since = time.monotonic()
            if self._open_records >= self.batching.records:
                self._cut()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"airloom-{self.name}-writer", daemon=True
                )
                self._thread.start()
                atexit.register(self.close)  # an app run without lifespan events still writes its last batch
            self._cond.notify_all()

    def pending(self) -> dict[str, int]:
        """Records and bytes held in memory, not yet in the store."""
        with self._cond:
            records = self._open_records + sum(n for _, _, n in self._ready)
            return {"records": records, "bytes": self._bytes}

    def flush(self, timeout: float | None = None) -> bool:
        """Cut the open batch and wait until everything buffered is written; False if ``timeout`` passed first."""
        with self._cond:
            if self._open_records:
                self._cut()
                self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._ready and not self._open_records, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is buffered (waiting at most ``timeout`` seconds), then stop the thread. What could not
        be written by then (S3 down) goes to the spill folder, with an ERROR naming it. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            if self._open_records:
                self._cut()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            left = list(self._ready)
            self._ready.clear()
            self._bytes = 0
            self._cond.notify_all()
        if left:
            self._spill(left)

    # -- the writer thread -------------------------------------------------------------------------

    def _cut(self) -> None:
        """Turn the open batch into one ready object per day (the lock is held)."""
        for ds, lines in sorted(self._open.items()):
            key = f"ds={ds}/{self._token}-{next(self._seq):06d}.jsonl"
            self._ready.append((key, b"".join(lines), len(lines)))
        self._open.clear()
        self._open_records = 0
        self._open_since = None

    def _next(self) -> tuple[str, bytes, int] | None:
        """The next batch to write, waiting for one; None once closed with nothing left."""
        with self._cond:
            while True:
                wait = None
                if not self._ready and self._open_since is not None:
                    wait = self.batching.seconds - (time.monotonic() - self._open_since)
                    if self._closed or wait <= 0:
                        self._cut()
                if self._ready:
                    return self._ready[0]
                if self._closed:
                    return None
                self._cond.wait(wait)

    def _run(self) -> None:
        from airloom.exceptions import ConflictError

        failures = 0
        while (batch := self._next()) is not None:
            key, data, records = batch
            try:
                self.store.put_bytes(key, data, if_none_match=True)
            except ConflictError:
                pass  # an earlier try of this very batch landed (its answer was lost): written once
            except Exception as exc:  # noqa: BLE001 - S3 down, throttled, credentials: retry, never raise
                failures += 1
                delay = 0.5 if self._closed else min(30.0, 2.0 ** (failures - 1))
                with self._cond:
                    self.stats["upload_failures"] += 1
                    self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
                    pending = self._open_records + sum(n for _, _, n in self._ready)
                    log.error(
                        "%s log: writing %s failed (try %d; %d records, %d bytes held in memory, retrying in "
                        "%.1f s): %s",
                        self.name,
                        self.store.uri(key),
                        failures,
                        pending,
                        self._bytes,
                        delay,
                        exc,
                    )
                    # New records notify too: only close() cuts the backoff short (then 0.5 s between tries).
                    deadline = time.monotonic() + delay
                    while (left := deadline - time.monotonic()) > 0:
                        closing = self._closed
                        self._cond.wait(left)
                        if self._closed and not closing:
                            break
                continue
            if failures:
                log.warning("%s log: writing works again after %d failed tries", self.name, failures)
            failures = 0
            with self._cond:
                if self._ready and self._ready[0][0] == key:
                    self._ready.popleft()
                    self._bytes -= len(data)
                self.stats["objects_written"] += 1
                self.stats["records_written"] += records
                self._cond.notify_all()

    def _drop(self, n: int, why: str) -> None:
        """Count ``n`` records lost; ERROR at most once a minute (the lock is held)."""
        self.stats["records_dropped"] += n
        now = time.monotonic()
        if now - self._last_drop_log >= 60 or self.stats["records_dropped"] == n:
            self._last_drop_log = now
            log.error(
                "%s log: %s (%d bytes held, the bound is %d; last write error: %s): dropping records, "
                "%d dropped so far",
                self.name,
                why,
                self._bytes,
                self.batching.buffer_bytes,
                self.stats["last_error"],
                self.stats["records_dropped"],
            )

    def _spill(self, batches: list[tuple[str, bytes, int]]) -> None:
        records = sum(n for _, _, n in batches)
        if self._spill_dir is None:
            self.stats["records_dropped"] += records
            log.error(
                "%s log: shutting down with %d records not written to %s: lost",
                self.name,
                records,
                self.store.uri(),
            )
            return
        try:
            for key, data, _ in batches:
                path = self._spill_dir / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        except OSError as exc:
            self.stats["records_dropped"] += records
            log.error(
                "%s log: %d records not written to %s, nor to %s (%s): lost",
                self.name,
                records,
                self.store.uri(),
                self._spill_dir,
                exc,
            )
            return
        log.error(
            "%s log: shutting down with %d records not written to %s (last error: %s): they are in %s; "
            "upload that folder's ds=*/ objects there when S3 is back",
            self.name,
            records,
            self.store.uri(),
            self.stats["last_error"],
            self._spill_dir,
        )


class PartitionedJsonl:
    """Daily JSONL partitions under ``root``: a folder (``ds=<date>/part-<pid>.jsonl``, appended) or
    ``s3://bucket/prefix`` (one object per batch, :class:`BatchedObjectWriter`).

    :param client: the boto3 S3 client for an ``s3://`` root; None: boto3's default (and ``AWS_ENDPOINT_URL``).
    :param batching: batch size, age and memory bound for an ``s3://`` root.
    """

    NAME = "log"

    def __init__(self, root: str | Path, *, client: Any = None, batching: Batching | None = None) -> None:
        text = os.fspath(root)
        self.remote = text.startswith("s3://")
        self.root: Any = text.rstrip("/") if self.remote else Path(root)
        self._lock = threading.Lock()
        self.writer: BatchedObjectWriter | None = None
        if self.remote:
            from airloom.registry.store import open_store
            from airloom.settings import home

            self.writer = BatchedObjectWriter(
                open_store(text, client),
                batching,
                name=self.NAME,
                spill_dir=home() / "data" / "unsent" / self.NAME,
            )

    def path(self, ds: str) -> Path:
        return Path(self.root) / f"ds={ds}" / f"part-{os.getpid()}.jsonl"

    def append(self, records: list[dict[str, Any]], ds: str) -> Path | str:
        """Write ``records`` to ``ds``'s partition: appended to this process's file, or buffered for the
        next batch object (returns the partition's URI)."""
        if self.writer is not None:
            self.writer.add(records, ds)
            return f"{self.root}/ds={ds}"
        path = self.path(ds)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(data)
        return path

    def flush(self, timeout: float | None = None) -> bool:
        """Everything logged so far is in the store (a folder: always)."""
        return True if self.writer is None else self.writer.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is buffered and stop (the server's shutdown); a folder has nothing to do."""
        if self.writer is not None:
            self.writer.close(timeout)

    def stats(self) -> dict[str, Any] | None:
        """For /healthz and /metrics: the batching writer's counters and what it holds (None for a folder)."""
        if self.writer is None:
            return None
        return {"root": self.root, **self.writer.stats, "pending": self.writer.pending()}


class TrafficLog(PartitionedJsonl):
    """Traffic partitions plus a bounded in-memory index of recent response ids (for feedback)."""

    NAME = "traffic"
    SCRUBBED = ("prompt", "response", "messages")

    def __init__(
        self,
        root: str | Path,
        *,
        remember: int = 100_000,
        lookup_days: int = 7,
        client: Any = None,
        batching: Batching | None = None,
    ) -> None:
        super().__init__(root, client=client, batching=batching)
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._remember = remember
        self.lookup_days = lookup_days
        # s3:// root: objects already read by find() (they never change) and where each response id is
        self._scanned: set[str] = set()
        self._where: OrderedDict[str, str] = OrderedDict()
        self._scan_lock = threading.Lock()

    def write(self, records: list[dict[str, Any]], when: datetime) -> list[dict[str, Any]]:
        ds = when.astimezone(UTC).date().isoformat()
        clean = [scrub(r, self.SCRUBBED) for r in records]
        self.append(clean, ds)
        with self._lock:
            for r in clean:
                self._recent[r["response_id"]] = _found(ds, r)
                self._recent.move_to_end(r["response_id"])
            while len(self._recent) > self._remember:
                self._recent.popitem(last=False)
        return clean

    def find(self, response_id: str, today: datetime | None = None) -> dict[str, Any] | None:
        """The logged (scrubbed) record of ``response_id``: memory first, then the last ``lookup_days``
        partitions (on S3: the objects written so far, other servers' included; a batch still in another
        server's memory is not there yet)."""
        with self._lock:
            hit = self._recent.get(response_id)
        if hit is not None:
            return hit
        today = (today or utc_now()).astimezone(UTC).date()
        days = [(today - timedelta(days=k)).isoformat() for k in range(self.lookup_days)]
        if self.writer is not None:
            return self._find_in_store(response_id, days)
        needle = json.dumps(response_id)
        for ds in days:
            part = self.root / f"ds={ds}"
            for f in sorted(part.glob("*.jsonl")) if part.is_dir() else []:
                with f.open(encoding="utf-8") as fh:
                    for line in fh:
                        if needle not in line:  # cheap filter before parsing
                            continue
                        try:
                            r = json.loads(line)
                        except ValueError:
                            continue
                        if r.get("response_id") == response_id:
                            return _found(ds, r)
        return None

    def _find_in_store(self, response_id: str, days: list[str]) -> dict[str, Any] | None:
        """Objects are immutable: each is read once, its response ids indexed (bounded, as the memory
        index), and read again only for a hit. Blocking: the app calls it off the event loop."""
        assert self.writer is not None
        with self._scan_lock:
            key = self._scan(response_id, days)
        if key is None:
            return None
        ds = key.split("/", 1)[0].removeprefix("ds=")
        for r in _lines(self.writer.store.get_bytes(key)):
            if r.get("response_id") == response_id:
                return _found(ds, r)
        return None

    def _scan(self, response_id: str, days: list[str]) -> str | None:
        assert self.writer is not None
        store = self.writer.store
        window = {f"ds={ds}" for ds in days}
        key = self._where.get(response_id)
        if key is not None and key.split("/", 1)[0] not in window:
            return None  # a response older than lookup_days
        if key is None:
            self._scanned = {k for k in self._scanned if k.split("/", 1)[0] in window}  # days gone: forgotten
            for ds in days:
                for candidate in store.list(f"ds={ds}/"):
                    if candidate in self._scanned or not candidate.endswith(".jsonl"):
                        continue
                    for r in _lines(store.get_bytes(candidate)):
                        if isinstance(r.get("response_id"), str):
                            self._where[r["response_id"]] = candidate
                    self._scanned.add(candidate)
                    while len(self._where) > self._remember:
                        self._where.popitem(last=False)
                if response_id in self._where:
                    break
            key = self._where.get(response_id)
        return key


def _found(ds: str, r: dict[str, Any]) -> dict[str, Any]:
    return {"ds": ds, "model": r.get("model"), "prompt": r.get("prompt"), "response": r.get("response")}


def _lines(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.decode("utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            out.append(r)
    return out


class FeedbackLog(PartitionedJsonl):
    NAME = "feedback"
    SCRUBBED = ("corrected_answer", "comment")

    def write(self, record: dict[str, Any], when: datetime) -> dict[str, Any]:
        clean = scrub(record, self.SCRUBBED)
        self.append([clean], when.astimezone(UTC).date().isoformat())
        return clean
