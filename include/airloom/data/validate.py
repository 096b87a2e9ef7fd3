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
The text checks (:func:`find_pii`, :func:`scrub_pii`, :func:`has_markup`, :func:`dedup_key`) live here
so EDA and preparation flag exactly what validation flags.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import shutil
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from airloom.data.load import TEXT_FIELDS, Finding, LoadResult
from airloom.exceptions import UsageError

# --- text checks shared with eda.py and prepare.py -------------------------------------------------

EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
PHONE_RE = re.compile(
    r"(?<![\w.+-])(?:"
    r"(?:\+?1[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American
    r"|\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}\d"  # international, must start with +
    r")(?![\w-])"
)
IPV4_RE = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
)
CARD_RE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
CONTROL_CHARS_PATTERN = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
CONTROL_CHARS_RE = re.compile(CONTROL_CHARS_PATTERN)
MARKUP_RE = re.compile(
    r"</(?:html|head|body|div|span|p|a|iframe|script|style|table|tr|td|th|ul|ol|li|form|button|h[1-6]"
    r"|b|i|em|strong|pre|font|center|section|article|nav|footer|header)\s*>"
    r"|<(?:!doctype|html|body|head|iframe|script|style|meta|br|img|link)\b[^<>]*>",
    re.IGNORECASE,
)
_ASKS_FOR_MARKUP_RE = re.compile(
    r"\b(?:x?html5?|xml|svg|jsx|tsx|markup|web ?pages?|webpage|websites?|browsers?|dom|css|tags?|elements?"
    r"|buttons?|paragraphs?|forms?|div|php|jquery|react|vue|angular)\b",
    re.IGNORECASE,
)
PII_PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>", "card": "<CARD>"}
# Cheap pre-check: phones, cards and IPs all need 7+ characters of digits and separators.
_NUMBERISH_RE = re.compile(r"\d[\d .()+-]{5,}\d")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ip_is_personal(text: str) -> bool:
    """Loopback, unspecified and netmask-like addresses are code, not someone's address."""
    ip = ipaddress.IPv4Address(text)
    return not (ip.is_loopback or ip.is_unspecified or text.startswith("255.") or ip.is_multicast)


def _card_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and _luhn_ok(digits)


def find_pii(text: str) -> dict[str, list[str]]:
    """Personal data found in ``text``, by kind (``email``, ``phone``, ``ip``, ``card``); empty if none."""
    found: dict[str, list[str]] = {}
    if "@" in text and (emails := EMAIL_RE.findall(text)):
        found["email"] = emails
    if not _NUMBERISH_RE.search(text):
        return found
    if cards := [m for m in CARD_RE.findall(text) if _card_ok(m)]:
        found["card"] = cards
    if phones := [m for m in PHONE_RE.findall(text) if not _card_ok(m)]:
        found["phone"] = phones
    if "." in text and (ips := [m for m in IPV4_RE.findall(text) if _ip_is_personal(m)]):
        found["ip"] = ips
    return found


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace personal data with placeholders (``<EMAIL>``, ``<PHONE>``, ``<IP>``, ``<CARD>``).

    Returns:
        The scrubbed text and the number of replacements per kind.
    """
    counts: dict[str, int] = {}
    if "@" in text:
        text, n = EMAIL_RE.subn(PII_PLACEHOLDERS["email"], text)
        if n:
            counts["email"] = n
    if not _NUMBERISH_RE.search(text):
        return text, counts

    def sub(kind: str, pattern: re.Pattern, keep: Any) -> None:
        nonlocal text

        def repl(m: re.Match) -> str:
            if not keep(m.group(0)):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return PII_PLACEHOLDERS[kind]

        text = pattern.sub(repl, text)

    sub("card", CARD_RE, _card_ok)
    sub("phone", PHONE_RE, lambda m: True)
    sub("ip", IPV4_RE, _ip_is_personal)
    return text, counts


def has_markup(instruction: str, input: str, response: str) -> bool:
    """HTML in a row that is not about HTML: scraped-page junk rather than an answer.

    A row is about HTML when its input holds markup, or its instruction (tags aside) names HTML,
    the DOM, page elements or a web framework.
    """
    if not (MARKUP_RE.search(response) or MARKUP_RE.search(instruction)):
        return False
    if MARKUP_RE.search(input):
        return False
    return not _ASKS_FOR_MARKUP_RE.search(MARKUP_RE.sub(" ", f"{instruction}\n{input}"))


def normalize_text(text: str) -> str:
    """Unicode NFC, ``\\n`` line ends, no trailing spaces on lines, no blank ends; indentation is kept."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def dedup_key(instruction: str, input: str, response: str) -> str:
    """Identity of a row for duplicate detection: NFC text with whitespace runs collapsed."""
    return "\x1f".join(
        " ".join((t if unicodedata.is_normalized("NFC", t) else unicodedata.normalize("NFC", t)).split())
        for t in (instruction, input, response)
    )


