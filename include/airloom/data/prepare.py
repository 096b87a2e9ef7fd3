"""Turn validated records into train/validation/test files the fine-tuning recipe reads.

The output is a pure function of the records and the arguments: no timestamps, rows in input order,
splits decided by a seeded hash of each row's content. The same input therefore always gives
byte-identical files and the same ``dataset_hash``, which lineage and the registry rely on.

Splits are Parquet (``train.parquet``, ``validation.parquet``, ``test.parquet``; columns ``id``,
``prompt``, ``response``, ``task``, ``instruction``, ``input``). Older datasets hold the same
columns as ``<split>.jsonl``; :func:`read_split` reads either.
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

from airloom.data.prompts import BUILTIN_TEMPLATES, CHAT_TEMPLATE, load_template, prompt_context
from airloom.data.validate import dedup_key, normalize_text
from airloom.data.validate import scrub_pii as _scrub
from airloom.exceptions import UsageError

SPLITS = ("train", "validation", "test")
COLUMNS = ("id", "prompt", "response", "task", "instruction", "input")
MANIFEST_FORMAT = "airloom.prepared/2"
PII_POLICIES = ("mask", "drop", "keep")
PII_KINDS = ("email", "phone", "ip", "card")
DEFAULT_TOKENIZER = "registry:airloom-tiny-base"
# Files that define a Hugging Face tokenizer; their digest pins the tokenizer in the manifest.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
)
ROW_GROUP_SIZE = 50_000


def prepare(
    records: list[dict],
    out_dir: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    template: str = "alpaca",
    dedup: bool = True,
    pii_policy: str = "mask",
    max_seq_len: int | None = None,
    tokenizer: str | None = None,
    id_list_cap: int = 100,
) -> dict:
    """Normalise, screen for PII, deduplicate, render, length-filter and split ``records`` into ``out_dir``.

    Steps, in order (each counted in the manifest's ``counts``):

    1. Unicode NFC and whitespace clean-up (line ends, trailing spaces; indentation is kept).
    2. PII (e-mail, phone, IP, card-like numbers) by ``pii_policy``: ``mask`` replaces it with
       ``<EMAIL>``/``<PHONE>``/``<IP>``/``<CARD>``, ``drop`` removes the row, ``keep`` leaves it (and
       still counts it).
    3. Duplicates dropped (same instruction, input and response once whitespace is collapsed; the
       first copy stays) when ``dedup``.
    4. The prompt rendered with ``template`` (see :func:`airloom.data.prompts.load_template`).
    5. Rows whose prompt + response + EOS exceed ``max_seq_len`` tokens dropped (as the training
       recipe counts them), when ``max_seq_len`` is set.
    6. Each row assigned to a split.

    A record is either ``instruction``/``input``/``response`` or a chat: ``messages``, a list of
    ``{"role", "content"}`` whose last assistant turn is the response and whose earlier turns are the
    prompt (turns after it are ignored and counted). For chat records the ``instruction`` column
    holds the last user turn and ``input`` the other prompt turns as ``role: content`` lines, so
    single-turn templates such as ``alpaca`` still see the whole conversation.

    The split is stratified: within each ``task`` (or the whole set when no row has one), rows are
    ranked by ``sha256(seed, content)`` and the lowest ``round(n * test_fraction)`` go to test, the
    next ``round(n * val_fraction)`` to validation. A row's place depends on its content, not its
    position, so adding rows moves few others.

    ``out_dir`` is replaced as a whole: files are written to a temporary sibling folder that is
    renamed into place, so a failed run leaves the previous output (or nothing) behind.

    Args:
        tokenizer: a model folder or ``registry:NAME[/N|@ALIAS]``; loaded only when ``template`` is
            ``chat_template`` or ``max_seq_len`` is set.
        id_list_cap: at most this many ids of dropped rows are listed per reason in the manifest.

    Returns:
        The manifest, as written to ``manifest.json``: the arguments, ``counts`` per step (``input =
        pii_dropped + deduped + too_long + output``), ``pii`` (rows with PII and matches per kind,
        among the rows kept under mask/keep, among the rows dropped under drop), ``dropped_ids``
        (up to ``id_list_cap`` per reason), ``template`` and ``tokenizer`` with their sha256, and
        per split its file, rows, tasks and hashes. ``dataset_hash`` and each split's
        ``content_sha256`` are computed over the rows (canonical JSON lines), so they do not depend
        on the Parquet writer's version; ``sha256`` is that of the file's bytes.

    Raises:
        UsageError: Bad fractions/policy/length, an unknown or broken template, a missing tokenizer,
            no records, or a record without text.
    """
    if pii_policy not in PII_POLICIES:
        raise UsageError(f"unknown pii_policy {pii_policy!r}; use one of {', '.join(PII_POLICIES)}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise UsageError(f"{name} must be in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise UsageError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training rows"
        )
    if max_seq_len is not None:
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise UsageError(f"max_seq_len must be a positive number of tokens or None, got {max_seq_len!r}")
    if template not in BUILTIN_TEMPLATES and not (template and Path(template).is_file()):
        raise UsageError(
            f"unknown prompt template {template!r}: not a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
            "and no such file"
        )
    if not records:
        raise UsageError("no records to prepare; did validation accept any row?")

    tok, tok_info = None, None
    if template == CHAT_TEMPLATE or max_seq_len is not None:
        why = "template 'chat_template'" if template == CHAT_TEMPLATE else f"max_seq_len={max_seq_len}"
        if not tokenizer:
            raise UsageError(f"{why} needs a tokenizer: give a model folder or registry:NAME reference")
        tok, tok_info = load_tokenizer(tokenizer)
    renderer = load_template(template, tokenizer=tok)

    rows: list[dict] = []
    counts: Counter[str] = Counter()
    pii_found: Counter[str] = Counter()
    pii_rows = 0
    dropped: dict[str, list[str]] = {"pii": [], "too_long": []}
    seen_keys: set[str] = set()
    for i, rec in enumerate(records):
        where = f"record {i + 1}" + (f" (line {rec['_line']})" if "_line" in rec else "")
        row, changed, row_pii = _clean(rec, where, pii_policy)
        counts["normalized"] += changed
        counts["trailing_turns_ignored"] += row.pop("trailing_turns")
        if row_pii and pii_policy == "drop":
            counts["pii_dropped"] += 1
            pii_rows += 1
            pii_found.update(row_pii)
            _note(dropped["pii"], _given_id(rec, i), id_list_cap)
            continue
        key = dedup_key(row["instruction"], row["input"], row["response"])
        if dedup and key in seen_keys:
            counts["deduped"] += 1
            continue
        seen_keys.add(key)
        if row_pii:
            pii_rows += 1
            pii_found.update(row_pii)
            counts["pii_masked"] += pii_policy == "mask"
        row["key"] = key
        row["where"] = where
        rows.append(row)

    _assign_ids(rows)
    for row in rows:
        context = prompt_context(row["instruction"], row["input"], row.pop("messages"), row["task"])
        row["prompt"] = renderer.render(context, where=row["where"])

    if max_seq_len is not None:
        lengths = _token_lengths(tok, rows)
        kept = []
        for row, n in zip(rows, lengths, strict=True):
            if n > max_seq_len:
                counts["too_long"] += 1
                _note(dropped["too_long"], row["id"], id_list_cap)
            else:
                kept.append(row)
        rows = kept
    if not rows:
        raise UsageError(
            f"no rows left to prepare out of {len(records)}: pii_dropped={counts['pii_dropped']}, "
            f"deduped={counts['deduped']}, too_long={counts['too_long']}; relax pii_policy or max_seq_len"
        )
    assignment = _split(rows, seed, val_fraction, test_fraction)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        splits: dict[str, dict[str, Any]] = {}
        for split in SPLITS:
            chosen = [{c: r[c] for c in COLUMNS} for r, s in zip(rows, assignment, strict=True) if s == split]
            path = tmp / f"{split}.parquet"
            write_split(chosen, path)
            tasks = Counter(r["task"] for r in chosen if r["task"] is not None)
            splits[split] = {
                "file": path.name,
                "rows": len(chosen),
                "sha256": _sha256(path),
                "content_sha256": content_sha256(chosen),
                "tasks": dict(sorted(tasks.items())),
            }
        combined = hashlib.sha256()
        for split in SPLITS:
            combined.update(f"{split}:{splits[split]['content_sha256']}\n".encode())
        manifest = {
            "format": MANIFEST_FORMAT,
            "dataset_hash": combined.hexdigest(),
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "template": renderer.as_manifest(),
            "tokenizer": tok_info,
            "max_seq_len": max_seq_len,
            "pii_policy": pii_policy,
            "dedup": dedup,
            "counts": {
                "input": len(records),
                "normalized": counts["normalized"],
                "pii_masked": counts["pii_masked"],
                "pii_dropped": counts["pii_dropped"],
                "deduped": counts["deduped"],
                "too_long": counts["too_long"],
                "output": len(rows),
                **{split: splits[split]["rows"] for split in SPLITS},
                "trailing_turns_ignored": counts["trailing_turns_ignored"],
            },
            "pii": {"rows": pii_rows, **{k: pii_found[k] for k in PII_KINDS}},
            "dropped_ids": {**dropped, "cap": id_list_cap},
            "splits": splits,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_tokenizer(ref: str) -> tuple[Any, dict[str, Any]]:
    """Load a tokenizer from a model folder or ``registry:`` reference; return it and its manifest entry.

    The entry pins what was used: the resolved reference (``registry:NAME/N`` for registry refs) and
    a sha256 over the tokenizer's files, so a later run can tell whether it tokenizes the same way.
    """
    from airloom.registry.resolve import REGISTRY_PREFIX, resolve_model

    try:
        resolved = resolve_model(ref)
    except ValueError as exc:
        raise UsageError(f"cannot resolve tokenizer {ref!r}: {exc}") from exc
    folder = Path(resolved["path"])
    if not ref.startswith(REGISTRY_PREFIX) and not folder.is_dir():
        raise UsageError(f"tokenizer {ref!r}: no such folder (give a model folder or registry:NAME)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise UsageError(f"cannot load tokenizer {ref!r} from {folder}: {exc}") from exc
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(f"{name}\0{_sha256(folder / name)}\n".encode())
    return tok, {"ref": resolved["ref"], "requested": ref, "sha256": digest.hexdigest()}


def write_split(rows: list[dict], path: Path) -> None:
    """Write rows (``COLUMNS``, all text, ``task`` nullable) as Parquet in a fixed layout.

    pyarrow writes no timestamps; the same rows and pyarrow version give the same bytes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.string()) for c in COLUMNS])
    table = pa.Table.from_pydict({c: [r[c] for r in rows] for c in COLUMNS}, schema=schema)
    pq.write_table(table, path, row_group_size=ROW_GROUP_SIZE, compression="zstd")


