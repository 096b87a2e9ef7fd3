"""Profile a set of instruction records: ``profile.json`` for machines, ``report.html`` for people.

The report is one self-contained file (inline CSS, plots as base64 PNG) so it can be attached to a
task, mailed or served by the UI plugin without a static-file server. The PII, markup and duplicate
checks are the ones validation uses, so both stages count the same rows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from airloom.data.load import TEXT_FIELDS
from airloom.data.validate import CONTROL_CHARS_RE, MARKUP_RE, dedup_key, find_pii, has_markup

PROFILE_VERSION = 1
_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*|\n\n")
_STOPWORDS = frozenset(
    """a an the and or but if then else of to in on at by for from with without into onto over under as is are
    was were be been being it its this that these those there here i you he she we they me him her us them my
    your his our their what which who whom whose how why when where do does did done not no yes so than too very
    can could will would should may might must shall s t""".split()
)
_TOP = 20
_EXAMPLES = 5


def build_profile(
    records: list[dict],
    out_dir: Path,
    *,
    tokenizer: Any = None,
    previous_profile: dict | None = None,
) -> dict:
    """Profile ``records`` and write ``profile.json`` and ``report.html`` into ``out_dir``.

    Args:
        records: Records as :func:`airloom.data.load.load_records` returns them (``_line`` is used
            to point at rows; records without it are numbered from 1).
        out_dir: Folder for the two files; created if missing.
        tokenizer: Optional Hugging Face tokenizer (or ``tokenizers.Tokenizer``) for token lengths,
            the figure that decides ``max_seq_len``.
        previous_profile: An earlier ``profile.json`` (as a dict) to compare with; adds ``changes``.

    Returns:
        The profile, as written to ``profile.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile, series = _profile(records, tokenizer)
    if previous_profile is not None:
        profile["changes"] = _changes(previous_profile, profile)
    _write(out_dir / "profile.json", json.dumps(profile, indent=2, ensure_ascii=False) + "\n")
    _write(out_dir / "report.html", _render_html(profile, series))
    return profile


# --- numbers -------------------------------------------------------------------------------------


def _stats(values: list[int]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"min": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0}
    arr = np.asarray(values)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "min": int(arr.min()),
        "mean": round(float(arr.mean()), 3),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": int(arr.max()),
    }


def _histogram(values: list[int], bins: int = 30) -> dict[str, list]:
    """Counts over ``[0, p99]``; longer values are counted in ``above`` so one outlier cannot flatten the plot."""
    import numpy as np

    if not values:
        return {"edges": [], "counts": [], "above": 0}
    arr = np.asarray(values)
    top = max(1.0, float(np.percentile(arr, 99)))
    counts, edges = np.histogram(arr, bins=bins, range=(0.0, top))
    return {
        "edges": [round(float(e), 2) for e in edges],
        "counts": [int(c) for c in counts],
        "above": int((arr > top).sum()),
    }


def _token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    if callable(tokenizer):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [len(enc.ids) for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]


