"""Append-only, hash-chained record streams (the audit trail, sign-offs) over an object store.

A stream is one folder of records::

    <stream>/<seq:08d>.json   one record, created once, naming its predecessor's sha256
    <stream>/HEAD             the stream's newest seq and sha256, moved by compare-and-swap

Each record names its predecessor's sha256 (over the exact stored bytes) and its own ``seq``; the key is
derived from ``seq`` and created only if absent, so two writers can never chain onto the same predecessor.
``HEAD`` anchors the newest record, so removing it is detected too. Records written before chaining
(``<time>-<uuid>.json``, no ``seq``) still read; :meth:`RecordLog.verify` counts them as unchained
(legacy), and the first chained record of a stream pins a digest of them.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from airloom.exceptions import ConflictError, RegistryError, UsageError
from airloom.registry.store import ObjectStore, json_default

HEAD = "HEAD"
CHAIN_FIELDS = ("seq", "prev_sha256", "record_sha256")
"""Set by :meth:`RecordLog.append`; a caller's record must not bring them."""
PROBLEMS = ("edited", "removed", "reordered", "inserted", "truncated-tail", "unanchored", "unaudited")
"""What :meth:`RecordLog.verify` (and the registry's alias check, ``unaudited``) may find wrong."""
_SEQ_KEY_RE = re.compile(r"(\d{8,})\.json")
_MAX_APPEND_RETRIES = 200
_MAX_HEAD_RETRIES = 50
# How long verify waits for a writer between storing its record and moving HEAD.
_HEAD_GRACE_S = 0.5


def dumps(obj: Any, what: str) -> bytes:
    """The registry's one JSON encoding (sorted keys: the bytes, and so their sha256, are stable)."""
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=json_default).encode()
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} must be JSON-serialisable (str, numbers, lists, dicts): {exc}") from None


def as_utc(when: datetime) -> datetime:
    """Naive datetimes are taken as UTC."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def self_hash(record: dict[str, Any]) -> str:
    """sha256 of the record as stored, without its own ``record_sha256``: catches an in-place edit."""
    return _sha256(dumps({k: v for k, v in record.items() if k != "record_sha256"}, "record"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_key(prefix: str, seq: int) -> str:
    return f"{prefix}{seq:08d}.json"


def _seq_of(prefix: str, key: str) -> int | None:
    """The seq a chained record's key names; None for any other key."""
    m = _SEQ_KEY_RE.fullmatch(key[len(prefix) :])
    return int(m[1]) if m else None


def _record_stem(at: datetime) -> str:
    # Basic ISO 8601 (no colons) sorts lexically by time; the uuid keeps concurrent writers apart.
    return f"{at.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex}"


def _record_sort_key(record: dict[str, Any]) -> tuple[datetime, int, int, str]:
    # By time as before chaining; chained records that share a timestamp fall back to their chain order.
    seq = record.get("seq")
    position = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    return (
        as_utc(datetime.fromisoformat(record["at"])),
        int(position is not None),
        position or 0,
        str(record.get("id", "")),
    )


def _parse_at(value: Any) -> datetime | None:
    try:
        return as_utc(datetime.fromisoformat(value)) if isinstance(value, str) else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RecordFinding:
    """One thing wrong with a stream of records: ``problem`` is one of :data:`PROBLEMS`."""

    stream: str
    key: str
    uri: str
    problem: str
    detail: str

    def __str__(self) -> str:
        return f"{self.problem}: {self.uri}: {self.detail}"


@dataclass
class StreamSummary:
    """One stream (a folder of chained records): how many chained and unchained (legacy) records."""

    stream: str
    uri: str
    chained: int
    legacy: int
    head_seq: int | None


@dataclass
class RecordsReport:
    """What a verification found: ``ok`` when no stream shows tampering."""

    registry: str
    streams: list[StreamSummary] = field(default_factory=list)
    findings: list[RecordFinding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "registry": self.registry,
            "ok": self.ok,
            "streams": [asdict(s) for s in self.streams],
            "findings": [asdict(f) for f in self.findings],
        }


