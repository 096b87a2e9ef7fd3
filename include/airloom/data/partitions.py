"""Daily partitions of records, read wherever they are: the traffic and feedback ``airloom serve`` writes
(:mod:`airloom.serving.logs`), which monitoring reads, and the history ``llm_eval_backfill`` scores.

``<root>/ds=YYYY-MM-DD/*.jsonl`` under a folder (files in name order), or objects under an ``s3://`` prefix: the artifact
store's (``AIRLOOM_ARTIFACTS``: a path under ``AIRLOOM_HOME`` names the same key there) or any other
bucket. On a store a day is every ``.jsonl`` object under its prefix (listed, then read in parallel:
a busy day is a thousand batch objects per server); each was written by one PUT, so a batch is there
whole or not at all. No Airflow imports.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airloom.data.splits import json_lines, read_jsonl

if TYPE_CHECKING:
    from airloom.artifacts import Artifacts
    from airloom.registry.store import ObjectStore

READERS = 16  # parallel GETs of one day's objects


class DailyPartitions:
    """One log root. :meth:`open` picks the backend; :meth:`read` returns a day's records or None.

    :param root: the folder or URI, for messages.
    :param store: the object store holding the partitions (None: ``root`` is a local folder).
    :param prefix: the key of ``root`` in ``store`` ("" when the store's own prefix is the root).
    """

    def __init__(
        self, root: str | os.PathLike[str], store: ObjectStore | None = None, prefix: str = ""
    ) -> None:
        self.root = os.fspath(root).rstrip("/")
        self.store = store
        self.prefix = prefix.strip("/")

    @classmethod
    def open(
        cls, location: str | os.PathLike[str], *, artifacts: Artifacts | None = None, client: Any = None
    ) -> DailyPartitions:
        """``location`` as the reader of a task sees it: in the artifact store (an ``s3://`` store's URI, or
        a path under ``AIRLOOM_HOME`` when the store is on S3), another ``s3://`` prefix (read with
        ``client``), else a local folder."""
        from airloom.artifacts import is_remote

        text = os.fspath(location).rstrip("/")
        if artifacts is not None and artifacts.remote:
            key = artifacts.key_of(text)
            if key is not None:
                return cls(artifacts.uri(key), artifacts.store, key)
        if is_remote(text):
            from airloom.registry.store import open_store

            return cls(text, open_store(text, client))
        return cls(text)

    def where(self, ds: str) -> str:
        return f"{self.root}/ds={ds}"

    def read(self, ds: str) -> list[dict] | None:
        """The records of one day, or None when the partition does not exist (or holds no ``.jsonl``)."""
        if self.store is None:
            part = Path(self.where(ds))
            files = sorted(part.glob("*.jsonl")) if part.is_dir() else []
            return [r for f in files for r in read_jsonl(f)] if files else None
        base = f"{self.prefix}/ds={ds}/" if self.prefix else f"ds={ds}/"
        keys = [k for k in self.store.list(base) if k.endswith(".jsonl") and "/" not in k[len(base) :]]
        if not keys:
            return None
        store = self.store
        with ThreadPoolExecutor(max_workers=min(READERS, len(keys))) as pool:
            blobs = list(pool.map(store.get_bytes, keys))
        return [
            r
            for key, data in zip(keys, blobs, strict=True)
            for r in json_lines(data.decode("utf-8"), store.uri(key))
        ]


def as_partitions(root: DailyPartitions | str | Path) -> DailyPartitions:
    return root if isinstance(root, DailyPartitions) else DailyPartitions.open(root)
