"""Corpus chrF (sacrebleu, default settings), several references per example."""

from airloom.evaluation.metrics import corpus_chrf, reference_lists
from airloom.evaluation.modules import base

_DESCRIPTION = (
    "Corpus chrF from sacrebleu with its default settings (character 6-grams, beta 2), on sacrebleu's "
    "0-100 scale. Examples may have different numbers of references."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: one reference string, or a list of reference strings, per prediction.
Returns:
    chrf: corpus chrF, 0-100.
"""
_CITATION = """\
@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    pages = "392--395",
}
"""


class AirloomChrf(base.TextMetric):
    DESCRIPTION = _DESCRIPTION
    INPUTS = _KWARGS_DESCRIPTION
    CITATION = _CITATION
    URL = "https://github.com/mjpost/sacrebleu"

    def _compute(self, predictions, references):
        return {"chrf": corpus_chrf(predictions, reference_lists(references))}
