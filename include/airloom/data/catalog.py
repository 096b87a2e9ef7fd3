"""Named, versioned prepared datasets: ``$AIRLOOM_HOME/datasets/<name>/<version>/``.

A prepared dataset is chosen by reference, never by being the newest thing on disk:

- ``name@3``: version 3 of ``name``;
- ``name@latest`` or ``name``: the newest version of ``name`` (resolved once, recorded as ``name@N``);
- a folder path holding a ``manifest.json`` (datasets prepared before names existed, or ``airloom prepare
  --out``); a relative folder needs a ``/`` (``./mine``), so it is never mistaken for a name.

Versions are 1, 2, 3 … per name, as the model registry numbers model versions: short to type in a form,
ordered without clocks, and claimed atomically by renaming the staged folder to the next free number (two
writers cannot both get 3). A version's files never change after that. Publishing content whose
``dataset_hash`` equals the newest version's (a retry, or a rerun on the same data) returns that version
instead of a copy, so a retry does not mint versions.

``datasets/latest.json`` still names the most recently published version for readers that want "what was
prepared last" to show (demo summary, monitoring's last-resort reference); nothing trains on it unasked.

**On the artifact store.** When ``AIRLOOM_ARTIFACTS`` is ``s3://…`` (workers share no disk) and no local
``root`` is named, the catalog lives there under the same keys, ``datasets/<name>/<version>/`` and
``datasets/latest.json``. A version number is claimed by creating ``datasets/<name>/<N>/claim.json`` if absent
(S3's conditional write; a writer that loses tries N+1), then the files are uploaded and the artifact
manifest ``_airloom_artifact.json`` last (:meth:`airloom.artifacts.Artifacts.publish`): a version without it
(an upload cut short) is invisible to :func:`resolve` and the listings, and its number stays taken.
:attr:`PreparedDataset.path` is then the version's URI; a reader stages the files it needs. The DAG form's
:func:`choices` lists nothing for a remote catalog: it runs while DAG files are parsed, which must not
call the network (the form takes the reference as free text).

No Airflow imports: the CLI, operators and the DAG form's choice list use this module alike.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airloom.exceptions import ConflictError, RegistryError, UsageError

if TYPE_CHECKING:
    from airloom.artifacts import Artifacts

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
LATEST = "latest"
LATEST_FILE = "latest.json"
MANIFEST = "manifest.json"
_STAGING = ".staging-"
PREFIX = "datasets"  # the catalog's keys in the artifact store, as its folder under AIRLOOM_HOME
CLAIM = "claim.json"  # created if absent: who holds a version number on a remote catalog
# Known record-file suffixes, stripped when a name is derived from a source file.
_SOURCE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gz", ".zst", ".bz2", ".xz")


@dataclass(frozen=True)
class PreparedDataset:
    """A resolved reference: where the files are and what they are (``path``: a local folder, or the
    version's ``s3://`` URI when the catalog is on the artifact store)."""

    path: Path | str
    manifest: dict[str, Any]
    name: str | None = None  # None for a folder prepared outside the catalog
    version: int | None = None

    @property
    def ref(self) -> str | None:
        return f"{self.name}@{self.version}" if self.name and self.version else None

    @property
    def dataset_hash(self) -> str:
        return self.manifest["dataset_hash"]

    @property
    def rows(self) -> dict[str, int]:
        return {split: info.get("rows", 0) for split, info in (self.manifest.get("splits") or {}).items()}

    def summary(self) -> dict[str, Any]:
        """What the asset event, ``latest.json`` and the listing carry."""
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "path": str(self.path),
            "dataset_hash": self.dataset_hash,
            "splits": self.rows,
            "created_at": self.manifest.get("created_at"),
            **(self.manifest.get("origin") or {}),
        }


def root_dir(root: str | Path | None = None) -> Path:
    """The catalog folder: ``root`` or ``$AIRLOOM_HOME/datasets``."""
    if root:
        return Path(root)
    from airloom.settings import home

    return home() / "datasets"


