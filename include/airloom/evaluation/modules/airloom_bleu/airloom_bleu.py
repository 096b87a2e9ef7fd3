"""Corpus BLEU (sacrebleu, default settings), several references per example."""

from airloom.evaluation.metrics import corpus_bleu, reference_lists
from airloom.evaluation.modules import base

_DESCRIPTION = (
    "Corpus BLEU from sacrebleu with its default settings (13a tokenizer, exponential smoothing), "
    "on sacrebleu's 0-100 scale. Examples may have different numbers of references."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: one reference string, or a list of reference strings, per prediction.
Returns:
    bleu: corpus BLEU, 0-100.
"""
_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""


class AirloomBleu(base.TextMetric):
    DESCRIPTION = _DESCRIPTION
    INPUTS = _KWARGS_DESCRIPTION
    CITATION = _CITATION
    URL = "https://github.com/mjpost/sacrebleu"

    def _compute(self, predictions, references):
        return {"bleu": corpus_bleu(predictions, reference_lists(references))}
