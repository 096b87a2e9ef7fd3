from __future__ import annotations

import base64
import json
import re

import pytest

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


def test_report_shows_paired_intervals_and_bias_section(tmp_path):
    cand_rows = [{"id": f"e{i}", "exact_match": 1.0, "f1": 1.0, "rougeL": 1.0} for i in range(30)]
    base_rows = [{"id": f"e{i}", "exact_match": float(i < 10), "f1": 0.5, "rougeL": 1.0} for i in range(30)]
    (tmp_path / "cand.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cand_rows))
    (tmp_path / "base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(base_rows)))
    cand = {"model": "c", "n": 30, "aggregate": {"exact_match": 1.0, "f1": 1.0, "rougeL": 1.0, "bleu": 50.0}}
    base = {
        "model": "b",
        "n": 30,
        "aggregate": {"exact_match": 1 / 3, "f1": 0.5, "rougeL": 1.0, "bleu": 20.0},
    }
    bias = {
        "n_templates": 1,
        "n_prompts": 2,
        "n_pairs": 1,
        "overall": {"exact_equal_rate": 0.0, "mean_jaccard_distance": 0.75, "max_loglik_gap": 0.3},
        "by_dimension": {
            "gender_names": {
                "n_pairs": 1,
                "exact_equal_rate": 0.0,
                "mean_jaccard_distance": 0.75,
                "groups": {
                    "female": {"n": 1, "mean_loglik": -2.5, "mean_length": 4.0},
                    "male": {"n": 1, "mean_loglik": -2.2, "mean_length": 5.0},
                },
                "loglik_gap": 0.3,
                "length_gap": 1.0,
            }
        },
        "pairs": [
            {
                "template": "hire",
                "dimension": "gender_names",
                "groups": ["female", "male"],
                "prompts": ["Hire Emily?", "Hire James?"],
                "outputs": ["<b>yes</b>", "no way"],
                "jaccard_distance": 0.75,
                "equal": False,
            }
        ],
    }
    path = write_report(
        tmp_path / "out",
        cand,
        base,
        predictions_path=tmp_path / "cand.jsonl",
        baseline_predictions_path=tmp_path / "base.jsonl",
        bias=bias,
    )
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    em = comparison["metrics"]["exact_match"]["paired"]
    assert em["delta"] == pytest.approx(2 / 3) and em["n"] == 30 and 0 < em["low"] <= em["high"]
    assert em["p_value"] < 0.01
    assert comparison["metrics"]["f1"]["paired"] == {
        "delta": 0.5,
        "low": 0.5,
        "high": 0.5,
        "p_value": pytest.approx(1 / 1001),
        "n": 30,
    }
    assert comparison["metrics"]["rougeL"]["paired"]["p_value"] == 1.0  # no change at all
    assert "paired" not in comparison["metrics"]["bleu"]  # corpus-level: nothing to pair
    assert comparison["bootstrap"] == {"n_resamples": 1000, "seed": 0, "confidence": 0.95}
    assert comparison["bias"]["overall"]["max_loglik_gap"] == 0.3 and "pairs" not in comparison["bias"]

    page = path.read_text()
    assert "<th>95% CI of delta (paired bootstrap)</th><th>p</th><th>paired n</th>" in page
    assert f"<td class='num'>{em['low']:+.4f} .. {em['high']:+.4f}</td>" in page
    assert "<h2>Bias probes</h2>" in page and "<td>gender_names</td>" in page
    assert "female: -2.5000 (4.0000 words)" in page
    assert "&lt;b&gt;yes&lt;/b&gt;" in page and "<b>yes</b>" not in page


def test_report_pairs_per_example_rows_from_the_metrics_themselves(tmp_path):
    cand = {"model": "c", "aggregate": {"f1": 0.9}, "per_example": [{"id": i, "f1": 0.9} for i in range(5)]}
    base = {"model": "b", "aggregate": {"f1": 0.4}, "per_example": [{"id": i, "f1": 0.4} for i in range(5)]}
    write_report(tmp_path, cand, base)
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["metrics"]["f1"]["paired"]["delta"] == pytest.approx(0.5)


def test_ci_gate_rows_show_the_interval_bound(tmp_path):
    cand = {"model": "c", "aggregate": {"f1": 0.9}, "per_example": [{"id": i, "f1": 0.9} for i in range(5)]}
    base = {"model": "b", "aggregate": {"f1": 0.4}, "per_example": [{"id": i, "f1": 0.4} for i in range(5)]}
    gates = check_gates(cand, parse_gates("f1:ci_low>=baseline-0.02, f1:ci_low>=0.5"), base)
    page = write_report(tmp_path, cand, base, gates).read_text()
    assert "<td>f1:ci_low&gt;=baseline-0.02</td><td class='num'>0.9000<br>change CI low +0.5000</td>" in page
    assert "<td class='num'>0.9000<br>CI low 0.9000</td>" in page
