"""Profile a set of instruction records: ``profile.json`` for machines, ``report.html`` for people.

Chat records (``messages``, see :mod:`airloom.data.chat`) are profiled through their instruction view
like any row, and get a ``conversations`` section of their own: turns, role mix, system prompts, turn
lengths per role and the share of conversations longer than the model's context once rendered.

This module computes the profile; :mod:`airloom.reports.eda` renders the report, one self-contained
file (inline CSS, plots as base64 PNG) that can be attached to a task, mailed or served by the UI
plugin without a static-file server. The PII, markup and duplicate
checks are the ones validation uses, so both stages count the same rows.

Numbers a reader may check against pandas are computed the way pandas computes them: quantiles with
linear interpolation (``Series.quantile``, whose ``0.5`` is ``Series.median``), means as a float64
sum over the count, and duplicates as *extra copies* (``DataFrame.duplicated().sum()``), not as
the number of distinct rows that have copies (given separately as ``groups``).

Records stream through :class:`Profiler` in chunks and are never held: per row it keeps lengths,
flags and a 64-bit content hash (in scratch files when given a folder), and the word-level half
(vocabulary, bigrams, near-duplicates: :class:`WordWork`) runs in a forked child beside the rest
(:mod:`airloom.data.background`). Only the few rows shown as examples are read a second time.
Validation profiles the data in its own pass (:func:`save_scan`); EDA then renders that
(:func:`profile_source` with ``scan_dir``).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import re
import shutil
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from airloom.data.background import Background, Local
from airloom.data.chat import ROLES
from airloom.data.divergence import js_divergence, psi, psi_verdict
from airloom.data.load import TEXT_FIELDS
from airloom.data.neardup import (
    DEFAULT_NUM_PERM,
    DEFAULT_SHINGLE_SIZE,
    DEFAULT_THRESHOLD,
    NearDuplicateFinder,
    NearDuplicates,
    scan_words,
)
from airloom.data.seen import SeenKeys
from airloom.data.text import (
    CONTROL_CHARS_RE,
    LETTER_SCRIPTS,
    MARKUP_RE,
    SCRIPT_NAMES,
    dedup_key,
    find_pii,
    has_markup,
)
from airloom.exceptions import UsageError
from airloom.prompts import CHAT_TEMPLATE, PromptRenderer, chat_fields, load_template
from airloom.tokens import as_token_counter

PROFILE_VERSION = 2
QUANTILES = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
_QUANTILE_KEYS = ("p25", "p50", "p75", "p90", "p95", "p99")
#: Lower edges of the length bins (characters or tokens); the last bin is open-ended. Fixed, so the
#: counts of any two profiles can be compared (population stability index).
LENGTH_BIN_EDGES: tuple[int, ...] = tuple(sorted({0, 1, 2, 3, *(round(2 ** (k / 2)) for k in range(4, 38))}))
_STOPWORDS = frozenset(
    """a an the and or but if then else of to in on at by for from with without into onto over under as is are
    was were be been being it its this that these those there here i you he she we they me him her us them my
    your his our their what which who whom whose how why when where do does did done not no yes so than too very
    can could will would should may might must shall s t d ll m re ve don doesn didn isn aren wasn won""".split()
)
_TOP = 20
_EXAMPLES = 5
_FREQUENCIES = 5000  # words with counts kept in profile.json, for the vocabulary drift of a later run
_NEW_WORDS_TOP = 1000
_LANGUAGE_SAMPLE = 200
#: Rows whose token lengths are counted when a profile is given a tokenizer (an even sample of the
#: stream): tokenizing costs seconds per 10k rows, and quantiles to a few percent need no more.
TOKEN_SAMPLE = 4_000
_PAIRS_CAP = 1_000_000  # distinct word pairs counted (see _PairCounts)
_VOCAB_CAP = 250_000  # distinct words counted exactly; the size of a larger vocabulary is estimated
_BATCH = 4096
#: Distinct system prompts counted exactly (by hash); past it the rarer half is dropped and the number
#: of distinct prompts is estimated
_SYSTEM_CAP = 10_000
_SYSTEM_TOP = 10
_TURNS_SHOWN = 40  # bars of the turns-per-conversation histogram; longer conversations counted in "above"
_ROLE_GROUPS = (*ROLES, "other")  # turns of any other role are counted together
_ASCII_LETTER_RE = re.compile(r"[A-Za-z]")


def build_profile(records: Sequence[dict], out_dir: Path, **options: Any) -> dict:
    """:func:`profile_stream` over records already in memory; the options are the same."""
    records = list(records)
    return profile_stream(lambda: [records], out_dir, **options)


def profile_stream(
    chunks: Callable[[], Iterable[Sequence[dict]]],
    out_dir: Path,
    *,
    tokenizer: Any = None,
    previous_profile: dict | None = None,
    near_duplicate_threshold: float | None = DEFAULT_THRESHOLD,
    shingle_size: int = DEFAULT_SHINGLE_SIZE,
    languages: bool = True,
    token_sample: int | None = TOKEN_SAMPLE,
    token_error: str | None = None,
) -> dict:
    """Profile a stream of records and write ``profile.json`` and ``report.html`` into ``out_dir``.

    ``chunks()`` is called twice: once for the profile, once more to pick the few rows shown as
    examples, so memory holds one chunk and a few bytes per row, never the corpus.

    Args:
        chunks: Returns the records chunk by chunk, as :func:`airloom.data.load.iter_chunks` reads them
            (``_line`` is used to point at rows; records without it are numbered from 1).
        out_dir: Folder for the two files (and scratch files while it runs); created if missing.
        tokenizer: Optional :class:`airloom.tokens.TokenCounter` (or a Hugging Face tokenizer, or a
            ``tokenizers.Tokenizer``) for token lengths, the figure that decides ``max_seq_len``, and
            the share of rows longer than the model's context.
        token_sample: Count tokens on an even sample of at most this many rows; None: every row.
        token_error: Why a tokenizer that was asked for could not be loaded (said in the report).
        previous_profile: An earlier ``profile.json`` (as a dict) to compare with; adds ``changes``
            and ``drift`` (population stability index of lengths, vocabulary shift).
        near_duplicate_threshold: Jaccard of word shingles from which a row counts as a near-duplicate
            of an earlier one; None skips the search.
        shingle_size: Words per shingle.
        languages: Guess the language of a sample of instructions when ``langdetect`` is installed.

    Returns:
        The profile, as written to ``profile.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profiler = Profiler(
        tokenizer,
        near_duplicate_threshold,
        shingle_size,
        languages=languages,
        spill_dir=out_dir,
        token_sample=token_sample,
        token_error=token_error,
    )
    try:
        for chunk in chunks():
            profiler.add(chunk)
        profile, series = profiler.finish(pick_rows(chunks(), profiler.wanted()))
    finally:
        profiler.close()  # scratch files
    return write_profile(profile, series, out_dir, previous_profile)


def profile_source(
    path: str | Path,
    out_dir: Path,
    *,
    scan_dir: str | Path | None = None,
    previous_profile: dict | None = None,
    s3_client: Any = None,
    tokenizer: Any = None,
    field_map: dict[str, str] | None = None,
) -> dict:
    """The EDA report of a file, folder, glob or ``s3://`` source, read as a stream (``field_map`` as
    :func:`airloom.data.load.iter_chunks` takes it).

    When ``scan_dir`` holds the profile validation computed while reading the same files (unchanged
    since: see :func:`airloom.data.load.fingerprint`), it is rendered instead of read again (with the
    token lengths of validation's tokenizer, if it had one; ``tokenizer``, an object or a reference
    for :func:`airloom.tokens.load_token_counter`, is for a fresh read).
    """
    from airloom.data.load import fingerprint, iter_chunks

    if scan_dir:
        source = fingerprint(path)
        saved = load_scan(Path(scan_dir), source) if source is not None else None
        if saved is not None:
            profile, series = saved
            return write_profile(profile, series, out_dir, previous_profile)
    token_error = None
    if isinstance(tokenizer, str):  # a reference: loaded only now that the data is read here
        from airloom.exceptions import UsageError
        from airloom.tokens import load_token_counter

        try:
            tokenizer = load_token_counter(tokenizer)
        except UsageError as exc:  # the rest of the report is still worth having
            tokenizer, token_error = None, str(exc)
    return profile_stream(
        lambda: (chunk.records for chunk in iter_chunks(path, field_map, s3_client=s3_client)),
        out_dir,
        previous_profile=previous_profile,
        tokenizer=tokenizer,
        token_error=token_error,
    )