def read_split(path: str | Path) -> list[dict]:
    """Read a split file: ``.parquet`` (current) or ``.jsonl`` (datasets prepared before Parquet)."""
    from airloom.evaluation.harness import load_records_file

    return load_records_file(path)


def content_sha256(rows: list[dict]) -> str:
    """Digest of the rows as canonical JSON lines: the same as the bytes of the equivalent JSONL file."""
    digest = hashlib.sha256()
    for r in rows:
        digest.update((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return digest.hexdigest()


def _clean(rec: dict, where: str, pii_policy: str) -> tuple[dict, bool, Counter[str]]:
    """Normalised (and, under ``mask``, scrubbed) row; whether normalising changed it; PII found."""
    pii: Counter[str] = Counter()

    def clean(value: Any, what: str) -> tuple[str, bool]:
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise UsageError(f"{where}: {what} must be text, got {type(value).__name__}; validate first")
        text = normalize_text(value)
        changed = text != value
        scrubbed, found = _scrub(text)  # also under "keep": the manifest reports what was kept
        pii.update(found)
        if pii_policy == "mask":
            text = scrubbed
        return text, changed

    messages = rec.get("messages")
    trailing = 0
    if isinstance(messages, list) and messages:
        turns, changed = [], False
        for n, m in enumerate(messages, start=1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
                raise UsageError(f"{where}: messages[{n}] must be an object with a 'role' and 'content'")
            content, ch = clean(m.get("content"), f"messages[{n}].content")
            changed |= ch
            turns.append({"role": m["role"], "content": content})
        last = max((n for n, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last is None or not turns[last]["content"]:
            raise UsageError(
                f"{where}: messages need a non-empty assistant turn (the response); validate first"
            )
        prompt, trailing = turns[:last], len(turns) - last - 1
        user = max((n for n, t in enumerate(prompt) if t["role"] == "user"), default=None)
        if user is None or not prompt[user]["content"]:
            raise UsageError(f"{where}: messages need a non-empty user turn before the last assistant turn")
        others = [f"{t['role']}: {t['content']}" for n, t in enumerate(prompt) if n != user]
        row = {"instruction": prompt[user]["content"], "input": "\n".join(others),
               "response": turns[last]["content"], "messages": prompt}
    else:
        texts, changed = {}, False
        for fld in ("instruction", "input", "response"):
            texts[fld], ch = clean(rec.get(fld), fld)
            changed |= ch
        if not texts["instruction"] or not texts["response"]:
            raise UsageError(f"{where}: instruction and response must not be empty; validate first")
        row = {**texts, "messages": None}
    task = rec.get("task") or None
    row.update(given_id=rec.get("id"), task=str(task) if task is not None else None, trailing_turns=trailing)
    return row, changed, pii


def _given_id(rec: dict, i: int) -> str:
    if rec.get("id") not in (None, ""):
        return str(rec["id"])
    return f"line {rec['_line']}" if "_line" in rec else f"record {i + 1}"


def _note(ids: list[str], rid: str, cap: int) -> None:
    if len(ids) < cap:
        ids.append(rid)


def _token_lengths(tokenizer: Any, rows: list[dict], batch: int = 1024) -> list[int]:
    """Tokens of prompt + response + EOS, counted as ``airloom.training.recipe.tokenize_examples`` does."""
    eos = tokenizer.eos_token or ""
    out: list[int] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        # verbose=False: rows longer than the model's context are expected here; they are what is counted.
        prompts = tokenizer([r["prompt"] for r in chunk], add_special_tokens=False, verbose=False)
        responses = tokenizer([r["response"] + eos for r in chunk], add_special_tokens=False, verbose=False)
        out.extend(
            len(p) + len(r) for p, r in zip(prompts["input_ids"], responses["input_ids"], strict=True)
        )
    return out


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
