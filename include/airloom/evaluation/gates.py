"""Quality gates: the thresholds a candidate model must meet before it may be promoted.

A gate names a metric and sets an absolute floor (``min``), an absolute ceiling (``max``, for
lower-is-better metrics such as perplexity) and/or the most the metric may get worse than the
production baseline (``max_drop_vs_baseline``). "Worse" means lower, except for the metrics in
``LOWER_IS_BETTER``, where it means higher.

String form, comma-separated: ``"exact_match>=0.3, f1>=baseline-0.02, perplexity<=50"``.

Confidence-interval gates (``use_ci_low=True``; string form ``<metric>:ci_low``) judge the lower
bound of a bootstrap interval instead of the point estimate, so a gate passes only when the
evaluation set is large enough to be confident, not on a lucky sample:

- ``f1:ci_low>=baseline-0.02`` -- the lower bound of the paired bootstrap interval of
  (candidate - baseline), over the examples both models answered, must be >= -0.02: "confidently
  not worse than production by more than 0.02". ``f1:ci_low>=baseline`` asks for "not worse" at
  the interval's confidence.
- ``exact_match:ci_low>=0.3`` -- the lower bound of the bootstrap interval of the candidate's own
  mean must be >= 0.3.

They need per-example scores with ids (``predictions.jsonl`` rows, or ``per_example`` in the
metrics) and apply to per-example, higher-is-better metrics (exact_match, f1, rouge*,
math_exact_match); dict form: ``{"metric": "f1", "max_drop_vs_baseline": 0.02, "use_ci_low": true}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from airloom.exceptions import CheckFailed, UsageError

LOWER_IS_BETTER = frozenset({"perplexity", "seconds"})

_CLAUSE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][\w.]*)(?P<ci>\s*:\s*ci_low)?\s*(?P<op>>=|<=)\s*"
    r"(?:(?P<baseline>baseline)\s*(?:(?P<sign>[-+])\s*(?P<delta>\d+(?:\.\d*)?|\.\d+))?|(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)))\s*$"
)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


@dataclass(frozen=True)
class Gate:
    """One metric's thresholds; at least one of ``min``, ``max``, ``max_drop_vs_baseline`` is set.

    ``use_ci_low`` makes ``min`` and ``max_drop_vs_baseline`` judge bootstrap lower bounds (see the
    module docstring); ``max`` is unaffected.
    """

    metric: str
    min: float | None = None
    max_drop_vs_baseline: float | None = None
    max: float | None = None
    use_ci_low: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise UsageError(f"gate metric must be a non-empty string, got {self.metric!r}")
        if self.min is None and self.max is None and self.max_drop_vs_baseline is None:
            raise UsageError(
                f"gate on {self.metric!r} sets no threshold; give min, max or max_drop_vs_baseline"
            )
        for name in ("min", "max", "max_drop_vs_baseline"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise UsageError(f"gate on {self.metric!r}: {name} must be a number, got {value!r}")
        if self.max_drop_vs_baseline is not None and self.max_drop_vs_baseline < 0:
            raise UsageError(
                f"gate on {self.metric!r}: max_drop_vs_baseline must be >= 0, got {self.max_drop_vs_baseline}"
            )
        if not isinstance(self.use_ci_low, bool):
            raise UsageError(
                f"gate on {self.metric!r}: use_ci_low must be true or false, got {self.use_ci_low!r}"
            )
        if self.use_ci_low:
            if self.lower_is_better:
                raise UsageError(
                    f"gate on {self.metric!r}: use_ci_low applies to per-example, higher-is-better metrics "
                    "(exact_match, f1, rouge*, math_exact_match)"
                )
            if self.min is None and self.max_drop_vs_baseline is None:
                raise UsageError(
                    f"gate on {self.metric!r}: use_ci_low needs min or max_drop_vs_baseline to apply to"
                )

    @property
    def lower_is_better(self) -> bool:
        return self.metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER

    def describe(self) -> str:
        ci = f"{self.metric}:ci_low" if self.use_ci_low else self.metric
        parts = []
        if self.min is not None:
            parts.append(f"{ci}>={_fmt(self.min)}")
        if self.max is not None:
            parts.append(f"{self.metric}<={_fmt(self.max)}")
        if self.max_drop_vs_baseline is not None:
            op, sign = ("<=", "+") if self.lower_is_better else (">=", "-")
            parts.append(f"{ci}{op}baseline{sign}{_fmt(self.max_drop_vs_baseline)}")
        return ", ".join(parts)


def lookup_metric(metrics: dict, name: str) -> float | None:
    """A metric by name: ``aggregate`` first, then a dotted path (``by_task.qa.f1``), then top level."""
    candidates = []
    if isinstance(metrics.get("aggregate"), dict):
        candidates.append(metrics["aggregate"].get(name))
    node = metrics
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    candidates.append(node)
    for value in candidates:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _available(metrics: dict) -> list[str]:
    agg = metrics.get("aggregate")
    source = agg if isinstance(agg, dict) else metrics
    return sorted(k for k, v in source.items() if isinstance(v, int | float) and not isinstance(v, bool))


def _example_rows(explicit: Iterable[Mapping] | None, metrics: dict | None) -> list[Mapping] | None:
    if explicit is not None:
        return list(explicit)
    rows = (metrics or {}).get("per_example")
    return rows if isinstance(rows, list) else None


def _ci_text(ci: dict, confidence: float) -> str:
    return f"{confidence:.0%} CI {ci['low']:+.4g}..{ci['high']:+.4g}, n={ci['n']}"


def check_gates(
    metrics: dict,
    gates: list[Gate],
    baseline: dict | None = None,
    *,
    candidate_examples: Iterable[Mapping] | None = None,
    baseline_examples: Iterable[Mapping] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[dict]:
    """Evaluate every gate; never raises on a failed gate (see ``raise_on_failure``).

    Args:
        metrics: the candidate's ``metrics.json`` content.
        baseline: the production model's, or ``None`` (first release).
        candidate_examples: per-example rows with ``id`` (the rows of ``predictions.jsonl``) for
            ``use_ci_low`` gates; default: ``metrics["per_example"]`` if present.
        baseline_examples: the baseline's rows; default: ``baseline["per_example"]`` if present.
        n_resamples, seed, confidence: the bootstrap settings of ``use_ci_low`` gates.

    Returns:
        One dict per gate: ``gate`` (its text form), ``metric``, ``value``, ``threshold`` (the
        binding bound, ``None`` if it could not be computed), ``passed`` and a human ``message``;
        ``use_ci_low`` gates add ``ci`` (``{"mean": ...}`` and/or ``{"vs_baseline": ...}`` with the
        bootstrap results). A drop gate without a baseline (first release) or whose metric the
        baseline lacks is skipped and passes, saying so in the message.
    """
    from airloom.evaluation.compare import bootstrap_mean, paired_bootstrap, scores_by_id

    cand_rows = _example_rows(candidate_examples, metrics)
    base_rows = _example_rows(baseline_examples, baseline)
    results = []
    for gate in gates:
        value = lookup_metric(metrics, gate.metric)
        result = {"gate": gate.describe(), "metric": gate.metric, "value": value, "threshold": None}
        if value is None or math.isnan(value):
            what = (
                "is NaN"
                if value is not None
                else f"is missing from the metrics (available: {', '.join(_available(metrics)) or 'none'})"
            )
            results.append({**result, "value": None, "passed": False, "message": f"{gate.metric} {what}"})
            continue

        failures: list[str] = []
        notes: list[str] = []
        lower_bounds: list[float] = []
        upper_bounds: list[float] = []
        ci: dict = {}
        cand_scores: dict | None = None
        if gate.use_ci_low:
            cand_scores = scores_by_id(cand_rows, gate.metric, "candidate") if cand_rows is not None else {}
            if not cand_scores:
                failures.append(
                    f"{gate.metric}:ci_low needs the candidate's per-example {gate.metric} scores with ids "
                    "(pass candidate_examples=<rows of predictions.jsonl>)"
                )
        if gate.min is not None:
            lower_bounds.append(gate.min)
            if gate.use_ci_low:
                if cand_scores:
                    ci["mean"] = bootstrap_mean(cand_scores, n_resamples, seed, confidence)
                    low = ci["mean"]["low"]
                    if low < gate.min:
                        failures.append(
                            f"{gate.metric} CI lower bound {_fmt(low)} < min {_fmt(gate.min)} "
                            f"(short by {_fmt(gate.min - low)}; mean {_fmt(value)}, "
                            f"{_ci_text(ci['mean'], confidence)})"
                        )
            elif value < gate.min:
                failures.append(
                    f"{gate.metric} {_fmt(value)} < min {_fmt(gate.min)} (short by {_fmt(gate.min - value)})"
                )
        if gate.max is not None:
            upper_bounds.append(gate.max)
            if value > gate.max:
                failures.append(
                    f"{gate.metric} {_fmt(value)} > max {_fmt(gate.max)} (over by {_fmt(value - gate.max)})"
                )
        if gate.max_drop_vs_baseline is not None:
            base = lookup_metric(baseline, gate.metric) if baseline else None
            if base is None:
                notes.append(
                    "drop check skipped: no baseline" + (f" value for {gate.metric}" if baseline else "")
                )
            elif gate.use_ci_low:
                lower_bounds.append(base - gate.max_drop_vs_baseline)
                base_scores = (
                    scores_by_id(base_rows, gate.metric, "baseline") if base_rows is not None else {}
                )
                if not base_scores:
                    failures.append(
                        f"{gate.metric}:ci_low needs the baseline's per-example {gate.metric} scores with ids "
                        "(pass baseline_examples=<rows of its predictions.jsonl>)"
                    )
                elif cand_scores:
                    if not (cand_scores.keys() & base_scores.keys()):
                        failures.append(
                            f"{gate.metric}: candidate and baseline share no example ids; score both on the "
                            "same evaluation set"
                        )
                    else:
                        paired = paired_bootstrap(cand_scores, base_scores, n_resamples, seed, confidence)
                        ci["vs_baseline"] = paired
                        allowed = -gate.max_drop_vs_baseline
                        if paired["low"] < allowed:
                            failures.append(
                                f"{gate.metric} change vs baseline has CI lower bound {paired['low']:+.4g}, "
                                f"below the allowed {_fmt(allowed)} (short by {_fmt(allowed - paired['low'])}; "
                                f"change {paired['delta']:+.4g}, {_ci_text(paired, confidence)}, "
                                f"p={paired['p_value']:.3g})"
                            )
            else:
                worse_by = (value - base) if gate.lower_is_better else (base - value)
                if gate.lower_is_better:
                    upper_bounds.append(base + gate.max_drop_vs_baseline)
                else:
                    lower_bounds.append(base - gate.max_drop_vs_baseline)
                if worse_by > gate.max_drop_vs_baseline:
                    word = "rose" if gate.lower_is_better else "dropped"
                    failures.append(
                        f"{gate.metric} {word} by {_fmt(worse_by)} vs baseline ({_fmt(base)} -> {_fmt(value)}), "
                        f"more than the allowed {_fmt(gate.max_drop_vs_baseline)} "
                        f"(over by {_fmt(worse_by - gate.max_drop_vs_baseline)})"
                    )
        if lower_bounds:
            result["threshold"] = max(lower_bounds)
        elif upper_bounds:
            result["threshold"] = min(upper_bounds)
        if failures:
            message = f"gate {gate.describe()} failed: " + "; ".join(failures)
        else:
            message = f"{gate.metric} {_fmt(value)} passes {gate.describe()}"
            if "vs_baseline" in ci:
                message += (
                    f" (change {ci['vs_baseline']['delta']:+.4g}, {_ci_text(ci['vs_baseline'], confidence)})"
                )
            elif "mean" in ci:
                message += f" ({_ci_text(ci['mean'], confidence)})"
        if notes:
            message += " (" + "; ".join(notes) + ")"
        if gate.use_ci_low:
            result["ci"] = ci
        results.append({**result, "passed": not failures, "message": message})
    return results


def raise_on_failure(results: list[dict]) -> None:
    """Raise ``CheckFailed`` listing every failed gate, so a pipeline stops before promotion."""
    failed = [r["message"] for r in results if not r["passed"]]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(results)} quality gates failed:\n- " + "\n- ".join(failed))


def _parse_clause(clause: str) -> Gate:
    m = _CLAUSE.match(clause)
    if not m:
        raise UsageError(
            f"cannot parse gate {clause.strip()!r}; write e.g. 'exact_match>=0.3', 'perplexity<=50', "
            "'f1>=baseline-0.02' or 'f1:ci_low>=baseline-0.02'"
        )
    metric, op, use_ci = m["metric"], m["op"], m["ci"] is not None
    if use_ci and op != ">=":
        raise UsageError(
            f"cannot parse gate {clause.strip()!r}: a CI gate reads '{metric}:ci_low>=<value>' or "
            f"'{metric}:ci_low>=baseline-<allowed drop>'"
        )
    if m["value"] is not None:
        value = float(m["value"])
        return Gate(metric, min=value, use_ci_low=use_ci) if op == ">=" else Gate(metric, max=value)
    delta = float(m["delta"]) if m["delta"] is not None else 0.0
    lower_better = metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER
    expected_op, expected_sign = ("<=", "+") if lower_better else (">=", "-")
    if op != expected_op or (m["sign"] is not None and m["sign"] != expected_sign and delta != 0):
        raise UsageError(
            f"cannot parse gate {clause.strip()!r}: a baseline gate on {metric} reads "
            f"'{metric}{expected_op}baseline{expected_sign}<allowed change>'"
        )
    return Gate(metric, max_drop_vs_baseline=delta, use_ci_low=use_ci)


def parse_gates(spec: list[dict] | str | None) -> list[Gate]:
    """Gates from a config list of dicts (keys: metric, min, max, max_drop_vs_baseline, use_ci_low) or a string."""
    if spec is None:
        return []
    if isinstance(spec, str):
        clauses = [c for c in re.split(r"[,;\n]", spec) if c.strip()]
        return [_parse_clause(c) for c in clauses]
    if not isinstance(spec, list | tuple):
        raise UsageError(
            f"gates must be a list of dicts or a string like 'f1>=0.5', got {type(spec).__name__}"
        )
    allowed = {f.name for f in fields(Gate)}
    gates = []
    for i, item in enumerate(spec):
        if isinstance(item, Gate):
            gates.append(item)
            continue
        if isinstance(item, str):
            gates.extend(parse_gates(item))
            continue
        if not isinstance(item, dict):
            raise UsageError(f"gate {i}: expected a dict with 'metric' and a threshold, got {item!r}")
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise UsageError(f"gate {i}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if "metric" not in item:
            raise UsageError(f"gate {i}: missing 'metric'")
        gates.append(Gate(**item))
    return gates