def write_profile(profile: dict, series: dict, out_dir: Path, previous_profile: dict | None = None) -> dict:
    """Write ``profile.json`` and ``report.html`` (with drift against ``previous_profile``, if given)."""
    from airloom.reports.eda import render_profile

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = dict(profile)
    if previous_profile is not None:
        profile["changes"] = _changes(previous_profile, profile)
        profile["drift"] = _drift(previous_profile, profile)
    _write(out_dir / "profile.json", json.dumps(profile, indent=2, ensure_ascii=False) + "\n")
    _write(out_dir / "report.html", render_profile(profile, series))
    return profile


def save_scan(profile: dict, series: dict, scan_dir: Path, source: dict) -> None:
    """Keep a profile computed elsewhere (validation computes one in its pass) for :func:`load_scan`.

    ``source`` identifies what was read (see :func:`airloom.data.load.fingerprint`), so a later EDA
    reuses the scan only for the same data.
    """
    scan_dir = Path(scan_dir)
    scan_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"{unit}:{f}": values for unit, by_field in series.items() for f, values in by_field.items()}
    with open(scan_dir / "series.npz", "wb") as fh:
        np.savez(fh, **arrays)
    _write(scan_dir / "profile.json", json.dumps(profile, ensure_ascii=False) + "\n")
    _write(scan_dir / "source.json", json.dumps(source, sort_keys=True) + "\n")


def load_scan(scan_dir: Path, source: dict) -> tuple[dict, dict] | None:
    """(profile, series) saved by :func:`save_scan` for the same ``source``; None when absent or stale."""
    scan_dir = Path(scan_dir)
    try:
        if json.loads((scan_dir / "source.json").read_text()) != json.loads(
            json.dumps(source, sort_keys=True)
        ):
            return None
        profile = json.loads((scan_dir / "profile.json").read_text(encoding="utf-8"))
        with np.load(scan_dir / "series.npz") as arrays:
            series: dict[str, dict[str, np.ndarray]] = {"chars": {}, "words": {}, "tokens": {}}
            for key in arrays.files:
                unit, f = key.split(":", 1)
                series.setdefault(unit, {})[f] = arrays[key]
    except (OSError, ValueError, KeyError):
        return None
    return profile, series


# --- numbers -------------------------------------------------------------------------------------


def _stats(values: np.ndarray | Sequence[int]) -> dict[str, float]:
    """Count, min, mean, quantiles (pandas' linear interpolation: ``p50`` is the median) and max."""
    arr = np.asarray(values, dtype=np.int64)
    if not arr.size:
        return {"count": 0, "min": 0, "mean": 0.0, **dict.fromkeys(_QUANTILE_KEYS, 0.0), "max": 0}
    qs = np.quantile(arr, QUANTILES)  # the call pandas' Series.quantile makes
    return {
        "count": int(arr.size),
        "min": int(arr.min()),
        "mean": float(arr.sum(dtype=np.float64) / arr.size),  # as pandas' nanmean
        **{k: float(q) for k, q in zip(_QUANTILE_KEYS, qs, strict=True)},
        "max": int(arr.max()),
    }


def _histogram(values: np.ndarray, bins: int = 30) -> dict[str, list]:
    """Counts over ``[0, p99]``; longer values are counted in ``above`` so one outlier cannot flatten the plot."""
    if not len(values):
        return {"edges": [], "counts": [], "above": 0}
    top = max(1.0, float(np.quantile(values, 0.99)))
    counts, edges = np.histogram(values, bins=bins, range=(0.0, top))
    return {
        "edges": [round(float(e), 2) for e in edges],
        "counts": [int(c) for c in counts],
        "above": int((values > top).sum()),
    }


def _binned(values: np.ndarray) -> list[int]:
    """Counts per :data:`LENGTH_BIN_EDGES` bin."""
    idx = np.searchsorted(np.asarray(LENGTH_BIN_EDGES), values, side="right") - 1
    return [int(c) for c in np.bincount(idx, minlength=len(LENGTH_BIN_EDGES))]


