"""Validate loaded records with a Great Expectations suite, quarantining the rows that fail.

Two kinds of rule, both written as GX expectations so they show up in the Data Docs:

* Row rules (length bounds, blank text, control characters): a failing row is quarantined, with its
  line and reasons, and the rest goes on. Each carries ``mostly = 1 - max_quarantine_rate`` so one
  rule alone may not eat the quarantine budget.
* Rate rules (exact and near duplicates, PII, markup): ``expect_column_mean_to_be_between(max_value=rate)``
  on a derived 0/1 flag column fails the dataset when the share of flagged rows passes the threshold.
  The flagged rows are quarantined too, except PII rows, which are reported but kept because
  ``prepare`` scrubs them. Of a set of (near) copies the first one that breaks no other rule is kept.

Rows that ``load`` could not read count as quarantined too, so ``rows_read = accepted + quarantined``.
The text checks themselves live in :mod:`airloom.data.text`, so EDA and preparation flag exactly what
validation flags.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from airloom.data.chat import ROLES, longest_turns
from airloom.data.load import TEXT_FIELDS, Finding, LoadResult
from airloom.data.text import (
    CONTROL_CHARS_RE,
    MARKUP_RE,
    composition,
    find_pii,
    has_markup,
    repetition,
    unspaced,
)
from airloom.exceptions import UsageError

# --- configuration --------------------------------------------------------------------------------


def _default_min_chars() -> dict[str, int]:
    return {"instruction": 3, "response": 1}


def _default_max_chars() -> dict[str, int]:
    return {
        "instruction": 4000,
        "input": 16000,
        "response": 8000,
        "system": 4000,
        "user": 4000,
        "assistant": 8000,
    }


#: Fields with character bounds: an instruction row's three, and each turn of a conversation by role
#: (a conversation is bounded turn by turn, not through its instruction view).
LENGTH_FIELDS = (*TEXT_FIELDS, *ROLES)
#: Quality measures (:func:`airloom.data.text.repetition` of each field or turn, the worst one;
#: :func:`airloom.data.text.composition` of the whole row) -> (check, config bounds).
_QUALITY = {
    "repeated_line_fraction": ("repeated_lines", None, "max_repeated_line_fraction"),
    "repeated_ngram_fraction": ("repeated_ngrams", None, "max_repeated_ngram_fraction"),
    "non_alpha_fraction": ("non_alpha_text", None, "max_non_alpha_fraction"),
    "mean_word_length": ("mean_word_length", "min_mean_word_length", "max_mean_word_length"),
}
_QUALITY_COLUMN = {check: column for column, (check, _, _) in _QUALITY.items()}
#: A text this long is judged by the quality measures whatever its number of words.
QUALITY_MIN_CHARS = 1000


@dataclass
class ValidationConfig:
    """Thresholds of the validation suite.

    Attributes:
        min_chars: Least characters per field (``instruction``, ``input``, ``response``) and per turn
            of a conversation by role (``system``, ``user``, ``assistant``).
        max_chars: Most characters per field, and per turn by role.
        max_record_chars: Most characters of text in a whole row, every key counted (also the ones the
            loader ignores); None: no bound.
        max_repeated_line_fraction: Largest share of a row's characters in lines that repeat an
            earlier line of the same field or turn (see :func:`airloom.data.text.repetition`; an answer
            that repeats the code of its input is fine).
        max_repeated_ngram_fraction: Largest share of a field's (or turn's) word 5-grams that repeat an
            earlier one.
        max_non_alpha_fraction: Largest share of characters that are neither letters nor whitespace.
        min_mean_word_length: Least mean word length (characters). Neither word-length bound judges a
            row whose letters are mostly in a script written without spaces (Chinese, Japanese, Thai...:
            :func:`airloom.data.text.unspaced`), where a whitespace-separated "word" is a whole phrase.
        max_mean_word_length: Most mean word length.
        quality_min_words: The quality measures judge texts (a field or turn for repetition, the whole
            row for the other two) of at least this many words (or 1,000 characters); shorter texts are
            too short for the shares to mean much. Each measure is off when its bound is None.
        max_duplicate_rate: Largest share of rows that repeat an earlier row.
        max_near_duplicate_rate: Largest share of rows that nearly repeat an earlier row (see
            :mod:`airloom.data.neardup`); such rows are quarantined like exact duplicates.
        near_duplicate_threshold: Least Jaccard similarity of two rows' word-shingle sets for the later
            one to count as a near-duplicate; None turns the check off.
        near_duplicate_shingle_size: Words per shingle.
        near_duplicate_num_perm: MinHash permutations (candidates are confirmed exactly, so 64-128 do).
        max_pii_rate: Largest share of rows holding an e-mail, phone, IP or card number.
        max_markup_rate: Largest share of rows with HTML the instruction does not ask for.
        on_bad_rows: ``quarantine`` sets bad rows aside; ``fail`` fails the run on any bad row.
        max_quarantine_rate: Largest share of rows that may be quarantined before the run fails.
        tokenizer: The model's tokenizer (a folder, ``registry:NAME[/N|@ALIAS]``, ``s3://`` or hub id):
            the profile then shows token lengths (of an even sample of rows) and the share of rows
            longer than the model's context.
        min_tokens: Least tokens per field (``instruction``, ``input``, ``response``) or in ``total``;
            needs ``tokenizer``, and every row is tokenized.
        max_tokens: Most tokens per field or in ``total`` (e.g. ``{total: 2048}``, the context);
            needs ``tokenizer``, and every row is tokenized.
    """

    min_chars: dict[str, int] = field(default_factory=_default_min_chars)
    max_chars: dict[str, int] = field(default_factory=_default_max_chars)
    max_record_chars: int | None = 32000
    max_repeated_line_fraction: float | None = 0.3
    max_repeated_ngram_fraction: float | None = 0.5
    max_non_alpha_fraction: float | None = 0.6
    min_mean_word_length: float | None = 2.0
    max_mean_word_length: float | None = 20.0
    quality_min_words: int = 50
    max_duplicate_rate: float = 0.05
    max_near_duplicate_rate: float = 0.05
    near_duplicate_threshold: float | None = 0.8
    near_duplicate_shingle_size: int = 5
    near_duplicate_num_perm: int = 128
    max_pii_rate: float = 0.01
    max_markup_rate: float = 0.05
    on_bad_rows: str = "quarantine"
    max_quarantine_rate: float = 0.05
    tokenizer: str | None = None
    min_tokens: dict[str, int] = field(default_factory=dict)
    max_tokens: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("min_tokens", "max_tokens"):
            bounds = getattr(self, name)
            if not isinstance(bounds, dict):
                raise UsageError(f"{name} must map field names (or total) to numbers, e.g. {{total: 2048}}")
            for fld, value in bounds.items():
                if fld not in (*TEXT_FIELDS, "total"):
                    raise UsageError(
                        f"{name}.{fld}: unknown field; use one of {', '.join(TEXT_FIELDS)}, total"
                    )
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise UsageError(f"{name}.{fld} must be a whole number >= 0, got {value!r}")
        if (self.min_tokens or self.max_tokens) and not self.tokenizer:
            raise UsageError("min_tokens/max_tokens need a tokenizer (a model folder or registry:NAME)")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise UsageError(
                f"tokenizer must be a model folder, registry:NAME or hub id, got {self.tokenizer!r}"
            )
        for name in ("min_chars", "max_chars"):
            bounds = getattr(self, name)
            if not isinstance(bounds, dict):
                raise UsageError(f"{name} must map field names to numbers, e.g. {{instruction: 3}}")
            for fld, value in bounds.items():
                if fld not in LENGTH_FIELDS:
                    raise UsageError(f"{name}.{fld}: unknown field; use one of {', '.join(LENGTH_FIELDS)}")
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise UsageError(f"{name}.{fld} must be a whole number >= 0, got {value!r}")
        for fld in set(self.min_chars) & set(self.max_chars):
            if self.min_chars[fld] > self.max_chars[fld]:
                raise UsageError(
                    f"min_chars.{fld} ({self.min_chars[fld]}) is above max_chars.{fld} ({self.max_chars[fld]})"
                )
        rates = ("max_duplicate_rate", "max_near_duplicate_rate", "max_pii_rate", "max_markup_rate")
        for name in (*rates, "max_quarantine_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise UsageError(f"{name} must be a share between 0 and 1, got {value!r}")
            setattr(self, name, float(value))
        t = self.near_duplicate_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 1):
            raise UsageError(
                f"near_duplicate_threshold must be a Jaccard similarity in (0, 1], or null to turn the "
                f"check off, got {t!r}"
            )
        if t is not None:
            self.near_duplicate_threshold = float(t)
        for name, lo, hi in (("near_duplicate_shingle_size", 1, 64), ("near_duplicate_num_perm", 16, 256)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise UsageError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
        for name in ("max_record_chars", "quality_min_words"):
            value = getattr(self, name)
            if (value is not None or name == "quality_min_words") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise UsageError(
                    f"{name} must be a whole number >= 0{', or null' if 'max' in name else ''}, got {value!r}"
                )
        for name in ("max_repeated_line_fraction", "max_repeated_ngram_fraction", "max_non_alpha_fraction"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1
            ):
                raise UsageError(
                    f"{name} must be a share between 0 and 1, or null to turn it off, got {value!r}"
                )
        for name in ("min_mean_word_length", "max_mean_word_length"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                raise UsageError(f"{name} must be a number of characters >= 0, or null, got {value!r}")
        if self.on_bad_rows not in ("quarantine", "fail"):
            raise UsageError(f"on_bad_rows must be 'quarantine' or 'fail', got {self.on_bad_rows!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "validation config") -> ValidationConfig:
        """Build from plain values; per-field bounds given here replace only those fields' defaults."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise UsageError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        for name, default in (("min_chars", _default_min_chars), ("max_chars", _default_max_chars)):
            if name in data:
                if not isinstance(data[name], dict):
                    raise UsageError(
                        f"{source}: {name} must map field names to numbers, e.g. {{instruction: 3}}"
                    )
                data[name] = {**default(), **data[name]}
        try:
            return cls(**data)
        except UsageError as exc:
            raise UsageError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ValidationConfig:
        from airloom.configfile import load_yaml_mapping

        return cls.from_dict(load_yaml_mapping(path, "validation config"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --- result ---------------------------------------------------------------------------------------


@dataclass
class ValidationResult:
    """Outcome of :func:`validate_stream`; every number is also in ``validation.json``."""

    success: bool
    rows_read: int
    accepted: int
    quarantined: int
    failed_expectations: list[dict]
    reasons: list[str]
    report_path: Path
    accepted_path: Path
    quarantine_path: Path
    data_docs_path: Path | None
    error_count: int = 0
    first_errors: list[Finding] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        """Every finding, read back from ``validation.json`` (not kept in memory: there can be millions)."""
        report = json.loads(self.report_path.read_text(encoding="utf-8"))
        return [Finding(**f) for f in report["findings"]]

    def summary(self) -> str:
        """A few lines for the task log: the verdict, counts, then each failed rule with example rows."""
        verdict = "PASSED" if self.success else "FAILED"
        lines = [
            f"validation {verdict}: {self.rows_read} rows read, {self.accepted} accepted, "
            f"{self.quarantined} quarantined",
        ]
        lines += [f"  - {r}" for r in self.reasons]
        for exp in self.failed_expectations:
            col = f"({exp['column']})" if exp.get("column") else ""
            lines.append(f"  failed {exp['type']}{col}: observed {exp['observed']}")
            for ex in exp.get("details", {}).get("examples", [])[:3]:
                lines.append(f"      {ex}")
        if self.error_count:
            lines.append(f"  {self.error_count} row problems, first ones:")
            lines += [f"      {f}" for f in self.first_errors[:5]]
        lines.append(f"  report: {self.report_path}")
        if self.data_docs_path:
            lines.append(f"  data docs: {self.data_docs_path}")
        return "\n".join(lines)


# --- the suite ------------------------------------------------------------------------------------

# Row checks that set the row aside; the others (pii) only report it.
_QUARANTINING = {
    "null_field",
    "too_short",
    "too_long",
    "too_few_tokens",
    "too_many_tokens",
    "blank_text",
    "control_chars",
    "duplicate",
    "near_duplicate",
    "markup",
    "record_too_long",
    *(check for check, _, _ in _QUALITY.values()),
}


#: Flag column -> the row check it stands for (rate rules: GX judges the share, the rows come from here).
_FLAG_COLUMNS = {
    "is_duplicate": "duplicate",
    "is_near_duplicate": "near_duplicate",
    "has_pii": "pii",
    "has_markup": "markup",
}
_FLAG_OF_CHECK = {check: column for column, check in _FLAG_COLUMNS.items()}


class _Features:
    """Pass 1 of validation: per-row features of a stream of records, the EDA profile on the way.

    GX checks these columns (lengths, blank and control-character flags, duplicate/PII/markup flags),
    not the text: a few bytes per row however long the rows are, kept in scratch files and handed to GX
    as a SQLite table (:func:`_write_features`).
    """

    def __init__(self, config: ValidationConfig, spill_dir: Path) -> None:
        from airloom.data.eda import TOKEN_SAMPLE, Columns, Profiler

        self.config = config
        self.counter = None
        self.token_bounds = bool(config.min_tokens or config.max_tokens)  # then every row is tokenized
        token_error = None
        if config.tokenizer:
            from airloom.tokens import load_token_counter

            try:
                self.counter = load_token_counter(config.tokenizer)
            except UsageError as exc:
                if self.token_bounds:  # the suite checks tokens: it cannot run without them
                    raise
                token_error = str(exc)  # only the profile wanted them: it says why they are missing
        self.profiler = Profiler(
            self.counter,
            near_duplicate_threshold=config.near_duplicate_threshold,
            shingle_size=config.near_duplicate_shingle_size,
            num_perm=config.near_duplicate_num_perm,
            spill_dir=spill_dir,
            token_sample=None if self.token_bounds else TOKEN_SAMPLE,
            token_error=token_error,
        )
        self.files: list[str] = []
        self._file_ids: dict[str, int] = {}
        self._chat_renderer: Any = None
        self._parts = Columns(spill_dir)
        self.columns: dict[str, Any] = {}

    def add(self, records: list[dict]) -> None:
        import numpy as np

        m = len(records)
        if not m:
            return
        file_ids = np.empty(m, dtype=np.int32)
        for j, rec in enumerate(records):
            name = rec.get("_file", "")
            k = self._file_ids.get(name)
            if k is None:
                k = self._file_ids[name] = len(self.files)
                self.files.append(name)
            file_ids[j] = k
        self._parts.append("file", file_ids)
        bad = np.zeros(m, dtype=bool)  # breaks another quarantining row rule: no (near) duplicate search
        # the profile's row flag: any field's (its row text joins the fields by \n, not a control character)
        any_control = np.zeros(m, dtype=bool)
        prose = np.fromiter(("messages" not in r for r in records), dtype=bool, count=m)  # field bounds apply
        for f in TEXT_FIELDS:
            texts = [rec.get(f) or "" for rec in records]
            chars = np.fromiter(map(len, texts), dtype=np.int64, count=m)
            control = np.zeros(m, dtype=bool)
            if CONTROL_CHARS_RE.search("\n".join(texts)):  # rare: one search of the chunk, then per row
                control[:] = [CONTROL_CHARS_RE.search(t) is not None for t in texts]
            lo, hi = self.config.min_chars.get(f), self.config.max_chars.get(f)
            bad |= control
            any_control |= control
            if lo is not None:
                bad |= (chars < lo) & prose
            if hi is not None:
                bad |= (chars > hi) & prose
            self._parts.append(f"{f}_control", control)
            if f in ("instruction", "response"):
                blank = np.fromiter((not t.strip() for t in texts), dtype=bool, count=m)
                bad |= blank
                self._parts.append(f"{f}_blank", blank)
        markup = np.fromiter(
            ("<" in (r.get("instruction", "") + r.get("input", "") + r.get("response", ""))
             and has_markup(r.get("instruction", ""), r.get("input", ""), r.get("response", ""))
             for r in records),
            dtype=bool,
            count=m,
        )  # fmt: skip
        bad |= markup
        bad |= self._add_rows(records)
        self.profiler.add(records, eligible=~bad, markup=markup, control=any_control)

    def _add_rows(self, records: list[dict]) -> Any:
        """The per-row columns beyond the profile's: conversation turns by role (-1: no such turn; a
        conversation's instruction view then has no bounds of its own), the whole row's size and the
        quality measures (NaN: the row is too short to judge). Returns the rows breaking their bounds."""
        import numpy as np

        config, m = self.config, len(records)
        chat = np.zeros(m, dtype=bool)
        roles = {role: np.full(m, -1, dtype=np.int64) for role in ROLES}
        sizes = np.fromiter((r.get("_chars", 0) for r in records), dtype=np.int64, count=m)
        # float64: GX compares the SQL values with the bounds as Python floats, and so must we
        quality = {column: np.full(m, np.nan, dtype=np.float64) for column in _QUALITY}
        floor = config.max_repeated_ngram_fraction
        floor = 1.0 if floor is None else floor
        for j, rec in enumerate(records):
            turns = rec.get("messages")
            if turns:
                chat[j] = True
                for role, (n, _) in longest_turns(turns).items():
                    if role in roles:
                        roles[role][j] = n
            for column, (value, _) in _row_quality(rec, config.quality_min_words, floor).items():
                quality[column][j] = value
        self._parts.append("chat", chat)
        if self.token_bounds:
            rendered = np.full(m, -1, dtype=np.int64)
            if chat.any():
                rows = np.flatnonzero(chat)
                rendered[rows] = self.chat_tokens([records[j] for j in rows])
            self._parts.append("chat_tokens", rendered)
        for role, values in roles.items():
            self._parts.append(f"{role}_chars", values)
        self._parts.append("record_chars", sizes)
        for column, values in quality.items():
            self._parts.append(column, values)
        bad = np.zeros(m, dtype=bool)
        chunk = {"record_chars": sizes, **{f"{role}_chars": v for role, v in roles.items()}, **quality}
        for check, fld in (
            [("length", role) for role in ROLES]
            + [("record_length", None)]
            + [(check, None) for check, _, _ in _QUALITY.values()]
        ):
            failing = _failing(check, fld, chunk, config)
            if failing is not None:
                bad |= failing
        return bad

    def chat_tokens(self, records: list[dict]) -> list[int]:
        """Tokens of each conversation as training reads it: rendered whole with the model's chat
        template (ChatML when it has none), EOS appended where the template does not end with it. A
        conversation the template refuses counts as -1 (the profile reports such refusals)."""
        from airloom.prompts import CHAT_TEMPLATE, load_template, render_conversation

        if self._chat_renderer is None:
            self._chat_renderer = load_template(CHAT_TEMPLATE, tokenizer=self.counter)
        eos = self.counter.special_tokens.get("eos_token") if self.counter is not None else None
        texts, where = [], []
        for rec in records:
            try:
                texts.append(render_conversation(self._chat_renderer, rec["messages"], eos, spans=False).text)
                where.append(True)
            except UsageError:
                where.append(False)
        counts = iter(self.counter.lengths(texts))
        return [next(counts) if ok else -1 for ok in where]

    def close(self) -> None:
        self._parts.close()
        self.profiler.close()

    def finish(self) -> dict[str, Any]:
        """The columns pass 2 needs (``file``, ``line``, ``dup_of``), read into memory."""
        p = self.profiler
        self.columns = {
            "file": self._parts.get("file"),
            "line": p.column("line"),
            "dup_of": p.column("dup_of"),
        }
        return self.columns

    def feature_chunks(self, rows: int = 65536) -> Iterator[dict[str, Any]]:
        """The columns GX checks (lengths, flags; no text), ``rows`` rows at a time from the scratch files;
        ``is_near_duplicate`` all False (the search ends later: :func:`_mark_near_duplicates`)."""
        import numpy as np

        p = self.profiler
        for start in range(0, p.n, rows):
            stop = min(start + rows, p.n)
            chat = self._parts.get("chat", start, stop).astype(bool, copy=False)
            # a conversation is bounded turn by turn (by role), not through its instruction view
            chunk = {
                f"{f}_chars": np.where(chat, -1, p.column(f"chars:{f}", start, stop)) for f in TEXT_FIELDS
            }
            for name in (*(f"{role}_chars" for role in ROLES), "record_chars", *_QUALITY):
                chunk[name] = self._parts.get(name, start, stop)
            for f in TEXT_FIELDS:
                chunk[f"{f}_control"] = self._parts.get(f"{f}_control", start, stop).astype(bool, copy=False)
            for f in ("instruction", "response"):
                chunk[f"{f}_blank"] = self._parts.get(f"{f}_blank", start, stop).astype(bool, copy=False)
            chunk["is_duplicate"] = self.columns["dup_of"][start:stop] != np.arange(start, stop)
            chunk["is_near_duplicate"] = np.zeros(stop - start, dtype=bool)
            chunk["has_pii"] = p.column("pii", start, stop).astype(bool, copy=False)
            chunk["has_markup"] = p.column("markup", start, stop).astype(bool, copy=False)
            if self.token_bounds:
                tokens = [p.column(f"tokens:{f}", start, stop) for f in TEXT_FIELDS]
                for f, counts in zip(TEXT_FIELDS, tokens, strict=True):
                    chunk[f"{f}_tokens"] = counts
                rendered = self._parts.get("chat_tokens", start, stop)  # -1: not a conversation
                chunk["total_tokens"] = np.where(rendered >= 0, rendered, tokens[0] + tokens[1] + tokens[2])
            yield chunk


def _suite_spec(config: ValidationConfig) -> list[tuple[str, str | None, str | None, dict[str, Any]]]:
    """The expectation suite over the feature table, as (GX expectation class, row check, field, kwargs);
    the check and field go into each expectation's ``meta``. Plain data, so the process that judges the
    rows and the one that runs GX build it alike. (Null and wrong-typed fields never get here: the loader
    reports them per row.)"""
    row_mostly = 1.0 - config.max_quarantine_rate
    spec: list[tuple[str, str | None, str | None, dict[str, Any]]] = [
        ("ExpectTableRowCountToBeBetween", None, None, {"min_value": 1})
    ]
    for fld in LENGTH_FIELDS:
        lo, hi = config.min_chars.get(fld), config.max_chars.get(fld)
        if lo is not None or hi is not None:
            # rows without the field (-1 in the feature columns) are NULL in GX's table: not judged
            kwargs = {"column": f"{fld}_chars", "min_value": lo, "max_value": hi, "mostly": row_mostly}
            spec.append(("ExpectColumnValuesToBeBetween", "length", fld, kwargs))
    if config.max_record_chars is not None:
        kwargs = {"column": "record_chars", "max_value": config.max_record_chars, "mostly": row_mostly}
        spec.append(("ExpectColumnValuesToBeBetween", "record_length", None, kwargs))
    for column, (check, lo_name, hi_name) in _QUALITY.items():
        lo = getattr(config, lo_name) if lo_name else None
        hi = getattr(config, hi_name)
        if lo is not None or hi is not None:
            kwargs = {"column": column, "min_value": lo, "max_value": hi, "mostly": row_mostly}
            spec.append(("ExpectColumnValuesToBeBetween", check, None, kwargs))
    for fld in (*TEXT_FIELDS, "total"):
        lo, hi = config.min_tokens.get(fld), config.max_tokens.get(fld)
        if lo is not None or hi is not None:
            kwargs = {"column": f"{fld}_tokens", "min_value": lo, "max_value": hi, "mostly": row_mostly}
            spec.append(("ExpectColumnValuesToBeBetween", "token_length", fld, kwargs))
    for fld in ("instruction", "response"):
        kwargs = {"column": f"{fld}_blank", "value_set": [False], "mostly": row_mostly}
        spec.append(("ExpectColumnValuesToBeInSet", "blank_text", fld, kwargs))
    for fld in TEXT_FIELDS:
        kwargs = {"column": f"{fld}_control", "value_set": [False], "mostly": row_mostly}
        spec.append(("ExpectColumnValuesToBeInSet", "control_chars", fld, kwargs))
    rates = (
        ("is_duplicate", config.max_duplicate_rate, "duplicate"),
        ("is_near_duplicate", config.max_near_duplicate_rate, "near_duplicate"),
        ("has_pii", config.max_pii_rate, "pii"),
        ("has_markup", config.max_markup_rate, "markup"),
    )
    for column, rate, check in rates:
        # the mean of a flag column is the share of flagged rows; an aggregate, so GX does not list (and
        # store, and render) the indices of what can be most of the rows: the feature columns have them already
        spec.append(
            (
                "ExpectColumnMeanToBeBetween",
                check,
                None,
                {"column": column, "min_value": 0.0, "max_value": rate},
            )
        )
    return spec


def _rules(config: ValidationConfig) -> list[tuple[str, str | None]]:
    """(check, field) of each expectation that stands for a row check, in suite order."""
    return [(check, fld) for _, check, fld, _ in _suite_spec(config) if check]


def _build_suite(config: ValidationConfig, rows: int = 0, judged: dict[str, int] | None = None) -> Any:
    """The GX suite of :func:`_suite_spec`. ``judged`` counts the non-NULL values of the columns that
    only some rows have (turns of a role, quality measures of long enough rows): GX leaves NULLs out of
    ``mostly``, so it is scaled to let the same number of rows fail as a rule over all ``rows`` does."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="airloom_instruction_records")
    for name, check, fld, kwargs in _suite_spec(config):
        column = kwargs.get("column")
        if judged and "mostly" in kwargs and judged.get(column, rows) < rows:
            allowed = (1.0 - kwargs["mostly"]) * rows
            kwargs = {**kwargs, "mostly": max(0.0, 1.0 - allowed / judged[column]) if judged[column] else 1.0}
        # meta tells the result reader what a failing row means for us
        suite.add_expectation(getattr(gxe, name)(**kwargs, meta={"check": check, "field": fld}))
    return suite


#: The feature table GX checks: one row per record, no text (see _Features.feature_chunks), in a
#: scratch SQLite file in the output folder.
_FEATURE_DB = ".features.sqlite"


def _feature_columns(config: ValidationConfig) -> list[str]:
    columns = [
        *(f"{f}_chars" for f in LENGTH_FIELDS),
        "record_chars",
        *_QUALITY,
        *(f"{f}_control" for f in TEXT_FIELDS),
        "instruction_blank",
        "response_blank",
        *_FLAG_COLUMNS,
    ]
    if config.min_tokens or config.max_tokens:
        columns += [*(f"{f}_tokens" for f in TEXT_FIELDS), "total_tokens"]
    return columns


def _failing(check: str | None, fld: str | None, chunk: dict, config: ValidationConfig) -> Any:
    """Rows of a feature chunk that break a rule (a bool array), or None for a rule without rows."""
    import numpy as np

    if check in ("length", "token_length"):
        unit = "tokens" if check == "token_length" else "chars"
        lengths = chunk[f"{fld}_{unit}"]
        lo, hi = getattr(config, f"min_{unit}").get(fld), getattr(config, f"max_{unit}").get(fld)
        bad = np.zeros(len(lengths), dtype=bool)
        if lo is not None:
            bad |= lengths < lo
        if hi is not None:
            bad |= lengths > hi
        return bad & (lengths >= 0)  # -1: the row has no such field
    if check == "record_length":
        return None if config.max_record_chars is None else chunk["record_chars"] > config.max_record_chars
    if check in _QUALITY_COLUMN:
        values = chunk[_QUALITY_COLUMN[check]]
        _, lo_name, hi_name = _QUALITY[_QUALITY_COLUMN[check]]
        bad = np.zeros(len(values), dtype=bool)  # NaN (not judged) compares False
        if lo_name and (lo := getattr(config, lo_name)) is not None:
            bad |= values < lo
        if (hi := getattr(config, hi_name)) is not None:
            bad |= values > hi
        return bad
    if check == "blank_text":
        return chunk[f"{fld}_blank"]
    if check == "control_chars":
        return chunk[f"{fld}_control"]
    flag = _FLAG_OF_CHECK.get(check)
    return chunk[flag] if flag else None


def _scratch_db(db: Path) -> Any:
    """A connection to the scratch feature table's file: no journal, no fsync (nothing to roll back to;
    both are per connection)."""
    import sqlite3

    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    return con


def _write_features(
    db: Path, chunks: Iterable[dict], rules: list[tuple[str, str | None]], config: ValidationConfig, n: int
) -> tuple[Any, list[int], dict[str, int]]:
    """Write the feature table GX checks into the SQLite file ``db``, chunk by chunk, and note which
    rows break which rule on the way.

    Returns:
        A uint32 per row (bit k: the row breaks ``rules[k]``), the number of rows breaking each rule
        and the number of non-NULL values of each nullable column.
    """

    import numpy as np

    if len(rules) > 32:
        raise RuntimeError(f"{len(rules)} row rules: the per-row failure mask holds 32")
    failed = np.zeros(n, dtype=np.uint32)
    counts = [0] * len(rules)
    columns = _feature_columns(config)
    con = _scratch_db(db)
    try:
        kinds = {c: "INTEGER" if c.endswith(("_chars", "_tokens")) else "BOOLEAN" for c in columns}
        kinds.update(dict.fromkeys(_QUALITY, "REAL"))
        # -1 / NaN: not judged (no such field or turn, too short, a conversation the template refuses)
        nullable = {*(f"{f}_chars" for f in LENGTH_FIELDS), "total_tokens", *_QUALITY}
        judged: dict[str, int] = {}
        con.execute(
            f"CREATE TABLE features ({', '.join(f'{c} {kinds[c]}' + ('' if c in nullable else ' NOT NULL') for c in columns)})"
        )
        # sqlite3 binds exact ints and floats directly but sends None and bools through its adapter
        # lookup, which took two thirds of the insert: so booleans go as 0/1, a not-judged count as -1
        # that NULLIF turns into NULL, and NaN as it is (SQLite stores a NaN as NULL)
        marks = ("NULLIF(?, -1)" if c in nullable and kinds[c] == "INTEGER" else "?" for c in columns)
        insert = f"INSERT INTO features VALUES ({', '.join(marks)})"
        start = 0
        for chunk in chunks:
            m = len(chunk[columns[0]])
            part = failed[start : start + m]
            for bit, (check, fld) in enumerate(rules):
                bad = _failing(check, fld, chunk, config)
                part[bad] |= np.uint32(1 << bit)
                counts[bit] += int(np.count_nonzero(bad))
            values = [_sql_values(chunk[c], c in nullable) for c in columns]
            for c in nullable & set(columns):
                judged[c] = judged.get(c, 0) + int(np.count_nonzero(chunk[c] >= 0))  # NaN >= 0 is False
            con.executemany(insert, zip(*values, strict=True))
            start += m
        con.commit()
    finally:
        con.close()
    if start != n:
        raise RuntimeError(f"the feature table has {start} rows, the read {n}")
    return failed, counts, judged


def _sql_values(values: Any, nullable: bool) -> list:
    """A feature column as the plain ints and floats :func:`_write_features` binds: booleans as 0/1, and
    in a nullable integer column every negative value (not judged) as -1."""
    import numpy as np

    if values.dtype == bool:
        return values.view(np.uint8).tolist()
    if nullable and values.dtype.kind == "i":
        return np.maximum(values, -1).tolist()
    return values.tolist()


def _mark_near_duplicates(
    db: Path, near: Any, rules: list[tuple[str, str | None]], failed: Any, counts: list[int]
) -> None:
    """Set the near-duplicate flags in the feature table (rowid k+1 is row k) and in the failure mask."""

    import numpy as np

    if near is None or not near.count or ("near_duplicate", None) not in rules:
        return
    bit = rules.index(("near_duplicate", None))
    failed[near.members] |= np.uint32(1 << bit)
    counts[bit] = near.count
    con = _scratch_db(db)
    try:
        con.executemany(
            "UPDATE features SET is_near_duplicate = 1 WHERE rowid = ?",
            ((k + 1,) for k in near.members.tolist()),
        )
        con.commit()
    finally:
        con.close()


def _gx_context(docs_dir: Path) -> Any:
    """An ephemeral GX context whose only Data Docs site is ``docs_dir``."""
    import logging

    # GX logs ~220 INFO lines per run (each API function it registers at import, each SQLite connection):
    # nine tenths of a validate task's log. Its warnings still come through; a level set by the user stays.
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # Only our docs site: the ephemeral default would pick a fresh temp folder each run.
    project_config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={
            "airloom": {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
            }
        },
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=project_config)


def _run_gx(context: Any, db: Path, suite: Any):
    """Run ``suite`` on the feature table in the SQLite file ``db`` (GX's SQL engine: it aggregates in
    the database, so memory does not grow with the rows) and build the Data Docs."""
    import great_expectations as gx

    batch = (
        context.data_sources.add_sqlite("records", connection_string=f"sqlite:///{db}")
        .add_table_asset("instruction_records", table_name="features")
        .add_batch_definition_whole_table("all_rows")
    )
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="instruction_records", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="llm_data_quality",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["airloom"])],
            # counts and a few examples: the failing rows themselves come from the same feature columns
            # (_write_features), so GX does not build, copy and render lists of up to every row
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5},
        )
    )
    run = checkpoint.run()
    (validation,) = run.run_results.values()
    return validation.results


class _GxRunner:
    """Great Expectations in a process of its own (:class:`airloom.data.background.Background`): made
    when the first pass starts, it imports GX (seconds of CPU) beside it, then runs the suite on the
    feature table while the second pass writes the rows."""

    def __init__(self, docs_dir: str) -> None:
        # GX is not needed before the first pass ends: at a lower priority its import takes the CPU
        # the pass leaves idle, not the pass's own (2 cores, 136k rows: ~0.5 s less wall time)
        os.nice(10)
        self.context = _gx_context(Path(docs_dir))

    def run(self, db: str, config: ValidationConfig, rows: int = 0, judged: dict | None = None) -> list[dict]:
        """The suite's results as plain values (GX's result objects stay in this process)."""
        results = []
        for res in _run_gx(self.context, Path(db), _build_suite(config, rows, judged)):
            cfg, r = res.expectation_config, res.result or {}
            info = res.exception_info or {}
            results.append({
                "type": cfg.type,
                "kwargs": {k: _jsonable(v) for k, v in cfg.kwargs.items() if k != "batch_id"},
                "meta": dict(cfg.meta or {}),
                "success": bool(res.success),
                "result": {k: _jsonable(r[k]) for k in ("observed_value", "unexpected_count", "unexpected_percent")
                           if k in r},
                "error": info.get("exception_message") if info.get("raised_exception") else None,
            })  # fmt: skip
        return results


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


def _row_message(
    check: str,
    fld: str | None,
    rec: dict,
    config: ValidationConfig,
    first: tuple[str, int] | None = None,
    near: tuple[str, int, float] | None = None,
    tokens: int | None = None,
) -> tuple[str, str]:
    """(check, message) for one failing row, with the numbers needed to fix it.

    ``first`` is the (file, line) of the row a duplicate repeats; ``near`` the (file, line, Jaccard) of
    the row a near-duplicate repeats; ``tokens`` the token count of a row breaking a token bound.
    """
    if check == "token_length":
        what = "instruction + input + response have" if fld == "total" else f"{fld} has"
        if fld == "total" and rec.get("messages"):
            what = "the conversation, rendered with the chat template, has"
        lo, hi = config.min_tokens.get(fld), config.max_tokens.get(fld)
        if lo is not None and tokens is not None and tokens < lo:
            return "too_few_tokens", f"{what} {tokens} tokens; at least {lo} required (min_tokens.{fld})"
        return "too_many_tokens", f"{what} {tokens} tokens; at most {hi} allowed (max_tokens.{fld})"
    if check == "length":
        lo, hi = config.min_chars.get(fld), config.max_chars.get(fld)
        if fld in ROLES:  # a conversation: its longest (or shortest) turn of that role
            lengths = [len(t["content"]) for t in rec["messages"] if t["role"] == fld]
            n = min(lengths) if lo is not None and min(lengths) < lo else max(lengths)
            what = f"the longest {fld} turn has" if n == max(lengths) else f"the shortest {fld} turn has"
        else:
            n, what = len(rec.get(fld, "")), f"{fld} has"
        if lo is not None and n < lo:
            return "too_short", f"{what} {n} characters; at least {lo} required (min_chars.{fld})"
        return "too_long", f"{what} {n} characters; at most {hi} allowed (max_chars.{fld})"
    if check == "record_length":
        n, key = rec.get("_chars", 0), rec.get("_longest")
        most = f" (the most under {key!r})" if key else ""
        return "record_too_long", (
            f"the row holds {n:,} characters of text{most}; at most {config.max_record_chars:,} allowed "
            "(max_record_chars)"
        )
    if check in _QUALITY_COLUMN:
        column = _QUALITY_COLUMN[check]
        value, unit = _row_quality(rec, config.quality_min_words)[column]
        _, lo_name, hi_name = _QUALITY[column]
        what = {
            "repeated_lines": f"of {unit}'s characters are in lines that repeat an earlier line",
            "repeated_ngrams": f"of {unit}'s word 5-grams repeat an earlier one",
            "non_alpha_text": "of the row's characters are neither letters nor whitespace",
        }
        if check == "mean_word_length":
            lo = getattr(config, lo_name)
            if lo is not None and value < lo:
                return check, f"mean word length {value:.1f} characters; at least {lo} required ({lo_name})"
            return (
                check,
                f"mean word length {value:.1f} characters; at most {getattr(config, hi_name)} allowed ({hi_name})",
            )
        return check, f"{value:.1%} {what[check]}; at most {getattr(config, hi_name):.0%} allowed ({hi_name})"
    if check == "blank_text":
        return check, f"{fld} is empty or only whitespace"
    if check == "control_chars":
        chars = sorted({f"U+{ord(c):04X}" for c in CONTROL_CHARS_RE.findall(rec.get(fld, ""))})
        return check, f"{fld} holds control characters ({', '.join(chars[:6])}); remove them"
    if check == "duplicate" and first is not None:
        where = f"line {first[1]}" + ("" if first[0] == rec["_file"] else f" of {first[0]}")
        return check, f"repeats the row at {where} (ignoring whitespace); the first copy is kept"
    if check == "near_duplicate" and near is not None:
        file, line, jaccard = near
        where = f"line {line}" + ("" if file == rec["_file"] else f" of {file}")
        return check, (
            f"nearly repeats the row at {where} (Jaccard {jaccard:.2f} of word "
            f"{config.near_duplicate_shingle_size}-shingles, near_duplicate_threshold "
            f"{config.near_duplicate_threshold}); the first copy is kept"
        )
    if check == "pii":
        kinds = sorted({k for f in TEXT_FIELDS for k in find_pii(rec.get(f, ""))})
        return check, f"personal data ({', '.join(kinds)}); prepare scrubs it, or remove the row"
    if check == "markup":
        return check, "HTML tags the instruction does not ask for (scraped page?); strip them or drop the row"
    return check, check


def _row_quality(rec: dict, min_words: int, ngram_floor: float = 0.0) -> dict[str, tuple[float, str | None]]:
    """The quality measures of a row that is long enough to judge, each with where it was measured:
    repetition per field (or turn), the worst one, since a field may rightly repeat another (a fixed
    program repeats the one it was given); composition over the whole row."""
    turns = rec.get("messages")
    texts = [t["content"] for t in turns] if turns else [rec.get(f) or "" for f in TEXT_FIELDS]
    out: dict[str, tuple[float, str | None]] = {}
    min_chars = 5 * min_words  # fewer characters cannot hold that many words: skip the split
    most_lines = most_ngrams = -1.0
    for k, text in enumerate(texts):
        if len(text) < min_chars:
            continue
        lines, ngrams, words = repetition(text, ngram_floor)
        if words >= min_words or len(text) >= QUALITY_MIN_CHARS:
            # named only here: pass 1 runs this on every row, and most units never get this far
            unit = rec.get("_turn_key", "messages[{}].content").format(k) if turns else TEXT_FIELDS[k]
            if lines > most_lines:
                most_lines = lines
                out["repeated_line_fraction"] = (lines, unit)
            if ngrams > most_ngrams:
                most_ngrams = ngrams
                out["repeated_ngram_fraction"] = (ngrams, unit)
    whole = "\n".join(texts)
    if len(whole) >= min_chars:
        non_alpha, word_length, words = composition(whole)
        if words >= min_words or len(whole) >= QUALITY_MIN_CHARS:
            out["non_alpha_fraction"] = (non_alpha, None)
            if not unspaced(whole):  # Chinese, Japanese, Thai…: a "word" there is a whole phrase
                out["mean_word_length"] = (word_length, None)
    return out


def _turn_of(fld: str, rec: dict, config: ValidationConfig) -> str:
    """Where a conversation breaks a role's length bound: the first turn of that role out of bounds."""
    lo, hi = config.min_chars.get(fld), config.max_chars.get(fld)
    for i, turn in enumerate(rec["messages"]):
        n = len(turn["content"])
        if turn["role"] == fld and ((lo is not None and n < lo) or (hi is not None and n > hi)):
            return rec.get("_turn_key", "messages[{}].content").format(i)
    return fld


