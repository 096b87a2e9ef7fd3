"""``validation.html``: the verdict of a validation (``validation.json``) as a page that reads offline.

Great Expectations' Data Docs load their CSS and JS from CDNs and render blank without internet;
this page shows the same expectations (and the row findings behind them) with nothing to fetch.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from airloom.reports import render

SHOWN_FINDINGS = 200
"""Findings listed row by row; the rest are counted (a corpus can have millions)."""


def write_validation_report(report_path: Path) -> Path:
    """Write ``validation.html`` beside ``report_path`` (a ``validation.json``) and return its path."""
    report_path = Path(report_path)
    report, shown, counts = _read(report_path)
    docs = report.get("data_docs")
    page = report_path.with_name("validation.html")
    docs_href = None
    if docs:
        docs_href = Path(os.path.relpath(docs, report_path.parent)).as_posix()
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(
        render(
            "validation.html.j2",
            report=report,
            failed=[e for e in report.get("expectations") or [] if not e.get("success")],
            findings=shown,
            counts=sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])),
            total_findings=sum(counts.values()),
            docs_href=docs_href,
        ),
        encoding="utf-8",
    )
    os.replace(tmp, page)
    return page


def _read(path: Path) -> tuple[dict, list[dict], Counter]:
    """The report without its findings, the first :data:`SHOWN_FINDINGS` findings, and counts of all of
    them by (check, severity).

    ``validation.json`` keeps one finding per line (see ``airloom.data.validate._report_lines``), so the
    findings are read a line at a time and memory does not grow with their number; a file laid out
    otherwise is read whole.
    """
    shown: list[dict] = []
    counts: Counter = Counter()

    def add(finding: dict) -> None:
        counts[(finding.get("check"), finding.get("severity"))] += 1
        if len(shown) < SHOWN_FINDINGS:
            shown.append(finding)

    outside: list[str] = []
    inside = False
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if inside:
                    text = line.strip()
                    if text.startswith("{"):
                        add(json.loads(text.removesuffix(",")))
                        continue
                    inside = False  # the line that closes the list
                elif line.rstrip().endswith('"findings": ['):
                    inside = True
                outside.append(line)
        report = json.loads("".join(outside))
    except json.JSONDecodeError:
        shown.clear()
        counts.clear()
        report = json.loads(path.read_text(encoding="utf-8"))
    for finding in report.pop("findings", None) or []:
        add(finding)
    return report, shown, counts