# --- configuration --------------------------------------------------------------------------------


def _default_min_chars() -> dict[str, int]:
    return {"instruction": 3, "response": 1}


def _default_max_chars() -> dict[str, int]:
    return {"instruction": 4000, "response": 8000}


@dataclass
class ValidationConfig:
    """Thresholds of the validation suite.

    Attributes:
        min_chars: Least characters per field (``instruction``, ``input``, ``response``).
        max_chars: Most characters per field.
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
    """

    min_chars: dict[str, int] = field(default_factory=_default_min_chars)
    max_chars: dict[str, int] = field(default_factory=_default_max_chars)
    max_duplicate_rate: float = 0.05
    max_near_duplicate_rate: float = 0.05
    near_duplicate_threshold: float | None = 0.8
    near_duplicate_shingle_size: int = 5
    near_duplicate_num_perm: int = 128
    max_pii_rate: float = 0.01
    max_markup_rate: float = 0.05
    on_bad_rows: str = "quarantine"
    max_quarantine_rate: float = 0.05

    def __post_init__(self) -> None:
        for name in ("min_chars", "max_chars"):
            bounds = getattr(self, name)
            if not isinstance(bounds, dict):
                raise UsageError(f"{name} must map field names to numbers, e.g. {{instruction: 3}}")
            for fld, value in bounds.items():
                if fld not in TEXT_FIELDS:
                    raise UsageError(f"{name}.{fld}: unknown field; use one of {', '.join(TEXT_FIELDS)}")
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
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"{path}: cannot read the validation config ({exc.strerror or exc})") from exc
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML ({exc})") from exc
        if data is not None and not isinstance(data, dict):
            raise UsageError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --- result ---------------------------------------------------------------------------------------


@dataclass
class ValidationResult:
    """Outcome of :func:`validate`; every number is also in ``validation.json``."""

    success: bool
    rows_read: int
    accepted: int
    quarantined: int
    failed_expectations: list[dict]
    findings: list[Finding]
    reasons: list[str]
    report_path: Path
    accepted_path: Path
    quarantine_path: Path
    data_docs_path: Path | None

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
        errors = [f for f in self.findings if f.severity == "error"]
        if errors:
            lines.append(f"  {len(errors)} row problems, first ones:")
            lines += [f"      {f}" for f in errors[:5]]
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
    "blank_text",
    "control_chars",
    "duplicate",
    "near_duplicate",
    "markup",
}


#: Flag column -> the row check it stands for (rate rules: GX judges the share, the rows come from here).
_FLAG_COLUMNS = {
    "is_duplicate": "duplicate",
    "is_near_duplicate": "near_duplicate",
    "has_pii": "pii",
    "has_markup": "markup",
}


def _frame(records: list[dict], config: ValidationConfig):
    """The frame GX checks, plus for each row the row it (nearly) repeats.

    Returns:
        (frame, dup_of, near_of): ``dup_of[i]`` is the first row with the same :func:`dedup_key`;
        ``near_of`` maps a near-duplicate row to (the kept row it repeats, Jaccard).
    """
    import numpy as np
    import pandas as pd

    seen: dict[str, int] = {}
    n = len(records)
    dup = np.zeros(n, dtype=bool)
    eligible = np.zeros(n, dtype=bool)  # takes part in (near-)duplicate search
    dup_of, pii, markup = list(range(n)), [], []
    (lo_i, hi_i), (lo_n, hi_n), (lo_r, hi_r) = (
        (config.min_chars.get(f) or 0, config.max_chars.get(f, math.inf)) for f in TEXT_FIELDS
    )
    for i, rec in enumerate(records):
        ins, inp, resp = rec["instruction"], rec.get("input", ""), rec["response"]
        row = f"{ins}\n{inp}\n{resp}"
        # the whole row first, a cheap filter: a match in a field is a match in the newline-joined row
        pii.append(bool(find_pii(row)) and any(find_pii(t) for t in (ins, inp, resp)))
        markup.append("<" in row and has_markup(ins, inp, resp))
        # A row that breaks another quarantining rule of the suite (the same rules, in Python) is
        # quarantined anyway: it must not be the "first copy" that makes a clean copy a duplicate.
        if (
            markup[-1]
            or not (lo_i <= len(ins) <= hi_i and lo_n <= len(inp) <= hi_n and lo_r <= len(resp) <= hi_r)
            or not ins.strip()
            or not resp.strip()
            or CONTROL_CHARS_RE.search(row)  # "\n" is not one of them
        ):
            continue
        first = seen.setdefault(dedup_key(ins, inp, resp), i)
        dup_of[i] = first
        dup[i] = first != i
        eligible[i] = first == i
    near_of: dict[int, tuple[int, float]] = {}
    if config.near_duplicate_threshold is not None and n:
        from airloom.data.neardup import find_near_duplicates

        near_of = find_near_duplicates(
            (f"{r['instruction']}\n{r.get('input', '')}\n{r['response']}" for r in records),
            threshold=config.near_duplicate_threshold,
            shingle_size=config.near_duplicate_shingle_size,
            num_perm=config.near_duplicate_num_perm,
            eligible=eligible,
        ).of
    near = np.zeros(n, dtype=bool)
    near[list(near_of)] = True
    frame = pd.DataFrame(
        {
            "_row": pd.Series(range(n), dtype="int64"),
            **{f: pd.Series([r.get(f, "") for r in records], dtype="str") for f in TEXT_FIELDS},
            "is_duplicate": pd.Series(dup, dtype="bool"),
            "is_near_duplicate": pd.Series(near, dtype="bool"),
            "has_pii": pd.Series(pii, dtype="bool"),
            "has_markup": pd.Series(markup, dtype="bool"),
        }
    )
    return frame, dup_of, near_of


