"""SQuAD-style exact match and token F1 (0-1) on plain strings, best reference per example."""

from airloom.evaluation.metrics import exact_match, token_f1
from airloom.evaluation.modules import base

_DESCRIPTION = (
    "Exact match and token-overlap F1 after SQuAD normalisation (lowercase, no punctuation or "
    "articles, single spaces), each example scored against its best reference. Unlike the hub's "
    "'squad' metric, inputs are plain strings and the scale is 0-1."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of answers.
    references: one accepted answer, or a list of accepted answers, per prediction.
Returns:
    exact_match, f1: means over examples, 0-1.
"""
_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of EMNLP 2016",
    year = "2016",
    pages = "2383--2392",
}
"""


class AirloomSquad(base.TextMetric):
    DESCRIPTION = _DESCRIPTION
    INPUTS = _KWARGS_DESCRIPTION
    CITATION = _CITATION
    URL = "https://rajpurkar.github.io/SQuAD-explorer/"

    def _compute(self, predictions, references):
        return base.example_means(predictions, references, exact_match=exact_match, f1=token_f1)
