"""What the served model's traffic and feedback say: satisfaction, ratings, latency, tokens, failing
outputs, a dashboard with daily trends, and corrected answers as a new raw dataset.

Inputs are the partitions ``airloom serve`` writes (see :mod:`airloom.serving.logs`; read from a folder
or the artifact store by :mod:`airloom.data.partitions`): traffic lines
with ``response``, ``latency_ms``, ``prompt_tokens``, ``completion_tokens``, ``pii_masked`` (per
field); feedback lines with ``rating`` (+1/-1/0), ``rating_raw`` ("up"/"down" or 1-5),
``corrected_answer`` and the logged ``prompt``.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from airloom.reports import render

if TYPE_CHECKING:
    from airloom.data.partitions import DailyPartitions


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (pos - lo), 2)


def output_failures(record: dict) -> list[str]:
    """Checks a served answer fails: ``empty`` (blank) and ``pii`` (the scrubber masked personal data in it)."""
    failed = []
    if not str(record.get("response") or "").strip():
        failed.append("empty")
    if (record.get("pii_masked") or {}).get("response"):
        failed.append("pii")
    return failed


def serving_summary(traffic: list[dict], feedback: list[dict]) -> dict:
    """One day's figures. ``satisfaction_rate`` = positive / (positive + negative) ratings."""
    served = [r for r in traffic if "response" in r]  # prompt-only history rows have no answer to check
    failures = Counter(f for r in served for f in output_failures(r))
    failing = sum(1 for r in served if output_failures(r))
    signs = Counter(r.get("rating") for r in feedback)
    raw = Counter(str(r.get("rating_raw", r.get("rating"))) for r in feedback)
    rated = signs[1] + signs[-1]
    latency = [float(r["latency_ms"]) for r in traffic if isinstance(r.get("latency_ms"), int | float)]
    ptok = [float(r["prompt_tokens"]) for r in traffic if isinstance(r.get("prompt_tokens"), int)]
    ctok = [float(r["completion_tokens"]) for r in traffic if isinstance(r.get("completion_tokens"), int)]
    return {
        "requests": len({r.get("response_id", r.get("id")) for r in traffic}),
        "outputs": len(traffic),
        "models": dict(Counter(r.get("model") or "unknown" for r in traffic)),
        "feedback": len(feedback),
        "satisfaction_rate": round(signs[1] / rated, 4) if rated else None,
        "rating_distribution": dict(sorted(raw.items())),
        "corrected_answers": sum(1 for r in feedback if (r.get("corrected_answer") or "").strip()),
        "latency_ms": {"p50": _pct(latency, 0.5), "p95": _pct(latency, 0.95), "p99": _pct(latency, 0.99)},
        "prompt_tokens": {"p50": _pct(ptok, 0.5), "p95": _pct(ptok, 0.95)},
        "completion_tokens": {"p50": _pct(ctok, 0.5), "p95": _pct(ctok, 0.95)},
        "failing_outputs": failing,
        "failing_output_rate": round(failing / len(served), 4) if served else None,
        "failures": dict(failures),
    }


def decide_serving(summary: dict, *, max_failing_rate: float = 0.2) -> list[str]:
    """Reasons to retrain from served outputs (empty = fine).

    Satisfaction is not decided here: it is 1 - the negative-feedback rate that
    :func:`airloom.monitoring.drift.decide_retraining` already thresholds.
    """
    fail = summary.get("failing_output_rate")
    if fail is not None and fail > max_failing_rate:
        return [f"failing outputs {fail:.2f} > {max_failing_rate} ({summary['failures']})"]
    return []


def corrected_dataset(feedback: list[dict]) -> tuple[list[dict], dict]:
    """Corrected answers as raw instruction rows for ``llm_data_quality``, validated and deduplicated.

    Alpaca prompts are parsed back into instruction/input; other prompts (a chat template) keep the
    whole prompt as the instruction. Rows with PII left after scrubbing, or blank parts, are dropped.
    """
    from airloom.data.text import dedup_key, find_pii
    from airloom.prompts import split_alpaca

    rows, seen, dropped = [], set(), Counter()
    for fb in feedback:
        answer = (fb.get("corrected_answer") or "").strip()
        if not answer:
            continue
        instruction, inp = split_alpaca(fb.get("prompt") or "")
        if not instruction.strip():
            dropped["no_prompt"] += 1
            continue
        if find_pii(instruction) or find_pii(inp) or find_pii(answer):
            dropped["pii"] += 1
            continue
        key = dedup_key(instruction, inp, answer)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        rows.append(
            {
                "id": fb.get("id"),
                "instruction": instruction,
                "input": inp,
                "response": answer,
                "source": "feedback",
                "response_id": fb.get("response_id"),
                "model": fb.get("model"),
            }
        )
    return rows, dict(dropped)


