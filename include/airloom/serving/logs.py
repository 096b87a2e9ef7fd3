"""Traffic and feedback records as daily JSONL partitions, PII masked before anything is written.

Layout (the one ``llm_eval_backfill`` reads with :func:`airloom.evaluation.backfill.read_partition`)::

    <traffic-dir>/ds=YYYY-MM-DD/part-<pid>.jsonl     one line per generated choice
    <feedback-dir>/ds=YYYY-MM-DD/part-<pid>.jsonl    one line per feedback post

One file per server process, appended line by line under a lock, so several workers never
interleave inside a line. ``ds`` is the UTC date the record was created.

A traffic line has ``id``, ``prompt`` (what the model saw) and ``response`` (what it answered) —
the fields the backfill needs — plus ``response_id`` (the API id feedback refers to), ``model``
(``NAME/VERSION``), ``latency_ms``, ``prompt_tokens``, ``completion_tokens``, ``finish_reason``,
``created`` and ``pii_masked`` (replacements per field and kind). Note that ``response`` is the served
output, not a reference answer: evaluating traffic measures agreement with what was served; the
corrected answers in feedback are the references.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any


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


class PartitionedJsonl:
    """Append JSON lines to ``<root>/ds=<date>/part-<pid>.jsonl``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def path(self, ds: str) -> Path:
        return self.root / f"ds={ds}" / f"part-{os.getpid()}.jsonl"

    def append(self, records: list[dict[str, Any]], ds: str) -> Path:
        path = self.path(ds)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(data)
        return path


class TrafficLog(PartitionedJsonl):
    """Traffic partitions plus a bounded in-memory index of recent response ids (for feedback)."""

    SCRUBBED = ("prompt", "response", "messages")

    def __init__(self, root: str | Path, *, remember: int = 100_000, lookup_days: int = 7) -> None:
        super().__init__(root)
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._remember = remember
        self.lookup_days = lookup_days

    def write(self, records: list[dict[str, Any]], when: datetime) -> list[dict[str, Any]]:
        ds = when.astimezone(UTC).date().isoformat()
        clean = [scrub(r, self.SCRUBBED) for r in records]
        self.append(clean, ds)
        with self._lock:
            for r in clean:
                self._recent[r["response_id"]] = {
                    "ds": ds,
                    "model": r["model"],
                    "prompt": r["prompt"],
                    "response": r["response"],
                }
                self._recent.move_to_end(r["response_id"])
            while len(self._recent) > self._remember:
                self._recent.popitem(last=False)
        return clean

    def find(self, response_id: str, today: datetime | None = None) -> dict[str, Any] | None:
        """The logged (scrubbed) record of ``response_id``: memory first, then the last ``lookup_days`` partitions."""
        with self._lock:
            hit = self._recent.get(response_id)
        if hit is not None:
            return hit
        today = (today or utc_now()).astimezone(UTC).date()
        needle = json.dumps(response_id)
        for k in range(self.lookup_days):
            ds = (today - timedelta(days=k)).isoformat()
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
                            return {
                                "ds": ds,
                                "model": r.get("model"),
                                "prompt": r.get("prompt"),
                                "response": r.get("response"),
                            }
        return None


class FeedbackLog(PartitionedJsonl):
    SCRUBBED = ("corrected_answer", "comment")

    def write(self, record: dict[str, Any], when: datetime) -> dict[str, Any]:
        clean = scrub(record, self.SCRUBBED)
        self.append([clean], when.astimezone(UTC).date().isoformat())
        return clean
