"""Feedback and drift: is today's traffic still like the training data, and do users like the answers?

Drift is the population stability index (PSI) of prompt length and of the task mix between the
training split and one day of traffic; by the usual rule of thumb PSI < 0.1 is stable and
> 0.25 a real shift. Feedback is the share of thumbs-down ratings.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

LENGTH_BINS = (0, 40, 60, 80, 100, 130, 170, 250, 10**9)


def psi(expected: dict[str, float], actual: dict[str, float], eps: float = 1e-4) -> float:
    """Population stability index between two distributions given as {bucket: count}."""
    keys = set(expected) | set(actual)
    e_total = sum(expected.values()) or 1
    a_total = sum(actual.values()) or 1
    total = 0.0
    for k in keys:
        e = max(expected.get(k, 0) / e_total, eps)
        a = max(actual.get(k, 0) / a_total, eps)
        total += (a - e) * math.log(a / e)
    return total


def length_histogram(prompts: list[str]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for p in prompts:
        n = len(p)
        for lo, hi in zip(LENGTH_BINS, LENGTH_BINS[1:], strict=False):
            if lo <= n < hi:
                counts[f"{lo}-{hi}"] += 1
                break
    return dict(counts)


def drift_report(reference: list[dict], current: list[dict]) -> dict:
    """PSI of prompt length and task mix; records need ``prompt`` and may have ``task``."""
    ref_len = length_histogram([r["prompt"] for r in reference])
    cur_len = length_histogram([r["prompt"] for r in current])
    ref_task = Counter(r.get("task") or "unknown" for r in reference)
    cur_task = Counter(r.get("task") or "unknown" for r in current)
    return {
        "reference_rows": len(reference), "current_rows": len(current),
        "psi_prompt_length": round(psi(ref_len, cur_len), 4),
        "psi_task_mix": round(psi(dict(ref_task), dict(cur_task)), 4),
        "prompt_length": {"reference": ref_len, "current": cur_len},
        "task_mix": {"reference": dict(ref_task), "current": dict(cur_task)},
    }


def feedback_summary(records: list[dict]) -> dict:
    """Ratings are ``1`` (thumbs up) or ``-1`` (thumbs down); anything else is counted as invalid."""
    up = sum(1 for r in records if r.get("rating") == 1)
    down = sum(1 for r in records if r.get("rating") == -1)
    rated = up + down
    return {"feedback_rows": len(records), "thumbs_up": up, "thumbs_down": down,
            "invalid": len(records) - rated, "negative_rate": round(down / rated, 4) if rated else None}


def decide_retraining(report: dict, *, max_psi: float = 0.25, max_negative_rate: float = 0.3) -> list[str]:
    """Reasons to retrain (empty = keep the model)."""
    reasons = []
    for key in ("psi_prompt_length", "psi_task_mix"):
        if report.get(key) is not None and report[key] > max_psi:
            reasons.append(f"{key} {report[key]:.3f} > {max_psi}")
    neg = report.get("negative_rate")
    if neg is not None and neg > max_negative_rate:
        reasons.append(f"negative feedback rate {neg:.2f} > {max_negative_rate}")
    return reasons


def write_report(out_dir: Path, report: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "monitoring.json"
    path.write_text(json.dumps(report, indent=2))
    return path