def _preview(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _mask(value: str) -> str:
    """Enough of a PII match to recognise it in the report, not enough to copy it."""
    if len(value) <= 6:
        return "***"
    return value[:2] + "*" * (len(value) - 6) + value[-4:]


def _row_scripts(text: str) -> tuple[str, bool]:
    """(the script most of the row's letters are in, whether another script has >= 10% of them); a tie
    goes to the script whose first letter comes first."""
    if text.isascii():
        return ("Latin" if _ASCII_LETTER_RE.search(text) else "none"), False
    classes = LETTER_SCRIPTS(text)
    counts = np.bincount(classes, minlength=len(SCRIPT_NAMES) + 1).tolist()[1:]  # a few dozen: Python's pace
    total = sum(counts)
    if not total:
        return "none", False
    top, second = heapq.nlargest(2, counts)
    first = counts.index(top)
    if counts.count(top) > 1:
        first = min(
            (k for k, n in enumerate(counts) if n == top), key=lambda k: int(np.argmax(classes == k + 1))
        )
    return SCRIPT_NAMES[first], second > 0 and second >= 0.1 * total


class _PairCounts:
    """Counts of uint64 keys (word-id bigrams), merged in sorted arrays instead of a Python dict.

    At most ``_PAIRS_CAP`` distinct keys are kept: past it the rarest half is dropped (the top pairs of
    a big corpus are frequent from early on; their counts stay exact once kept).
    """

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    def add(self, keys: np.ndarray) -> None:
        self._pending.append(keys)
        self._pending_size += len(keys)
        if self._pending_size > 1_000_000:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        new = np.sort(np.concatenate(self._pending))
        self._pending, self._pending_size = [], 0
        if not len(new):  # rows without a content-word pair (e.g. "Task 0"): nothing to count
            return
        starts = np.flatnonzero(np.concatenate(([True], new[1:] != new[:-1])))
        keys, counts = new[starts], np.diff(np.append(starts, len(new)))
        del new
        # into the sorted table: counts of known keys added in place, new keys inserted where they sort
        pos = np.searchsorted(self.keys, keys)
        known = pos < len(self.keys)
        known[known] = self.keys[pos[known]] == keys[known]
        np.add.at(self.counts, pos[known], counts[known])
        self.keys = np.insert(self.keys, pos[~known], keys[~known])
        self.counts = np.insert(self.counts, pos[~known], counts[~known])
        if len(self.keys) > _PAIRS_CAP:
            keep = np.sort(np.argsort(-self.counts, kind="stable")[: _PAIRS_CAP // 2])
            self.keys, self.counts = self.keys[keep], self.counts[keep]

    def top(self, n: int) -> list[tuple[int, int, int]]:
        """(first id, second id, count), most frequent first; ties in key order."""
        self._merge()
        if not len(self.keys):
            return []
        order = np.lexsort((self.keys, -self.counts))[:n]
        return [
            (int(k >> np.uint64(32)), int(k & np.uint64(0xFFFFFFFF)), int(c))
            for k, c in zip(self.keys[order], self.counts[order], strict=True)
        ]


def row_key_hashes(records: Sequence[dict]) -> np.ndarray:
    """64-bit hash of each record's :func:`dedup_key`, for duplicate detection within this process.

    Python's own string hash (SipHash): several times cheaper than a cryptographic digest, and
    nothing here is kept across processes. Two distinct rows collide with p ~ n^2 / 2^65.
    """
    mask = (1 << 64) - 1
    return np.fromiter(
        (
            hash(dedup_key(r.get("instruction") or "", r.get("input") or "", r.get("response") or "")) & mask
            for r in records
        ),
        dtype=np.uint64,
        count=len(records),
    )


class _Hll:
    """HyperLogLog (2^14 registers, ~0.8% error) over 64-bit word keys, for the vocabulary size once the
    exact word table is full."""

    P = 14

    def __init__(self) -> None:
        self.registers = np.zeros(1 << self.P, dtype=np.uint8)

    def add(self, keys: np.ndarray) -> None:
        h = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # spread both halves of the key
        idx = (h >> np.uint64(64 - self.P)).astype(np.int64)
        rest = (h << np.uint64(self.P)) | np.uint64(1 << (self.P - 1))  # never 0: rank <= 64 - P + 1
        rank = (64 - np.floor(np.log2(rest.astype(np.float64)))).astype(np.uint8)
        np.maximum.at(self.registers, idx, rank)

    def estimate(self) -> int:
        m = float(len(self.registers))
        raw = 0.7213 / (1 + 1.079 / m) * m * m / float(np.sum(2.0 ** -self.registers.astype(np.float64)))
        zeros = int(np.count_nonzero(self.registers == 0))
        if raw <= 2.5 * m and zeros:
            return round(m * math.log(m / zeros))  # linear counting for small sets
        return round(raw)


class _SystemPrompts:
    """How many conversations share each system prompt, by a 64-bit hash of its text (whitespace
    collapsed), with the first row that has it: its text is read again only for the top prompts.

    At most ``_SYSTEM_CAP`` prompts are counted: past it the rarer half is dropped (their counts, and
    those of prompts seen again after that, become lower bounds) and the number of distinct prompts is
    estimated from a HyperLogLog of every hash.
    """

    def __init__(self) -> None:
        self.counts: dict[int, list[int]] = {}  # hash -> [conversations, first row]
        self.hll = _Hll()
        self.dropped = False

    def add(self, keys: list[int], rows: list[int]) -> None:
        for key, row in zip(keys, rows, strict=True):
            seen = self.counts.get(key)
            if seen is None:
                self.counts[key] = [1, row]
            else:
                seen[0] += 1
        if keys:
            self.hll.add(np.asarray(keys, dtype=np.uint64))
        if len(self.counts) > _SYSTEM_CAP:
            self.counts = dict(self._ranked()[: _SYSTEM_CAP // 2])
            self.dropped = True

    def _ranked(self) -> list[tuple[int, list[int]]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1][0], kv[1][1]))  # ties: first seen first

    def distinct(self) -> int:
        return max(self.hll.estimate(), len(self.counts)) if self.dropped else len(self.counts)

    def top(self, n: int) -> list[tuple[int, int]]:
        """(conversations, first row) of the ``n`` most shared prompts."""
        return [(count, row) for _, (count, row) in self._ranked()[:n]]


def _chat_turns(rec: dict) -> list[tuple[Any, str]] | None:
    """(role, content) of each turn of a chat record; None for an instruction record."""
    messages = rec.get("messages")
    if not isinstance(messages, list):
        return None
    return [
        (t.get("role"), t["content"] if isinstance(t.get("content"), str) else "")
        for t in messages
        if isinstance(t, dict)
    ]


def _role_group(role: Any) -> str:
    return role if role in ROLES else "other"


def _system_prompt(turns: list[tuple[Any, str]]) -> str | None:
    return next((content for role, content in turns if role == "system"), None)


def _masked_preview(text: str, n: int = 80) -> str:
    """:func:`_preview` with personal data masked as the PII examples are."""
    for matches in find_pii(text).values():
        for match in matches:
            text = text.replace(match, _mask(match))
    return _preview(text, n)


def _turn_of(renderer: PromptRenderer) -> str:
    """One turn as ``renderer`` writes it, ``{role}`` and ``{content}`` standing for its parts (the
    report shows it for ChatML)."""
    return renderer.render_turns([{"role": "{role}", "content": "{content}"}], add_generation_prompt=False)


class Columns:
    """Per-row arrays appended chunk by chunk, read back whole one at a time.

    With ``spill_dir`` they go to scratch files there (removed by :meth:`close`), so a profile of
    millions of rows holds the column it is working on, not all of them.
    """

    def __init__(self, spill_dir: str | Path | None = None, *, existing: str | Path | None = None) -> None:
        """``existing``: write into another Columns' folder (from another process); it stays its owner's."""
        self._owner = existing is None
        if existing is not None:
            self.dir: Path | None = Path(existing)
        else:
            self.dir = (
                Path(tempfile.mkdtemp(prefix=".columns.", dir=spill_dir)) if spill_dir is not None else None
            )
        self._parts: dict[str, list[np.ndarray]] = {}
        self._dtypes: dict[str, np.dtype] = {}

    def declare(self, name: str, dtype: Any) -> None:
        """A column another process appends to this folder."""
        self._dtypes[name] = np.dtype(dtype)

    def append(self, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        self._dtypes[name] = values.dtype
        if self.dir is None:
            self._parts.setdefault(name, []).append(values)
        else:
            with open(self.dir / name, "ab") as fh:
                fh.write(values.tobytes())

    def get(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The column's rows ``[start, stop)`` (default: all); an empty int64 array for a column nothing
        was appended to."""
        if name not in self._dtypes:
            return np.zeros(0, dtype=np.int64)
        dtype = self._dtypes[name]
        if self.dir is None:
            parts = self._parts.get(name) or [np.zeros(0, dtype=dtype)]
            if len(parts) > 1:  # keep one array from now on
                parts[:] = [np.concatenate(parts)]
            return parts[0][start:stop]
        path = self.dir / name
        if not path.exists():
            return np.zeros(0, dtype)
        count = -1 if stop is None else max(0, stop - start)
        return np.fromfile(path, dtype=dtype, count=count, offset=start * dtype.itemsize)

    def close(self) -> None:
        if self.dir is not None and self._owner:
            shutil.rmtree(self.dir, ignore_errors=True)


class _Words:
    """A growing list of words kept as one UTF-8 buffer and offsets (a Python str costs ~50 bytes more)."""

    def __init__(self) -> None:
        self._blob = bytearray()
        self._ends = array("q")

    def extend(self, words: Iterable[str]) -> None:
        for w in words:
            self._blob += w.encode("utf-8", "surrogatepass")
            self._ends.append(len(self._blob))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = self._ends[i - 1] if i else 0
        return self._blob[start : self._ends[i]].decode("utf-8", "surrogatepass")


class WordWork:
    """The part of a profile computed from each row's words: word counts, content-word bigrams, leading
    words, the vocabulary size, and the near-duplicate search. It needs only the text of each batch,
    so it can run in a child process (:class:`airloom.data.background.Background`) beside the rest."""

    def __init__(
        self,
        columns: Columns | str,
        near_duplicate_threshold: float | None = DEFAULT_THRESHOLD,
        shingle_size: int = DEFAULT_SHINGLE_SIZE,
        num_perm: int = DEFAULT_NUM_PERM,
        spill_dir: str | Path | None = None,
    ) -> None:
        # a Columns in this process, or the folder of one in the parent (a child appends beside it)
        self.columns = columns if isinstance(columns, Columns) else Columns(existing=columns)
        # word key (WordScan.keys) -> id as sorted arrays, up to _VOCAB_CAP words: a few bytes a word
        # where a dict of Python ints takes ~100
        self.vocab_keys = np.zeros(0, dtype=np.uint64)
        self.vocab_ids = np.zeros(0, dtype=np.int32)
        self.vocab_words = _Words()  # id -> word
        self.word_counts = np.zeros(0, dtype=np.int64)
        self.leading_counts = np.zeros(0, dtype=np.int64)
        self.content = np.zeros(0, dtype=bool)  # per word id: not a stop word, not a number
        self.total_words = 0
        self.please = -1  # id of "please", skipped as a leading word
        self.bigrams = _PairCounts()
        self.hll = _Hll()
        self.finder = (
            NearDuplicateFinder(near_duplicate_threshold, shingle_size, num_perm, spill_dir=spill_dir)
            if near_duplicate_threshold is not None
            else None
        )

    def add(self, cols: list[list[str]], eligible: np.ndarray) -> None:
        """One batch: the instruction, input and response texts, and which rows the near-duplicate
        search takes part in. Appends the ``words:<field>`` columns."""
        m = len(cols[0])
        # the words of instruction, input and response of each row, in that order, as arrays
        scan = scan_words([t for row in zip(*cols, strict=True) for t in row], keys=True)
        per_field = scan.lengths.reshape(m, 3)
        for k, f in enumerate(TEXT_FIELDS):
            self.columns.append(f"words:{f}", per_field[:, k].astype(np.int32))
        lengths = per_field.sum(axis=1)
        self._count_words(scan, per_field, lengths, m)
        if self.finder is not None:
            self.finder.add_hashes(scan.hashes, lengths, eligible)

    def _count_words(self, scan: Any, per_field: np.ndarray, lengths: np.ndarray, m: int) -> None:
        """Word counts, content-word bigrams and leading words of one batch."""
        self.total_words += len(scan.keys)
        self.hll.add(scan.keys)
        # word ids: distinct keys of the batch, looked up once each; new words decoded from the bytes
        # any sort (numpy's SIMD quicksort is ~5x its stable one): first occurrences come from reduceat
        order = np.argsort(scan.keys)
        sorted_keys = scan.keys[order]
        first = (
            np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
            if len(order)
            else order.astype(bool)
        )
        unique_keys = sorted_keys[first]
        at = np.searchsorted(self.vocab_keys, unique_keys)
        known = at < len(self.vocab_keys)
        known[known] = self.vocab_keys[at[known]] == unique_keys[known]
        unique_ids = np.full(len(unique_keys), -1, dtype=np.int64)
        unique_ids[known] = self.vocab_ids[at[known]]
        new = np.flatnonzero(~known)
        room = _VOCAB_CAP - len(self.vocab_words)
        if new.size and room > 0:
            where = np.minimum.reduceat(order, np.flatnonzero(first))  # each distinct word's first position
            new = new[np.argsort(where[new], kind="stable")][:room]  # ids in order of appearance
            start = len(self.vocab_words)
            unique_ids[new] = np.arange(start, start + len(new))
            added = [scan.word(k) for k in where[new].tolist()]
            self.vocab_words.extend(added)
            if self.please < 0 and "please" in added:
                self.please = start + added.index("please")
            by_key = np.sort(new)  # insert in key order, so the table stays sorted
            self.vocab_keys = np.insert(self.vocab_keys, at[by_key], unique_keys[by_key])
            self.vocab_ids = np.insert(self.vocab_ids, at[by_key], unique_ids[by_key].astype(np.int32))
            self.content = np.concatenate(
                (self.content, [w not in _STOPWORDS and not w.isdigit() for w in added])
            )
            grow = np.zeros(len(added), dtype=np.int64)
            self.word_counts = np.concatenate((self.word_counts, grow))
            self.leading_counts = np.concatenate((self.leading_counts, grow))
        ids = np.empty(len(order), dtype=np.int64)
        ids[order] = unique_ids[np.cumsum(first) - 1]
        known = ids >= 0  # words past the table's cap are counted in total_words and the size estimate
        self.word_counts += np.bincount(ids[known], minlength=len(self.word_counts))

        row_of = np.repeat(np.arange(m), lengths)
        keep = known.copy()
        keep[known] = self.content[ids[known]]
        cid, crow = ids[keep].astype(np.uint64), row_of[keep]
        same_row = crow[1:] == crow[:-1]
        self.bigrams.add((cid[:-1][same_row] << np.uint64(32)) | cid[1:][same_row])

        # leading word of each instruction, "please" skipped
        row_starts = np.cumsum(lengths) - lengths
        has = per_field[:, 0] > 0
        lead = ids[row_starts[has]]
        skip = (lead == self.please) & (per_field[has, 0] > 1)
        lead[skip] = ids[row_starts[has][skip] + 1]
        lead = lead[~((lead == self.please) & ~skip) & (lead >= 0)]
        self.leading_counts += np.bincount(lead, minlength=len(self.leading_counts))

    def near_duplicates(self) -> NearDuplicates | None:
        return self.finder.result() if self.finder is not None else None

    def summary(self) -> dict:
        """The profile's ``vocabulary`` and ``leading_verbs``."""
        vocab, word_counts, leading = self.vocab_words, self.word_counts, self.leading_counts
        by_count = np.lexsort((np.arange(len(word_counts)), -word_counts))  # ties: first seen first
        top_content = by_count[self.content[by_count]][:_TOP]
        exact = len(vocab) < _VOCAB_CAP
        return {
            "vocabulary": {
                "size": len(vocab) if exact else max(self.hll.estimate(), len(vocab)),
                "size_exact": exact,
                "total_words": int(self.total_words),
                "top_words": [[vocab[i], int(word_counts[i])] for i in top_content],
                "top_bigrams": [[f"{vocab[a]} {vocab[b]}", c] for a, b, c in self.bigrams.top(_TOP)],
                "frequencies": [[vocab[i], int(word_counts[i])] for i in by_count[:_FREQUENCIES]],
            },
            "leading_verbs": [
                [vocab[i], int(leading[i])]
                for i in np.lexsort((np.arange(len(leading)), -leading))[:15]
                if leading[i]
            ],
        }

    def close(self) -> None:
        if self.finder is not None:
            self.finder.close()


class Profiler:
    """The EDA of a stream of records: :meth:`add` chunk after chunk, then :meth:`finish`.

    One pass computes every number; only the examples in the report need text again, from a handful
    of rows, which :meth:`finish` asks for by index (:meth:`wanted` lists them) so the caller can read
    them in a second pass instead of keeping the corpus. Per row, only lengths, flags and a 64-bit
    key stay in memory (plus what near-duplicate detection needs).

    ``add(records, eligible)`` lets validation say which rows take part in the duplicate and
    near-duplicate search (those its other row checks keep); by default every row does. With
    ``spill_dir``, the near-duplicate search keeps its per-row data (~1.5 KB a row) in scratch files
    there instead of in memory.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        near_duplicate_threshold: float | None = DEFAULT_THRESHOLD,
        shingle_size: int = DEFAULT_SHINGLE_SIZE,
        num_perm: int = DEFAULT_NUM_PERM,
        languages: bool = True,
        spill_dir: str | Path | None = None,
        token_sample: int | None = None,
        context: int | None = None,
        token_error: str | None = None,
    ) -> None:
        self.tokenizer = as_token_counter(tokenizer)  # any tokenizer, counted one way
        self.token_error = token_error  # why there are no token lengths although they were asked for
        # token lengths of every row, or (token_sample) of an even sample of that many rows at most,
        # tokenized at the end: a tokenizer costs seconds per 100k rows, and quantiles need no more
        self.token_sample = token_sample if tokenizer is not None else None
        # the model's context in tokens, for the share of rows over it
        self.context = context if context is not None else getattr(self.tokenizer, "context", None)
        # sampled rows: (row, instruction, input, response, the turns of a chat record or None)
        self._token_rows: list[tuple[int, str, str, str, list | None]] = []
        self._token_stride = 1
        self._token_lengths: dict[str, np.ndarray] | None = None
        self._chat_token_lengths: dict[str, np.ndarray] | None = None  # of the sample's conversations
        # conversations are rendered for their token count as training renders them: with the model's
        # chat template (the tokenizer's, or its folder's), else ChatML
        self.chat_renderer = (
            load_template(CHAT_TEMPLATE, tokenizer=self.tokenizer) if self.tokenizer is not None else None
        )
        self.render_errors = 0
        self.render_error: str | None = None
        self.chats = 0
        self.role_turns: Counter[str] = Counter()
        self.role_conversations: Counter[str] = Counter()  # conversations with at least one such turn
        self.system_prompts = _SystemPrompts()
        self._system_top: list[tuple[int, int]] = []
        self.want_languages = languages
        # instructions of every stride-th row; the stride doubles whenever twice the sample is held,
        # so an even sample of any stream is at hand at the end of the pass
        self._lang_texts: list[tuple[int, str]] = []
        self._lang_stride = 1
        self.n = 0
        self.columns = Columns(spill_dir)
        self._first_seen = SeenKeys()
        self.empty = dict.fromkeys(TEXT_FIELDS, 0)
        self.present = {"id": 0, "task": 0}
        self.tasks: Counter[str] = Counter()

        # words, vocabulary and near-duplicates: with a scratch folder the corpus may be big, and this
        # half of the work runs in a child process beside the other (Background), else in place
        if spill_dir is not None:
            for f in TEXT_FIELDS:
                self.columns.declare(f"words:{f}", np.int32)
            if languages:  # imported before the fork: the child then takes no import lock for it
                with contextlib.suppress(ImportError):
                    import langdetect.lang_detect_exception  # noqa: F401
        self.near_threshold = near_duplicate_threshold
        self.work = (Background if spill_dir is not None else Local)(
            WordWork,
            str(self.columns.dir) if spill_dir is not None else self.columns,
            near_duplicate_threshold,
            shingle_size,
            num_perm,
            spill_dir,
        )
        self._near_job: Callable[[], NearDuplicates | None] | None = None
        self.pii_rows, self.pii_kinds, self.pii_examples = 0, Counter(), []
        self.markup_rows, self.markup_examples = 0, []
        self.control_rows = 0
        self.scripts: Counter[str] = Counter()
        self.mixed_rows = 0
        self.script_examples: dict[str, list[dict]] = {}
        self._near: NearDuplicates | None = None
        self._want: set[int] | None = None
        self._result: tuple[dict, dict] | None = None

    # --- pass 1 -----------------------------------------------------------------------------------

    def add(
        self,
        records: Sequence[dict],
        eligible: np.ndarray | None = None,
        *,
        markup: np.ndarray | None = None,
        control: np.ndarray | None = None,
    ) -> None:
        """Profile one chunk of records (a few thousand at a time keeps the temporary arrays small).

        ``markup`` and ``control``: the rows' :func:`has_markup` and control-character flags where the
        caller has them already (validation does), so the rows are not searched twice.
        """
        for start in range(0, len(records), _BATCH):
            batch = records[start : start + _BATCH]
            ok = None if eligible is None else np.asarray(eligible[start : start + _BATCH], dtype=bool)
            known_markup = None if markup is None else np.asarray(markup[start : start + _BATCH], dtype=bool)
            known_control = (
                None if control is None else np.asarray(control[start : start + _BATCH], dtype=bool)
            )
            self._add(batch, ok, known_markup, known_control)

    def _add(
        self,
        batch: Sequence[dict],
        eligible: np.ndarray | None,
        known_markup: np.ndarray | None = None,
        known_control: np.ndarray | None = None,
    ) -> None:
        m = len(batch)
        if not m:
            return
        base = self.n
        self.n += m
        # per-row columns in 32 bits: at millions of rows they are most of what a profile holds
        lines = np.fromiter((rec.get("_line", base + j + 1) for j, rec in enumerate(batch)), np.int32, m)
        self.columns.append("line", lines)
        cols = {f: [rec.get(f) or "" for rec in batch] for f in TEXT_FIELDS}
        if self.want_languages:
            stride = self._lang_stride
            for i in range(-(-base // stride) * stride, base + m, stride):
                self._lang_texts.append((i, cols["instruction"][i - base][:200]))
            if len(self._lang_texts) > 2 * _LANGUAGE_SAMPLE:
                self._lang_stride = stride = stride * 2
                self._lang_texts = [(i, t) for i, t in self._lang_texts if i % stride == 0]
        if self.token_sample is not None:
            stride = self._token_stride
            for i in range(-(-base // stride) * stride, base + m, stride):
                turns = _chat_turns(batch[i - base])
                self._token_rows.append((i, *(cols[f][i - base] for f in TEXT_FIELDS), turns))
            if len(self._token_rows) > 2 * self.token_sample:
                self._token_stride = stride = stride * 2
                self._token_rows = [row for row in self._token_rows if row[0] % stride == 0]
        for f in ("id", "task"):
            self.present[f] += sum(1 for rec in batch if rec.get(f) not in (None, ""))
        self.tasks.update(rec.get("task") or "(none)" for rec in batch)
        rows = np.arange(base, base + m, dtype=np.int32)
        keys = row_key_hashes(batch)
        ok = np.ones(m, dtype=bool) if eligible is None else eligible
        dup_of = rows.copy()
        dup_of[ok] = self._first_seen.first_rows(keys[ok], rows[ok])
        self.columns.append("dup_of", dup_of)
        words = [cols[f] for f in TEXT_FIELDS]
        if any("messages" in rec for rec in batch):  # a chat's words are its turns', not its "user:" labels
            words[1] = [
                chat_fields(rec["messages"], labels=False)["input"] if rec.get("messages") else text
                for rec, text in zip(batch, words[1], strict=True)
            ]
        self.work.post("add", words, ok & (dup_of == rows))
        for f in TEXT_FIELDS:
            self.columns.append(f"chars:{f}", np.fromiter(map(len, cols[f]), dtype=np.int32, count=m))
            self.empty[f] += sum(1 for t in cols[f] if not t.strip())
            if self.tokenizer is not None and self.token_sample is None:
                self.columns.append(f"tokens:{f}", np.asarray(self.tokenizer.lengths(cols[f]), np.int32))

        pii = np.zeros(m, dtype=bool)
        rows_text = [f"{a}\n{b}\n{c}" for a, b, c in zip(*cols.values(), strict=True)]
        blob = "\n".join(rows_text) if known_control is None or known_markup is None else ""
        if known_control is None:  # the whole batch searched once for what most rows lack
            control = np.zeros(m, dtype=bool)
            if CONTROL_CHARS_RE.search(blob):
                control[:] = [CONTROL_CHARS_RE.search(row) is not None for row in rows_text]
        else:
            control = known_control
        self.control_rows += int(control.sum())
        if known_markup is None:
            markup = np.zeros(m, dtype=bool)
            if "<" in blob:
                markup[:] = [
                    "<" in row and has_markup(*texts)
                    for row, texts in zip(rows_text, zip(*cols.values(), strict=True), strict=True)
                ]
        else:
            markup = known_markup
        self.markup_rows += int(markup.sum())
        for j in np.flatnonzero(markup)[: max(0, _EXAMPLES - len(self.markup_examples))]:
            texts = [cols[f][j] for f in TEXT_FIELDS]
            tag = next(mt.group(0) for t in texts if (mt := MARKUP_RE.search(t)))
            self.markup_examples.append(
                {"line": int(lines[j]), "tag": tag, "instruction": _preview(texts[0])}
            )
        for j in range(m):
            ins, inp, resp = cols["instruction"][j], cols["input"][j], cols["response"][j]
            line = int(lines[j])
            row = rows_text[j]
            if find_pii(row):  # cheap whole-row test first; per field only for the few rows that hit
                row_kinds: set[str] = set()
                for f, text in zip(TEXT_FIELDS, (ins, inp, resp), strict=True):
                    for kind, matches in find_pii(text).items():
                        row_kinds.add(kind)
                        if len(self.pii_examples) < _EXAMPLES:
                            self.pii_examples.append(
                                {"line": line, "field": f, "kind": kind, "match": _mask(matches[0])}
                            )
                if row_kinds:
                    pii[j] = True
                    self.pii_rows += 1
                    self.pii_kinds.update(row_kinds)
            script, mixed = _row_scripts(row)
            self.scripts[script] += 1
            self.mixed_rows += mixed
            if script not in ("Latin", "none") or mixed:
                shown = self.script_examples.setdefault(script + (" + other" if mixed else ""), [])
                if len(shown) < 3:
                    shown.append({"line": line, "instruction": _preview(ins)})
        self.columns.append("pii", pii)
        self.columns.append("markup", markup)
        self.columns.append("control", control)
        self._add_chats(batch, base)

    def _add_chats(self, batch: Sequence[dict], base: int) -> None:
        """The conversation counters and per-conversation (``conv:turns``) and per-turn
        (``conv:chars:<role>``) columns of a batch's chat records."""
        turn_counts: list[int] = []
        chars: dict[str, list[int]] = {group: [] for group in _ROLE_GROUPS}  # per turn, by role
        with_role = dict.fromkeys(_ROLE_GROUPS, 0)  # conversations with a turn of the role
        system_keys: list[int] = []
        system_rows: list[int] = []
        convs: list[list[tuple[Any, str]]] = []
        mask = (1 << 64) - 1
        for j, rec in enumerate(batch):
            turns = _chat_turns(rec)
            if turns is None:
                continue
            convs.append(turns)
            turn_counts.append(len(turns))
            system = None
            seen = set()
            for role, content in turns:  # one loop per turn: this is most of the cost of chat rows
                group = role if role in ROLES else "other"
                chars[group].append(len(content))
                seen.add(group)
                if system is None and group == "system":
                    system = content
            for group in seen:
                with_role[group] += 1
            if system is not None:
                system_keys.append(hash(" ".join(system.split())) & mask)
                system_rows.append(base + j)
        if not convs:
            return
        self.chats += len(convs)
        self.columns.append("conv:turns", np.asarray(turn_counts, dtype=np.int32))
        for group, values in chars.items():
            self.role_turns[group] += len(values)
            self.role_conversations[group] += with_role[group]
            if values:
                self.columns.append(f"conv:chars:{group}", np.asarray(values, dtype=np.int32))
        self.system_prompts.add(system_keys, system_rows)
        if self.tokenizer is not None and self.token_sample is None:  # every row's tokens are counted
            for name, values in self._count_chat_tokens(convs).items():
                self.columns.append(f"conv:{name}", values)

    def _count_chat_tokens(self, convs: list[list[tuple[Any, str]]]) -> dict[str, np.ndarray]:
        """``tokens:<role>`` per turn and ``tokens:rendered`` per conversation (those the template
        renders) of ``convs``."""
        by_role: dict[str, list[str]] = {}
        for turns in convs:
            for role, content in turns:
                by_role.setdefault(_role_group(role), []).append(content)
        out = {
            f"tokens:{group}": np.asarray(self.tokenizer.lengths(texts), dtype=np.int32)
            for group, texts in by_role.items()
        }
        rendered = [text for text in map(self._render, convs) if text is not None]
        out["tokens:rendered"] = np.asarray(self.tokenizer.lengths(rendered), dtype=np.int32)
        return out

    def _render(self, turns: list[tuple[Any, str]]) -> str | None:
        """A whole conversation as the model reads it; None when the template refuses it."""
        try:
            return self.chat_renderer.render_turns(
                [{"role": role, "content": content} for role, content in turns],
                add_generation_prompt=False,
                where="a conversation",
            )
        except Exception as exc:  # noqa: BLE001 - templates raise what they like (e.g. roles not alternating)
            self.render_errors += 1
            if self.render_error is None:
                self.render_error = (
                    str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"
                )
            return None

    # --- per-row results (for validation) ---------------------------------------------------------

    def column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A per-row array (rows ``[start, stop)``, default all): ``chars:<field>``, ``words:<field>``,
        ``tokens:<field>``, ``line``, ``dup_of`` (the first row with the same text; itself when none),
        ``pii``, ``markup``, ``control``."""
        return self.columns.get(name, start, stop)

    def close(self) -> None:
        """Stop the background work and remove the scratch files (:meth:`finish` does both)."""
        self.work.close()
        self.columns.close()

    def start_near_duplicates(self) -> None:
        """Ask for the near-duplicates, the word statistics and the language guess now, so a background
        process works on them while the caller does other things (in place: computed here and now)."""
        if self._near_job is None:
            self._first_seen = SeenKeys()  # the pass is over: its keys (12 bytes a row) can go
            self._near_job = self.work.ask("near_duplicates")
            self._words_job = self.work.ask("summary")
            if self.want_languages:
                self._languages_job = self.work.ask(_languages, self._language_sample())

    def release_worker(self) -> bool:
        """After :meth:`start_near_duplicates`: stop the background process if it has answered all it
        was asked (its memory goes with it); True when it is stopped. Never waits, so a caller can try
        now and then while it does something else."""
        if self._near_job is not None and self.work.ready():
            self.work.close()
            return True
        return False

    def sample_token_lengths(self) -> dict[str, np.ndarray]:
        """Token lengths per field of the even sample (``token_sample``), tokenized on the first call
        (validation calls it while its worker finishes, so the time is not added to the run)."""
        if self._token_lengths is None:
            step = max(1, len(self._token_rows) // self.token_sample)
            rows = self._token_rows[::step][: self.token_sample]
            self._token_rows = []
            self._token_lengths = {
                f: np.asarray(self.tokenizer.lengths([row[k + 1] for row in rows]), dtype=np.int32)
                for k, f in enumerate(TEXT_FIELDS)
            }
            convs = [row[4] for row in rows if row[4] is not None]
            self._chat_token_lengths = self._count_chat_tokens(convs) if convs else {}
        return self._token_lengths

    def _language_sample(self) -> list[str]:
        step = max(1, len(self._lang_texts) // _LANGUAGE_SAMPLE)
        return [t for _, t in self._lang_texts[::step][:_LANGUAGE_SAMPLE]]

    def _words(self) -> dict:
        self.start_near_duplicates()
        return self._words_job()

    def near_duplicates(self) -> NearDuplicates | None:
        self.start_near_duplicates()
        if self._near is None:
            self._near = self._near_job()
        return self._near

    # --- pass 2 and the profile -------------------------------------------------------------------

    def wanted(self) -> list[int]:
        """Rows (0-based, in stream order) whose text :meth:`finish` needs for examples."""
        self._plan()
        return sorted(self._want)

    def _plan(self) -> None:
        if self._want is not None:
            return
        n = self.n
        totals = sum(self.column(f"chars:{f}") for f in TEXT_FIELDS) if n else np.zeros(0, np.int64)
        lines = self.column("line")
        order = np.lexsort((lines, totals)) if n else np.zeros(0, dtype=np.int64)
        self._longest = [int(i) for i in order[::-1][:_EXAMPLES]]
        self._shortest = [int(i) for i in order[:_EXAMPLES]]
        dup_of = self.column("dup_of")
        later = np.flatnonzero(dup_of != np.arange(n))
        firsts, sizes = np.unique(dup_of[later], return_counts=True)
        rank = np.lexsort((firsts, -sizes))
        self._dup_groups = len(firsts)
        self._dup_examples = []
        for g in rank[:_EXAMPLES]:
            first = int(firsts[g])
            copies = later[dup_of[later] == first][:9].tolist()
            self._dup_examples.append((first, [first, *copies], int(sizes[g]) + 1))
        found = self.near_duplicates()
        self._clusters = found.clusters(limit=_EXAMPLES) if found is not None else []
        self._system_top = self.system_prompts.top(_SYSTEM_TOP)
        self._want = {
            *self._longest,
            *self._shortest,
            *(first for first, _, _ in self._dup_examples),
            *(i for group in self._clusters[:_EXAMPLES] for i in group[:2]),
            *(row for _, row in self._system_top),
        }

    def finish(self, rows: dict[int, dict]) -> tuple[dict, dict]:
        """The profile and the per-row series for the plots; ``rows`` maps each :meth:`wanted` row to its record."""
        if self._result is not None:
            return self._result
        self._plan()
        n = self.n
        lines = self.column("line")
        chars = {f: self.column(f"chars:{f}") for f in TEXT_FIELDS}
        nwords = {f: self.column(f"words:{f}") for f in TEXT_FIELDS}
        if self.tokenizer is None:
            tokens = {}
        elif self.token_sample is not None:
            tokens = dict(self.sample_token_lengths())
        else:
            tokens = {f: self.column(f"tokens:{f}") for f in TEXT_FIELDS}
        series: dict[str, dict[str, np.ndarray]] = {"chars": chars, "words": nwords, "tokens": tokens}
        fields: dict[str, dict] = {}
        bins: dict[str, dict[str, list[int]]] = {"chars": {}}
        for f in TEXT_FIELDS:
            empty = self.empty[f]
            fields[f] = {
                "present": n - empty,
                "empty": empty,
                "completeness": round((n - empty) / n, 4) if n else 0.0,
                "chars": _stats(chars[f]),
                "words": _stats(nwords[f]),
                "chars_histogram": _histogram(chars[f]),
            }
            bins["chars"][f] = _binned(chars[f])
            if self.tokenizer is not None:
                fields[f]["tokens"] = _stats(tokens[f])
        for f in ("id", "task"):
            present = self.present[f]
            fields[f] = {
                "present": present,
                "empty": n - present,
                "completeness": round(present / n, 4) if n else 0.0,
            }
        totals = chars["instruction"] + chars["input"] + chars["response"]
        fields["total_chars"] = _stats(totals)
        fields["total_words"] = _stats(nwords["instruction"] + nwords["input"] + nwords["response"])
        bins["chars"]["total"] = _binned(totals)
        if self.tokenizer is not None:
            total_tokens = tokens["instruction"] + tokens["input"] + tokens["response"]
            series["tokens"]["total"] = total_tokens
            fields["total_tokens"] = _stats(total_tokens)
            bins["tokens"] = {f: _binned(tokens[f]) for f in TEXT_FIELDS}
            bins["tokens"]["total"] = _binned(total_tokens)
        token_info = {"error": self.token_error} if self.token_error else None
        if self.tokenizer is not None:
            counted = len(total_tokens)
            over = int(np.count_nonzero(total_tokens > self.context)) if self.context else None
            token_info = {
                "tokenizer": self.tokenizer.ref,
                "rows": counted,
                "sampled": self.token_sample is not None and counted < n,
                "context": self.context,
                "over_context": over,
                "over_context_rate": round(over / counted, 4) if over is not None and counted else None,
            }

        conversations, conversation_series = self._conversations(rows, lines)
        if conversation_series:
            series["conversations"] = conversation_series
        words = self._words()
        languages = self._languages_job() if self.want_languages else None
        self.work.close()  # all its answers are in: its memory can go before the profile's own

        def instruction(i: int) -> str:
            return _preview(rows[i].get("instruction") or "")

        def outlier(i: int) -> dict:
            return {"line": int(lines[i]), "chars": int(totals[i]), "instruction": instruction(i)}

        tasks = None
        if any(t != "(none)" for t in self.tasks):
            tasks = dict(self.tasks.most_common())
        duplicates = int(np.count_nonzero(self.column("dup_of") != np.arange(n)))
        rate = (lambda k: round(k / n, 4)) if n else (lambda k: 0.0)
        profile = {
            "version": PROFILE_VERSION,
            "rows": n,
            "fields": fields,
            "length_bins": {"lower_edges": list(LENGTH_BIN_EDGES), **bins},
            "vocabulary": words["vocabulary"],
            "leading_verbs": words["leading_verbs"],
            "duplicates": {
                "count": duplicates,
                "rate": rate(duplicates),
                "groups": self._dup_groups,
                "examples": [
                    {
                        "copies": size,
                        "lines": [int(lines[i]) for i in group],
                        "instruction": instruction(first),
                    }
                    for first, group, size in self._dup_examples
                ],
            },
            "near_duplicates": self._near_profile(rows, lines, rate),
            "scripts": {
                "rows": dict(self.scripts.most_common()),
                "shares": {k: rate(v) for k, v in self.scripts.most_common()},
                "mixed_rows": self.mixed_rows,
                "examples": self.script_examples,
            },
            "languages": languages,
            "tokens": token_info,
            "tasks": tasks,
            "pii": {
                "rows": self.pii_rows,
                "rate": rate(self.pii_rows),
                "by_kind": dict(self.pii_kinds),
                "examples": self.pii_examples,
            },
            "markup": {
                "rows": self.markup_rows,
                "rate": rate(self.markup_rows),
                "examples": self.markup_examples,
            },
            "control_chars": {"rows": self.control_rows, "rate": rate(self.control_rows)},
            "outliers": {
                "longest": [outlier(i) for i in self._longest],
                "shortest": [outlier(i) for i in self._shortest],
            },
        }
        if conversations is not None:  # chat data only: instruction data keeps its profile as it was
            profile["conversations"] = conversations
        self._result = (profile, series)
        self.close()
        return self._result

    def _conversations(self, rows: dict[int, dict], lines: np.ndarray) -> tuple[dict | None, dict]:
        """The profile's ``conversations`` section (None without chat records) and its series:
        ``turns`` per conversation, ``chars:<role>`` and ``tokens:<role>`` per turn, ``tokens:rendered``
        per conversation."""
        n = self.chats
        if not n:
            return None, {}
        turns = self.column("conv:turns")
        series: dict[str, np.ndarray] = {"turns": turns}
        share = lambda k: round(k / n, 4)  # noqa: E731 - of all conversations
        total_turns = int(turns.sum())
        roles = {
            group: {
                "turns": self.role_turns[group],
                "turn_share": round(self.role_turns[group] / total_turns, 4) if total_turns else 0.0,
                "per_conversation": share(self.role_turns[group]),
                "conversations": self.role_conversations[group],
                "conversation_share": share(self.role_conversations[group]),
            }
            for group in _ROLE_GROUPS
            if group != "other" or self.role_turns[group]
        }
        by_turns = np.bincount(turns, minlength=1)[: _TURNS_SHOWN + 1]
        shown = np.flatnonzero(by_turns)
        with_system = self.role_conversations["system"]

        def system_preview(row: int) -> str:
            turns_of = _chat_turns(rows.get(row) or {}) or []
            return _masked_preview(_system_prompt(turns_of) or "")

        lengths: dict[str, dict[str, dict]] = {"chars": {}}
        for group in roles:
            series[f"chars:{group}"] = self.column(f"conv:chars:{group}")
            lengths["chars"][group] = _stats(series[f"chars:{group}"])
        token_info = None
        if self.tokenizer is not None:
            if self.token_sample is None:
                counted = {
                    name: self.column(f"conv:{name}")
                    for name in (*(f"tokens:{g}" for g in roles), "tokens:rendered")
                }
            else:
                self.sample_token_lengths()
                counted = dict(self._chat_token_lengths or {})
            lengths["tokens"] = {}
            for group in roles:
                series[f"tokens:{group}"] = counted.get(f"tokens:{group}", np.zeros(0, dtype=np.int32))
                lengths["tokens"][group] = _stats(series[f"tokens:{group}"])
            rendered = series["tokens:rendered"] = counted.get("tokens:rendered", np.zeros(0, np.int32))
            sampled_convs = len(rendered) + self.render_errors
            over = int(np.count_nonzero(rendered > self.context)) if self.context else None
            token_info = {
                "template": (
                    self.chat_renderer.as_manifest()
                    if self.chat_renderer.kind == "tokenizer"
                    else {**self.chat_renderer.as_manifest(), "turn": _turn_of(self.chat_renderer)}
                ),
                "conversations": len(rendered),
                "sampled": sampled_convs < n,
                "render_errors": self.render_errors,
                "render_error": self.render_error,
                "rendered": _stats(rendered),
                "context": self.context,
                "over_context": over,
                "over_context_rate": round(over / len(rendered), 4)
                if over is not None and len(rendered)
                else None,
            }
        section = {
            "count": n,
            "share_of_rows": round(n / self.n, 4),
            "turns": _stats(turns),
            "turns_histogram": {
                "turns": [int(k) for k in shown],
                "counts": [int(by_turns[k]) for k in shown],
                "above": int(np.count_nonzero(turns > _TURNS_SHOWN)),
            },
            "roles": roles,
            "with_system": with_system,
            "with_system_rate": share(with_system),
            "system_prompts": {
                "distinct": self.system_prompts.distinct(),
                "distinct_exact": not self.system_prompts.dropped,
                "top": [
                    {
                        "conversations": count,
                        "share": share(count),
                        "line": int(lines[row]),
                        "preview": system_preview(row),
                    }
                    for count, row in self._system_top
                ],
            },
            "lengths": lengths,
            "tokens": token_info,
        }
        return section, series

    def _near_profile(self, rows: dict[int, dict], lines: np.ndarray, rate) -> dict:
        found = self.near_duplicates()
        if found is None:
            return {"count": 0, "rate": 0.0, "clusters": 0, "examples": [], "settings": None}
        examples = []
        for group in self._clusters[:_EXAMPLES]:
            first, other = (_row_text(rows[i]) for i in group[:2])
            at = len(os.path.commonprefix([first, other]))  # show both from just before they part
            cut = max(0, at - 30)
            examples.append(
                {
                    "rows": len(group),
                    "lines": [int(lines[i]) for i in group[:10]],
                    "jaccard": [
                        found.jaccards[np.searchsorted(found.members, i)].item() for i in group[1:10]
                    ],
                    "instruction": _preview(rows[group[0]].get("instruction") or ""),
                    "first": ("…" if cut else "") + _preview(first[cut:], 100),
                    "repeat": ("…" if cut else "") + _preview(other[cut:], 100),
                }
            )
        return {
            "count": found.count,
            "rate": rate(found.count),
            "clusters": found.cluster_count,
            "examples": examples,
            "settings": found.to_dict(),
        }


def pick_rows(chunks: Iterable[Sequence[dict]], wanted: Sequence[int]) -> dict[int, dict]:
    """The records at the ``wanted`` 0-based positions of a stream of chunks (a second pass)."""
    want = sorted(set(wanted))
    got: dict[int, dict] = {}
    k, base = 0, 0
    for chunk in chunks:
        end = base + len(chunk)
        while k < len(want) and want[k] < end:
            got[want[k]] = chunk[want[k] - base]
            k += 1
        base = end
        if k == len(want):
            break
    return got


def _row_text(rec: dict) -> str:
    return " ".join(" / ".join(rec.get(f) or "" for f in TEXT_FIELDS).split())


def _languages(texts: list[str]) -> dict:
    """Language guess on an even sample of instructions, when the optional ``langdetect`` is installed."""
    try:
        from langdetect import DetectorFactory, detect
        from langdetect.lang_detect_exception import LangDetectException
    except ImportError:
        return {"method": None, "note": "install langdetect (1.0.9) for a language guess; scripts are above"}
    DetectorFactory.seed = 0  # langdetect is random without it
    guesses: Counter[str] = Counter()
    sampled = 0
    for text in texts:
        text = text[:200]
        if sum(ch.isalpha() for ch in text) < 12:
            continue  # too little text to guess from
        sampled += 1
        try:
            guesses[detect(text)] += 1
        except LangDetectException:
            guesses["unknown"] += 1
    return {
        "method": "langdetect 1.0.9 (Nakatani's n-gram profiles) on instructions",
        "sample": sampled,
        "shares": {lang: round(c / sampled, 4) for lang, c in guesses.most_common()} if sampled else {},
    }


# --- changes and drift ---------------------------------------------------------------------------


def _metrics(profile: dict) -> dict[str, float]:
    """The flat numbers compared between two profiles."""
    out: dict[str, float] = {"rows": profile.get("rows", 0)}
    for key in ("duplicates", "near_duplicates", "pii", "markup", "control_chars"):
        if isinstance(profile.get(key), dict) and "rate" in profile[key]:
            out[f"{key} rate"] = profile[key]["rate"]
    out["vocabulary size"] = profile.get("vocabulary", {}).get("size", 0)
    for f in TEXT_FIELDS:
        stats = profile.get("fields", {}).get(f, {})
        for unit in ("chars", "tokens"):
            if unit in stats:
                out[f"{f} mean {unit}"] = stats[unit]["mean"]
                out[f"{f} p90 {unit}"] = stats[unit]["p90"]
    rows = profile.get("rows") or 0
    for task, count in (profile.get("tasks") or {}).items():
        out[f"task share: {task}"] = round(count / rows, 4) if rows else 0.0
    for script, share in ((profile.get("scripts") or {}).get("shares") or {}).items():
        out[f"script share: {script}"] = share
    conversations = profile.get("conversations")
    if conversations:
        out["conversation share"] = conversations["share_of_rows"]
        out["turns per conversation mean"] = conversations["turns"]["mean"]
        out["system turn share"] = conversations["with_system_rate"]
        out["distinct system prompts"] = conversations["system_prompts"]["distinct"]
    return out


def _changes(previous: dict, current: dict) -> list[dict]:
    before, after = _metrics(previous), _metrics(current)
    changes = []
    for name in list(after) + [k for k in before if k not in after]:
        old, new = before.get(name), after.get(name)
        row: dict[str, Any] = {
            "metric": name,
            "previous": old,
            "current": new,
            "change": None,
            "relative": None,
        }
        if old is not None and new is not None:
            row["change"] = round(new - old, 4)
            row["relative"] = round((new - old) / old, 4) if old else None
        changes.append(row)
    return changes


def _drift(previous: dict, current: dict) -> dict:
    """Length drift (PSI over the fixed length bins) and vocabulary shift against ``previous``."""
    out: dict[str, Any] = {"length_psi": {}, "vocabulary": None, "notes": []}
    prev_bins, cur_bins = previous.get("length_bins") or {}, current.get("length_bins") or {}
    if prev_bins.get("lower_edges") != cur_bins.get("lower_edges"):
        out["notes"].append(
            "the previous profile has no length bins or other ones (written before profile version 2): "
            "no population stability index"
        )
    else:
        for unit in ("chars", "tokens"):
            for f, counts in (cur_bins.get(unit) or {}).items():
                before = (prev_bins.get(unit) or {}).get(f)
                if before is None or not sum(before) or not sum(counts):
                    continue
                value = round(psi(before, counts), 4)
                out["length_psi"].setdefault(unit, {})[f] = {"psi": value, "verdict": psi_verdict(value)}
        if "tokens" in cur_bins and "tokens" not in prev_bins:
            out["notes"].append("the previous profile has no token lengths (no tokenizer then): chars only")
    prev_vocab, cur_vocab = previous.get("vocabulary") or {}, current.get("vocabulary") or {}
    if not prev_vocab.get("frequencies") or not cur_vocab.get("frequencies"):
        out["notes"].append("the previous profile keeps no word frequencies: no vocabulary shift")
        return out
    before = {w: c for w, c in prev_vocab["frequencies"]}
    top = cur_vocab["frequencies"][:_NEW_WORDS_TOP]
    new = [[w, c] for w, c in top if w not in before]
    out["vocabulary"] = {
        "new_top_words_share": round(len(new) / len(top), 4) if top else 0.0,
        "new_top_words": new[:_TOP],
        "top_words_compared": len(top),
        "previous_words_known": len(before),
        "js_divergence": js_divergence(
            before,
            prev_vocab.get("total_words") or 1,
            dict(cur_vocab["frequencies"]),
            cur_vocab["total_words"] or 1,
        ),
    }
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
