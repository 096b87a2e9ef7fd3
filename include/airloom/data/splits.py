"""The one reader of record files: prepared splits (Parquet), and JSON lines (older splits, history
partitions, predictions).

Prepared datasets are Parquet since the ``airloom.prepared/2`` format; older ones and the history
partitions are JSON lines, so both stay readable.
"""

from __future__ import annotations

import json
from pathlib import Path

from airloom.exceptions import UsageError


def read_split(path: str | Path) -> list[dict]:
    """Read a file of records: ``.parquet`` (prepared splits) or JSON lines (any other name).

    Raises:
        UsageError: The file is missing or unreadable; the message names it (and the line, for JSONL).
    """
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        return read_jsonl(path)
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UsageError(f"cannot read {path}: no such file")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError with the reason
        raise UsageError(f"cannot read {path}: not a readable Parquet file ({exc})") from exc


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file of objects; blank lines are skipped, bad lines are reported by number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or remove the line") from exc
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows
