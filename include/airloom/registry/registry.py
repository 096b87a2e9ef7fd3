"""The model registry: immutable numbered versions, movable aliases, an append-only audit trail.

Layout under the store (every write is either create-once or compare-and-swap, so any number of
processes or machines can use one registry without a lock service)::

    models/<name>/versions/<N>/CLAIM           created exclusively; its owner token, read back, says who owns N
    models/<name>/versions/<N>/<files...>      the model folder, metadata.json, README.md (card)
    models/<name>/versions/<N>/MANIFEST.json   written last: the commit marker (path, sha256, size)
    models/<name>/aliases/<alias>.json         moved by compare-and-swap
    models/<name>/audit/<seq:08d>.json         one object per record, created once, hash-chained
    models/<name>/audit/HEAD                   the stream's newest seq and sha256, moved by compare-and-swap
    models/<name>/signoffs/<N>/<seq:08d>.json  (and signoffs/<N>/HEAD): the same kind of stream

The audit trail and sign-offs are hash-chained record streams (:mod:`airloom.registry.records`);
``verify_records`` checks them, and that each alias points where its last audited move put it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airloom.exceptions import CheckFailed, ConflictError, RegistryError, UsageError
from airloom.registry.records import HEAD, RecordLog, RecordsReport, as_utc, dumps
from airloom.registry.store import LocalStore, ObjectStore, open_store, sha256_file

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
MANIFEST = "MANIFEST.json"
CLAIM = "CLAIM"
METADATA = "metadata.json"
CARD = "README.md"
# Written by the registry itself; a model folder must not bring its own (README.md is replaced).
_RESERVED = {MANIFEST, CLAIM, METADATA}
_MAX_CAS_RETRIES = 50
_MAX_CLAIM_RACES = 5


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()
"""Default of ``set_alias(expected_version=...)``: move the alias whatever it points to now."""


def now() -> datetime:
    return datetime.now(UTC)


def check_name(name: str, what: str = "model name") -> str:
    """Names become object keys and URLs, so keep them to one safe, lowercase alphabet."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid {what} {name!r}: use lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. 'support-bot' or 'tinyllama-1.1b')"
        )
    return name


def _check_actor(actor: str, what: str = "actor") -> str:
    if not isinstance(actor, str) or not actor.strip():
        raise UsageError(f"{what} must be a non-empty user or service name, got {actor!r}")
    return actor


def _executed_by(value: Any) -> str | dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, dict) and value and all(isinstance(v, str) and v for v in value.values()):
        return {str(k): v for k, v in value.items()}
    raise UsageError(
        "executed_by must name the run that moves the alias: {'dag_id', 'run_id', 'task_id'} or "
        f"'cli:<user>', got {value!r}"
    )


