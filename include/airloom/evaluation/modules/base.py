"""What every Airloom ``evaluate`` module shares: input features, the MetricInfo boilerplate, per-example means.

Module scripts import this *module* (``from airloom.evaluation.modules import base``), not the
class: ``evaluate`` takes the first Metric subclass it finds in a script's namespace as the
metric, so the base class must not appear there by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import evaluate

from airloom.evaluation.metrics import reference_lists


def example_means(
    predictions: Sequence[str], references: Sequence, **scorers: Callable[[str, list[str]], float]
) -> dict[str, float]:
    """Each scorer's mean over the examples (each scored against its own references); 0.0 with none."""
    refs = reference_lists(references)
    n = len(predictions)
    return {
        name: sum(score(p, r) for p, r in zip(predictions, refs, strict=True)) / n if n else 0.0
        for name, score in scorers.items()
    }


def text_features() -> list:
    """Input formats the text metrics accept: several references per example, or exactly one."""
    import datasets

    return [
        datasets.Features(
            {
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }
        ),
        datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
    ]


class TextMetric(evaluate.Metric):
    """A text metric over predictions and one or several references per example.

    Subclasses set ``DESCRIPTION``, ``INPUTS`` (the kwargs description), ``CITATION`` and ``URL``
    and implement ``_compute``.
    """

    DESCRIPTION = ""
    INPUTS = ""
    CITATION = ""
    URL = ""

    def _info(self):
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation=self.CITATION,
            inputs_description=self.INPUTS,
            features=text_features(),
            reference_urls=[self.URL],
        )