class _Stored(NamedTuple):
    key: str
    data: bytes
    record: dict[str, Any] | None  # None: not a JSON object


class RecordLog:
    """Append, read and verify the hash-chained record streams in ``store``.

    :param clock: stamps a record's ``at`` (and its default ``id``) when the caller gives none.
    """

    def __init__(self, store: ObjectStore, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.clock = clock

    # -- writing -------------------------------------------------------------------------------------

    def append(self, prefix: str, record: dict[str, Any]) -> dict[str, Any]:
        """Append ``record`` to the stream under ``prefix``; returns it as stored.

        ``at`` and ``id`` are set if absent; ``seq`` (1, 2, ...), ``prev_sha256`` (sha256 of the
        predecessor's stored bytes, None for the first) and ``record_sha256`` (its own hash without that
        field) always. The record is created at ``<prefix><seq:08d>.json`` only if absent: a writer that
        loses the race for a seq re-reads the tail and chains onto the winner's record. Then ``HEAD``
        moves by compare-and-swap.
        """
        if not prefix.endswith("/"):
            raise UsageError(f"record prefix must end with '/', got {prefix!r}")
        clash = sorted(set(CHAIN_FIELDS) & set(record))
        if clash:
            raise UsageError(f"record fields {clash} are set by the registry's hash chain; leave them out")
        at = self.clock()
        record = {"at": at.isoformat(), **record}
        record.setdefault("id", _record_stem(at))
        for attempt in range(_MAX_APPEND_RETRIES):
            seq, prev, head_etag = self._tail(prefix)
            stored: dict[str, Any] = {**record, "seq": seq + 1, "prev_sha256": prev}
            if seq == 0 and (legacy := self._legacy_digest(prefix)) is not None:
                stored["legacy_records"] = legacy
            stored["record_sha256"] = self_hash(stored)
            data = dumps(stored, "record")
            if self._create(_record_key(prefix, seq + 1), data):
                self._advance_head(prefix, seq + 1, _sha256(data), head_etag)
                return stored
            time.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))  # spread out a crowd of writers
        raise ConflictError(
            f"could not append to {self.store.uri(prefix)}: lost the race for the next record "
            f"{_MAX_APPEND_RETRIES} times; retry later"
        )

    def _create(self, key: str, data: bytes) -> bool:
        """Create ``key`` if absent; True if ``data`` is what it holds afterwards."""
        try:
            self.store.put_bytes(key, data, if_none_match=True)
        except ConflictError:
            return False
        # Read back: a server whose If-None-Match check and write are not atomic (moto's) can let two
        # writers "create" the key; the later write holds it, the other writer retries.
        return (self.store.get_with_etag(key) or (b"", ""))[0] == data

    def _tail(self, prefix: str) -> tuple[int, str | None, str | None]:
        """The newest record's seq and sha256 (0, None for an empty stream) and the head's etag.

        The head may lag by a record whose writer stopped before moving it: probe the keys after it.
        """
        head, etag = _read_head(self.store, prefix)
        seq, sha = 0, None
        if head is not None:
            seq, sha = int(head["seq"]), str(head["sha256"])
        elif seqs := self._chained_seqs(prefix):
            seq, sha = seqs[-1], _sha256(self.store.get_bytes(_record_key(prefix, seqs[-1])))
        while (got := self.store.get_with_etag(_record_key(prefix, seq + 1))) is not None:
            seq, sha = seq + 1, _sha256(got[0])
        return seq, sha, etag

    def _chained_seqs(self, prefix: str) -> list[int]:
        return sorted(s for k in self.store.list(prefix) if (s := _seq_of(prefix, k)) is not None)

    def _advance_head(self, prefix: str, seq: int, sha: str, etag: str | None) -> None:
        """Move HEAD forward to ``seq`` unless a later writer already moved it further."""
        doc = dumps({"seq": seq, "sha256": sha, "key": _record_key(prefix, seq)}, "head")
        for _ in range(_MAX_HEAD_RETRIES):
            try:
                self.store.put_if_match(prefix + HEAD, doc, etag)
            except ConflictError:
                pass
            # Read back whether or not the CAS "won": on a server that does not check If-Match
            # atomically an older head can land over ours, and then it must be moved again.
            head, etag = _read_head(self.store, prefix)
            if head is not None and int(head["seq"]) >= seq:
                return
        # The record is stored and chained; a lagging head is caught up by the next append.

    def _legacy_digest(self, prefix: str) -> dict[str, Any] | None:
        """Count and digest of the unchained records already in the stream, pinned by its first chained one."""
        legacy = [
            k
            for k in self.store.list(prefix)
            if k.endswith(".json") and "/" not in k[len(prefix) :] and _seq_of(prefix, k) is None
        ]
        if not legacy:
            return None
        return {"count": len(legacy), "sha256": _digest_of(self.store, prefix, legacy)}

    # -- reading -------------------------------------------------------------------------------------

    def read(self, prefix: str) -> list[dict[str, Any]]:
        """All records under ``prefix``, oldest first (ties broken by chain order, then id)."""
        records = [
            json.loads(self.store.get_bytes(k)) for k in self.store.list(prefix) if k.endswith(".json")
        ]
        return sorted(records, key=_record_sort_key)

    # -- verifying -----------------------------------------------------------------------------------

    def uri(self, key: str) -> str:
        """A key's URI; a folder (a stream) keeps its trailing '/'."""
        return _uri(self.store, key)

    def finding(self, stream: str, key: str, problem: str, detail: str) -> RecordFinding:
        return RecordFinding(stream, key, _uri(self.store, key), problem, detail)

    def verify(
        self, stream: str, report: RecordsReport, keys: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Add the stream's findings and summary to ``report``; returns the records that parsed.

        The chain is walked by seq: a record whose bytes no longer hash to what its successor (or HEAD,
        for the newest) names is *edited*; a missing seq is *removed*, or *truncated-tail* past the last
        record while HEAD names a later one; a record under another seq's key is *reordered*; an
        unchained record that the chain did not pin, or a chained one outside the chain's keys, is
        *inserted*; records past HEAD are *unanchored*. Unchained records written before chaining are
        counted as legacy, not as tampering. ``keys`` (the stream's objects, from a listing the caller
        already has) default to a fresh listing.
        """
        if keys is None:
            keys = [k for k in self.store.list(stream) if "/" not in k[len(stream) :]]
        check = _StreamCheck(self.store, stream, report)
        check.load(keys)
        check.check_head()
        check.check_records()
        check.check_gaps()
        check.check_links()
        legacy = check.check_unchained()
        report.streams.append(
            StreamSummary(stream, self.uri(stream), len(check.chained), legacy, check.head_seq)
        )
        return [s.record for s in [*check.chained.values(), *check.unchained] if s.record is not None]


def _uri(store: ObjectStore, key: str) -> str:
    return store.uri(key.rstrip("/")) + ("/" if key.endswith("/") else "")


def _read_head(store: ObjectStore, prefix: str) -> tuple[dict[str, Any] | None, str | None]:
    """The stream's HEAD and its etag (None, None when absent); RegistryError when it is unreadable."""
    got = store.get_with_etag(prefix + HEAD)
    if got is None:
        return None, None
    try:
        head = json.loads(got[0])
        if not isinstance(head.get("seq"), int) or not isinstance(head.get("sha256"), str):
            raise ValueError("seq and sha256 missing")
    except (ValueError, AttributeError) as exc:
        raise RegistryError(
            f"{store.uri(prefix + HEAD)}: the stream head is unreadable ({exc}); it was edited by "
            "hand: run 'airloom registry verify' and restore it before appending"
        ) from None
    return head, got[1]


def _digest_of(store: ObjectStore, prefix: str, keys: list[str]) -> str:
    combined = hashlib.sha256()
    for key in sorted(keys):
        combined.update(f"{key[len(prefix) :]}\0{_sha256(store.get_bytes(key))}\n".encode())
    return combined.hexdigest()


class _StreamCheck:
    """One pass of :meth:`RecordLog.verify` over a stream; each step adds its findings in order."""

    def __init__(self, store: ObjectStore, stream: str, report: RecordsReport) -> None:
        self.store, self.stream, self.report = store, stream, report
        self.chained: dict[int, _Stored] = {}
        self.unchained: list[_Stored] = []
        self.head: dict[str, Any] | None = None
        self.head_bad = ""
        self.self_ok: dict[int, bool] = {}  # chained seq -> its content matches its record_sha256
        self.misplaced: set[int] = set()

    @property
    def head_seq(self) -> int | None:
        return None if self.head is None else int(self.head["seq"])

    def add(self, key: str, problem: str, detail: str) -> None:
        self.report.findings.append(RecordFinding(self.stream, key, _uri(self.store, key), problem, detail))

    def _load(self, key: str) -> _Stored | None:
        got = self.store.get_with_etag(key)
        if got is None:
            return None  # deleted between list and read
        try:
            record = json.loads(got[0])
        except ValueError:
            record = None
        return _Stored(key, got[0], record if isinstance(record, dict) else None)

    def _fetch_head(self) -> None:
        """Set ``head``, or leave it None with ``head_bad`` saying why it is unreadable."""
        try:
            self.head, self.head_bad = _read_head(self.store, self.stream)[0], ""
        except RegistryError as exc:
            self.head, self.head_bad = None, str(exc)

    def load(self, keys: list[str]) -> None:
        """Read the listed records, then those written since, up to what HEAD names."""
        for key in keys:
            if not key.endswith(".json") or (stored := self._load(key)) is None:  # HEAD is read below
                continue
            if (seq := _seq_of(self.stream, key)) is not None:
                self.chained[seq] = stored
            else:
                self.unchained.append(stored)
        self._fetch_head()
        if self.head_seq is not None:
            for seq in range(max(self.chained, default=0) + 1, self.head_seq + 1):
                if (stored := self._load(_record_key(self.stream, seq))) is not None:
                    self.chained[seq] = stored
        top = max(self.chained, default=0)
        # A writer between its record and its head move: give it a moment before calling it unanchored.
        deadline = time.monotonic() + _HEAD_GRACE_S
        while self.head_seq is not None and top > self.head_seq and time.monotonic() < deadline:
            time.sleep(0.05)
            self._fetch_head()

    def check_head(self) -> None:
        if self.head_bad:
            self.add(self.stream + HEAD, "edited", self.head_bad)
        elif self.head is None and self.chained:
            self.add(
                self.stream + HEAD,
                "truncated-tail",
                "the stream's HEAD is missing: the removal of its newest record(s) cannot be ruled out",
            )

    def check_records(self) -> None:
        """Each chained record on its own: parses, keeps its chain fields, sits under its seq, hashes."""
        for seq in sorted(self.chained):
            key, _, rec = self.chained[seq]
            self.self_ok[seq] = False
            if rec is None:
                self.add(key, "edited", "not a JSON object any more")
                continue
            if not isinstance(rec.get("seq"), int) or "prev_sha256" not in rec:
                self.add(key, "edited", "its chain fields (seq, prev_sha256) were removed")
                continue
            if rec["seq"] != seq:
                self.add(key, "reordered", f"stored as seq {seq} but the record says seq {rec['seq']}")
                self.misplaced.add(seq)
            try:
                self.self_ok[seq] = rec.get("record_sha256") == self_hash(rec)
            except UsageError:  # e.g. a NaN written in by hand
                pass
            if not self.self_ok[seq]:
                self.add(key, "edited", "its content no longer matches its record_sha256")

    def check_gaps(self) -> None:
        present = sorted(self.chained)
        last_present = max(present, default=0)
        for seq in range(1, max([*present, self.head_seq or 0]) + 1):
            if seq in self.chained:
                continue
            if seq > last_present:
                self.add(
                    _record_key(self.stream, seq),
                    "truncated-tail",
                    f"missing, but HEAD says the stream had {self.head_seq} record(s)",
                )
            else:
                follows = min(s for s in present if s > seq)
                self.add(
                    _record_key(self.stream, seq),
                    "removed",
                    f"missing from the chain (seq {follows} follows a gap)",
                )

    def check_links(self) -> None:
        """Each intact record's prev_sha256 against its predecessor's bytes; HEAD against the newest."""
        sha_of = {seq: _sha256(stored.data) for seq, stored in self.chained.items()}
        for seq in sorted(self.chained):
            rec = self.chained[seq].record
            # Records that fail their own hash or sit under another seq are already reported.
            if rec is None or not self.self_ok[seq] or seq in self.misplaced:
                continue
            named = rec.get("prev_sha256")
            if seq == 1:
                if named is not None:
                    self.add(self.chained[seq].key, "edited", "the first record names a predecessor")
                continue
            before = seq - 1
            if before not in self.chained or before in self.misplaced or not self.self_ok[before]:
                continue
            if named != sha_of[before]:
                self.add(
                    self.chained[before].key,
                    "edited",
                    f"its sha256 {sha_of[before][:12]}… differs from the one seq {seq} names "
                    f"({str(named)[:12]}…)",
                )
        if (head := self.head) is None:
            return
        head_seq = int(head["seq"])
        if head_seq in self.chained and self.self_ok[head_seq] and head["sha256"] != sha_of[head_seq]:
            self.add(
                self.chained[head_seq].key,
                "edited",
                f"the newest record's sha256 {sha_of[head_seq][:12]}… differs from HEAD's "
                f"({str(head['sha256'])[:12]}…)",
            )
        for seq in sorted(s for s in self.chained if s > head_seq):
            self.add(
                self.chained[seq].key,
                "unanchored",
                f"past HEAD (seq {head_seq}): inserted, or its writer stopped before moving HEAD "
                "(the next append anchors it)",
            )

    def check_unchained(self) -> int:
        """Unchained records: legacy ones must match the digest the first chained record pinned.

        Returns how many legacy records there are.
        """
        first: dict[str, Any] = (self.chained[1].record if 1 in self.chained else None) or {}
        chain_start = _parse_at(first.get("at"))
        legacy: list[str] = []
        for key, _, rec in self.unchained:
            written = None if rec is None else _parse_at(rec.get("at"))
            if rec is not None and any(f in rec for f in CHAIN_FIELDS):
                self.add(key, "inserted", "a chained record outside the chain's keys (<seq:08d>.json)")
            elif written is None:
                self.add(
                    key, "edited", "an unchained record that is not a JSON object with a valid 'at' time"
                )
            elif chain_start is not None and written > chain_start:
                self.add(key, "inserted", f"an unchained record dated after the chain began ({first['at']})")
            else:
                legacy.append(key)
        if self.self_ok.get(1, False):
            pinned = first.get("legacy_records") or {"count": 0, "sha256": None}
            count = len(legacy)
            digest = _digest_of(self.store, self.stream, legacy) if legacy else None
            if (count, digest) != (pinned.get("count"), pinned.get("sha256")):
                if count < pinned["count"]:
                    problem = "removed"
                elif count > pinned["count"]:
                    problem = "inserted"
                else:
                    problem = "edited"
                self.add(
                    self.stream,
                    problem,
                    f"the unchained (legacy) records no longer match what {self.chained[1].key} pinned "
                    f"({pinned['count']} record(s) then, {count} now)",
                )
        return len(legacy)
