"""Turn validated records into train/validation/test files the fine-tuning recipe reads.

The output is a pure function of the records and the arguments: no timestamps, rows in input order,
splits decided by a seeded hash of each row's content. The same input therefore always gives
byte-identical files and the same ``dataset_hash``, which lineage and the registry rely on.

Splits are Parquet (``train.parquet``, ``validation.parquet``, ``test.parquet``; columns ``id``,
``prompt``, ``response``, ``task``, ``instruction``, ``input``, and ``messages`` when the dataset holds
conversations). Older datasets hold the same columns as ``<split>.jsonl``;
:func:`airloom.data.splits.read_split` reads either.

:mod:`airloom.data.catalog` names and numbers the output (``name@version``): it adds the name, version,
creation time and origin to ``manifest.json``; the split files and ``dataset_hash`` stay as written here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import itertools
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from json.encoder import encode_basestring as _json_str  # what json.dumps(ensure_ascii=False) uses
from pathlib import Path
from typing import Any

import numpy as np

from airloom.data.neardup import DEFAULT_THRESHOLD as DEFAULT_NEAR_THRESHOLD
from airloom.data.seen import SeenKeys
from airloom.data.text import dedup_key, has_markup, normalize_text, numberish
from airloom.data.text import scrub_pii as _scrub
from airloom.exceptions import UsageError
from airloom.prompts import (
    AUTO_TEMPLATE,
    BUILTIN_TEMPLATES,
    CHAT_TEMPLATE,
    DEFAULT_TEMPLATE,
    chat_fields,
    load_template,
    prompt_context,
    render_conversation,
)
from airloom.tokens import TokenCounter, load_token_counter

SPLITS = ("train", "validation", "test")
COLUMNS = ("id", "prompt", "response", "task", "instruction", "input")
# The columns of a dataset with conversations: ``messages`` is the conversation as JSON text (a list of
# {"role", "content"[, "weight"]} up to its last assistant turn), null on instruction rows. A dataset
# without conversations keeps COLUMNS, so its files are what they were before conversations existed.
CHAT_COLUMNS = (*COLUMNS, "messages")
MANIFEST_FORMAT = "airloom.prepared/2"
PII_POLICIES = ("mask", "drop", "keep")
PII_KINDS = ("email", "phone", "ip", "card")
MARKUP_POLICIES = ("strip", "keep")
DEFAULT_TOKENIZER = "registry:airloom-tiny-base"
# Files that define a Hugging Face tokenizer; their digest pins the tokenizer in the manifest.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
)
ROW_GROUP_SIZE = 50_000
# Records cleaned, rendered and spooled at a time: bounds memory, and amortises numpy/arrow calls.
CHUNK_ROWS = 4096
SPOOL_BATCH_ROWS = 4096
# The kept rows in input order, in the temporary output folder until the split files are written.
SPOOL_FILE = ".rows.spool.parquet"
_NO_RECORD = object()


def prepare(
    records: Iterable[dict],
    out_dir: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    template: str = AUTO_TEMPLATE,
    dedup: bool = True,
    pii_policy: str = "mask",
    max_seq_len: int | None = None,
    tokenizer: str | None = None,
    id_list_cap: int = 100,
    markup: str = "strip",
    near_dedup: float | None = DEFAULT_NEAR_THRESHOLD,
) -> dict:
    """Normalise, screen for PII, deduplicate, render, length-filter and split ``records`` into ``out_dir``.

    Steps, in order (each counted in the manifest's ``counts``):

    1. Unicode NFC and whitespace clean-up (line ends, trailing spaces; indentation is kept). With
       ``markup="strip"``, a row with HTML it does not ask for (:func:`airloom.data.text.has_markup`:
       scraped-page junk) loses its tags, ``<script>``/``<style>`` elements and entities
       (``markup_stripped``); rows about HTML keep theirs.
    2. PII (e-mail, phone, IP, card-like numbers) by ``pii_policy``: ``mask`` replaces it with
       ``<EMAIL>``/``<PHONE>``/``<IP>``/``<CARD>``, ``drop`` removes the row, ``keep`` leaves it (and
       still counts it).
    3. Duplicates dropped (same instruction, input and response once whitespace is collapsed; the
       first copy stays) when ``dedup``.
    4. The prompt rendered with ``template`` (see :func:`airloom.prompts.load_template`).
    5. Rows whose prompt + response + EOS exceed ``max_seq_len`` tokens dropped (as the training
       recipe counts them: a conversation under a template that renders conversations counts the whole
       conversation, :func:`airloom.prompts.render_conversation`), when ``max_seq_len`` is set.
    6. Near-duplicates dropped (``near_deduped``), when ``near_dedup`` is a Jaccard threshold: a row
       whose word 5-shingles are at least that similar to an earlier kept row's (MinHash LSH, confirmed
       exactly: :mod:`airloom.data.neardup`, as validation finds them; the search runs in a worker
       process beside the pass). None turns it off, e.g. for rows validation already screened; so does
       ``dedup=False``, which keeps every copy.
    7. Each row assigned to a split.

    ``records`` may be any iterable (a generator streaming from a file): it is read once, in chunks
    of ``CHUNK_ROWS``; kept rows are spooled to a Parquet file in the temporary output folder and only
    a few fixed-size numbers per row stay in memory, so peak memory hardly grows with the corpus.

    A record is either ``instruction``/``input``/``response`` or a chat: ``messages``, a list of
    ``{"role", "content"[, "weight"]}`` whose last assistant turn is the response and whose earlier turns
    are the prompt (turns after it are ignored and counted). For chat records the ``instruction`` column
    holds the last user turn and ``input`` the other prompt turns as ``role: content`` lines
    (:func:`airloom.prompts.chat_fields`), so single-turn templates such as ``alpaca`` still see the
    whole conversation; the ``messages`` column keeps every turn (JSON text, see ``CHAT_COLUMNS``), so
    training can learn every assistant turn. A dataset without chat records has no ``messages`` column.

    The split is stratified: within each ``task`` (or the whole set when no row has one), rows are
    ranked by ``sha256(seed, content)`` and the lowest ``round(n * test_fraction)`` go to test, the
    next ``round(n * val_fraction)`` to validation. A row's place depends on its content, not its
    position, so adding rows moves few others.

    ``out_dir`` is replaced as a whole: files are written to a temporary sibling folder that is
    renamed into place, so a failed run leaves the previous output (or nothing) behind.

    Args:
        template: ``alpaca``, ``chatml``, ``chat_template`` (the tokenizer's; ChatML when it has none,
            recorded as ``chatml`` with ``requested: chat_template``) or a Jinja2 file.
        tokenizer: a model folder or ``registry:NAME[/N|@ALIAS]``; loaded only when ``template`` is
            ``chat_template`` or ``max_seq_len`` is set.
        id_list_cap: at most this many ids of dropped rows are listed per reason in the manifest.

    Returns:
        The manifest, as written to ``manifest.json``: the arguments, ``counts`` per step (``input =
        pii_dropped + deduped + too_long + near_deduped + output``), ``pii`` (rows with PII and matches per kind,
        among the rows kept under mask/keep, among the rows dropped under drop), ``dropped_ids``
        (up to ``id_list_cap`` per reason), ``template`` and ``tokenizer`` with their sha256, and
        per split its file, rows, tasks and hashes. ``dataset_hash`` and each split's
        ``content_sha256`` are computed over the rows (canonical JSON lines), so they do not depend
        on the Parquet writer's version; ``sha256`` is that of the file's bytes.

    Raises:
        UsageError: Bad fractions/policy/length, an unknown or broken template, a missing tokenizer,
            no records, or a record without text. Records are checked a chunk at a time, so with
            several bad records the first chunk holding one decides which error is reported.
    """
    if pii_policy not in PII_POLICIES:
        raise UsageError(f"unknown pii_policy {pii_policy!r}; use one of {', '.join(PII_POLICIES)}")
    if markup not in MARKUP_POLICIES:
        raise UsageError(f"unknown markup policy {markup!r}; use one of {', '.join(MARKUP_POLICIES)}")
    if near_dedup is not None and (
        isinstance(near_dedup, bool) or not isinstance(near_dedup, int | float) or not 0 < near_dedup <= 1
    ):
        raise UsageError(
            f"near_dedup must be a Jaccard threshold in (0, 1], or None to turn it off, got {near_dedup!r}"
        )
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
    if template not in (*BUILTIN_TEMPLATES, AUTO_TEMPLATE) and not (template and Path(template).is_file()):
        raise UsageError(
            f"unknown prompt template {template!r}: not a built-in "
            f"({', '.join((AUTO_TEMPLATE, *BUILTIN_TEMPLATES))}) and no such file"
        )
    # Peek at the first chunk so an empty input fails before a tokenizer is loaded, as it always did, and
    # "auto" can see whether the data holds conversations.
    records = iter(records)
    head = list(itertools.islice(records, CHUNK_ROWS))
    if not head:
        raise UsageError("no records to prepare; did validation accept any row?")
    records = itertools.chain(head, records)
    requested = template
    if template == AUTO_TEMPLATE:
        chats = any(isinstance(rec.get("messages"), list) for rec in head)
        template = (CHAT_TEMPLATE if tokenizer else "chatml") if chats else DEFAULT_TEMPLATE

    tok, tok_info = None, None
    if template == CHAT_TEMPLATE or max_seq_len is not None:
        why = "template 'chat_template'" if template == CHAT_TEMPLATE else f"max_seq_len={max_seq_len}"
        if not tokenizer:
            raise UsageError(f"{why} needs a tokenizer: give a model folder or registry:NAME reference")
        tok, tok_info = load_tokenizer(tokenizer)
    renderer = load_template(template, tokenizer=tok)
    if requested == AUTO_TEMPLATE:
        renderer = dataclasses.replace(renderer, requested=AUTO_TEMPLATE)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder")
    made = _make_folders(out_dir.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        spool = tmp / SPOOL_FILE
        screen = _Screen(
            spool,
            seed=seed,
            dedup=dedup,
            pii_policy=pii_policy,
            renderer=renderer,
            tok=tok,
            max_seq_len=max_seq_len,
            id_list_cap=id_list_cap,
            strip_markup=markup == "strip",
            near_dedup=near_dedup if dedup else None,
        )
        near = screen.run(records)
        counts = screen.counts
        if not screen.kept:
            raise UsageError(
                f"no rows left to prepare out of {screen.inputs}: pii_dropped={counts['pii_dropped']}, "
                f"deduped={counts['deduped']}, too_long={counts['too_long']}; relax pii_policy or max_seq_len"
            )
        tasks, ranks = screen.strata()
        kept = np.ones(screen.kept, dtype=bool)
        if near is not None:
            kept[near.members] = False
        assignment = np.full(screen.kept, -1, dtype=np.int8)  # -1: dropped as a near-duplicate
        assignment[kept] = _split(tasks[kept], ranks[kept], val_fraction, test_fraction)
        near_ids: list[str] = []
        columns = CHAT_COLUMNS if screen.conversations else COLUMNS
        splits = _write_splits(
            spool, assignment, tasks, screen.task_names, tmp, near_ids, id_list_cap, columns
        )
        screen.dropped["near_duplicate"] = near_ids
        spool.unlink()
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
            "markup": markup,
            "near_dedup": near.to_dict() if near is not None else None,
            "counts": {
                "input": screen.inputs,
                "normalized": counts["normalized"],
                "markup_stripped": counts["markup_stripped"],
                "pii_masked": counts["pii_masked"],
                "pii_dropped": counts["pii_dropped"],
                "deduped": counts["deduped"],
                "too_long": counts["too_long"],
                "near_deduped": near.count if near is not None else 0,
                "output": int(kept.sum()),
                **{split: splits[split]["rows"] for split in SPLITS},
                "trailing_turns_ignored": counts["trailing_turns_ignored"],
            },
            "pii": {"rows": screen.pii_rows, **{k: screen.pii_found[k] for k in PII_KINDS}},
            "dropped_ids": {**screen.dropped, "cap": id_list_cap},
            "splits": splits,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):  # the parents this run created, deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return manifest


def load_tokenizer(ref: str) -> tuple[TokenCounter, dict[str, Any]]:
    """Load a tokenizer from a model folder or ``registry:`` reference; return it and its manifest entry.

    The tokenizer is the light :class:`airloom.tokens.TokenCounter` (the ``tokenizers`` library, the
    folder's chat template; transformers only for a slow tokenizer): the same ids and rendering as
    ``AutoTokenizer``, without its seconds of imports. The entry pins what was used: the resolved
    reference (``registry:NAME/N`` for registry refs) and a sha256 over the tokenizer's files, so a later
    run can tell whether it tokenizes the same way.
    """
    from airloom.registry.resolve import REGISTRY_PREFIX, resolve_model

    try:
        resolved = resolve_model(ref)
    except ValueError as exc:
        raise UsageError(f"cannot resolve tokenizer {ref!r}: {exc}") from exc
    folder = Path(resolved["path"])
    if not ref.startswith(REGISTRY_PREFIX) and not folder.is_dir():
        raise UsageError(f"tokenizer {ref!r}: no such folder (give a model folder or registry:NAME)")
    tok = load_token_counter(str(folder))
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(f"{name}\0{_sha256(folder / name)}\n".encode())
    return tok, {"ref": resolved["ref"], "requested": ref, "sha256": digest.hexdigest()}


def write_split(rows: Iterable[dict], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    """Write rows (``columns``, all text, ``task`` and ``messages`` nullable) as Parquet in a fixed layout.

    pyarrow writes no timestamps; the same rows and pyarrow version give the same bytes.
    """
    import pyarrow as pa

    writer = SplitWriter(path, columns)
    try:
        for chunk in _chunks(rows, ROW_GROUP_SIZE):
            table = pa.Table.from_pydict({c: [r[c] for r in chunk] for c in columns}, schema=_schema(columns))
            writer.write(table)
    finally:
        writer.close()


class SplitWriter:
    """Writes a split file from tables of any size, in :func:`write_split`'s layout and bytes.

    Rows are buffered until a ``ROW_GROUP_SIZE`` row group is complete, which is then written as one
    contiguous table: pages and dictionaries depend on how the writer is handed a row group (a table
    of several chunks gives other bytes), so this gives the bytes one ``pq.write_table(...,
    row_group_size=ROW_GROUP_SIZE)`` over all rows gave before prepare streamed. At most one row
    group (and its contiguous copy) is in memory.
    """

    def __init__(self, path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.rows = 0
        self._schema = _schema(columns)
        self._writer = pq.ParquetWriter(self.path, self._schema, compression="zstd")
        self._pending: list[Any] = []  # tables not yet written, in order
        self._pending_rows = 0

    def write(self, table: Any) -> None:
        """Append the rows of ``table`` (a pyarrow table with this writer's columns)."""
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= ROW_GROUP_SIZE:
            group, size = [], 0
            while size < ROW_GROUP_SIZE:
                part = self._pending.pop(0)
                if part.num_rows > ROW_GROUP_SIZE - size:
                    self._pending.insert(0, part.slice(ROW_GROUP_SIZE - size))
                    part = part.slice(0, ROW_GROUP_SIZE - size)
                group.append(part)
                size += part.num_rows
            self._pending_rows -= size
            self._write_group(group)

    def close(self) -> None:
        """Write the last (partial) row group, or an empty one for a split without rows, and the footer."""
        if self._pending or not self.rows:
            self._write_group(self._pending or [self._schema.empty_table()])
            self._pending, self._pending_rows = [], 0
        self._writer.close()

    def _write_group(self, parts: list[Any]) -> None:
        import pyarrow as pa

        table = pa.concat_tables(parts).combine_chunks()
        del parts[:]  # let the pieces go before the write
        self._writer.write_table(table, row_group_size=ROW_GROUP_SIZE)


def content_sha256(rows: Iterable[dict]) -> str:
    """Digest of the rows as canonical JSON lines: the same as the bytes of the equivalent JSONL file.

    ``messages`` counts as the JSON text a split file stores, also when given as the list of turns that
    :func:`airloom.data.splits.read_split` returns, so the digest of rows read back is the manifest's.
    """
    digest = hashlib.sha256()
    for r in rows:
        if isinstance(r.get("messages"), list):
            r = {**r, "messages": json.dumps(r["messages"], ensure_ascii=False)}
        digest.update((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return digest.hexdigest()


# One row of ``COLUMNS``/``CHAT_COLUMNS`` as json.dumps(row, ensure_ascii=False) + "\n" writes it, in
# UTF-8, for values already JSON-encoded; test_fast_paths_match_validate_and_json holds them to json.dumps.
_JSON_LINE = {
    COLUMNS: b'{"id": %s, "prompt": %s, "response": %s, "task": %s, "instruction": %s, "input": %s}\n'.__mod__,
    CHAT_COLUMNS: (
        b'{"id": %s, "prompt": %s, "response": %s, "task": %s, "instruction": %s, "input": %s, "messages": %s}\n'
    ).__mod__,
}


def _json_value_encoder() -> Callable[[str | None], bytes]:
    """A text or None as JSON, in UTF-8: msgspec's encoder, which escapes strings as json.dumps(...,
    ensure_ascii=False) does, ~3x faster (most of writing the splits); json's when msgspec is missing."""
    try:
        import msgspec
    except ImportError:
        return lambda v: b"null" if v is None else _json_str(v).encode("utf-8")
    return msgspec.json.Encoder().encode


def _turns_json(turns: list[dict], encode: Callable[[str | None], bytes]) -> str:
    """``json.dumps(turns, ensure_ascii=False)`` of cleaned turns (``role``, ``content``, ``weight`` if
    any, in that order), its strings escaped by ``encode`` (:func:`_json_value_encoder`): ~3x faster."""
    parts = []
    for t in turns:
        part = b'{"role": ' + encode(t["role"]) + b', "content": ' + encode(t["content"])
        if "weight" in t:
            part += b', "weight": %d' % t["weight"]
        parts.append(part + b"}")
    return (b"[" + b", ".join(parts) + b"]").decode("utf-8")


def _json_lines(batch: Any, columns: tuple[str, ...] = COLUMNS) -> list[str]:
    """The canonical JSON line of each row of a pyarrow batch (``columns``: text, ``task`` and
    ``messages`` nullable)."""
    encode = _json_value_encoder()
    encoded = [map(encode, batch.column(name).to_pylist()) for name in columns]
    return list(map(bytes.decode, map(_JSON_LINE[columns], zip(*encoded, strict=True))))


class _InBackground:
    """Runs calls one at a time, in order, on a worker thread.

    Parquet compression and I/O release the GIL, so handing them over lets them overlap the Python work
    on the next chunks. At most ``depth`` calls are pending (``submit`` waits for the oldest beyond
    that), which bounds the memory held by their data; a call's error comes out of a later
    ``submit``/``wait``, the first error first.
    """

    def __init__(self, depth: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="airloom-prepare")
        self._pending: deque[Future] = deque()
        self._depth = depth

    def submit(self, fn: Any, *args: Any) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def shutdown(self) -> None:
        """Wait for the calls pending without raising their errors (for ``finally``: the first error wins)."""
        self._pool.shutdown(wait=True)


def _hashes64(digests: list[bytes]) -> np.ndarray:
    """The first 8 bytes of each digest as a big-endian unsigned number."""
    return np.frombuffer(b"".join(d[:8] for d in digests), dtype=">u8").astype(np.uint64)


def _id_hashes(ids: list[str]) -> np.ndarray:
    return _hashes64(
        [hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=8).digest() for i in ids]
    )


def _cleaned(
    chunk: list[tuple[int, dict]], pii_policy: str, rank_prefix: bytes, strip_markup: bool
) -> list[tuple]:
    """Clean a chunk of (position, record): per record ``(row, changed, trailing turns, PII found, id)``;
    ``row`` is None for a row dropped for PII (``id`` then names it), else carries its dedup ``key``,
    rank ``digest`` and ``where`` (and ``markup_stripped``)."""
    out = []
    for i, rec in chunk:
        where = f"record {i + 1}" + (f" (line {rec['_line']})" if "_line" in rec else "")
        row, changed, row_pii = _clean(rec, where, pii_policy, strip_markup)
        trailing = row.pop("trailing_turns")
        if row_pii and pii_policy == "drop":
            out.append((None, changed, trailing, row_pii, _given_id(rec, i)))
            continue
        key = dedup_key(row["instruction"], row["input"], row["response"]).encode("utf-8")
        row.update(key=key, digest=hashlib.sha256(rank_prefix + key).digest(), where=where)
        out.append((row, changed, trailing, row_pii, None))
    return out


class _Screen:
    """The single pass over the records: clean, screen PII, dedup, assign ids, render, length-filter.

    Works a chunk of ``CHUNK_ROWS`` records at a time and appends the kept rows, in input order, to a
    Parquet spool file. What stays in memory per kept row is fixed-size: its task (as a small code)
    and the first 16 bytes of its rank digest ``sha256(seed, key)``; plus, for dedup and id
    uniqueness, a 64-bit hash per distinct key and per id (see :class:`airloom.data.seen.SeenKeys`).

    The rank digest doubles as the dedup hash: for one seed, equal keys give equal digests. Two
    different keys share the first 64 bits with probability ~n²/2**65 (about 5e-8 for 1.4M rows), in
    which case the second row would be dropped as a duplicate; ids are hashed the same way, and a
    collision there would give a row a ``-2`` id. The ranking uses 128 bits: ties between different
    keys (~n²/2**129) are as good as impossible, and equal keys tie as before (input order).
    """

    def __init__(
        self,
        spool: Path,
        *,
        seed: int,
        dedup: bool,
        pii_policy: str,
        renderer: Any,
        tok: Any,
        max_seq_len: int | None,
        id_list_cap: int,
        strip_markup: bool = False,
        near_dedup: float | None = None,
    ) -> None:
        self.spool = spool
        self.strip_markup, self.near_dedup = strip_markup, near_dedup
        self._near: Any = None  # the near-duplicate search, in a worker process
        self.dedup, self.pii_policy, self.renderer = dedup, pii_policy, renderer
        self.tok, self.max_seq_len, self.id_list_cap = tok, max_seq_len, id_list_cap
        self.inputs = 0
        self.kept = 0
        self.conversations = 0  # chat rows spooled
        self.counts: Counter[str] = Counter()
        self.pii_found: Counter[str] = Counter()
        self.pii_rows = 0
        self.dropped: dict[str, list[str]] = {"pii": [], "too_long": []}
        self.task_names: dict[str | None, int] = {}  # task -> code, in order of first appearance
        self._rank_prefix = f"{seed}\x1e".encode()
        self._seen_keys = SeenKeys(rows=False)
        self._used_ids = SeenKeys(rows=False)
        self._ranks: list[np.ndarray] = []  # per chunk: (rows, 2) uint64, the rank digest's first 16 bytes
        self._tasks: list[np.ndarray] = []  # per chunk: task codes
        self._writer: Any = None
        self._background: _InBackground

    def run(self, records: Iterable[dict]) -> Any:
        """The pass; returns the near-duplicates among the spooled rows (None when ``near_dedup`` is off)."""
        # (Cleaning chunks in a forked child while this process finished the one before was measured
        # on 136k rows: no faster, 1.4x the memory. The pickling costs what the cleaning saves.)
        if self.near_dedup is not None:
            from airloom.data.background import Background
            from airloom.data.neardup import NearDuplicateFinder

            # forked before the writer thread starts; its scratch files go beside the spool
            self._near = Background(NearDuplicateFinder, self.near_dedup, spill_dir=str(self.spool.parent))
        self._background = _InBackground()
        try:
            for chunk in _chunks(enumerate(records), CHUNK_ROWS):
                self.inputs += len(chunk)
                self._chunk(_cleaned(chunk, self.pii_policy, self._rank_prefix, self.strip_markup))
            self._background.wait()
            return self._near.ask("result")() if self._near is not None else None
        finally:
            self._background.shutdown()
            if self._writer is not None:
                self._writer.close()
            if self._near is not None:
                self._near.close()

    def strata(self) -> tuple[np.ndarray, np.ndarray]:
        """Per kept row, in order: its task code and its (rows, 2) rank key."""
        return np.concatenate(self._tasks), np.concatenate(self._ranks)

    def _chunk(self, cleaned: list[tuple]) -> None:
        """The rest of a chunk's screening, on what :func:`_cleaned` made of it: in order, as it must be."""
        counts = self.counts
        rows = []
        normalized = trailing = 0
        for row, changed, turns, row_pii, dropped_id in cleaned:
            normalized += changed
            trailing += turns
            if row is not None and row.pop("markup_stripped"):
                counts["markup_stripped"] += 1
            if row is None:  # PII under pii_policy "drop"
                counts["pii_dropped"] += 1
                self.pii_rows += 1
                self.pii_found.update(row_pii)
                _note(self.dropped["pii"], dropped_id, self.id_list_cap)
                continue
            row["pii"] = row_pii
            rows.append(row)
        counts["normalized"] += normalized
        counts["trailing_turns_ignored"] += trailing
        if self.dedup:
            rows = self._drop_duplicates(rows)
        for row in rows:
            if row_pii := row.pop("pii"):
                self.pii_rows += 1
                self.pii_found.update(row_pii)
                counts["pii_masked"] += self.pii_policy == "mask"
        self._assign_ids(rows)
        for row in rows:
            conversation = row["turns"]
            prompt_turns = conversation[:-1] if conversation else None  # the turns before the response
            context = prompt_context(row["instruction"], row["input"], prompt_turns, row["task"])
            row["prompt"] = self.renderer.render(context, where=row["where"])
        if self.max_seq_len is not None:
            kept = []
            for row, n in zip(rows, _token_lengths(self.tok, rows, self.renderer), strict=True):
                if n > self.max_seq_len:
                    counts["too_long"] += 1
                    _note(self.dropped["too_long"], row["id"], self.id_list_cap)
                else:
                    kept.append(row)
            rows = kept
        if rows:
            self._spool(rows)

    def _drop_duplicates(self, rows: list[dict]) -> list[dict]:
        """The rows whose key no earlier row had (in this chunk or before); the first copy stays."""
        firsts, in_chunk = [], set()
        for row in rows:
            h = row["digest"][:8]
            if h not in in_chunk:
                in_chunk.add(h)
                firsts.append(row)
        hashes = _hashes64([r["digest"] for r in firsts])
        seen = self._seen_keys.contains(hashes)
        self._seen_keys.add(hashes[~seen])
        kept = [r for r, s in zip(firsts, seen.tolist(), strict=True) if not s]
        self.counts["deduped"] += len(rows) - len(kept)
        return kept

    def _assign_ids(self, rows: list[dict]) -> None:
        """Keep the source id when it is unique; otherwise use a content hash, stable across runs.

        Ids of earlier chunks are only known by their 64-bit hash (see the class docstring).
        """
        given = []
        for r in rows:
            g = r.pop("given_id")
            given.append(str(g) if g not in (None, "") else None)
        # The first id each row asks for (its own, or its content hash) is nearly always free: one
        # vectorised look-up settles those; repeats take the exact loop below, one look-up per try.
        asked = [g or _content_id(r["key"]) for r, g in zip(rows, given, strict=True)]
        hashes = _id_hashes(asked)
        taken_before = self._used_ids.contains(hashes).tolist()
        used: set[str] = set()  # ids given out in this chunk
        as_asked = True  # whether every row got the id it asked for (so ``hashes`` are the ids' hashes)

        def taken(rid: str) -> bool:
            return rid in used or bool(self._used_ids.contains(_id_hashes([rid]))[0])

        for r, g, first, before in zip(rows, given, asked, taken_before, strict=True):
            first_taken = before or first in used
            if g is not None and not first_taken:
                rid = g
            else:
                base = rid = first if g is None else _content_id(r["key"])
                in_use = first_taken if g is None else taken(base)
                n = 1
                while in_use:  # only when dedup is off and a row repeats
                    n += 1
                    rid = f"{base}-{n}"
                    in_use = taken(rid)
            if rid != first:
                as_asked = False
            used.add(rid)
            r["id"] = rid
        if as_asked:
            self._used_ids.add(hashes)
        else:
            self._used_ids.add(_id_hashes([r["id"] for r in rows]))

    def _spool(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        encode = _json_value_encoder()
        for r in rows:
            turns = r.pop("turns")
            r["messages"] = _turns_json(turns, encode) if turns else None
            self.conversations += turns is not None
        schema = _schema(CHAT_COLUMNS)
        table = pa.Table.from_arrays(
            [_string_array([r[c] for r in rows]) for c in CHAT_COLUMNS], schema=schema
        )
        if self._writer is None:
            # A scratch file read back once: fast compression, no dictionaries or statistics.
            self._writer = pq.ParquetWriter(
                self.spool, schema, compression="lz4", use_dictionary=False, write_statistics=False
            )
        self._background.submit(self._writer.write_table, table)
        if self._near is not None:  # what validation's search reads: the three fields' words, in order
            self._near.post("add_texts", [f"{r['instruction']}\n{r['input']}\n{r['response']}" for r in rows])
        self.kept += len(rows)
        self._ranks.append(
            np.frombuffer(b"".join(r["digest"][:16] for r in rows), dtype=">u8")
            .astype(np.uint64)
            .reshape(-1, 2)
        )
        names = self.task_names
        self._tasks.append(
            np.fromiter(
                (names.setdefault(r["task"], len(names)) for r in rows), dtype=np.int32, count=len(rows)
            )
        )


def _split(tasks: np.ndarray, ranks: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Each row's split (an index into ``SPLITS``): within each task, the lowest ranks go to test, the next
    to validation. A stable sort, so rows of equal content keep their input order, as before."""
    order = np.lexsort((ranks[:, 1], ranks[:, 0], tasks))
    by_task = tasks[order]
    starts = np.flatnonzero(np.r_[True, by_task[1:] != by_task[:-1]]).tolist()
    out = np.zeros(len(tasks), dtype=np.int8)  # 0 = train
    for start, end in zip(starts, starts[1:] + [len(order)], strict=True):
        n = end - start
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        out[order[start : start + n_test]] = SPLITS.index("test")
        out[order[start + n_test : start + n_test + n_val]] = SPLITS.index("validation")
    return out


def _write_splits(
    spool: Path,
    assignment: np.ndarray,
    tasks: np.ndarray,
    task_names: dict[str | None, int],
    folder: Path,
    dropped_ids: list[str] | None = None,
    cap: int = 0,
    columns: tuple[str, ...] = COLUMNS,
) -> dict[str, dict[str, Any]]:
    """Second pass: copy each split's rows, in input order, from the spool to its file and content hash.

    One read of the spool per split, so that one split's row group is buffered at a time (a read
    costs far less than the writing), besides the batches queued for the writer thread: up to a row
    group's worth, so that this thread goes on while a row group is compressed, also the last one of
    a split while the next split is read. Rows assigned -1 go nowhere; the first ``cap`` of their ids
    are appended to ``dropped_ids``. The split files hold ``columns`` of the spool's.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the Parquet writing, while this thread builds the JSON lines
    background = _InBackground(depth=max(1, ROW_GROUP_SIZE // SPOOL_BATCH_ROWS))
    writers, digests = [], []
    try:
        for n, split in enumerate(SPLITS):
            writer = SplitWriter(folder / f"{split}.parquet", columns)
            digest = hashlib.sha256()
            done = 0
            batches = pq.ParquetFile(spool, pre_buffer=False).iter_batches(
                batch_size=SPOOL_BATCH_ROWS, columns=list(columns), use_threads=False
            )
            for batch in batches:
                here = assignment[done : done + batch.num_rows]
                picked = np.flatnonzero(here == n)
                done += batch.num_rows
                if n == 0 and dropped_ids is not None and len(dropped_ids) < cap:
                    ids = batch.column("id")
                    dropped_ids += [
                        ids[k].as_py() for k in np.flatnonzero(here < 0)[: cap - len(dropped_ids)]
                    ]
                if len(picked):
                    rows = pa.Table.from_batches([batch])
                    if len(picked) < batch.num_rows:  # indices not as numpy: see _string_array
                        rows = rows.take(
                            pa.Array.from_buffers(pa.int64(), len(picked), [None, pa.py_buffer(picked)])
                        )
                    background.submit(writer.write, rows)
                    digest.update("".join(_json_lines(rows, columns)).encode("utf-8"))
            background.submit(writer.close)
            writers.append(writer)
            digests.append(digest)
        background.wait()
    finally:
        background.shutdown()
    names = {code: name for name, code in task_names.items()}
    splits: dict[str, dict[str, Any]] = {}
    for n, (split, writer, digest) in enumerate(zip(SPLITS, writers, digests, strict=True)):
        per_task = np.bincount(tasks[assignment == n], minlength=len(names)).tolist()
        counted = {names[code]: k for code, k in enumerate(per_task) if k and names[code] is not None}
        splits[split] = {
            "file": writer.path.name,
            "rows": writer.rows,
            "sha256": _sha256(writer.path),
            "content_sha256": digest.hexdigest(),
            "tasks": dict(sorted(counted.items())),
        }
    return splits


def _schema(columns: tuple[str, ...] = COLUMNS) -> Any:
    import pyarrow as pa

    return pa.schema([(c, pa.string()) for c in columns])


def _string_array(values: list[str | None]) -> Any:
    """``pa.array(values, pa.string())``, built from its buffers: pa.array imports pandas (~0.3 s) to
    ask whether ``values`` is a pandas object, and prepare has no other use for pandas."""
    import pyarrow as pa

    encoded = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(values)), out=offsets[1:])
    if offsets[-1] >= 2**31:  # past a string array's 32-bit offsets: pa.array splits it into chunks
        return pa.array(values, pa.string())
    nulls = values.count(None)
    valid = None
    if nulls:
        valid = np.packbits(
            np.fromiter((v is not None for v in values), dtype=bool, count=len(values)), bitorder="little"
        )
    return pa.StringArray.from_buffers(
        len(values),
        pa.py_buffer(offsets.astype(np.int32)),
        pa.py_buffer(b"".join(encoded)),
        None if valid is None else pa.py_buffer(valid),
        nulls,
    )


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# Whitespace (other than the line break itself) just before a line break: normalize_text strips it.
# Written to start with the literal "\n", which re finds far faster than a leading character class.
_SPACE_BEFORE_BREAK_RE = re.compile(r"\n(?<=[^\S\n]\n)")


def _normalize(text: str) -> str:
    """``normalize_text(text)``, without its split/rstrip/join when that would return ``text`` as it is.

    That is so when the text is NFC (ASCII always is), has no ``\\r``, no whitespace before a line
    break and none at either end, which most text already is; the tests hold both to the same result.
    """
    if (
        "\r" not in text
        and not (text[:1].isspace() or text[-1:].isspace())
        and not _SPACE_BEFORE_BREAK_RE.search(text)
        and (text.isascii() or unicodedata.is_normalized("NFC", text))
    ):
        return text
    return normalize_text(text)


def _clean_text(value: Any, what: str, where: str, mask: bool, pii: list[dict[str, int]]) -> tuple[str, bool]:
    """One field normalised (and scrubbed when ``mask``); whether normalising changed it. PII found is
    appended to ``pii``."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise UsageError(f"{where}: {what} must be text, got {type(value).__name__}; validate first")
    text = _normalize(value)
    changed = text is not value and text != value
    # Scrubbed also under "keep": the manifest reports what was kept. The pre-check is the one
    # scrub_pii starts with, here only to skip the call for the (many) texts without PII.
    if "@" in text or numberish(text):
        scrubbed, found = _scrub(text)
        if found:
            pii.append(found)
        if mask:
            text = scrubbed
    return text, changed


def _clean(
    rec: dict, where: str, pii_policy: str, strip_markup: bool = False
) -> tuple[dict, bool, Counter[str] | None]:
    """Normalised (and, under ``mask``, scrubbed) row; whether normalising changed it; PII found, if any.
    With ``strip_markup``, a row with HTML it does not ask for loses it (``row["markup_stripped"]``)."""
    mask = pii_policy == "mask"
    found: list[dict[str, int]] = []
    messages = rec.get("messages")
    trailing = 0
    if isinstance(messages, list) and messages:
        turns, changed = [], False
        for n, m in enumerate(messages, start=1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
                raise UsageError(f"{where}: messages[{n}] must be an object with a 'role' and 'content'")
            content, ch = _clean_text(m.get("content"), f"messages[{n}].content", where, mask, found)
            changed |= ch
            turn = {"role": m["role"], "content": content}
            weight = m.get("weight")
            if weight is not None:
                if isinstance(weight, bool) or weight not in (0, 1):
                    raise UsageError(f"{where}: messages[{n}].weight must be 0 or 1, got {weight!r}")
                turn["weight"] = int(weight)
            turns.append(turn)
        row, trailing = _chat_row(turns, where)
        stripped = strip_markup and _is_junk_markup(row)
        if stripped:
            turns = [{**t, "content": _strip_markup(t["content"])} for t in turns]
            row, trailing = _chat_row(turns, where)
    else:
        instruction, ch1 = _clean_text(rec.get("instruction"), "instruction", where, mask, found)
        input_, ch2 = _clean_text(rec.get("input"), "input", where, mask, found)
        response, ch3 = _clean_text(rec.get("response"), "response", where, mask, found)
        changed = ch1 or ch2 or ch3
        if not instruction or not response:
            raise UsageError(f"{where}: instruction and response must not be empty; validate first")
        row = {"instruction": instruction, "input": input_, "response": response, "turns": None}
        stripped = strip_markup and _is_junk_markup(row)
        if stripped:  # the input holds no markup (else has_markup would call the row about HTML)
            row["instruction"] = _strip_markup(instruction)
            row["response"] = _strip_markup(response)
    task = rec.get("task") or None
    row.update(
        given_id=rec.get("id"),
        task=str(task) if task is not None else None,
        trailing_turns=trailing,
        markup_stripped=stripped,
    )
    pii = None
    if found:
        pii = Counter()
        for kinds in found:
            pii.update(kinds)
    return row, changed, pii


def _chat_row(turns: list[dict], where: str) -> tuple[dict, int]:
    """A chat's row: its instruction view (:func:`airloom.prompts.chat_fields`) and ``turns``, the
    conversation up to its last assistant turn; and the number of turns after that turn (dropped)."""
    last = max((n for n, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None or not turns[last]["content"]:
        raise UsageError(f"{where}: messages need a non-empty assistant turn (the response); validate first")
    kept = turns[: last + 1]
    row = {**chat_fields(kept), "turns": kept}
    if not row["instruction"]:
        raise UsageError(f"{where}: messages need a non-empty user turn before the last assistant turn")
    return row, len(turns) - last - 1


# HTML elements whose tags _strip_markup removes (names that are not also common in code, such as the
# <T> or <int> of generics); block elements leave a line break.
_INLINE_TAGS = (
    "a|abbr|b|big|cite|em|font|i|img|link|meta|small|span|strong|sub|sup|u|iframe|input|label|button"
)
_BLOCK_TAGS = (
    "br|hr|p|div|li|ul|ol|dl|dt|dd|tr|td|th|thead|tbody|table|h[1-6]|section|article|nav|footer|header|main"
    "|aside|center|pre|blockquote|form|html|head|body|title"
)
_TAG_RE = re.compile(
    rf"</?(?:({_BLOCK_TAGS})|(?:{_INLINE_TAGS}))\b[^<>]*?/?>|<!--.*?-->|<!doctype[^<>]*>",
    re.IGNORECASE | re.DOTALL,
)
_SCRIPT_STYLE_RE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def _is_junk_markup(row: dict) -> bool:
    text = row["instruction"] + row["input"] + row["response"]
    return "<" in text and has_markup(row["instruction"], row["input"], row["response"])


def _strip_markup(text: str) -> str:
    """``text`` without HTML tags, ``<script>``/``<style>`` elements and entities; whitespace tidied.
    Left as it is when nothing but markup would remain."""
    out = _SCRIPT_STYLE_RE.sub("", text)
    out = _TAG_RE.sub(lambda m: "\n" if m.group(1) else "", out)
    out = _BLANK_LINES_RE.sub("\n\n", normalize_text(html.unescape(out)))
    return out or text


def _given_id(rec: dict, i: int) -> str:
    if rec.get("id") not in (None, ""):
        return str(rec["id"])
    return f"line {rec['_line']}" if "_line" in rec else f"record {i + 1}"


def _note(ids: list[str], rid: str, cap: int) -> None:
    if len(ids) < cap:
        ids.append(rid)


def _token_lengths(
    counter: TokenCounter, rows: list[dict], renderer: Any = None, batch: int = 1024
) -> list[int]:
    """Tokens of prompt + response + EOS, counted as ``airloom.training.recipe.tokenize_examples`` does:
    a conversation under a template that renders conversations counts its whole rendered text."""
    eos = counter.special_tokens.get("eos_token") or ""
    whole = renderer is not None and renderer.multi_turn
    out: list[int] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        lengths = [0] * len(chunk)
        convs: list[int] = []  # rendered whole
        singles: list[int] = []  # prompt + response
        for n, r in enumerate(chunk):
            (convs if whole and r["turns"] else singles).append(n)
        if convs:  # each conversation rendered whole, the texts counted together (one tokenizer call)
            texts = [
                render_conversation(renderer, chunk[n]["turns"], eos or None, chunk[n]["task"], chunk[n]["where"],
                                    spans=False).text
                for n in convs
            ]  # fmt: skip
            for n, count in zip(convs, counter.lengths(texts), strict=True):
                lengths[n] = count
        prompts = counter.lengths([chunk[n]["prompt"] for n in singles])
        responses = counter.lengths([chunk[n]["response"] + eos for n in singles])
        for n, p, r in zip(singles, prompts, responses, strict=True):
            lengths[n] = p + r
        out.extend(lengths)
    return out


def _content_id(key: bytes) -> str:
    """The id of a row without a usable source id: a hash of its dedup key."""
    return hashlib.sha256(key).hexdigest()[:16]


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


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