def _preview(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _mask(value: str) -> str:
    """Enough of a PII match to recognise it in the report, not enough to copy it."""
    if len(value) <= 6:
        return "***"
    return value[:2] + "*" * (len(value) - 6) + value[-4:]


def _profile(records: list[dict], tokenizer: Any) -> tuple[dict, dict]:
    n = len(records)
    lines = [rec.get("_line", i + 1) for i, rec in enumerate(records)]
    texts = {f: [rec.get(f) or "" for rec in records] for f in TEXT_FIELDS}
    series: dict[str, dict[str, list[int]]] = {"chars": {}, "words": {}, "tokens": {}}
    fields: dict[str, dict] = {}
    for f in TEXT_FIELDS:
        col = texts[f]
        chars = [len(t) for t in col]
        words = [len(t.split()) for t in col]
        series["chars"][f] = chars
        series["words"][f] = words
        empty = sum(1 for t in col if not t.strip())
        fields[f] = {
            "present": n - empty,
            "empty": empty,
            "completeness": round((n - empty) / n, 4) if n else 0.0,
            "chars": _stats(chars),
            "words": _stats(words),
            "chars_histogram": _histogram(chars),
        }
        if tokenizer is not None:
            tokens = _token_lengths(tokenizer, col)
            series["tokens"][f] = tokens
            fields[f]["tokens"] = _stats(tokens)
    for f in ("id", "task"):
        present = sum(1 for rec in records if rec.get(f) not in (None, ""))
        fields[f] = {
            "present": present,
            "empty": n - present,
            "completeness": round(present / n, 4) if n else 0.0,
        }
    if tokenizer is not None:
        total = [a + b + c for a, b, c in zip(*(series["tokens"][f] for f in TEXT_FIELDS), strict=True)]
        series["tokens"]["total"] = total
        fields["total_tokens"] = _stats(total)

    rows = ["\n".join(parts) for parts in zip(*(texts[f] for f in TEXT_FIELDS), strict=True)]

    # Vocabulary in one regex pass over the whole corpus; "\n\n" marks row ends so no bigram spans two rows.
    tokens = _TOKEN_RE.findall("\n\n".join(rows).lower())
    words = Counter(tokens)
    words.pop("\n\n", None)
    content = [t for t in tokens if t not in _STOPWORDS and not t.isdigit()]
    bigrams = Counter(zip(content, content[1:], strict=False))
    top_words = [[w, c] for w, c in words.most_common() if w not in _STOPWORDS and not w.isdigit()][:_TOP]
    top_bigrams = [[f"{a} {b}", c] for (a, b), c in bigrams.most_common(_TOP + 50) if "\n\n" not in (a, b)]

    leading: Counter[str] = Counter()
    for t in texts["instruction"]:
        toks = _WORD_RE.findall(t[:200].lower())
        if toks and toks[0] == "please":
            toks = toks[1:]
        if toks:
            leading[toks[0]] += 1

    groups: dict[str, list[int]] = {}
    for i in range(n):
        key = dedup_key(texts["instruction"][i], texts["input"][i], texts["response"][i])
        groups.setdefault(key, []).append(i)
    dup_groups = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
    duplicates = n - len(groups)

    pii_rows, pii_kinds, pii_examples = 0, Counter(), []
    markup_rows, markup_examples = 0, []
    control_rows = 0
    for i, row in enumerate(rows):
        if find_pii(row):  # cheap whole-row test first; per field only for the few rows that hit
            row_kinds: set[str] = set()
            for f in TEXT_FIELDS:
                for kind, matches in find_pii(texts[f][i]).items():
                    row_kinds.add(kind)
                    if len(pii_examples) < _EXAMPLES:
                        pii_examples.append(
                            {"line": lines[i], "field": f, "kind": kind, "match": _mask(matches[0])}
                        )
            if row_kinds:
                pii_rows += 1
                pii_kinds.update(row_kinds)
        if "<" in row and has_markup(texts["instruction"][i], texts["input"][i], texts["response"][i]):
            markup_rows += 1
            if len(markup_examples) < _EXAMPLES:
                tag = next(m.group(0) for f in TEXT_FIELDS if (m := MARKUP_RE.search(texts[f][i])))
                markup_examples.append(
                    {"line": lines[i], "tag": tag, "instruction": _preview(texts["instruction"][i])}
                )
        if CONTROL_CHARS_RE.search(row):
            control_rows += 1

    totals = [
        series["chars"]["instruction"][i] + series["chars"]["input"][i] + series["chars"]["response"][i]
        for i in range(n)
    ]
    order = sorted(range(n), key=lambda i: (totals[i], lines[i]))

    def outlier(i: int) -> dict:
        return {"line": lines[i], "chars": totals[i], "instruction": _preview(texts["instruction"][i])}

    tasks = None
    if any(rec.get("task") for rec in records):
        tasks = dict(Counter(rec.get("task") or "(none)" for rec in records).most_common())

    rate = (lambda k: round(k / n, 4)) if n else (lambda k: 0.0)
    profile = {
        "version": PROFILE_VERSION,
        "rows": n,
        "fields": fields,
        "vocabulary": {
            "size": len(words),
            "total_words": sum(words.values()),
            "top_words": top_words,
            "top_bigrams": top_bigrams[:_TOP],
        },
        "leading_verbs": [[w, c] for w, c in leading.most_common(15)],
        "duplicates": {
            "count": duplicates,
            "rate": rate(duplicates),
            "examples": [
                {
                    "copies": len(g),
                    "lines": [lines[i] for i in g[:10]],
                    "instruction": _preview(texts["instruction"][g[0]]),
                }
                for g in dup_groups[:_EXAMPLES]
            ],
        },
        "tasks": tasks,
        "pii": {
            "rows": pii_rows,
            "rate": rate(pii_rows),
            "by_kind": dict(pii_kinds),
            "examples": pii_examples,
        },
        "markup": {"rows": markup_rows, "rate": rate(markup_rows), "examples": markup_examples},
        "control_chars": {"rows": control_rows, "rate": rate(control_rows)},
        "outliers": {
            "longest": [outlier(i) for i in reversed(order[-_EXAMPLES:])],
            "shortest": [outlier(i) for i in order[:_EXAMPLES]],
        },
    }
    return profile, series


def _metrics(profile: dict) -> dict[str, float]:
    """The flat numbers compared between two profiles."""
    out: dict[str, float] = {"rows": profile.get("rows", 0)}
    for key in ("duplicates", "pii", "markup", "control_chars"):
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


# --- report --------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(profile: dict, series: dict) -> dict[str, str]:
    """Base64 PNGs, drawn with the Agg canvas directly so no global pyplot state is touched."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figs: dict[str, str] = {}
    for unit in ("chars", "words", "tokens"):
        data = series[unit]
        if not data:
            continue
        fig = Figure(figsize=(11, 2.8))
        FigureCanvasAgg(fig)
        for k, f in enumerate(TEXT_FIELDS):
            ax = fig.add_subplot(1, 3, k + 1)
            values = np.asarray(data[f]) if data[f] else np.zeros(1)
            top = max(1.0, float(np.percentile(values, 99)))
            ax.hist(np.clip(values, 0, top), bins=30, color="#4a6fa5")
            clipped = int((values > top).sum())
            ax.set_title(f"{f} ({unit})" + (f", {clipped} > p99 at edge" if clipped else ""), fontsize=9)
            ax.tick_params(labelsize=8)
        fig.tight_layout()
        figs[unit] = _png(fig)
    if profile["tasks"]:
        items = list(profile["tasks"].items())[:30]
        fig = Figure(figsize=(8, 0.3 * len(items) + 1))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.barh([t for t, _ in items][::-1], [c for _, c in items][::-1], color="#4a6fa5")
        ax.set_title("task mix (rows)", fontsize=9)
        ax.tick_params(labelsize=8)
        fig.tight_layout()
        figs["tasks"] = _png(fig)
    return figs


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.85rem}td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f5f8}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:.5rem 1rem;min-width:8rem}
.card b{display:block;font-size:1.3rem}.warn{color:#b3261e}.cols{display:flex;gap:2rem;flex-wrap:wrap;align-items:flex-start}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return _e(value) if value is not None else "–"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{_num(c)}</td>' if isinstance(c, int | float) else f"<td>{_e(c)}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(figs: dict[str, str], key: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{figs[key]}" alt="{_e(alt)}">' if key in figs else ""


def _render_html(profile: dict, series: dict) -> str:
    figs = _figures(profile, series)
    f = profile["fields"]
    pct = lambda r: f"{r:.2%}"  # noqa: E731
    cards = [
        ("rows", _num(profile["rows"])),
        ("duplicates", f"{_num(profile['duplicates']['count'])} ({pct(profile['duplicates']['rate'])})"),
        ("PII rows", f"{_num(profile['pii']['rows'])} ({pct(profile['pii']['rate'])})"),
        ("markup rows", f"{_num(profile['markup']['rows'])} ({pct(profile['markup']['rate'])})"),
        ("vocabulary", _num(profile["vocabulary"]["size"])),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Data profile: {profile['rows']} rows</title><style>{_CSS}</style></head><body>",
        "<h1>Instruction data profile</h1><div class='cards'>"
        + "".join(f"<div class='card'>{_e(k)}<b>{v}</b></div>" for k, v in cards)
        + "</div>",
    ]
    if "changes" in profile:
        rows = [
            [
                c["metric"],
                c["previous"],
                c["current"],
                c["change"],
                f"{c['relative']:+.1%}" if c["relative"] is not None else "–",
            ]
            for c in profile["changes"]
        ]
        parts += [
            "<h2>Changes since previous profile</h2>",
            _table(["metric", "previous", "current", "change", "relative"], rows),
        ]
    parts += [
        "<h2>Fields</h2>",
        _table(
            ["field", "present", "empty", "completeness"],
            [[k, v["present"], v["empty"], pct(v["completeness"])] for k, v in f.items() if "present" in v],
        ),
        "<h2>Lengths</h2>",
    ]
    for unit in ("chars", "words", "tokens"):
        rows = [
            [k, *(f[k][unit][s] for s in ("min", "mean", "p50", "p90", "p99", "max"))]
            for k in TEXT_FIELDS
            if unit in f[k]
        ]
        if rows:
            parts += [
                f"<h3>{unit}</h3>",
                _table(["field", "min", "mean", "p50", "p90", "p99", "max"], rows),
                _img(figs, unit, f"{unit} histograms"),
            ]
    if "total_tokens" in f:
        t = f["total_tokens"]
        parts.append(
            f"<p>Tokens per row (instruction + input + response): p50 {_num(t['p50'])}, "
            f"p99 {_num(t['p99'])}, max {_num(t['max'])}.</p>"
        )
    v = profile["vocabulary"]
    parts += [
        "<h2>Vocabulary</h2>",
        f"<p>{_num(v['size'])} distinct words, {_num(v['total_words'])} in all (lower-cased; the top lists "
        "leave out stop words and numbers).</p><div class='cols'>",
        _table(["word", "count"], v["top_words"]),
        _table(["bigram", "count"], v["top_bigrams"]),
        _table(["leading word of instruction", "rows"], profile["leading_verbs"]),
        "</div>",
    ]
    if profile["tasks"]:
        parts += [
            "<h2>Task mix</h2>",
            _img(figs, "tasks", "task mix"),
            _table(["task", "rows"], [[k, c] for k, c in profile["tasks"].items()]),
        ]
    d = profile["duplicates"]
    parts += [
        "<h2>Exact duplicates</h2>",
        f"<p>{_num(d['count'])} rows repeat an earlier row (whitespace ignored).</p>",
        _table(
            ["copies", "lines", "instruction"],
            [[x["copies"], ", ".join(map(str, x["lines"])), x["instruction"]] for x in d["examples"]],
        ),
        "<h2>Personal data and markup</h2>",
        f"<p>PII in {_num(profile['pii']['rows'])} rows ({pct(profile['pii']['rate'])}): "
        + (", ".join(f"{_e(k)} {_num(c)}" for k, c in profile["pii"]["by_kind"].items()) or "none")
        + ". Matches are masked.</p>",
        _table(
            ["line", "field", "kind", "match"],
            [[x["line"], x["field"], x["kind"], x["match"]] for x in profile["pii"]["examples"]],
        ),
        f"<p>HTML the instruction does not ask for in {_num(profile['markup']['rows'])} rows "
        f"({pct(profile['markup']['rate'])}); control characters in {_num(profile['control_chars']['rows'])} rows.</p>",
        _table(
            ["line", "tag", "instruction"],
            [[x["line"], x["tag"], x["instruction"]] for x in profile["markup"]["examples"]],
        ),
        "<h2>Outliers (instruction + input + response characters)</h2><div class='cols'>",
        _table(
            ["longest: line", "chars", "instruction"],
            [[x["line"], x["chars"], x["instruction"]] for x in profile["outliers"]["longest"]],
        ),
        _table(
            ["shortest: line", "chars", "instruction"],
            [[x["line"], x["chars"], x["instruction"]] for x in profile["outliers"]["shortest"]],
        ),
        "</div></body></html>\n",
    ]
    return "\n".join(parts)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
