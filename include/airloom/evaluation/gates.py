"""Quality gates: the thresholds a candidate model must meet before it may be promoted.

A gate names a metric and sets an absolute floor (``min``), an absolute ceiling (``max``, for
lower-is-better metrics such as perplexity) and/or the most the metric may get worse than the
production baseline (``max_drop_vs_baseline``). "Worse" means lower, except for the metrics in
``LOWER_IS_BETTER``, where it means higher.

String form, comma-separated: ``"exact_match>=0.3, f1>=baseline-0.02, perplexity<=50"``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from airloom.exceptions import CheckFailed, UsageError

LOWER_IS_BETTER = frozenset({"perplexity", "seconds"})

_CLAUSE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][\w.]*)\s*(?P<op>>=|<=)\s*"
    r"(?:(?P<baseline>baseline)\s*(?:(?P<sign>[-+])\s*(?P<delta>\d+(?:\.\d*)?|\.\d+))?|(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)))\s*$"
)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


@dataclass(frozen=True)
class Gate:
    """One metric's thresholds; at least one of ``min``, ``max``, ``max_drop_vs_baseline`` is set."""

    metric: str
    min: float | None = None
    max_drop_vs_baseline: float | None = None
    max: float | None = None

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

    @property
    def lower_is_better(self) -> bool:
        return self.metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"{self.metric}>={_fmt(self.min)}")
        if self.max is not None:
            parts.append(f"{self.metric}<={_fmt(self.max)}")
        if self.max_drop_vs_baseline is not None:
            op, sign = ("<=", "+") if self.lower_is_better else (">=", "-")
            parts.append(f"{self.metric}{op}baseline{sign}{_fmt(self.max_drop_vs_baseline)}")
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


def check_gates(metrics: dict, gates: list[Gate], baseline: dict | None = None) -> list[dict]:
    """Evaluate every gate; never raises on a failed gate (see ``raise_on_failure``).

    Returns:
        One dict per gate: ``gate`` (its text form), ``metric``, ``value``, ``threshold`` (the
        binding bound, ``None`` if it could not be computed), ``passed`` and a human ``message``.
        A drop gate without a baseline (first release) or whose metric the baseline lacks is
        skipped and passes, saying so in the message.
    """
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
        if gate.min is not None:
            lower_bounds.append(gate.min)
            if value < gate.min:
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
        if notes:
            message += " (" + "; ".join(notes) + ")"
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
            f"cannot parse gate {clause.strip()!r}; write e.g. 'exact_match>=0.3', 'perplexity<=50' "
            "or 'f1>=baseline-0.02'"
        )
    metric, op = m["metric"], m["op"]
    if m["value"] is not None:
        value = float(m["value"])
        return Gate(metric, min=value) if op == ">=" else Gate(metric, max=value)
    delta = float(m["delta"]) if m["delta"] is not None else 0.0
    lower_better = metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER
    expected_op, expected_sign = ("<=", "+") if lower_better else (">=", "-")
    if op != expected_op or (m["sign"] is not None and m["sign"] != expected_sign and delta != 0):
        raise UsageError(
            f"cannot parse gate {clause.strip()!r}: a baseline gate on {metric} reads "
            f"'{metric}{expected_op}baseline{expected_sign}<allowed change>'"
        )
    return Gate(metric, max_drop_vs_baseline=delta)


def parse_gates(spec: list[dict] | str | None) -> list[Gate]:
    """Gates from a config list of dicts (keys: metric, min, max, max_drop_vs_baseline) or a string."""
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
