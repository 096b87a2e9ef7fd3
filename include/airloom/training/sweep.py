"""Hyperparameter sweeps: plan trials from a search space, pick the best by a metric.

A space maps training options to either a list (grid: every combination) or a distribution for
random search: ``{"log_uniform": [lo, hi]}``, ``{"uniform": [lo, hi]}``, ``{"choice": [a, b]}``,
``{"int_uniform": [lo, hi]}``. An empty space is one trial with the base options. Each trial is a
full training config (base options overridden by the trial's values), so the DAG maps one
training task per trial and the trials queue for the ``gpu`` pool like any training run.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any

from airloom.exceptions import UsageError
from airloom.training.config import TrainConfig

DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice")
LOWER_IS_BETTER = ("loss", "perplexity")
MAX_TRIALS = 64


def parse_space(space: Any) -> dict[str, Any]:
    """A space from a dict or JSON object text; None or empty = no sweep."""
    if not space:
        return {}
    if isinstance(space, str):
        try:
            space = json.loads(space)
        except json.JSONDecodeError as e:
            raise UsageError(f"sweep space is not a JSON object: {e} in {space!r}") from None
    if not isinstance(space, dict):
        raise UsageError(f"sweep space must map option names to values, got {type(space).__name__}")
    known = set(TrainConfig.__dataclass_fields__)
    for name, spec in space.items():
        if name not in known:
            raise UsageError(f"sweep space: unknown training option {name!r}")
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise UsageError(
                    f"sweep space: {name} must be a list or one of {DISTRIBUTIONS}, got {spec!r}"
                )
            kind, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
                raise UsageError(
                    f"sweep space: {name}: {kind} needs " + ("a list" if kind == "choice" else "[low, high]")
                )
            if kind == "log_uniform" and min(args) <= 0:
                raise UsageError(f"sweep space: {name}: log_uniform bounds must be > 0")
        elif not isinstance(spec, list) or not spec:
            raise UsageError(f"sweep space: {name} must be a non-empty list of values or a distribution")
    return space


def _draw(spec: dict, rng: random.Random) -> Any:
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return rng.choice(args)
    lo, hi = args
    if kind == "log_uniform":
        return float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")
    if kind == "int_uniform":
        return rng.randint(int(lo), int(hi))
    return float(f"{rng.uniform(lo, hi):.3g}")


def plan_trials(space: Any, base: dict[str, Any], *, trials: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Training configs, one per trial: the grid if every entry is a list, else ``trials`` random draws."""
    space = parse_space(space)
    if not space:
        combos: list[dict[str, Any]] = [{}]
    elif all(isinstance(v, list) for v in space.values()):
        names = list(space)
        combos = [dict(zip(names, values, strict=True)) for values in itertools.product(*space.values())]
    else:
        rng = random.Random(seed)
        combos = [
            {k: (rng.choice(v) if isinstance(v, list) else _draw(v, rng)) for k, v in space.items()}
            for _ in range(int(trials))
        ]
    if len(combos) > MAX_TRIALS:
        raise UsageError(f"sweep has {len(combos)} trials; at most {MAX_TRIALS}")
    planned = []
    for i, values in enumerate(combos):
        config = {**base, **values}
        TrainConfig.from_dict(
            {k: v for k, v in config.items() if v is not None}
        )  # refuse bad trials before any training
        planned.append(
            {**config, "extra": {**dict(base.get("extra") or {}), "trial": i, "trial_values": values}}
        )
    return planned


def spread_master_ports(planned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Multi-node trials get their own master port each (the given one + the trial number), so trials
    running at once do not meet at one rendezvous."""
    from airloom.training.config import DEFAULT_MASTER_PORT

    out = []
    for config in planned:
        if int(config.get("nnodes") or 1) > 1:
            port = int(config.get("master_port") or DEFAULT_MASTER_PORT) + int(config["extra"]["trial"])
            config = {**config, "master_port": port}
        out.append(config)
    return out


def other_node_launches(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{"config": ..., "node_rank": r}`` for nodes 1..n-1 of every multi-node trial: the launches of the
    task mapped beside each trial's node-0 task (none for one node)."""
    return [
        {"config": config, "node_rank": rank}
        for config in trials
        for rank in range(1, int(config.get("nnodes") or 1))
    ]


def trial_score(metric: str, train_result: dict[str, Any], evaluation: dict[str, Any] | None) -> float | None:
    """The trial's value of ``metric``: from its evaluation's aggregate, else from its training metrics."""
    aggregate = (evaluation or {}).get("aggregate") or {}
    value = aggregate.get(metric, (train_result.get("metrics") or {}).get(metric))
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def select_best(
    metric: str, train_results: list[dict], evaluations: list[dict | None]
) -> tuple[int, list[dict]]:
    """Index of the best trial and a table of every trial (values, score), best first."""
    if len(train_results) != len(evaluations):
        raise ValueError(f"{len(train_results)} trials but {len(evaluations)} evaluations")
    lower = any(metric.endswith(s) for s in LOWER_IS_BETTER)
    rows = []
    for i, (result, evaluation) in enumerate(zip(train_results, evaluations, strict=True)):
        extra = (result.get("config") or {}).get("extra") or {}
        rows.append(
            {
                "trial": extra.get("trial", i),
                "index": i,
                "values": extra.get("trial_values", {}),
                "score": trial_score(metric, result, evaluation),
                "model_dir": result.get("model_dir"),
            }
        )
    scored = [r for r in rows if r["score"] is not None]
    if not scored:
        raise UsageError(f"no trial reports the metric {metric!r}")
    scored.sort(key=lambda r: r["score"] if lower else -r["score"])
    return scored[0]["index"], scored + [r for r in rows if r["score"] is None]
