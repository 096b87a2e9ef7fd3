"""The one reader of record files: prepared splits (Parquet), and JSON lines (older splits, history
partitions, predictions).

Prepared datasets are Parquet since the ``airloom.prepared/2`` format; older ones and the history
partitions are JSON lines, so both stay readable. A prepared dataset with conversations stores each
row's turns in its ``messages`` column as JSON text; the readers give them back as a list of
``{"role", "content"[, "weight"]}`` (None on instruction rows).
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
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError with the reason
        raise UsageError(f"cannot read {path}: not a readable Parquet file ({exc})") from exc
    return _with_turns(rows, path)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file of objects; blank lines are skipped, bad lines are reported by number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return json_lines(text, path)


def json_lines(text: str, where: str | Path) -> list[dict]:
    """The JSON objects of ``text`` (a file's or an object's), one per line, blank lines skipped; a bad line
    is named by ``where`` and its number."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}:{lineno}: not valid JSON ({exc.msg}); fix or remove the line") from exc
        if not isinstance(row, dict):
            raise UsageError(f"{where}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return _with_turns(rows, where)


def _with_turns(rows: list[dict], path: str | Path) -> list[dict]:
    """``messages`` stored as JSON text (prepared splits) decoded into the list of turns, in place."""
    for n, row in enumerate(rows, start=1):
        turns = row.get("messages")
        if isinstance(turns, str):
            try:
                turns = json.loads(turns) if turns else None
            except json.JSONDecodeError as exc:
                raise UsageError(
                    f"{path}: row {n}: messages is not JSON ({exc.msg}); prepare the data again"
                ) from exc
            if turns is not None and not isinstance(turns, list):
                raise UsageError(
                    f"{path}: row {n}: messages must be a list of turns, got {type(turns).__name__}"
                )
            row["messages"] = turns
    return rows