@dataclass
class ModelVersion:
    """One committed, immutable version. ``created_at`` is ISO 8601 UTC; ``files`` are manifest entries."""

    name: str
    version: int
    created_at: str
    created_by: str
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    uri: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelRegistry:
    """Register, resolve, verify and download model versions; move aliases with an audit trail."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        # The clock is looked up per record, so patching this module's ``now`` (as tests do) stamps records.
        self.records = RecordLog(store, clock=lambda: now())

    @classmethod
    def from_uri(cls, uri: str | os.PathLike[str]) -> ModelRegistry:
        return cls(open_store(uri))

    def __repr__(self) -> str:
        return f"ModelRegistry({self.store.uri()!r})"

    # -- keys --------------------------------------------------------------------------------------

    @staticmethod
    def model_prefix(name: str) -> str:
        return f"models/{check_name(name)}/"

    def _version_prefix(self, name: str, version: int) -> str:
        return f"{self.model_prefix(name)}versions/{version}/"

    def _alias_key(self, name: str, alias: str) -> str:
        return f"{self.model_prefix(name)}aliases/{check_name(alias, 'alias')}.json"

    # -- append-only records (audit, sign-offs) ------------------------------------------------------

    def append_record(self, prefix: str, record: dict[str, Any]) -> dict[str, Any]:
        """Append ``record`` to the hash-chained stream under ``prefix``: see :meth:`RecordLog.append`."""
        return self.records.append(prefix, record)

    def read_records(self, prefix: str) -> list[dict[str, Any]]:
        """All records under ``prefix``, oldest first (ties broken by chain order, then id)."""
        return self.records.read(prefix)

    def append_audit(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        return self.append_record(f"{self.model_prefix(name)}audit/", {"name": name, **record})

    def history(self, name: str) -> list[dict[str, Any]]:
        """The audit trail of a model (registrations, alias moves, sign-offs), oldest first."""
        return self.read_records(f"{self.model_prefix(name)}audit/")

    # -- tamper evidence -----------------------------------------------------------------------------

    def verify_records(self, name: str | None = None) -> RecordsReport:
        """Check every record stream of ``name`` (default: every model) for edits, removals, insertions.

        Each stream is checked by :meth:`RecordLog.verify`; each alias must also point where its last
        audited move put it (*unaudited* otherwise).
        """
        if name is not None:
            check_name(name)
            names = [name]
            if not self.store.list(self.model_prefix(name)):
                raise RegistryError(
                    f"model {name!r} has no records in {self.store.uri()}; models there: {self.list_models() or 'none'}"
                )
        else:
            names = sorted({k.split("/")[1] for k in self.store.list("models/") if k.count("/") >= 2})
        report = RecordsReport(self.store.uri())
        for model in names:
            prefix = self.model_prefix(model)
            streams: dict[str, list[str]] = {}
            for key in self.store.list(prefix):
                rest = key[len(prefix) :]
                if rest.startswith(("versions/", "aliases/")) or "/" not in rest:
                    continue
                stream = key.rsplit("/", 1)[0] + "/"
                base = key[len(stream) :]
                if base == HEAD or base.endswith(".json"):
                    streams.setdefault(stream, []).append(key)
            audit: list[dict[str, Any]] = []
            for stream in sorted(streams):
                records = self.records.verify(stream, report, streams[stream])
                if stream == f"{prefix}audit/":
                    audit = records
            self._verify_aliases(model, audit, report)
        return report

    def _verify_aliases(self, name: str, audit: list[dict[str, Any]], report: RecordsReport) -> None:
        """Each alias must point where its last audited move put it: a hand-edited alias is not."""
        moves: dict[str, dict[str, Any]] = {}
        for rec in audit:
            revision = rec.get("revision")
            if (
                rec.get("action") == "alias"
                and isinstance(rec.get("alias"), str)
                and isinstance(revision, int)
            ):
                best = moves.get(rec["alias"])
                if best is None or revision >= best["revision"]:
                    moves[rec["alias"]] = rec
        prefix = f"{self.model_prefix(name)}aliases/"
        stream = f"{self.model_prefix(name)}audit/"

        def add(key: str, problem: str, detail: str) -> None:
            report.findings.append(self.records.finding(stream, key, problem, detail))

        for key in self.store.list(prefix):
            alias = key[len(prefix) :].removesuffix(".json")
            try:
                doc = json.loads(self.store.get_bytes(key))
                pointed = (doc.get("revision"), doc.get("version"))
            except (ValueError, AttributeError):
                add(key, "edited", "the alias is not a JSON object any more")
                continue
            move = moves.get(alias)
            audited = None if move is None else (move.get("revision"), move.get("to"))
            if pointed != audited:
                add(
                    key,
                    "unaudited",
                    f"{name}@{alias} points to version {pointed[1]} (revision {pointed[0]}) but its last "
                    + (
                        "audited move is none"
                        if audited is None
                        else f"audited move set version {audited[1]} (revision {audited[0]})"
                    ),
                )

    # -- versions ------------------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        return sorted({k.split("/")[1] for k in self.store.list("models/") if k.endswith("/" + MANIFEST)})

    def _claimed_versions(self, name: str) -> list[int]:
        prefix = f"{self.model_prefix(name)}versions/"
        found = set()
        for key in self.store.list(prefix):
            head = key[len(prefix) :].split("/", 1)[0]
            if head.isdigit():
                found.add(int(head))
        return sorted(found)

    def _committed_numbers(self, name: str) -> list[int]:
        prefix = f"{self.model_prefix(name)}versions/"
        numbers = []
        for key in self.store.list(prefix):
            parts = key[len(prefix) :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and parts[0].isdigit():
                numbers.append(int(parts[0]))
        return sorted(numbers)

    def has_version(self, name: str, version: int) -> bool:
        return self.store.exists(self._version_prefix(name, int(version)) + MANIFEST)

    def _owns_claim(self, name: str, version: int, token: str) -> bool:
        got = self.store.get_with_etag(self._version_prefix(name, version) + CLAIM)
        if got is None:
            return False
        try:
            return json.loads(got[0]).get("token") == token
        except (ValueError, AttributeError):
            return False

    def _claim_version(self, name: str, actor: str) -> tuple[int, str]:
        """Create ``versions/<N>/CLAIM`` exclusively for the next free N; returns N and our owner token.

        The claim is read back: an S3-compatible server that checks If-None-Match and then writes,
        without holding a lock in between (moto's server does), can let two writers both "create" it;
        the later write wins the object, and the token says which writer that was.
        """
        claimed = self._claimed_versions(name)
        version = (claimed[-1] if claimed else 0) + 1
        token = uuid.uuid4().hex
        claim = {
            "claimed_by": actor,
            "at": now().isoformat(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": token,
        }
        data = dumps(claim, "claim")
        for _ in range(1000):
            try:
                self.store.put_bytes(self._version_prefix(name, version) + CLAIM, data, if_none_match=True)
            except ConflictError:
                version += 1
                continue
            if self._owns_claim(name, version, token):
                return version, token
            version += 1  # a concurrent writer's claim replaced ours: that number is theirs
        raise RegistryError(f"could not claim a version of {name!r} after 1000 tries in {self.store.uri()}")

    def register(
        self,
        name: str,
        folder: str | os.PathLike[str],
        *,
        metadata: dict[str, Any],
        actor: str,
        card: str | None = None,
        attachments: dict[str, str | os.PathLike[str]] | None = None,
    ) -> ModelVersion:
        """Upload ``folder`` as the next version of ``name`` and commit it with a manifest.

        Until MANIFEST.json exists the version is invisible, so a crash mid-upload leaves only an
        unused number behind, never a half model. A README.md in ``folder`` is replaced by the card.
        ``attachments`` maps a path inside the version (e.g. ``evaluation/report.html``) to a file
        stored with it: evidence that is hashed in the manifest like the weights.
        """
        check_name(name)
        _check_actor(actor)
        if not isinstance(metadata, dict):
            raise UsageError(f"metadata must be a dict, got {type(metadata).__name__}")
        root = Path(folder)
        if not root.is_dir():
            raise UsageError(f"model folder {root} does not exist or is not a folder")
        files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
        if not files:
            raise UsageError(f"model folder {root} is empty; point register at a saved model folder")
        taken = {rel for rel, _ in files}
        for rel, path in sorted((attachments or {}).items()):
            p = Path(path)
            if not p.is_file():
                raise UsageError(f"attachment {rel}: {p} is not a file")
            if rel in taken or rel == CARD or rel.startswith("/") or ".." in rel.split("/"):
                raise UsageError(f"attachment {rel}: not a free relative path in the version")
            files.append((rel, p))
            taken.add(rel)
        for rel, _ in files:
            if rel in _RESERVED:
                raise UsageError(
                    f"{root / rel}: {rel} is written by the registry; remove or rename it in the model folder"
                )
        metadata_bytes = dumps(metadata, "metadata")

        for _ in range(_MAX_CLAIM_RACES):
            mv = self._upload_version(name, files, metadata_bytes, card, actor)
            if mv is not None:
                self.append_audit(
                    name, {"action": "register", "version": mv.version, "actor": actor, "uri": mv.uri}
                )
                return mv
        raise ConflictError(
            f"could not register {name!r} in {self.store.uri()}: lost a version claim to a concurrent "
            f"writer {_MAX_CLAIM_RACES} times (the store does not seem to enforce If-None-Match atomically)"
        )

    def _upload_version(
        self,
        name: str,
        files: list[tuple[str, Path]],
        metadata_bytes: bytes,
        card: str | None,
        actor: str,
    ) -> ModelVersion | None:
        """Claim a number, upload, commit. None if the claim turned out to be another writer's."""
        version, token = self._claim_version(name, actor)
        prefix = self._version_prefix(name, version)
        if card is None:
            from airloom.registry.card import render_model_card

            card = render_model_card(name, version, json.loads(metadata_bytes))
        entries: list[dict[str, Any]] = []
        for rel, path in files:
            if rel == CARD:
                continue
            digest, size = sha256_file(path)
            self.store.put_file(prefix + rel, path)
            entries.append({"path": rel, "sha256": digest, "size": size})
        for rel, data in ((METADATA, metadata_bytes), (CARD, card.encode())):
            self.store.put_bytes(prefix + rel, data)
            entries.append({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
        # Checked again just before the commit: never commit under a number someone else holds.
        if not self._owns_claim(name, version, token):
            return None
        created_at = now().isoformat()
        manifest_files = sorted(entries, key=lambda e: e["path"])
        manifest = {
            "format": 1,
            "name": name,
            "version": version,
            "created_at": created_at,
            "created_by": actor,
            "files": manifest_files,
        }
        self.store.put_bytes(prefix + MANIFEST, dumps(manifest, "manifest"), if_none_match=True)
        return ModelVersion(
            name,
            version,
            created_at,
            actor,
            json.loads(metadata_bytes),
            manifest_files,
            self.store.uri(prefix.rstrip("/")),
        )

    def _manifest(self, name: str, version: int) -> tuple[bytes, dict[str, Any]]:
        check_name(name)
        got = self.store.get_with_etag(self._version_prefix(name, version) + MANIFEST)
        if got is None:
            committed = self._committed_numbers(name)
            raise RegistryError(
                f"model {name!r} has no committed version {version} in {self.store.uri()}; "
                f"committed versions: {committed or 'none'}"
            )
        return got[0], json.loads(got[0])

    def get(self, name: str, version: int) -> ModelVersion:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise UsageError(f"version must be a positive integer, got {version!r}")
        _, manifest = self._manifest(name, version)
        prefix = self._version_prefix(name, version)
        metadata = {}
        if any(e["path"] == METADATA for e in manifest["files"]):
            metadata = json.loads(self.store.get_bytes(prefix + METADATA))
        return ModelVersion(
            name=name,
            version=version,
            created_at=manifest["created_at"],
            created_by=manifest["created_by"],
            metadata=metadata,
            files=manifest["files"],
            uri=self.store.uri(prefix.rstrip("/")),
        )

    def list_versions(self, name: str) -> list[ModelVersion]:
        """Committed versions, oldest first; claimed-but-uncommitted numbers are skipped."""
        return [self.get(name, n) for n in self._committed_numbers(name)]

    def latest(self, name: str) -> ModelVersion:
        committed = self._committed_numbers(name)
        if not committed:
            raise RegistryError(
                f"model {name!r} has no committed versions in {self.store.uri()}; "
                f"models there: {self.list_models() or 'none'}"
            )
        return self.get(name, committed[-1])

    def resolve(self, ref: str) -> ModelVersion:
        """``name/3`` → version 3, ``name@production`` → the alias target, ``name`` → latest."""
        if not isinstance(ref, str) or not ref:
            raise UsageError(
                f"model reference must be 'name', 'name/<version>' or 'name@<alias>', got {ref!r}"
            )
        if "@" in ref:
            name, alias = ref.split("@", 1)
            target = self.get_alias(name, alias)
            if target is None:
                raise RegistryError(
                    f"cannot resolve {ref!r}: alias {alias!r} of model {name!r} is not set; "
                    f"aliases: {self.list_aliases(name) or 'none'}; versions: {self._committed_numbers(name) or 'none'}"
                )
            return self.get(name, target)
        if "/" in ref:
            name, _, number = ref.partition("/")
            if not number.isdigit() or int(number) < 1:
                raise UsageError(
                    f"cannot resolve {ref!r}: the part after '/' must be a version number like {name}/3"
                )
            return self.get(name, int(number))
        return self.latest(ref)

    # -- integrity -----------------------------------------------------------------------------------

    def _hash_object(self, key: str, scratch: Path) -> tuple[str, int]:
        if isinstance(self.store, LocalStore):
            return sha256_file(self.store.path(key))  # hash in place; copying a 10 GB shard is waste
        tmp = scratch / uuid.uuid4().hex
        self.store.download_file(key, tmp)
        try:
            return sha256_file(tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def verify(self, name: str, version: int) -> None:
        """Recompute every file's sha256 and size; CheckFailed names the first file that differs."""
        mv = self.get(name, version)
        prefix = self._version_prefix(name, version)
        with tempfile.TemporaryDirectory(prefix="airloom-verify-") as scratch:
            for entry in mv.files:
                key = prefix + entry["path"]
                if not self.store.exists(key):
                    raise CheckFailed(
                        f"{mv.ref}: file {entry['path']} listed in MANIFEST.json is missing "
                        f"({self.store.uri(key)}); restore it or register the model again"
                    )
                digest, size = self._hash_object(key, Path(scratch))
                if (digest, size) != (entry["sha256"], entry["size"]):
                    raise CheckFailed(
                        f"{mv.ref}: file {entry['path']} is corrupt ({self.store.uri(key)}): sha256 {digest[:12]}… "
                        f"size {size}, manifest says sha256 {entry['sha256'][:12]}… size {entry['size']}; "
                        "restore it or register the model again"
                    )

    def download(self, name: str, version: int, dest: str | os.PathLike[str]) -> Path:
        """Fetch a version into ``dest`` (a folder ``from_pretrained`` can load), verifying each file.

        MANIFEST.json is written last, so a copy with the same manifest and file sizes is complete and
        is reused instead of downloaded again.
        """
        manifest_bytes, manifest = self._manifest(name, version)
        dest = Path(dest)
        local_manifest = dest / MANIFEST
        if local_manifest.is_file() and local_manifest.read_bytes() == manifest_bytes:
            if all(
                (dest / e["path"]).is_file() and (dest / e["path"]).stat().st_size == e["size"]
                for e in manifest["files"]
            ):
                return dest
        dest.mkdir(parents=True, exist_ok=True)
        local_manifest.unlink(missing_ok=True)
        prefix = self._version_prefix(name, version)
        for entry in manifest["files"]:
            target = dest / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
            try:
                self.store.download_file(prefix + entry["path"], tmp)
                digest, size = sha256_file(tmp)
                if (digest, size) != (entry["sha256"], entry["size"]):
                    raise CheckFailed(
                        f"{name}/{version}: file {entry['path']} downloaded from "
                        f"{self.store.uri(prefix + entry['path'])} does not match MANIFEST.json "
                        f"(sha256 {digest[:12]}…, size {size}; expected {entry['sha256'][:12]}…, size {entry['size']}); "
                        "the stored copy is corrupt: run verify and restore it"
                    )
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        tmp_manifest = dest / f".{MANIFEST}.{uuid.uuid4().hex}.part"
        tmp_manifest.write_bytes(manifest_bytes)
        os.replace(tmp_manifest, local_manifest)
        return dest

    # -- aliases -------------------------------------------------------------------------------------

    def _read_alias(self, name: str, alias: str) -> tuple[dict[str, Any] | None, str | None]:
        got = self.store.get_with_etag(self._alias_key(name, alias))
        if got is None:
            return None, None
        return json.loads(got[0]), got[1]

    def get_alias(self, name: str, alias: str) -> int | None:
        doc, _ = self._read_alias(name, alias)
        return None if doc is None else doc["version"]

    def list_aliases(self, name: str) -> dict[str, int]:
        prefix = f"{self.model_prefix(name)}aliases/"
        out = {}
        for key in self.store.list(prefix):
            alias = key[len(prefix) :].removesuffix(".json")
            version = self.get_alias(name, alias)
            if version is not None:
                out[alias] = version
        return out

    def _lost_cas(self, name: str, alias: str, revision: int, token: str) -> bool:
        """True if another writer's move with the same revision replaced ours right after our CAS.

        That only happens on a server whose If-Match check and write are not atomic (moto's server,
        for one): both writers pass the check and the later write wins. A higher revision is fine:
        ours landed and a later move followed it.
        """
        doc, _ = self._read_alias(name, alias)
        return doc is not None and doc.get("revision") == revision and doc.get("token") != token

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        actor: str,
        reason: str = "",
        expected_version: int | None | Any = ANY,
        approved_by: list[str] | None = None,
        executed_by: str | dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Point ``alias`` at a committed ``version`` by compare-and-swap; returns the audit record.

        With ``expected_version`` (an int, or None for "not set yet") the move only happens if the
        alias still points there, so two promotions racing from the same state cannot both win.
        The audit record keeps, beside ``actor``, who approved the version (``approved_by``: the
        sign-off's approvers when the move was gated, else None) and what ran the move
        (``executed_by``: ``{"dag_id", "run_id", "task_id"}`` of a task, or ``"cli:<user>"``).
        """
        check_name(alias, "alias")
        _check_actor(actor)
        executed_by = _executed_by(executed_by)
        if approved_by is not None:
            if isinstance(approved_by, str) or not all(isinstance(u, str) and u for u in approved_by):
                raise UsageError(f"approved_by must be a list of user names, got {approved_by!r}")
            approved_by = list(approved_by)
        if isinstance(version, bool) or not isinstance(version, int):
            raise UsageError(f"alias target must be a version number, got {version!r}")
        if not self.has_version(name, version):
            raise RegistryError(
                f"cannot point {name}@{alias} at version {version}: it is not a committed version; "
                f"committed versions: {self._committed_numbers(name) or 'none'}"
            )
        key = self._alias_key(name, alias)
        for _ in range(_MAX_CAS_RETRIES):
            doc, etag = self._read_alias(name, alias)
            current = None if doc is None else doc["version"]
            if expected_version is not ANY and current != expected_version:
                raise ConflictError(
                    f"{name}@{alias} points to {current} (expected {expected_version}); "
                    "someone else moved it: re-read the alias and decide again"
                )
            revision = (doc or {}).get("revision", 0) + 1
            at = now().isoformat()
            token = uuid.uuid4().hex
            new_doc = {
                "alias": alias,
                "version": version,
                "revision": revision,
                "set_by": actor,
                "reason": reason,
                "at": at,
                "token": token,
            }
            try:
                self.store.put_if_match(key, dumps(new_doc, "alias"), etag)
                lost = self._lost_cas(name, alias, revision, token)
            except ConflictError:
                lost = True
            if lost:
                if expected_version is ANY:
                    continue  # lost a race with an unconditional move: re-read and apply on top
                raise ConflictError(
                    f"{name}@{alias} was moved by someone else while it was being set to {version}; "
                    "re-read the alias and decide again"
                )
            return self.append_audit(
                name,
                {
                    "action": "alias",
                    "alias": alias,
                    "from": current,
                    "to": version,
                    "revision": revision,
                    "actor": actor,
                    "approved_by": approved_by,
                    "executed_by": executed_by,
                    "reason": reason,
                    "at": at,
                },
            )
        raise ConflictError(f"{name}@{alias} kept changing; gave up after {_MAX_CAS_RETRIES} tries")

    def alias_record_at(self, name: str, alias: str, when: datetime) -> dict[str, Any] | None:
        """The audit record of the move that set ``alias`` as it stood at ``when`` (None: not set yet).

        Naive datetimes are taken as UTC. The record says who moved it, when and why.
        """
        check_name(alias, "alias")
        when = as_utc(when)
        best: dict[str, Any] | None = None
        for rec in self.history(name):
            if rec.get("action") != "alias" or rec.get("alias") != alias:
                continue
            if as_utc(datetime.fromisoformat(rec["at"])) > when:
                continue
            # Revisions come from the CAS, so they order moves even if writers' clocks disagree.
            if best is None or rec.get("revision", 0) >= best.get("revision", 0):
                best = rec
        return best

    def alias_at(self, name: str, alias: str, when: datetime) -> int | None:
        """What ``alias`` pointed to at ``when`` (naive datetimes are taken as UTC), from the audit trail."""
        record = self.alias_record_at(name, alias, when)
        return None if record is None else record["to"]