def _build_suite(config: ValidationConfig):
    """The expectation suite; each expectation's ``meta`` names the row check it stands for."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    row_mostly = 1.0 - config.max_quarantine_rate
    suite = gx.ExpectationSuite(name="airloom_instruction_records")

    def add(cls: Any, check: str | None = None, fld: str | None = None, **kwargs: Any) -> None:
        # meta tells the result reader what a failing row means for us
        suite.add_expectation(cls(**kwargs, meta={"check": check, "field": fld}))

    add(gxe.ExpectTableRowCountToBeBetween, min_value=1)
    for fld in TEXT_FIELDS:
        add(gxe.ExpectColumnValuesToNotBeNull, "null_field", fld, column=fld)
        add(gxe.ExpectColumnValuesToBeOfType, column=fld, type_="str")
    for fld in TEXT_FIELDS:
        lo, hi = config.min_chars.get(fld), config.max_chars.get(fld)
        if lo is not None or hi is not None:
            add(
                gxe.ExpectColumnValueLengthsToBeBetween,
                "length",
                fld,
                column=fld,
                min_value=lo,
                max_value=hi,
                mostly=row_mostly,
            )
    for fld in ("instruction", "response"):
        add(
            gxe.ExpectColumnValuesToNotMatchRegex,
            "blank_text",
            fld,
            column=fld,
            regex=r"^\s*$",
            mostly=row_mostly,
        )
    for fld in TEXT_FIELDS:
        add(
            gxe.ExpectColumnValuesToNotMatchRegex,
            "control_chars",
            fld,
            column=fld,
            regex=CONTROL_CHARS_PATTERN,
            mostly=row_mostly,
        )
    rates = (
        ("is_duplicate", config.max_duplicate_rate, "duplicate"),
        ("is_near_duplicate", config.max_near_duplicate_rate, "near_duplicate"),
        ("has_pii", config.max_pii_rate, "pii"),
        ("has_markup", config.max_markup_rate, "markup"),
    )
    for column, rate, check in rates:
        # the mean of a flag column is the share of flagged rows; an aggregate, so GX does not list (and
        # store, and render) the indices of what can be most of the rows: validate() has them already
        add(gxe.ExpectColumnMeanToBeBetween, check, column=column, min_value=0.0, max_value=rate)
    return suite


def _run_gx(df, config: ValidationConfig, docs_dir: Path):
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
    context = gx.get_context(mode="ephemeral", project_config=project_config)
    batch = (
        context.data_sources.add_pandas("records")
        .add_dataframe_asset("instruction_records")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add(_build_suite(config))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="instruction_records", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="llm_data_quality",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["airloom"])],
            # row numbers of every failing row, but not the failing texts (long rows would be copied
            # several times into the stored result) nor the pandas query that lists them again
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": ["_row"],
                "exclude_unexpected_values": True,
                "return_unexpected_index_query": False,
            },
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": df})
    (validation,) = run.run_results.values()
    return validation.results


def _row_message(
    check: str,
    fld: str | None,
    rec: dict,
    config: ValidationConfig,
    first: dict,
    near: tuple[dict, float] | None = None,
) -> tuple[str, str]:
    """(check, message) for one failing row, with the numbers needed to fix it."""
    if check == "length":
        n = len(rec.get(fld, ""))
        lo, hi = config.min_chars.get(fld), config.max_chars.get(fld)
        if lo is not None and n < lo:
            return "too_short", f"{fld} has {n} characters; at least {lo} required (min_chars.{fld})"
        return "too_long", f"{fld} has {n} characters; at most {hi} allowed (max_chars.{fld})"
    if check == "blank_text":
        return check, f"{fld} is empty or only whitespace"
    if check == "null_field":
        return check, f"{fld} is missing or null"
    if check == "control_chars":
        chars = sorted({f"U+{ord(c):04X}" for c in CONTROL_CHARS_RE.findall(rec.get(fld, ""))})
        return check, f"{fld} holds control characters ({', '.join(chars[:6])}); remove them"
    if check == "duplicate":
        where = f"line {first['_line']}" + ("" if first["_file"] == rec["_file"] else f" of {first['_file']}")
        return check, f"repeats the row at {where} (ignoring whitespace); the first copy is kept"
    if check == "near_duplicate" and near is not None:
        other, jaccard = near
        where = f"line {other['_line']}" + ("" if other["_file"] == rec["_file"] else f" of {other['_file']}")
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


def _field_of(check: str, rec: dict) -> str | None:
    if check == "pii":
        return next((f for f in TEXT_FIELDS if find_pii(rec.get(f, ""))), None)
    if check == "markup":
        return next((f for f in TEXT_FIELDS if MARKUP_RE.search(rec.get(f, ""))), None)
    return None


def _unexpected_rows(result: dict) -> list[int]:
    """Row numbers (``_row``) of a GX result: one dict per row, or one dict listing all of them (the shape
    GX uses with ``exclude_unexpected_values``)."""
    rows: list[int] = []
    for hit in result.get("unexpected_index_list") or []:
        value = hit["_row"]
        if isinstance(value, list):
            rows.extend(int(v) for v in value)
        else:
            rows.append(int(value))
    return rows


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, list | dict | str):
        return value.item()
    return value


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


def _report_json(report: dict) -> str:
    """``validation.json``: indented, but one finding per line, which keeps 100k findings fast to write and
    easy to grep (``json.dumps(indent=...)`` runs the pure-Python encoder, ~10x slower)."""
    findings = report["findings"]
    head = json.dumps({**report, "findings": []}, indent=2, ensure_ascii=False, default=str)
    if not findings:
        return head + "\n"
    rows = ",\n".join("    " + json.dumps(f, ensure_ascii=False, default=str) for f in findings)
    return head.replace('"findings": []', '"findings": [\n' + rows + "\n  ]", 1) + "\n"


def _public(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def validate(load: LoadResult, out_dir: Path, config: ValidationConfig | None = None) -> ValidationResult:
    """Run the suite over ``load.records`` and write the verdict, the clean rows and the quarantine.

    Writes ``validation.json``, ``accepted.jsonl`` (canonical fields only, so it loads cleanly),
    ``quarantine.jsonl`` (one row per quarantined line with its reasons) and GX Data Docs under
    ``data_docs/``. A rerun into the same ``out_dir`` replaces these.

    Args:
        load: What :func:`airloom.data.load.load_records` read.
        out_dir: Folder for the outputs; created if missing.
        config: Thresholds; the defaults of :class:`ValidationConfig` when None.
    """
    import numpy as np

    config = config or ValidationConfig()
    if load.rows_read != len(load.records) + len(load.rejected):
        raise UsageError(
            f"{load.source}: rows_read is {load.rows_read} but there are {len(load.records)} records and "
            f"{len(load.rejected)} rejected rows; pass what load_records returned"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = out_dir / "data_docs"
    shutil.rmtree(docs_dir, ignore_errors=True)

    records = load.records
    df, dup_of, near_of = _frame(records, config)
    results = _run_gx(df, config, docs_dir)

    row_findings: dict[int, list[Finding]] = {}
    warnings: list[Finding] = []
    expectations: list[dict] = []
    failed: list[dict] = []
    flagged = {check: np.flatnonzero(df[column].to_numpy()) for column, check in _FLAG_COLUMNS.items()}
    for res in results:
        cfg = res.expectation_config
        meta = cfg.meta or {}
        check, fld = meta.get("check"), meta.get("field")
        r = res.result or {}
        column = cfg.kwargs.get("column")
        examples: list[str] = []
        rows = flagged[check].tolist() if check in flagged else _unexpected_rows(r)
        for i in rows:
            rec = records[i]
            near = (records[near_of[i][0]], near_of[i][1]) if i in near_of else None
            name, message = _row_message(check, fld, rec, config, records[dup_of[i]], near)
            target = fld or _field_of(check, rec)
            severity = "error" if name in _QUARANTINING else "warning"
            finding = Finding(rec["_file"], rec["_line"], target, name, message, severity=severity)
            (row_findings.setdefault(i, []) if severity == "error" else warnings).append(finding)
            if len(examples) < 5:
                examples.append(f"line {rec['_line']}: {message}")
        if check in flagged:
            observed = f"{len(rows) / len(df):.2%} of rows ({len(rows)} rows)" if len(df) else None
        elif "observed_value" in r:
            observed = _jsonable(r["observed_value"])
        elif r.get("unexpected_percent") is not None:
            observed = f"{r['unexpected_percent']:.2f}% unexpected ({r.get('unexpected_count', 0)} rows)"
        else:
            observed = None
        details = {k: _jsonable(v) for k, v in cfg.kwargs.items() if k not in ("batch_id", "column")}
        if r.get("unexpected_count") is not None or check in flagged:
            details["unexpected_count"] = len(rows) if check in flagged else int(r["unexpected_count"])
        if examples:
            details["examples"] = examples
        if res.exception_info and res.exception_info.get("raised_exception"):
            details["error"] = res.exception_info.get("exception_message")
        entry = {
            "type": cfg.type,
            "column": column,
            "success": bool(res.success),
            "observed": observed,
            "details": details,
        }
        expectations.append(entry)
        if not res.success:
            failed.append(entry)

    quarantine_rows: list[dict] = []
    for rej in load.rejected:
        quarantine_rows.append(
            {"file": rej["file"], "line": rej["line"], "reasons": rej["reasons"], "raw": rej["raw"]}
        )
    accepted_lines: list[str] = []
    for i, rec in enumerate(records):
        if i in row_findings:
            quarantine_rows.append(
                {
                    "file": rec["_file"],
                    "line": rec["_line"],
                    "reasons": [f.to_dict() for f in row_findings[i]],
                    "record": _public(rec),
                }
            )
        else:
            accepted_lines.append(json.dumps(_public(rec), ensure_ascii=False) + "\n")
    quarantine_rows.sort(key=lambda q: (q["file"], q["line"]))

    quarantined = len(quarantine_rows)
    accepted = len(accepted_lines)
    reasons: list[str] = []
    if failed:
        reasons.append(
            f"{len(failed)} expectation(s) failed: "
            + ", ".join(f"{e['type']}({e['column']})" if e["column"] else e["type"] for e in failed)
        )
    share = quarantined / load.rows_read if load.rows_read else 0.0
    if share > config.max_quarantine_rate:
        reasons.append(
            f"quarantined {quarantined} of {load.rows_read} rows ({share:.1%}), "
            f"above max_quarantine_rate {config.max_quarantine_rate:.1%}"
        )
    if config.on_bad_rows == "fail" and quarantined:
        reasons.append(f"on_bad_rows is 'fail' and {quarantined} rows are bad")
    if load.rows_read == 0:
        reasons.append("no rows were read")
    success = not reasons

    findings = sorted(
        [*load.findings, *(f for fs in row_findings.values() for f in fs), *warnings],
        key=lambda f: (f.file, f.line, f.check),
    )
    index = docs_dir / "index.html"
    docs_path = index if index.exists() else None
    report_path = out_dir / "validation.json"
    accepted_path = out_dir / "accepted.jsonl"
    quarantine_path = out_dir / "quarantine.jsonl"
    _write_atomic(accepted_path, accepted_lines)
    _write_atomic(quarantine_path, [json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine_rows])
    report = {
        "success": success,
        "source": load.source,
        "rows_read": load.rows_read,
        "accepted": accepted,
        "quarantined": quarantined,
        "reasons": reasons,
        "duplicates": int(df["is_duplicate"].sum()),
        "near_duplicates": len(near_of),
        "config": config.to_dict(),
        "findings": [f.to_dict() for f in findings],
        "expectations": expectations,
        "data_docs": str(docs_path) if docs_path else None,
    }
    _write_atomic(report_path, [_report_json(report)])
    return ValidationResult(
        success=success,
        rows_read=load.rows_read,
        accepted=accepted,
        quarantined=quarantined,
        failed_expectations=failed,
        findings=findings,
        reasons=reasons,
        report_path=report_path,
        accepted_path=accepted_path,
        quarantine_path=quarantine_path,
        data_docs_path=docs_path,
    )
