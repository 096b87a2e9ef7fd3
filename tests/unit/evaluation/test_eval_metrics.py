from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from airloom.evaluation.metrics import (
    bleu_chrf,
    exact_match,
    is_gsm8k_reference,
    last_number,
    math_exact_match,
    normalize_answer,
    normalize_number,
    reference_answer,
    rouge_scores,
    score_predictions,
    sentence_lines,
    token_f1,
    transpose_refs,
)
from airloom.exceptions import UsageError

PREDS = [
    "The cat sat on the mat.",
    "Paris is the capital of France. It is big.",
    "forty two",
    "a completely unrelated answer",
]
REFS = [
    ["A cat was sitting on the mat.", "The cat sat on a mat."],
    ["The capital of France is Paris. It is a large city."],
    ["42", "forty-two", "forty two"],
    ["the weather is fine today"],
]


def test_normalize_answer_follows_squad():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("  Theatre  ") == "theatre"  # 'the' inside a word is kept


@pytest.mark.parametrize(
    ("pred", "refs", "em", "f1"),
    [
        ("Denver Broncos", ["Denver Broncos", "Broncos"], 1.0, 1.0),
        ("the Broncos of Denver", ["Denver Broncos"], 0.0, 0.8),  # P=2/3, R=1
        ("the cat sat on the mat", ["a cat sat"], 0.0, 2 / 3),  # P=2/4, R=2/2
        ("Paris", ["London", "paris."], 1.0, 1.0),
        ("Santa Clara", ["Levi's Stadium"], 0.0, 0.0),
        ("", [""], 1.0, 1.0),
        ("", ["something"], 0.0, 0.0),
    ],
)
def test_exact_match_and_f1_on_hand_checked_examples(pred, refs, em, f1):
    assert exact_match(pred, refs) == em
    assert token_f1(pred, refs) == pytest.approx(f1)


def test_f1_takes_the_best_reference():
    assert token_f1("cat sat", ["dog", "cat sat down"]) == pytest.approx(0.8)


def test_sentence_lines_puts_one_sentence_per_line():
    assert sentence_lines(" One. Two?  Three!\nFour ") == "One.\nTwo?\nThree!\nFour"


def test_rouge_equals_rouge_score_called_directly_with_best_reference():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    newline = {
        PREDS[1]: "Paris is the capital of France.\nIt is big.",
        REFS[1][0]: "The capital of France is Paris.\nIt is a large city.",
    }
    expected = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for pred, refs in zip(PREDS, REFS, strict=True):
        scores = [scorer.score(newline.get(r, r), newline.get(pred, pred)) for r in refs]
        best = max(scores, key=lambda s: s["rougeL"].fmeasure)
        for k in expected:
            expected[k] += best[k].fmeasure / len(PREDS)

    got = rouge_scores(PREDS, REFS)
    assert got == pytest.approx(expected)
    # The multi-sentence example is what makes rougeLsum differ from rougeL.
    assert got["rougeLsum"] != pytest.approx(got["rougeL"])


def test_bleu_and_chrf_equal_sacrebleu_with_variable_reference_counts():
    streams = [
        [REFS[0][0], REFS[1][0], REFS[2][0], REFS[3][0]],
        [REFS[0][1], None, REFS[2][1], None],
        [None, None, REFS[2][2], None],
    ]
    assert transpose_refs(REFS) == streams
    got = bleu_chrf(PREDS, REFS)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, streams).score)
    # More accepted answers can only help.
    first_only = bleu_chrf(PREDS, [[r[0]] for r in REFS])
    assert first_only["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [streams[0]]).score)
    assert got["bleu"] >= first_only["bleu"]


def test_score_predictions_keeps_per_example_scores():
    result = score_predictions(PREDS, REFS)
    assert set(result["aggregate"]) == {
        "exact_match",
        "f1",
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "bleu",
        "chrf",
    }
    assert len(result["per_example"]) == len(PREDS)
    # Articles do not count: "The cat sat on the mat." matches "The cat sat on a mat."
    assert [row["exact_match"] for row in result["per_example"]] == [1.0, 0.0, 1.0, 0.0]
    assert result["aggregate"]["exact_match"] == 0.5
    assert result["aggregate"]["f1"] == pytest.approx(
        sum(token_f1(p, r) for p, r in zip(PREDS, REFS, strict=True)) / 4
    )
    assert result["aggregate"]["rougeL"] == pytest.approx(rouge_scores(PREDS, REFS)["rougeL"])
    assert result["per_example"][3]["rouge1"] == 0.0


def test_bad_inputs_are_usage_errors():
    with pytest.raises(UsageError, match="2 predictions but 1 reference lists"):
        score_predictions(["a", "b"], [["a"]])
    with pytest.raises(UsageError, match="references of example 1 must be a non-empty list"):
        score_predictions(["a", "b"], [["a"], []])
    with pytest.raises(UsageError, match="references of example 0"):
        bleu_chrf(["a"], ["a"])
    with pytest.raises(UsageError, match="evaluation set is empty"):
        score_predictions([], [])


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is $1,234.00.", "1234"),
        ("so 10-5", "5"),  # the last number, not "10-5" read as one
        ("72.0", "72"),
        ("1,2,3", "3"),  # a list, not thousands separators
        ("x is -3.50", "-3.5"),
        ("total 100", "100"),
        ("no digits here", None),
    ],
)
def test_last_number_normalises_commas_dollars_and_trailing_zeros(text, number):
    assert last_number(text) == number


def test_reference_answer_reads_gsm8k_final_line():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert is_gsm8k_reference(ref) and reference_answer(ref) == "72"
    assert reference_answer("it costs\n#### $1,000") == "1000"
    assert not is_gsm8k_reference("Paris") and reference_answer("about 3 or 4 apples") == "4"
    assert normalize_number("1E+2") == "100" and normalize_number("-0.0") == "0"
    assert math_exact_match("She sold 72.0 clips in total.", [ref]) == 1.0
    assert math_exact_match("72 clips, or 73", [ref]) == 0.0  # the last number counts
    assert math_exact_match("no idea", [ref]) == 0.0


def test_score_predictions_adds_math_exact_match_on_gsm8k_references():
    preds = ["48 + 24 = 72", "Paris", "The total is $1,000.", "forty"]
    refs = [["...\n#### 72"], ["Paris"], ["...\n#### 1,000"], ["...\n#### 40"]]
    result = score_predictions(preds, refs)
    rows = result["per_example"]
    assert [row.get("math_exact_match") for row in rows] == [1.0, None, 1.0, 0.0]
    assert result["aggregate"]["math_exact_match"] == pytest.approx(2 / 3)  # over math examples only
    assert result["aggregate"]["exact_match"] == 0.25  # SQuAD EM is unchanged
    # task="math" also applies to references without '####'; a list gives each example's task.
    explicit = score_predictions(["it is 12", "Paris"], [["12 eggs"], ["Paris"]], task=["math", "qa"])
    assert [row.get("math_exact_match") for row in explicit["per_example"]] == [1.0, None]
    assert "math_exact_match" not in score_predictions(PREDS, REFS)["aggregate"]
    with pytest.raises(
        UsageError, match="example 0 is a math example but none of its references holds a number"
    ):
        score_predictions(["12"], [["twelve"]], task="math")
    with pytest.raises(UsageError, match="got 1 task names for 2 examples"):
        score_predictions(["a", "b"], [["a"], ["b"]], task=["math"])
