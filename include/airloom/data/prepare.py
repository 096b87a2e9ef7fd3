"""Turn validated records into train/validation/test files the fine-tuning recipe reads.

The output is a pure function of the records and the arguments: no timestamps, rows in input order,
splits decided by a seeded hash of each row's content. The same input therefore always gives
byte-identical files and the same ``dataset_hash``, which lineage and the registry rely on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from airloom.data.prompts import TEMPLATES, render_prompt
from airloom.data.validate import dedup_key, normalize_text
from airloom.data.validate import scrub_pii as _scrub
from airloom.exceptions import UsageError

SPLITS = ("train", "validation", "test")
MANIFEST_FORMAT = "airloom.prepared/1"


def prepare(
    records: list[dict],
    out_dir: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    template: str = "alpaca",
    dedup: bool = True,
    scrub_pii: bool = True,
) -> dict:
    """Normalise, deduplicate, scrub and split ``records`` into ``out_dir``.

    Steps: Unicode NFC and whitespace clean-up (line ends, trailing spaces; indentation is kept),
    PII replaced by ``<EMAIL>``/``<PHONE>``/``<IP>``/``<CARD>``, duplicates dropped (same
    instruction, input and response once whitespace is collapsed; the first copy stays), the prompt
    rendered with :func:`airloom.data.prompts.render_prompt`, then each row assigned to a split.

    The split is stratified: within each ``task`` (or the whole set when no row has one), rows are
    ranked by ``sha256(seed, content)`` and the lowest ``round(n * test_fraction)`` go to test, the
    next ``round(n * val_fraction)`` to validation. A row's place depends on its content, not its
    position, so adding rows moves few others.

    ``out_dir`` is replaced as a whole: files are written to a temporary sibling folder that is
    renamed into place, so a failed run leaves the previous output (or nothing) behind.

    Returns:
        The manifest, as written to ``manifest.json``.

    Raises:
        UsageError: Bad fractions, an unknown template, no records, or a record without text.
    """
    if template not in TEMPLATES:
        raise UsageError(f"unknown prompt template {template!r}; known: {', '.join(sorted(TEMPLATES))}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise UsageError(f"{name} must be in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise UsageError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training rows"
        )
    if not records:
        raise UsageError("no records to prepare; did validation accept any row?")

    rows: list[dict] = []
    scrubbed: Counter[str] = Counter()
    scrubbed_rows = 0
    normalised = 0
    removed = 0
    seen_keys: set[str] = set()
    for i, rec in enumerate(records):
        where = f"record {i + 1}" + (f" (line {rec['_line']})" if "_line" in rec else "")
        texts = {}
        for fld in ("instruction", "input", "response"):
            value = rec.get(fld, "") if fld == "input" else rec.get(fld)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise UsageError(f"{where}: {fld} must be text, got {type(value).__name__}; validate first")
            texts[fld] = normalize_text(value)
        if not texts["instruction"] or not texts["response"]:
            raise UsageError(f"{where}: instruction and response must not be empty; validate first")
        if any(texts[f] != rec.get(f, "") for f in texts):
            normalised += 1
        row_counts: Counter[str] = Counter()
        if scrub_pii:
            for fld, value in texts.items():
                texts[fld], counts = _scrub(value)
                row_counts.update(counts)
        key = dedup_key(texts["instruction"], texts["input"], texts["response"])
        if dedup and key in seen_keys:
            removed += 1
            continue
        seen_keys.add(key)
        if row_counts:
            scrubbed_rows += 1
            scrubbed.update(row_counts)
        task = rec.get("task") or None
        rows.append(
            {
                "given_id": rec.get("id"),
                "key": key,
                "task": str(task) if task is not None else None,
                **texts,
            }
        )

    _assign_ids(rows)
    assignment = _split(rows, seed, val_fraction, test_fraction)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        splits: dict[str, dict[str, Any]] = {}
        for split in SPLITS:
            path = tmp / f"{split}.jsonl"
            chosen = [r for r, s in zip(rows, assignment, strict=True) if s == split]
            with path.open("w", encoding="utf-8", newline="\n") as fh:
                for r in chosen:
                    out = {
                        "id": r["id"],
                        "prompt": render_prompt(r["instruction"], r["input"] or None, template=template),
                        "response": r["response"],
                        "task": r["task"],
                        "instruction": r["instruction"],
                        "input": r["input"],
                    }
                    fh.write(json.dumps(out, ensure_ascii=False) + "\n")
            tasks = Counter(r["task"] for r in chosen if r["task"] is not None)
            splits[split] = {
                "file": path.name,
                "rows": len(chosen),
                "sha256": _sha256(path),
                "tasks": dict(sorted(tasks.items())),
            }
        combined = hashlib.sha256()
        for split in SPLITS:
            combined.update(f"{split}:{splits[split]['sha256']}\n".encode())
        manifest = {
            "format": MANIFEST_FORMAT,
            "dataset_hash": combined.hexdigest(),
            "template": template,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "input_rows": len(records),
            "rows": len(rows),
            "normalised_rows": normalised,
            "dedup": dedup,
            "removed_duplicates": removed,
            "scrub_pii": scrub_pii,
            "scrubbed": {"rows": scrubbed_rows, **{k: scrubbed[k] for k in ("email", "phone", "ip", "card")}},
            "splits": splits,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _assign_ids(rows: list[dict]) -> None:
    """Keep the source id when it is unique; otherwise use a content hash, stable across runs."""
    used: set[str] = set()
    for r in rows:
        given = r.pop("given_id")
        rid = str(given) if given not in (None, "") else None
        if rid is None or rid in used:
            base = rid = hashlib.sha256(r["key"].encode("utf-8")).hexdigest()[:16]
            n = 1
            while rid in used:  # only when dedup is off and a row repeats
                n += 1
                rid = f"{base}-{n}"
        used.add(rid)
        r["id"] = rid


def _split(rows: list[dict], seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    strata: dict[str | None, list[int]] = {}
    for i, r in enumerate(rows):
        strata.setdefault(r["task"], []).append(i)
    out = ["train"] * len(rows)
    for members in strata.values():
        ranked = sorted(members, key=lambda i: _rank(seed, rows[i]["key"]))
        n_test = round(len(ranked) * test_fraction)
        n_val = round(len(ranked) * val_fraction)
        for i in ranked[:n_test]:
            out[i] = "test"
        for i in ranked[n_test : n_test + n_val]:
            out[i] = "validation"
    return out


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x1e{key}".encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