def where(root: str | Path | None = None, artifacts: Artifacts | None = None) -> str:
    """The catalog's location for messages: its folder, or its URI on a remote artifact store."""
    remote = _remote(root, artifacts)
    return remote.uri(PREFIX) if remote else str(root_dir(root))


def _remote(root: str | Path | None, artifacts: Artifacts | None = None) -> Artifacts | None:
    """The artifact store when the catalog lives there: no local ``root`` named and the store (``artifacts``,
    else ``AIRLOOM_ARTIFACTS``) is ``s3://``; None for the local catalog (nothing is built then)."""
    if root:
        return None
    if artifacts is not None:
        return artifacts if artifacts.remote else None
    from airloom.artifacts import Artifacts, artifacts_uri, is_remote

    uri = artifacts_uri()
    return Artifacts(uri) if is_remote(uri) else None


def check_name(name: Any, field: str = "dataset name") -> str:
    """``name`` if it is a valid dataset name (as model names: ``^[a-z0-9][a-z0-9._-]*$``)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name == LATEST_FILE:
        raise UsageError(
            f"{field} {name!r} is not a valid name: use lower-case letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (e.g. 'demo' or 'support-chats')"
        )
    return name


def name_from_source(source: str) -> str:
    """A dataset name derived from a source path or URI: its file (without suffix) or folder name.

    ``…/data/raw`` → ``raw``; ``s3://b/exports/Chats 2026.jsonl`` → ``chats-2026``; a glob uses the folder
    above its first wildcard.
    """
    parts = [p for p in re.split(r"[/\\]+", str(source).removeprefix("s3://")) if p]
    for i, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            parts = parts[:i]
            break
    last = parts[-1].lower() if parts else ""
    while last.endswith(_SOURCE_SUFFIXES):
        last = last[: last.rfind(".")]
    name = re.sub(r"[^a-z0-9._-]+", "-", last).strip("-._")
    return name if name and NAME_RE.match(name) and name != LATEST_FILE else "dataset"


def staging_dir(name: str, root: str | Path | None = None) -> Path:
    """A fresh folder name beside the versions of ``name``, for :func:`airloom.data.prepare.prepare` to
    write into before :func:`publish` numbers it (same file system, so the rename is atomic)."""
    return root_dir(root) / check_name(name) / f"{_STAGING}{uuid.uuid4().hex}"


def publish(
    staged: Path,
    name: str,
    *,
    origin: dict[str, Any] | None = None,
    root: str | Path | None = None,
    artifacts: Artifacts | None = None,
) -> PreparedDataset:
    """Number the prepared folder ``staged`` as the next version of ``name`` and return it.

    The manifest gains ``name``, ``version``, ``ref``, ``created_at`` and ``origin`` (who prepared it: DAG
    and run, or the CLI). When the newest version already holds the same ``dataset_hash``, ``staged`` is
    removed and that version is returned. On a remote artifact store (``artifacts``, else
    ``AIRLOOM_ARTIFACTS``; only when no ``root`` is named) the version is uploaded there, manifest last, and
    ``staged`` is removed: see the module docstring.
    """
    check_name(name)
    staged = Path(staged)
    manifest = json.loads((staged / MANIFEST).read_text(encoding="utf-8"))
    remote = _remote(root, artifacts)
    if remote is not None:
        return _publish_remote(remote, staged, name, manifest, origin or {})
    folder = root_dir(root) / name
    try:
        while True:
            newest = _versions(folder)[-1:] or [0]
            if newest[0]:
                current = _load(folder / str(newest[0]))
                if current.get("dataset_hash") == manifest["dataset_hash"]:
                    shutil.rmtree(staged, ignore_errors=True)
                    found = PreparedDataset(folder / str(newest[0]), current, name, newest[0])
                    _write_latest(root, found)
                    return found
            version = max(_numbers(folder), default=0) + 1  # a number whose folder is broken stays taken
            manifest.update(
                name=name,
                version=version,
                ref=f"{name}@{version}",
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                origin=origin or {},
            )
            (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            target = folder / str(version)
            try:
                staged.rename(target)  # fails when another writer took the number first: try the next
            except OSError:
                if not target.exists():
                    raise
                continue
            found = PreparedDataset(target, manifest, name, version)
            _write_latest(root, found)
            return found
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def resolve(ref: str, root: str | Path | None = None, artifacts: Artifacts | None = None) -> PreparedDataset:
    """The prepared dataset ``ref`` names (see the module docstring for the forms; on a remote catalog
    also the ``s3://`` URI of a version).

    Raises:
        UsageError: A malformed reference, an unknown name or version, or a folder without a manifest;
            the message lists what is there.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise UsageError(f"dataset reference must be name@version, name or a folder, got {ref!r}")
    ref = ref.strip()
    remote = _remote(root, artifacts)
    if remote is not None and (ref.startswith("s3://") or not _is_path(ref)):
        return _resolve_remote(remote, ref)
    if _is_path(ref):
        folder = Path(ref).expanduser()
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise UsageError(f"{ref}: not a prepared dataset (no {MANIFEST})")
        manifest = _load(folder)
        name, version = manifest.get("name"), manifest.get("version")
        return PreparedDataset(folder, manifest, name, version if isinstance(version, int) else None)
    name, _, version_text = ref.partition("@")
    check_name(name, "dataset name in reference " + repr(ref))
    folder = root_dir(root) / name
    version = _pick(ref, _versions(folder), root_dir(root), lambda: _available(root))
    return PreparedDataset(folder / str(version), _load(folder / str(version)), name, version)


def _pick(ref: str, versions: list[int], where: Any, available: Any) -> int:
    """The version ``ref`` (``name``, ``name@latest`` or ``name@N``) names among ``versions`` (ascending)."""
    name, _, version_text = ref.partition("@")
    if not versions:
        raise UsageError(f"no prepared dataset named {name!r} in {where}; {available()}")
    if version_text in ("", LATEST):
        return versions[-1]
    if version_text.isdigit() and int(version_text) in versions:
        return int(version_text)
    raise UsageError(
        f"dataset {ref!r}: no version {version_text!r} of {name!r}; versions: "
        f"{', '.join(map(str, versions))} (or {name}@latest)"
    )


def list_datasets(
    root: str | Path | None = None, artifacts: Artifacts | None = None
) -> list[PreparedDataset]:
    """Every published version, newest first (by creation time, then name and version)."""
    remote = _remote(root, artifacts)
    if remote is not None:
        return _list_remote(remote)
    base = root_dir(root)
    found = []
    if base.is_dir():
        for folder in sorted(p for p in base.iterdir() if p.is_dir() and NAME_RE.match(p.name)):
            for version in _versions(folder):
                try:
                    found.append(
                        PreparedDataset(
                            folder / str(version), _load(folder / str(version)), folder.name, version
                        )
                    )
                except (OSError, ValueError):  # a half-deleted version: leave it out of the list
                    continue
    found.sort(key=lambda d: (d.manifest.get("created_at") or "", d.name or "", d.version or 0), reverse=True)
    return found


def describe(datasets: Iterable[PreparedDataset]) -> dict[str, str]:
    """``ref`` → one line for people: rows per split, when and by which run."""
    out = {}
    for d in datasets:
        rows = d.rows
        when = (d.manifest.get("created_at") or "?")[:16].replace("T", " ")
        run = (d.manifest.get("origin") or {}).get("run_id")
        out[d.ref or str(d.path)] = (
            f"{d.ref}: {sum(rows.values())} rows (train {rows.get('train', 0)}, validation "
            f"{rows.get('validation', 0)}, test {rows.get('test', 0)}), prepared {when}"
            + (f" by {run}" if run else "")
        )
    return out


def choices(limit: int = 30, root: str | Path | None = None) -> dict[str, str]:
    """The newest ``limit`` versions for a form's drop-down (``ref`` → description); never raises, so a DAG
    file can call it while parsing (an unreadable catalog gives an empty list). A catalog on a remote
    artifact store gives an empty list too: parsing a DAG file must not call the network."""
    try:
        from airloom.artifacts import artifacts_uri, is_remote

        if not root and is_remote(artifacts_uri()):
            return {}
        return describe(_newest(root, limit))
    except Exception:  # noqa: BLE001 - parse time: a broken catalog must not break the DAG
        return {}


def _newest(root: str | Path | None, limit: int) -> list[PreparedDataset]:
    """The ``limit`` most recently published versions, reading only their manifests: the DAG file calls
    this on every parse, so the ranking uses each manifest's mtime (written once, when the version is
    published) rather than reading every manifest the catalog holds."""
    base = root_dir(root)
    if not base.is_dir():
        return []
    stamped = [
        ((folder / str(v) / MANIFEST).stat().st_mtime, folder, v)
        for folder in base.iterdir()
        if folder.is_dir() and NAME_RE.match(folder.name)
        for v in _versions(folder)
    ]
    found = []
    for _, folder, version in sorted(stamped, key=lambda t: t[0], reverse=True)[:limit]:
        try:
            found.append(
                PreparedDataset(folder / str(version), _load(folder / str(version)), folder.name, version)
            )
        except (OSError, ValueError):  # a half-deleted version: leave it out of the list
            continue
    return found


def no_choice_message(
    root: str | Path | None = None, limit: int = 10, artifacts: Artifacts | None = None
) -> str:
    """Why a run without a named dataset refuses to guess, with what it could name."""
    listed = list_datasets(root, artifacts)
    location = where(root, artifacts)
    lines = [
        "no dataset chosen: this run was not started by a prepared_dataset event, and the 'dataset' param "
        "is empty. Name one as name@version (or name@latest), e.g. "
        + (f'-c \'{{"dataset": "{listed[0].ref}"}}\'' if listed else "after running llm_data_quality")
        + "."
    ]
    if listed:
        lines.append(f"Prepared datasets in {location} (newest first):")
        lines += [f"  {text}" for text in describe(listed[:limit]).values()]
        if len(listed) > limit:
            lines.append(f"  … and {len(listed) - limit} more (airloom datasets)")
    else:
        lines.append(f"There are no prepared datasets in {location}: run llm_data_quality first.")
    return "\n".join(lines)


def read_latest(root: str | Path | None = None, artifacts: Artifacts | None = None) -> dict[str, Any] | None:
    """``latest.json``: the most recently published dataset's summary, or None."""
    remote = _remote(root, artifacts)
    if remote is not None:
        got = remote.store.get_with_etag(f"{PREFIX}/{LATEST_FILE}")
        return json.loads(got[0]) if got else None
    path = root_dir(root) / LATEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_latest(root: str | Path | None, dataset: PreparedDataset) -> None:
    path = root_dir(root) / LATEST_FILE
    tmp = path.with_name(f".{LATEST_FILE}.{uuid.uuid4().hex}.tmp")  # unique per writer, threads too
    tmp.write_text(json.dumps(dataset.summary(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _is_path(ref: str) -> bool:
    return "/" in ref or "\\" in ref or ref.startswith(("~", "."))


def _numbers(folder: Path) -> list[int]:
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []


def _versions(folder: Path) -> list[int]:
    """The published versions of a name: numbered folders with a manifest, ascending."""
    return sorted(n for n in _numbers(folder) if (folder / str(n) / MANIFEST).is_file())


def _load(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def _available(root: str | Path | None, artifacts: Artifacts | None = None) -> str:
    names = sorted({d.name for d in list_datasets(root, artifacts) if d.name})
    return f"prepared datasets: {', '.join(names)}" if names else "there are none yet: run llm_data_quality"


# -- the catalog on a remote artifact store ----------------------------------------------------------


def _version_key(name: str, version: int | None = None) -> str:
    return f"{PREFIX}/{name}" + (f"/{version}" if version is not None else "")


def _remote_numbers(store: Any, name: str | None = None) -> dict[str, tuple[set[int], set[int]]]:
    """name → (every number claimed or holding objects, the complete versions: with the artifact manifest);
    one listing of ``datasets/<name>/`` (every name: ``datasets/``)."""
    from airloom.artifacts import MANIFEST as COMPLETE

    found: dict[str, tuple[set[int], set[int]]] = {}
    for key in store.list(f"{PREFIX}/{name}/" if name else f"{PREFIX}/"):
        parts = key.split("/")
        if len(parts) < 4 or not parts[2].isdigit() or not NAME_RE.match(parts[1]):
            continue
        taken, complete = found.setdefault(parts[1], (set(), set()))
        taken.add(int(parts[2]))
        if len(parts) == 4 and parts[3] == COMPLETE:
            complete.add(int(parts[2]))
    return found


def _load_remote(art: Artifacts, name: str, version: int) -> PreparedDataset:
    key = _version_key(name, version)
    manifest = json.loads(art.store.get_bytes(f"{key}/{MANIFEST}"))
    return PreparedDataset(art.uri(key), manifest, name, version)


def _publish_remote(
    art: Artifacts, staged: Path, name: str, manifest: dict[str, Any], origin: dict[str, Any]
) -> PreparedDataset:
    try:
        while True:
            taken, complete = _remote_numbers(art.store, name).get(name, (set(), set()))
            if complete:
                current = _load_remote(art, name, max(complete))
                if current.dataset_hash == manifest["dataset_hash"]:
                    _write_latest_remote(art, current)
                    return current
            version = max(taken, default=0) + 1  # a number whose upload was cut short stays taken
            claim = {
                "name": name,
                "version": version,
                "dataset_hash": manifest["dataset_hash"],
                "origin": origin,
                "claimed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            try:
                art.store.put_bytes(
                    f"{_version_key(name, version)}/{CLAIM}",
                    json.dumps(claim, indent=2).encode(),
                    if_none_match=True,
                )
            except ConflictError:  # another writer claimed it first: try the next number
                continue
            break
        manifest.update(
            name=name,
            version=version,
            ref=f"{name}@{version}",
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            origin=origin,
        )
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        # Every file, then the artifact manifest last: until it is there, readers do not see the version.
        uri = art.publish(staged, _version_key(name, version))
        found = PreparedDataset(uri, manifest, name, version)
        _write_latest_remote(art, found)
        return found
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # this worker's copy: the store holds the version


def _write_latest_remote(art: Artifacts, dataset: PreparedDataset) -> None:
    art.store.put_bytes(f"{PREFIX}/{LATEST_FILE}", (json.dumps(dataset.summary(), indent=2) + "\n").encode())


def _resolve_remote(art: Artifacts, ref: str) -> PreparedDataset:
    from airloom.artifacts import MANIFEST as COMPLETE

    if ref.startswith("s3://"):
        key = art.key_of(ref)
        parts = (key or "").split("/")
        if (
            key is None
            or not art.store.exists(f"{key}/{COMPLETE}")
            or not art.store.exists(f"{key}/{MANIFEST}")
        ):
            raise UsageError(
                f"{ref}: not a prepared dataset in {art.uri(PREFIX)} (no {MANIFEST} and {COMPLETE}: never "
                "published, or its upload was cut short)"
            )
        manifest = json.loads(art.store.get_bytes(f"{key}/{MANIFEST}"))
        name, version = manifest.get("name"), manifest.get("version")
        if not (len(parts) == 3 and parts[0] == PREFIX and parts[1] == name and parts[2] == str(version)):
            name, version = None, None  # files uploaded elsewhere: a folder, not a catalog version
        return PreparedDataset(art.uri(key), manifest, name, version if isinstance(version, int) else None)
    name = ref.partition("@")[0]
    check_name(name, "dataset name in reference " + repr(ref))
    versions = sorted(_remote_numbers(art.store, name).get(name, (set(), set()))[1])
    return _load_remote(art, name, _pick(ref, versions, art.uri(PREFIX), lambda: _available(None, art)))


def _list_remote(art: Artifacts) -> list[PreparedDataset]:
    found = []
    for name, (_, complete) in sorted(_remote_numbers(art.store).items()):
        for version in sorted(complete):
            try:
                found.append(_load_remote(art, name, version))
            except (OSError, ValueError, RegistryError):  # unreadable manifest: leave it out of the list
                continue
    found.sort(key=lambda d: (d.manifest.get("created_at") or "", d.name or "", d.version or 0), reverse=True)
    return found
