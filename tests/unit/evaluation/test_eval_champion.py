"""Champion vs. challenger on real tiny models: a worse candidate fails the gates, a better one passes.

Three copies of the tiny Llama are trained for a second each to answer a 16-question set: the
production model learns 8 answers, the worse candidate 4 and the better candidate all 16. Each is
evaluated through the harness (generation, scoring, predictions.jsonl), then gated against
production with both a point gate and a paired-bootstrap gate.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from airloom.data.splits import read_jsonl
from airloom.evaluation.gates import check_gates, parse_gates, raise_on_failure
from airloom.evaluation.harness import evaluate_model
from airloom.evaluation.report import write_report
from airloom.exceptions import CheckFailed

WORDS = ["Paris", "Red", "fox", "dog", "sea", "weather", "seven", "models",
         "tasks", "lazy", "brown", "quick", "nine", "three", "France", "colour"]  # fmt: skip
RECORDS = [
    {
        "id": f"q{i}",
        "task": "qa",
        "prompt": f"### Instruction:\nWhat is item {i}?\n### Response:\n",
        "response": w,
    }
    for i, w in enumerate(WORDS)
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


GATES = "exact_match>=baseline-0.02, f1:ci_low>=baseline-0.1"


def _train(base_dir, out_dir, n_known: int, steps: int = 150):
    """Teach a copy of the base model the answers of the first ``n_known`` records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rows = []
    for rec in RECORDS[:n_known]:
        p = tok(rec["prompt"])["input_ids"]
        r = tok(rec["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p + r, [-100] * len(p) + r))
    width = max(len(ids) for ids, _ in rows)
    pad = tok.eos_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    shutil.copytree(
        base_dir, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json")
    )
    return out_dir


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("champion")
    out = {}
    for name, n_known in (("production", 8), ("worse", 4), ("better", 16)):
        model_dir = _train(tiny_model_dir, root / name / "model", n_known)
        metrics = evaluate_model(model_dir, RECORDS, root / name / "eval", max_new_tokens=6)
        out[name] = (metrics, read_jsonl(root / name / "eval" / "predictions.jsonl"), root / name / "eval")
    return out


def test_the_three_models_are_ordered_as_intended(evaluated):
    em = {name: m["aggregate"]["exact_match"] for name, (m, _, _) in evaluated.items()}
    assert em["worse"] < em["production"] < em["better"]
    assert em["better"] == 1.0
    # Per-example scores for paired comparisons come with every prediction.
    rows = evaluated["better"][1]
    assert {"id", "exact_match", "f1", "rouge1", "rougeL"} <= set(rows[0])


def test_worse_candidate_fails_the_gates_against_production(evaluated):
    prod, prod_rows, _ = evaluated["production"]
    cand, cand_rows, cand_dir = evaluated["worse"]
    results = check_gates(
        cand, parse_gates(GATES), prod, candidate_examples=cand_rows, baseline_examples=prod_rows
    )
    assert [r["passed"] for r in results] == [False, False]
    assert "exact_match dropped by" in results[0]["message"]
    assert results[1]["ci"]["vs_baseline"]["high"] <= 0 and results[1]["ci"]["vs_baseline"]["n"] == 16
    with pytest.raises(
        CheckFailed, match=r"2 of 2 quality gates failed:\n- gate exact_match>=baseline-0.02 failed"
    ):
        raise_on_failure(results)

    report = write_report(
        cand_dir / "report",
        cand,
        prod,
        results,
        cand_dir / "predictions.jsonl",
        baseline_predictions_path=evaluated["production"][2] / "predictions.jsonl",
    )
    comparison = json.loads((report.parent / "comparison.json").read_text())
    assert comparison["gates_passed"] is False
    assert comparison["metrics"]["exact_match"]["paired"]["delta"] < 0


def test_better_candidate_passes_the_gates_against_production(evaluated):
    prod, prod_rows, _ = evaluated["production"]
    cand, cand_rows, _ = evaluated["better"]
    results = check_gates(
        cand, parse_gates(GATES), prod, candidate_examples=cand_rows, baseline_examples=prod_rows
    )
    assert all(r["passed"] for r in results), [r["message"] for r in results]
    assert results[1]["ci"]["vs_baseline"]["low"] > 0  # confidently better, not just not worse
    raise_on_failure(results)
