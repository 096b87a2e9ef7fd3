"""The HTML reports: one stylesheet, inlined; data text escaped in every page; validation.html from
validation.json (the verdict readable offline, where GX's Data Docs render blank)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from airloom.reports import render
from airloom.reports.validation import SHOWN_FINDINGS, write_validation_report

SCRIPT = "<script>alert(1)</script>"
STYLE = (Path(__file__).parents[3] / "include/airloom/reports/templates/style.css").read_text(
    encoding="utf-8"
)


def _self_contained_and_escaped(page: str) -> None:
    assert STYLE.strip() in page and "<link" not in page and "<script src" not in page
    assert SCRIPT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_missing_name_fails_and_none_renders_blank():
    with pytest.raises(jinja2.UndefinedError, match="ds"):
        render("dashboard.html.j2", trend=[], plots={}, drift=None, detail="")
    page = render("dashboard.html.j2", ds="2026-01-02", trend=[], plots={}, drift=None, detail=None)
    assert "<pre></pre>" in page and "None" not in page


def test_eda_report_escapes_the_data(tmp_path):
    from airloom.data.eda import build_profile

    records = [{"instruction": f"Say {SCRIPT} {i}", "input": "", "response": "ok"} for i in range(3)]
    build_profile(records, tmp_path, languages=False, near_duplicate_threshold=None)
    _self_contained_and_escaped((tmp_path / "report.html").read_text(encoding="utf-8"))


def test_evaluation_report_escapes_the_data(tmp_path):
    from airloom.evaluation.report import write_report

    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        json.dumps(
            {"id": "e0", "task": SCRIPT, "prompt": "q", "prediction": SCRIPT, "reference": "a", "f1": 0.0}
        )
        + "\n"
    )
    page = write_report(
        tmp_path / "out", {"model": SCRIPT, "n": 1, "aggregate": {"f1": 0.0}}, predictions_path=predictions
    ).read_text(encoding="utf-8")
    _self_contained_and_escaped(page)


def test_dashboard_escapes_the_data(tmp_path):
    from airloom.monitoring.serving import write_dashboard

    day = tmp_path / "traffic" / "ds=2026-01-02"
    day.mkdir(parents=True)
    (day / "part-0.jsonl").write_text(
        json.dumps({"id": "1", "model": SCRIPT, "response": "hi", "latency_ms": 5}) + "\n"
    )
    drift = {
        "reference_rows": 10,
        "current_rows": 1,
        "length_psi": {"instruction": 0.3},
        "vocabulary": {"js_divergence": 0.1, "new_top_words_share": 0.5, "new_top_words": [[SCRIPT, 2]]},
    }
    out = write_dashboard(
        tmp_path / "out", tmp_path / "traffic", tmp_path / "feedback", "2026-01-02", input_drift=drift
    )
    page = Path(out["dashboard"]).read_text(encoding="utf-8")
    _self_contained_and_escaped(page)
    assert "<td>instruction length (chars)</td><td>0.3</td><td>major shift</td>" in page


def test_signoff_page_escapes_the_data():
    from airloom.airflow.signoff_ui import render_card, render_page

    class Reviewer:
        def get_name(self) -> str:
            return "reviewer"

    entry = {
        "model": SCRIPT,
        "version": 1,
        "state": "pending",
        "requested_by": "trainer",
        "requested_at": "t",
        "request_id": "r1",
        "approvals": [],
        "rejections": [{"user": "u", "at": "t", "comment": SCRIPT}],
        "required_approvals": 1,
        "created_at": "t",
        "created_by": "trainer",
        "dag_id": "llm_finetune",
        "run_id": None,
        "metrics": {"f1": SCRIPT},
        "gates": [{"passed": False, "message": SCRIPT}],
        "evidence": [{"label": SCRIPT, "uri": "s3://b/k", "sha256": None, "href": None, "check": None}],
        "reports": [],
        "card_url": "/airloom/api/models/x/1/card",
        "can_approve": True,
        "can_reject": True,
        "why_not": None,
    }
    card = render_card(f"---\nname: {SCRIPT}\n---\n# Card\n\n{SCRIPT}\n")
    page = render_page(Reviewer(), [entry], {(SCRIPT, 1): card}, "/airloom", "Model sign-off")
    assert page.count("<script>") == 1  # the page's own decision script, inline
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 7
    assert "✘ &lt;script&gt;" in page and "<h1>Card</h1>" in page  # the card's markdown is rendered


def test_validation_report_names_the_failing_expectation(tmp_path):
    from airloom.data.load import iter_chunks
    from airloom.data.validate import validate_stream

    rows = [
        {"instruction": f"Write the word blue {i} times.", "input": "", "response": "blue " * (i % 3 + 1)}
        for i in range(20)
    ]
    for i in (4, 9, 14):
        rows[i] = {"instruction": "x", "input": "", "response": SCRIPT}  # too short, and markup
    source = tmp_path / "raw.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = validate_stream(lambda: iter_chunks(source), tmp_path / "out", source=str(source))

    page = (tmp_path / "out" / "validation.html").read_text(encoding="utf-8")
    assert not result.success and 'Data validation <span class="state failed">FAILED</span>' in page
    assert (
        '<tr><td class="fail">FAIL</td><td>expect_column_values_to_be_between</td>'
        "<td>instruction_chars</td><td>15.00% unexpected (3 rows)</td>"
    ) in page
    assert "line 5: instruction has 1 characters; at least 3 required (min_chars.instruction)" in page
    assert '<a href="data_docs/index.html">' in page  # GX's pages beside it, for those online
    assert STYLE.strip() in page and "<link" not in page and "<script" not in page


def test_validation_report_counts_every_finding_and_lists_the_first(tmp_path):
    """validation.json keeps one finding per line; the page lists the first few and counts them all."""
    findings = [
        {
            "file": "raw.jsonl",
            "line": i,
            "field": "response",
            "check": "pii" if i % 2 else "markup",
            "message": f"line {i}: {SCRIPT}",
            "severity": "warning" if i % 2 else "error",
        }
        for i in range(1, SHOWN_FINDINGS + 51)
    ]
    head = json.dumps(
        {
            "success": False,
            "source": SCRIPT,
            "rows_read": 300,
            "accepted": 150,
            "quarantined": 150,
            "reasons": [f"bad {SCRIPT}"],
            "findings": [],
            "expectations": [
                {
                    "type": "expect_column_mean_to_be_between",
                    "column": "has_pii",
                    "success": False,
                    "observed": "50.00% of rows (125 rows)",
                    "details": {"max_value": 0.01, "examples": [f"line 1: {SCRIPT}"]},
                }
            ],
            "data_docs": None,
        },
        indent=2,
    )
    before, after = head.split('"findings": []')
    body = ",\n    ".join(json.dumps(f) for f in findings)
    (tmp_path / "validation.json").write_text(before + '"findings": [\n    ' + body + "\n  ]" + after + "\n")

    page = write_validation_report(tmp_path / "validation.json").read_text(encoding="utf-8")
    _self_contained_and_escaped(page)
    assert f"{len(findings)} problems found in rows; the first {SHOWN_FINDINGS} are listed" in page
    assert '<tr><td>pii</td><td>warning</td><td class="num">125</td></tr>' in page
    assert page.count("<td>raw.jsonl</td>") == SHOWN_FINDINGS
    assert "Great Expectations Data Docs" not in page  # none were written


def test_canary_page_escapes_the_answers():
    page = render("canary.html.j2", model=SCRIPT, rows=[{"prompt": "p", "output": SCRIPT}], passed=True)
    _self_contained_and_escaped(page)


def test_evaluation_day_page_escapes_the_data_and_finds_the_trend_above_the_partition(tmp_path):
    from airloom.reports.evaluation_day import render_evaluation_day

    root = tmp_path / "evaluations"
    day = root / "m" / "ds=2026-01-02" / "v3"  # a version level below the day
    day.mkdir(parents=True)
    metrics = {
        "model_ref": SCRIPT,
        "n": 2,
        "aggregate": {"f1": 0.5},
        "by_task": {SCRIPT: {"n": 2, "f1": 0.5}},
    }
    (day / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "trend.png").write_bytes(b"\x89PNG")  # above the evaluations root: not this model's
    page = render_evaluation_day(day / "metrics.json", stop=root)
    _self_contained_and_escaped(page)
    assert "<h1>Evaluation of 2026-01-02</h1>" in page  # from the folder when metrics.json has no ds
    assert "No trend chart yet" in page
    (root / "m" / "trend.png").write_bytes(b"\x89PNG")
    (root / "m" / "trend.json").write_text(json.dumps({"rows": [{"ds": "2026-01-02", "model_ref": SCRIPT}]}))
    page = render_evaluation_day(day / "metrics.json", stop=root)
    assert 'src="data:image/png;base64,iVBORw=="' in page and '<tr class="day">' in page
    with pytest.raises(ValueError, match="trend.json: no 'aggregate' mapping"):
        render_evaluation_day(root / "m" / "trend.json", stop=root)