def _field_of(check: str, rec: dict) -> str | None:
    if check == "pii":
        return next((f for f in TEXT_FIELDS if find_pii(rec.get(f, ""))), None)
    if check == "markup":
        return next((f for f in TEXT_FIELDS if MARKUP_RE.search(rec.get(f, ""))), None)
    return None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, list | dict | str):
        return value.item()
    return value


def _report_lines(report: dict, findings: Iterable[str]) -> Iterator[str]:
    """``validation.json``: indented, but one finding per line (given as JSON text), which keeps 100k findings
    fast to write and easy to grep (``json.dumps(indent=...)`` runs the pure-Python encoder, ~10x slower)."""
    head = json.dumps({**report, "findings": []}, indent=2, ensure_ascii=False, default=str)
    before, after = head.split('"findings": []', 1)
    yield before + '"findings": ['
    sep = "\n    "
    for f in findings:
        yield sep + f
        sep = ",\n    "
    yield ("\n  ]" if sep != "\n    " else "]") + after + "\n"


def _keyed(key: tuple, value: dict) -> str:
    """A scratch-file line: the sort key, a tab, the value (JSON text has no raw tab)."""
    return json.dumps(key, ensure_ascii=False) + "\t" + json.dumps(value, ensure_ascii=False) + "\n"


