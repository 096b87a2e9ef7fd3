"""Sweep operators: plan the trials a mapped training task expands over, then keep only the best."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.operators._base import number, push_outputs
from airloom.exceptions import UsageError


class PlanTrialsOperator(BaseOperator):
    """Return one training config per trial (``DeepSpeedTrainOperator.partial(...).expand(config=...)``).

    :param base_config: training options every trial starts from (templated).
    :param space: the search space (see :mod:`airloom.training.sweep`); a dict, JSON, or empty for one trial.
    :param trials: draws for a random space.
    """

    template_fields: Sequence[str] = ("base_config", "space", "trials", "seed")
    template_fields_renderers = {"base_config": "json", "space": "json"}

    def __init__(
        self,
        *,
        base_config: dict[str, Any],
        space: dict[str, Any] | None = None,
        trials: int = 4,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.base_config = base_config
        self.space = space
        self.trials = trials
        self.seed = seed

    def execute(self, context) -> list[dict[str, Any]]:
        from airloom.training.sweep import plan_trials

        try:
            planned = plan_trials(
                self.space,
                dict(self.base_config),
                trials=number(self.trials, "trials"),
                seed=number(self.seed, "seed"),
            )
        except UsageError as e:  # a bad space fails the same way on every retry
            raise AirflowFailException(str(e)) from e
        for trial in planned:
            self.log.info(
                "trial %s: %s", trial["extra"]["trial"], trial["extra"]["trial_values"] or "base options"
            )
        return planned


class SelectBestTrialOperator(BaseOperator):
    """Pick the best trial by ``metric`` and pass on only its training outputs (same keys as the training task).

    :param trials: the mapped training task's outputs.
    :param evaluations: the mapped evaluation task's outputs, in the same order (map index).
    :param metric: an evaluation aggregate (e.g. ``exact_match``) or a training metric
        (``validation_loss``); names ending in loss/perplexity are minimised, others maximised.
    """

    template_fields: Sequence[str] = ("trials", "evaluations", "metric")

    def __init__(self, *, trials: Any, evaluations: Any, metric: str = "exact_match", **kwargs) -> None:
        super().__init__(**kwargs)
        self.trials = trials
        self.evaluations = evaluations
        self.metric = metric

    def execute(self, context) -> dict[str, Any]:
        from airloom.training.sweep import select_best

        trials, evaluations = list(self.trials), list(self.evaluations)
        try:
            best, table = select_best(self.metric, trials, evaluations)
        except UsageError as e:
            raise AirflowFailException(str(e)) from e
        for row in table:
            self.log.info(
                "%s trial %s %s: %s=%s",
                "BEST" if row["index"] == best else "    ",
                row["trial"],
                row["values"] or "(base options)",
                self.metric,
                row["score"],
            )
        return push_outputs(context, {**trials[best], "sweep": {"metric": self.metric, "trials": table}})
