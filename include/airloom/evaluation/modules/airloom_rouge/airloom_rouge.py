"""ROUGE-1/2/L/Lsum F-measures (rouge-score, Porter stemmer), best reference per example."""

from airloom.evaluation.metrics import ROUGE_TYPES, reference_lists, rouge_per_example, rouge_scores
from airloom.evaluation.modules import base

_DESCRIPTION = (
    "ROUGE F-measures from Google's rouge-score with the Porter stemmer on (as ROUGE-1.5.5 -m). "
    "With several references per example, the one with the best rougeL F counts for all four scores. "
    "rougeLsum splits sentences on . ! ? (no nltk download)."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: one reference string, or a list of reference strings, per prediction.
    use_aggregator: True (default) for the mean over examples, False for per-example lists.
Returns:
    rouge1, rouge2, rougeL, rougeLsum: F-measures in 0-1.
Examples:
    >>> rouge = evaluate.load("include/airloom/evaluation/modules/airloom_rouge")
    >>> rouge.compute(predictions=["the cat sat"], references=[["the cat sat", "a cat"]])["rouge1"]
    1.0
"""
_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    pages = "74--81",
}
"""


class AirloomRouge(base.TextMetric):
    DESCRIPTION = _DESCRIPTION
    INPUTS = _KWARGS_DESCRIPTION
    CITATION = _CITATION
    URL = "https://github.com/google-research/google-research/tree/master/rouge"

    def _compute(self, predictions, references, use_aggregator=True):
        refs = reference_lists(references)
        if use_aggregator:
            return rouge_scores(predictions, refs)
        rows = rouge_per_example(predictions, refs)
        return {k: [row[k] for row in rows] for k in ROUGE_TYPES}
