from __future__ import annotations

import base64
import json
import re

from airloom.evaluation.gates import check_gates, parse_gates
from airloom.evaluation.report import write_report

CANDIDATE = {
    "model": "models/candidate",
    "n": 12,
    "aggregate": {
        "exact_match": 0.4,
        "f1": 0.6,
        "rougeL": 0.5,
        "bleu": 22.0,
        "chrf": 40.0,
        "perplexity": 8.0,
    },
    "by_task": {
        "qa": {"exact_match": 0.5, "f1": 0.7, "n": 8},
        "math": {"exact_match": 0.25, "f1": 0.4, "n": 4},
    },
    "seconds": 3.2,
}
BASELINE = {
    "model": "models/prod",
    "n": 12,
    "aggregate": {
        "exact_match": 0.3,
        "f1": 0.65,
        "rougeL": 0.5,
        "bleu": 20.0,
        "chrf": 41.0,
        "perplexity": 9.0,
    },
    "by_task": {"qa": {"exact_match": 0.4, "f1": 0.75, "n": 8}},
}


def _predictions(path):
    rows = [
        {
            "id": f"e{i}",
            "task": "qa",
            "prompt": f"question {i}",
            "prediction": f"answer {i}",
            "reference": f"ref {i}",
            "exact_match": 0.0,
            "f1": (i % 15) / 15,
        }
        for i in range(15)
    ]
    rows[0]["prediction"] = "<script>alert(1)</script>"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_embeds_chart_and_tables(tmp_path):
    gates = check_gates(CANDIDATE, parse_gates("exact_match>=0.5,f1>=baseline-0.1"), BASELINE)
    path = write_report(tmp_path / "out", CANDIDATE, BASELINE, gates, _predictions(tmp_path / "p.jsonl"))

    assert path == tmp_path / "out" / "report.html"
    page = path.read_text()
    m = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert m and base64.b64decode(m.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<style>" in page and "<link" not in page  # self-contained
    assert "Quality gates: <span class='fail'>FAILED</span>" in page
    assert "exact_match 0.4 &lt; min 0.5 (short by 0.1)" in page
    assert "<td>math</td>" in page
    # Ten worst examples, lowest F1 first, escaped.
    assert len(re.findall(r"<td>e\d+</td>", page)) == 10
    assert page.index("<td>e0</td>") < page.index("<td>e1</td>")
    assert "<td>e10</td>" not in page
    assert "&lt;script&gt;" in page and "<script>" not in page

    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert comparison["baseline_model"] == "models/prod"
    assert comparison["gates_passed"] is False
    assert comparison["metrics"]["exact_match"]["delta"] == 0.4 - 0.3
    assert comparison["metrics"]["perplexity"]["improved"] is True  # lower is better
    assert comparison["metrics"]["chrf"]["improved"] is False
    assert comparison["metrics"]["rougeL"]["improved"] is None


def test_report_without_baseline_or_extras(tmp_path):
    path = write_report(tmp_path, {"model": "m", "n": 1, "aggregate": {"f1": 1.0}})
    page = path.read_text()
    assert "No baseline (first model)." in page and "data:image/png;base64," in page
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["metrics"]["f1"] == {
        "candidate": 1.0,
        "baseline": None,
        "delta": None,
        "improved": None,
    }
    assert comparison["gates_passed"] is None