def _plot(days: list[str], series: dict[str, list], ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    for label, values in series.items():
        ax.plot(days, [float("nan") if v is None else v for v in values], marker="o", label=label)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _input_drift_view(drift: dict, out_dir: Path) -> dict:
    """The input-drift section: PSI per field and language mix, vocabulary shift, link to the traffic's EDA."""
    from airloom.data.divergence import psi_verdict

    def row(label: str, value: float | None, note: str = "") -> tuple:
        return label, value, None if value is None else psi_verdict(value), note

    means = drift.get("mean_chars") or {}
    rows = [
        row(
            f"{f} length (chars)",
            v,
            "mean {reference} → {current}".format(
                **{
                    k: "?" if x is None else round(x, 1)
                    for k, x in (means.get(f) or {"reference": None, "current": None}).items()
                }
            ),
        )
        for f, v in (drift.get("length_psi") or {}).items()
        if f != "total"
    ]
    lang = drift.get("language") or {}
    rows.append(
        row("script mix", lang.get("psi_scripts"), json.dumps((lang.get("scripts") or {}).get("current")))
    )
    rows.append(
        row(
            "language mix",
            lang.get("psi_languages"),
            json.dumps((lang.get("languages") or {}).get("current")),
        )
    )
    vocab = drift.get("vocabulary") or {}
    report = Path(drift["report"]) if drift.get("report") else None
    href = None
    if report is not None and report.is_file():
        try:
            href = report.relative_to(Path(out_dir)).as_posix()
        except ValueError:
            href = report.as_uri()
    return {
        "reference_rows": drift.get("reference_rows"),
        "current_rows": drift.get("current_rows"),
        "rows": rows,
        "vocabulary": vocab,
        "new_words": [w for w, _ in (vocab.get("new_top_words") or [])[:10]],
        "report_href": href,
    }


def write_dashboard(
    out_dir: Path,
    traffic_root: str | Path | DailyPartitions,
    feedback_root: str | Path | DailyPartitions,
    ds: str,
    days: int = 14,
    extra: dict | None = None,
    input_drift: dict | None = None,
) -> dict:
    """``dashboard.html`` (self-contained: plots inlined) and ``serving.json`` for the ``days`` up to ``ds``.

    ``input_drift`` (:func:`airloom.monitoring.drift.input_drift`) adds the day's length, vocabulary and
    language shift against the training data's EDA profile. The roots are folders, ``s3://`` prefixes or
    :class:`~airloom.data.partitions.DailyPartitions` (the artifact store's, as the operator opens them).
    """
    from airloom.data.partitions import as_partitions

    traffic_days, feedback_days = as_partitions(traffic_root), as_partitions(feedback_root)
    end = date.fromisoformat(ds)
    trend = []
    for k in range(days - 1, -1, -1):
        day = (end - timedelta(days=k)).isoformat()
        traffic = traffic_days.read(day)
        if traffic is None:
            continue
        trend.append({"ds": day, **serving_summary(traffic, feedback_days.read(day) or [])})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    today = next((t for t in trend if t["ds"] == ds), None)
    xs = [t["ds"] for t in trend]
    plots = {}
    if trend:
        plots["Satisfaction and failing outputs"] = _plot(
            xs,
            {
                "satisfaction": [t["satisfaction_rate"] for t in trend],
                "failing outputs": [t["failing_output_rate"] for t in trend],
            },
            "share",
        )
        plots["Latency (ms)"] = _plot(
            xs, {q: [t["latency_ms"][q] for t in trend] for q in ("p50", "p95")}, "ms"
        )
        plots["Tokens"] = _plot(
            xs,
            {
                "prompt p50": [t["prompt_tokens"]["p50"] for t in trend],
                "completion p50": [t["completion_tokens"]["p50"] for t in trend],
            },
            "tokens",
        )
    page = render(
        "dashboard.html.j2",
        ds=ds,
        trend=trend,
        plots=plots,
        drift=_input_drift_view(input_drift, out_dir) if input_drift else None,
        detail=json.dumps({"today": today, **(extra or {})}, indent=2, default=str),
    )
    (out_dir / "dashboard.html").write_text(page, encoding="utf-8")
    result = {"ds": ds, "today": today, "trend": trend, "dashboard": str(out_dir / "dashboard.html")}
    (out_dir / "serving.json").write_text(json.dumps(result, indent=2, default=str))
    return result
