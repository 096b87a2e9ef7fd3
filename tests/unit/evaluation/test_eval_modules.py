"""The project's metrics as `evaluate` modules: loaded from the package, never from the hub."""

from __future__ import annotations

import os
import socket
import tempfile

# evaluate reads these when it is imported: offline, and its module cache in a throwaway folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="airloom-test-hf-modules-"))

import evaluate  # noqa: E402
import pytest  # noqa: E402
import sacrebleu  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402

from airloom.evaluation.metrics import (  # noqa: E402
    MODULES_DIR,
    bleu_chrf,
    exact_match,
    load_metric,
    math_exact_match,
    rouge_scores,
    token_f1,
    transpose_refs,
)

PREDS = ["The cat sat on the mat.", "Paris is the capital. It is big.", "she sold 72 clips"]
REFS = [
    ["A cat was sitting on the mat.", "The cat sat on a mat."],
    ["The capital of France is Paris. It is a large city."],
    ["48 + 24 = 72\n#### 72", "seventy-two"],
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: the modules must load from the project alone."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _load(name: str):
    return evaluate.load(str(MODULES_DIR / name), keep_in_memory=True)


def test_modules_give_our_numbers_and_the_libraries_numbers():
    rouge = _load("airloom_rouge").compute(predictions=PREDS, references=REFS)
    assert rouge == pytest.approx(rouge_scores(PREDS, REFS))
    # rouge-score directly: best reference by rougeL F, one sentence per line for rougeLsum.
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    best = [
        max((scorer.score(r, p) for r in refs), key=lambda s: s["rougeL"].fmeasure)
        for p, refs in zip(PREDS, REFS, strict=True)
    ]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert rouge[k] == pytest.approx(sum(s[k].fmeasure for s in best) / 3), k

    streams = transpose_refs(REFS)
    bleu = _load("airloom_bleu").compute(predictions=PREDS, references=REFS)
    chrf = _load("airloom_chrf").compute(predictions=PREDS, references=REFS)
    assert bleu["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score)
    assert chrf["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, streams).score)
    assert {**bleu, **chrf} == pytest.approx(bleu_chrf(PREDS, REFS))

    squad = _load("airloom_squad").compute(predictions=PREDS, references=REFS)
    assert squad == pytest.approx(
        {
            "exact_match": sum(exact_match(p, r) for p, r in zip(PREDS, REFS, strict=True)) / 3,
            "f1": sum(token_f1(p, r) for p, r in zip(PREDS, REFS, strict=True)) / 3,
        }
    )
    assert squad["exact_match"] == pytest.approx(1 / 3)

    math = _load("airloom_math").compute(
        predictions=["so 72.0", "1,000 dollars"], references=["#### 72", "#### 999"]
    )
    assert math == {"math_exact_match": 0.5}
    assert math_exact_match("so 72.0", ["#### 72"]) == 1.0


def test_single_string_references_and_per_example_rouge():
    rouge = _load("airloom_rouge")
    single = rouge.compute(predictions=["the cat sat", "a dog"], references=["the cat sat", "dog"])
    assert single == pytest.approx(rouge_scores(["the cat sat", "a dog"], [["the cat sat"], ["dog"]]))
    rows = rouge.compute(
        predictions=["the cat sat", "a dog"], references=[["the cat sat"], ["dog"]], use_aggregator=False
    )
    assert rows["rouge1"] == pytest.approx([1.0, 2 / 3])


def test_load_metric_names_paths_and_hub_fallback():
    rouge = load_metric("rouge", keep_in_memory=True)
    assert rouge.name == "airloom_rouge"
    assert load_metric("gsm8k", keep_in_memory=True).name == "airloom_math"
    # A module script path works as well as its folder.
    by_file = evaluate.load(str(MODULES_DIR / "airloom_bleu" / "airloom_bleu.py"), keep_in_memory=True)
    assert by_file.compute(predictions=PREDS, references=REFS)["bleu"] == pytest.approx(
        bleu_chrf(PREDS, REFS)["bleu"]
    )
    # A name the project does not ship goes to the hub, which offline cannot answer.
    with pytest.raises(FileNotFoundError, match="accuracy"):
        load_metric("accuracy")


def test_combine_merges_every_module():
    combined = evaluate.combine(
        [load_metric(n, keep_in_memory=True) for n in ("rouge", "bleu", "chrf", "airloom_squad", "math")]
    )
    got = combined.compute(predictions=PREDS, references=REFS)
    assert set(got) == {
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "bleu",
        "chrf",
        "exact_match",
        "f1",
        "math_exact_match",
    }
    assert got["rougeLsum"] == pytest.approx(rouge_scores(PREDS, REFS)["rougeLsum"])
    assert got["bleu"] == pytest.approx(bleu_chrf(PREDS, REFS)["bleu"])
    assert got["math_exact_match"] == pytest.approx(1 / 3)  # only the third prediction ends in 72
