"""Sweep operators: plan the trials a mapped training task expands over, then keep only the best."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.operators._base import number, push_outputs
from airloom.exceptions import UsageError


class PlanTrialsOperator(BaseOperator):
    """Return one training config per trial (``DeepSpeedTrainOperator.partial(...).expand(config=...)``);
    multi-node trials get a master port each.

    :param preset: a shipped preset name (``tiny_llama/0.5m_full_1proc``) or the path of a training YAML;
        None: ``base_config`` alone.
    :param base_config: training options every trial starts from, on top of the preset's (None values
        keep the preset's; templated).
    :param space: the search space (see :mod:`airloom.training.sweep`); a dict, JSON, or empty for one trial.
    :param trials: draws for a random space.
    """

    template_fields: Sequence[str] = ("preset", "base_config", "space", "trials", "seed")
    template_fields_renderers = {"base_config": "json", "space": "json"}

    def __init__(
        self,
        *,
        base_config: dict[str, Any],
        preset: str | None = None,
        space: dict[str, Any] | None = None,
        trials: int = 4,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.base_config = base_config
        self.preset = preset
        self.space = space
        self.trials = trials
        self.seed = seed

    def execute(self, context) -> list[dict[str, Any]]:
        from airloom.training.presets import load_preset
        from airloom.training.sweep import plan_trials, spread_master_ports

        try:
            base = dict(self.base_config)
            if self.preset:
                base = load_preset(self.preset, base)
                self.log.info(
                    "preset %s with %s",
                    self.preset,
                    {k: v for k, v in self.base_config.items() if v is not None},
                )
            planned = plan_trials(
                self.space,
                base,
                trials=number(self.trials, "trials"),
                seed=number(self.seed, "seed"),
            )
        except UsageError as e:  # a bad preset, override or space fails the same way on every retry
            raise AirflowFailException(str(e)) from e
        planned = spread_master_ports(planned)
        for trial in planned:
            self.log.info(
                "trial %s: %s", trial["extra"]["trial"], trial["extra"]["trial_values"] or "base options"
            )
        return planned


class PlanOtherNodesOperator(BaseOperator):
    """Multi-node: return the launches of nodes 1..n-1 of every trial (``{"config", "node_rank"}``, for
    ``DeepSpeedTrainOperator.partial(...).expand_kwargs(...)`` beside the trials' node-0 tasks); an empty
    list, so that task is skipped, for one node.

    :param trials: the planned trials (``PlanTrialsOperator``'s output).
    """

    template_fields: Sequence[str] = ("trials",)

    def __init__(self, *, trials: Any, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trials = trials

    def execute(self, context) -> list[dict[str, Any]]:
        from airloom.training.sweep import other_node_launches

        launches = other_node_launches(list(self.trials))
        for launch in launches:
            config = launch["config"]
            self.log.info(
                "trial %s node %s of %s at %s:%s",
                config["extra"]["trial"],
                launch["node_rank"],
                config["nnodes"],
                config["master_addr"],
                config["master_port"],
            )
        return launches


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
