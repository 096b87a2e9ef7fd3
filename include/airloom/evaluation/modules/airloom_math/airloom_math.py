"""Final-answer accuracy for math word problems (gsm8k's ``#### answer`` convention)."""

from airloom.evaluation.metrics import math_exact_match
from airloom.evaluation.modules import base

_DESCRIPTION = (
    "The share of predictions whose last number equals the reference's final answer: the number "
    "after '####' (gsm8k), or the reference's last number if it has no '####'. Numbers are compared "
    "after dropping '$', thousands commas and trailing zeros ('$1,000.0' equals '1000')."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of worked answers.
    references: one reference solution, or a list of them, per prediction.
Returns:
    math_exact_match: 0-1.
"""
_CITATION = """\
@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems},
  author={Cobbe, Karl and Kosaraju, Vineet and Bavarian, Mohammad and others},
  journal={arXiv preprint arXiv:2110.14168},
  year={2021}
}
"""


class AirloomMath(base.TextMetric):
    DESCRIPTION = _DESCRIPTION
    INPUTS = _KWARGS_DESCRIPTION
    CITATION = _CITATION
    URL = "https://github.com/openai/grade-school-math"

    def _compute(self, predictions, references):
        return base.example_means(predictions, references, math_exact_match=math_exact_match)