def _unkeyed(fh: IO[str]) -> Iterator[tuple[tuple, str]]:
    for line in fh:
        key, body = line.rstrip("\n").split("\t", 1)
        yield tuple(json.loads(key)), body


def _bits(mask: int) -> Iterator[int]:
    k = 0
    while mask:
        if mask & 1:
            yield k
        mask >>= 1
        k += 1


def _json_line_encoder() -> Callable[[dict], bytes]:
    """A row as one line of UTF-8 JSON: msgspec's compact encoder (a few times faster than json.dumps on
    100k+ rows), or json's when msgspec is missing."""
    try:
        import msgspec
    except ImportError:
        return lambda row: (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    encoder = msgspec.json.Encoder()
    return lambda row: encoder.encode(row) + b"\n"


def _public(rec: dict) -> dict:
    """A record as written out: no private keys; a conversation without its instruction view."""
    if "messages" in rec:
        return {k: v for k, v in rec.items() if not k.startswith("_") and k not in TEXT_FIELDS}
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def validate_stream(
    chunks: Callable[[], Iterable[LoadResult]],
    out_dir: Path,
    config: ValidationConfig | None = None,
    *,
    source: str,
    scan_source: dict | None = None,
) -> ValidationResult:
    """Run the suite over what ``chunks()`` reads and write the verdict, the clean rows and the quarantine.

    ``chunks()`` (e.g. ``lambda: iter_chunks(path)``) is read once: pass 1 computes per-row features and
    the data's EDA profile while spilling the records to a scratch file, GX judges the features, pass 2
    reads the scratch file back and writes the rows and the findings. Memory holds one chunk and a few
    dozen bytes per row, never the corpus.

    Writes ``validation.json`` and ``validation.html``, ``accepted.jsonl`` (canonical fields only, so it loads cleanly),
    ``quarantine.jsonl`` (one row per quarantined line with its reasons), GX Data Docs under
    ``data_docs/`` and, when ``scan_source`` is given (see :func:`airloom.data.load.fingerprint`), the
    profile of the rows read under ``scan/`` for the EDA task to render (:func:`airloom.data.eda.load_scan`).
    A rerun into the same ``out_dir`` replaces these.

    Args:
        chunks: Returns an iterable of :class:`LoadResult` chunks.
        out_dir: Folder for the outputs; created if missing.
        config: Thresholds; the defaults of :class:`ValidationConfig` when None.
        source: What was read, for the report.
    """
    config = config or ValidationConfig()
    out_dir = Path(out_dir).absolute()  # GX's docs site wants an absolute folder
    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = out_dir / "data_docs"
    shutil.rmtree(docs_dir, ignore_errors=True)

    from airloom.data.background import Background

    gx: Background | None = None
    features: _Features | None = None
    spill = tempfile.TemporaryFile(dir=out_dir, prefix=".records.", suffix=".spill")  # noqa: SIM115
    try:
        # pass 1: features (and the profile), the loader's findings and rejected rows; the records are
        # spilled to a scratch file as they go (pickle: ~10x faster to read back than parsing the source)
        features = _Features(config, spill_dir=out_dir)
        load_findings: list[Finding] = []
        rejected: list[dict] = []
        rows_read = 0
        reader = iter(chunks())
        first = next(reader, None)  # an unreadable source fails here, before GX's process is made
        gx = Background(_GxRunner, str(docs_dir))
        for chunk in itertools.chain([first] if first is not None else [], reader):
            rows_read += chunk.rows_read
            load_findings.extend(chunk.findings)
            rejected.extend(chunk.rejected)
            features.add(chunk.records)
            if chunk.records:
                pickle.dump(chunk.records, spill, protocol=pickle.HIGHEST_PROTOCOL)
        spill.seek(0)
        return _judge(
            features,
            spill,
            gx,
            out_dir,
            docs_dir,
            config,
            source,
            scan_source,
            rows_read,
            load_findings,
            rejected,
        )
    finally:
        spill.close()
        if features is not None:
            features.close()  # scratch files
        if gx is not None:
            gx.close()
        (out_dir / _FEATURE_DB).unlink(missing_ok=True)


def _spilled(spill: IO[bytes]) -> Iterator[list[dict]]:
    while True:
        try:
            yield pickle.load(spill)
        except EOFError:
            return


def _judge(
    features: _Features,
    spill: IO[bytes],
    gx: Any,
    out_dir: Path,
    docs_dir: Path,
    config: ValidationConfig,
    source: str,
    scan_source: dict | None,
    rows_read: int,
    load_findings: list[Finding],
    rejected: list[dict],
) -> ValidationResult:
    """GX on the features, then pass 2 over the spilled records: findings, accepted and quarantined rows."""

    features.profiler.start_near_duplicates()
    cols = features.finish()
    n = len(cols["line"])
    rules = _rules(config)
    db = out_dir / _FEATURE_DB  # removed by validate_stream
    db.unlink(missing_ok=True)
    # the feature table while the worker finishes the near-duplicate search; then its flags
    failed_mask, rule_counts, judged = _write_features(db, features.feature_chunks(), rules, config, n)
    if features.counter is not None and not features.token_bounds:
        features.profiler.sample_token_lengths()  # the profile's token lengths, in the same wait
    near = features.profiler.near_duplicates()
    _mark_near_duplicates(db, near, rules, failed_mask, rule_counts)
    gx_results = gx.ask("run", str(db), config, n, judged)  # GX runs while this process writes the rows

    # pass 2: messages need the text of the failing rows; the clean rows are written as they come, the
    # quarantined rows and the findings to scratch files in read order, which is (file, line) order
    files, lines, dup_of = features.files, cols["line"], cols["dup_of"]
    file_of = cols["file"]

    def at(i: int) -> tuple[str, int]:
        return files[int(file_of[i])], int(lines[i])

    examples: dict[int, list[str]] = {}
    wanted = set(features.profiler.wanted())
    picked: dict[int, dict] = {}
    accepted = quarantined_rows = 0
    accepted_path = out_dir / "accepted.jsonl"
    tmp_accepted = accepted_path.with_name(f".{accepted_path.name}.tmp")
    scratch_findings = tempfile.TemporaryFile("w+", encoding="utf-8", dir=out_dir)  # noqa: SIM115
    scratch_quarantine = tempfile.TemporaryFile("w+", encoding="utf-8", dir=out_dir)  # noqa: SIM115
    i = 0
    encode = _json_line_encoder()
    results: list[dict] | None = None
    worker_done = False
    with tmp_accepted.open("wb") as out:
        for records in _spilled(spill):
            # the two helper processes go as soon as they have answered: their memory with them
            if results is None and gx.ready():
                results = gx_results()
                gx.close()
            if not worker_done:
                worker_done = features.profiler.release_worker()
            for rec, failed_bits in zip(records, failed_mask[i : i + len(records)].tolist(), strict=True):
                if i in wanted:
                    picked[i] = rec
                if not failed_bits:
                    out.write(encode(_public(rec)))
                    accepted += 1
                    i += 1
                    continue
                row_findings: list[Finding] = []
                broken = [rules[k] for k in _bits(failed_bits)]
                for k in _bits(failed_bits):
                    check, fld = rules[k]
                    if check == "record_length" and any(c == "length" for c, _ in broken):
                        continue  # a field's own bound already says it (the row is quarantined either way)
                    first = at(int(dup_of[i])) if check == "duplicate" else None
                    similar = None
                    if check == "near_duplicate" and (hit := near.first_of(i)) is not None:
                        similar = (*at(hit[0]), hit[1])
                    tokens = None
                    if check == "token_length":  # the few failing rows are counted again
                        if fld == "total" and rec.get("messages"):
                            tokens = features.chat_tokens([rec])[0]
                        else:
                            texts = (
                                [rec.get(f) or "" for f in TEXT_FIELDS]
                                if fld == "total"
                                else [rec.get(fld) or ""]
                            )
                            tokens = sum(features.counter.lengths(texts))
                    name, message = _row_message(check, fld, rec, config, first, similar, tokens)
                    if check == "length" and fld in ROLES:
                        target = _turn_of(fld, rec, config)
                    elif check == "record_length":
                        target = rec.get("_longest")
                    elif check in ("repeated_lines", "repeated_ngrams"):
                        target = _row_quality(rec, config.quality_min_words)[_QUALITY_COLUMN[check]][1]
                    else:
                        target = (None if fld == "total" else fld) or _field_of(check, rec)
                    severity = "error" if name in _QUARANTINING else "warning"
                    row_findings.append(
                        Finding(rec["_file"], rec["_line"], target, name, message, severity=severity)
                    )
                    shown = examples.setdefault(k, [])
                    if len(shown) < 5:
                        shown.append(f"line {rec['_line']}: {message}")
                for f in sorted(
                    row_findings, key=lambda f: f.check
                ):  # the report's order; reasons keep the suite's
                    scratch_findings.write(_keyed((f.file, f.line, f.check), f.to_dict()))
                errors = [f for f in row_findings if f.severity == "error"]
                if errors:
                    entry = {
                        "file": rec["_file"],
                        "line": rec["_line"],
                        "reasons": [f.to_dict() for f in errors],
                        "record": _public(rec),
                    }
                    scratch_quarantine.write(_keyed((rec["_file"], rec["_line"]), entry))
                    quarantined_rows += 1
                else:
                    out.write(encode(_public(rec)))
                    accepted += 1
                i += 1
    if i != n:
        tmp_accepted.unlink(missing_ok=True)
        raise UsageError(f"{source}: the scratch copy gave {i} records, the read {n}")
    try:
        if results is None:
            results = gx_results()
            gx.close()
    except BaseException:
        tmp_accepted.unlink(missing_ok=True)
        raise
    # the verdict of each expectation; which rows fail which rule the feature columns say (bit k of
    # failed_mask: rules[k]), and GX's counts of the row rules must agree with them
    expectations: list[dict] = []
    failed: list[dict] = []
    for res in results:
        meta, r, kwargs = res["meta"], res["result"], res["kwargs"]
        check, fld = meta.get("check"), meta.get("field")
        flag = _FLAG_OF_CHECK.get(check)
        bit = rules.index((check, fld)) if (check, fld) in rules else None
        count = rule_counts[bit] if bit is not None else None
        if (
            not flag
            and count is not None
            and r.get("unexpected_count") is not None
            and count != r["unexpected_count"]
        ):
            tmp_accepted.unlink(missing_ok=True)
            raise RuntimeError(
                f"{res['type']}({kwargs.get('column')}): GX counted {r['unexpected_count']} "
                f"failing rows, the feature columns {count}"
            )  # the two must agree
        if flag:
            observed = f"{count / n:.2%} of rows ({count} rows)" if n else None
        elif "observed_value" in r:
            observed = r["observed_value"]
        elif r.get("unexpected_percent") is not None:
            observed = f"{r['unexpected_percent']:.2f}% unexpected ({r.get('unexpected_count', 0)} rows)"
        else:
            observed = None
        details = {k: v for k, v in kwargs.items() if k != "column"}
        if r.get("unexpected_count") is not None or flag:
            details["unexpected_count"] = count if flag else int(r["unexpected_count"])
        if res["error"]:
            details["error"] = res["error"]
        entry = {
            "type": res["type"],
            "column": kwargs.get("column"),
            "success": res["success"],
            "observed": observed,
            "details": details,
        }
        if bit is not None:
            if shown := examples.get(bit):
                details["examples"] = shown
        expectations.append(entry)
        if not res["success"]:
            failed.append(entry)
    duplicates = rule_counts[rules.index(("duplicate", None))]

    # the rows the loader could not read, and its findings, merged in (file, line) order
    rejected_entries = sorted(
        (
            (rej["file"], rej["line"]),
            {"file": rej["file"], "line": rej["line"], "reasons": rej["reasons"], "raw": rej["raw"]},
        )
        for rej in rejected
    )
    load_findings.sort(key=lambda f: (f.file, f.line, f.check))
    quarantined = len(rejected_entries) + quarantined_rows
    reasons: list[str] = []
    if failed:
        reasons.append(
            f"{len(failed)} expectation(s) failed: "
            + ", ".join(f"{e['type']}({e['column']})" if e["column"] else e["type"] for e in failed)
        )
    share = quarantined / rows_read if rows_read else 0.0
    if share > config.max_quarantine_rate:
        reasons.append(
            f"quarantined {quarantined} of {rows_read} rows ({share:.1%}), "
            f"above max_quarantine_rate {config.max_quarantine_rate:.1%}"
        )
    if config.on_bad_rows == "fail" and quarantined:
        reasons.append(f"on_bad_rows is 'fail' and {quarantined} rows are bad")
    if rows_read == 0:
        reasons.append("no rows were read")
    success = not reasons

    index = docs_dir / "index.html"
    docs_path = index if index.exists() else None
    report_path = out_dir / "validation.json"
    quarantine_path = out_dir / "quarantine.jsonl"
    with scratch_quarantine:
        scratch_quarantine.seek(0)
        merged = heapq.merge(
            ((key, json.dumps(entry, ensure_ascii=False)) for key, entry in rejected_entries),
            _unkeyed(scratch_quarantine),
            key=lambda item: item[0],
        )
        _write_atomic(quarantine_path, (body + "\n" for _, body in merged))
    report = {
        "success": success,
        "source": source,
        "rows_read": rows_read,
        "accepted": accepted,
        "quarantined": quarantined,
        "reasons": reasons,
        "duplicates": duplicates,
        "near_duplicates": near.count if near is not None else 0,
        "config": config.to_dict(),
        "findings": [],
        "expectations": expectations,
        "data_docs": str(docs_path) if docs_path else None,
    }
    error_count = 0
    first_errors: list[Finding] = []

    def findings() -> Iterator[str]:
        nonlocal error_count
        merged = heapq.merge(
            (((f.file, f.line, f.check), f.to_dict()) for f in load_findings),
            ((key, json.loads(body)) for key, body in _unkeyed(scratch_findings)),
            key=lambda item: item[0],
        )
        for _, f in merged:
            if f["severity"] == "error":
                error_count += 1
                if len(first_errors) < 5:
                    first_errors.append(Finding(**f))
            yield json.dumps(f, ensure_ascii=False, default=str)

    with scratch_findings:
        scratch_findings.seek(0)
        _write_atomic(report_path, _report_lines(report, findings()))
    from airloom.reports.validation import write_validation_report

    write_validation_report(
        report_path
    )  # validation.html: the verdict readable offline, unlike the Data Docs
    os.replace(tmp_accepted, accepted_path)
    if scan_source is not None:
        from airloom.data.eda import save_scan

        profile, series = features.profiler.finish(picked)
        save_scan(profile, series, out_dir / "scan", scan_source)
    return ValidationResult(
        success=success,
        rows_read=rows_read,
        accepted=accepted,
        quarantined=quarantined,
        failed_expectations=failed,
        reasons=reasons,
        report_path=report_path,
        accepted_path=accepted_path,
        quarantine_path=quarantine_path,
        data_docs_path=docs_path,
        error_count=error_count,
        first_errors=first_errors,
    )
