"""A self-contained HTML evaluation report (``templates/eval.html.j2`` of :mod:`airloom.reports`, chart
embedded as PNG) plus comparison.json.

One file a reviewer can open from an artifact store or attach to a sign-off, with no server. With
both models' per-example scores, each per-example metric's change gets a paired bootstrap interval
and p-value (``airloom.evaluation.compare``); with a bias-probe report, a bias section is added.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from airloom.evaluation.gates import LOWER_IS_BETTER
from airloom.reports import render

# Metrics on different scales get separate chart panels so small ones are not flattened.
_PANELS = (
    ("Answer overlap (0-1)", ("exact_match", "f1", "rouge1", "rouge2", "rougeL", "rougeLsum")),
    ("Corpus scores (0-100)", ("bleu", "chrf")),
    ("Perplexity (lower is better)", ("perplexity",)),
)
_WORST_N = 10


def _aggregate(metrics: dict | None) -> dict[str, float]:
    if not metrics:
        return {}
    agg = metrics.get("aggregate", metrics)
    return {k: float(v) for k, v in agg.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def compare(candidate: dict, baseline: dict | None) -> dict:
    """Per-metric candidate/baseline/delta; ``improved`` accounts for lower-is-better metrics."""
    cand, base = _aggregate(candidate), _aggregate(baseline)
    out = {}
    for name, value in cand.items():
        b = base.get(name)
        delta = None if b is None else value - b
        improved = None
        if delta is not None and delta != 0:
            improved = (delta < 0) if name in LOWER_IS_BETTER else (delta > 0)
        out[name] = {"candidate": value, "baseline": b, "delta": delta, "improved": improved}
    return out


def _chart_png(candidate: dict, baseline: dict | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cand, base = _aggregate(candidate), _aggregate(baseline)
    panels = [(title, [m for m in names if m in cand]) for title, names in _PANELS]
    panels = [(t, ms) for t, ms in panels if ms] or [("Metrics", sorted(cand))]
    widths = [max(len(ms), 1.5) for _, ms in panels]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(min(2 + sum(widths) * 1.1, 14), 3.6),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    for ax, (title, names) in zip(axes[0], panels, strict=True):
        xs = range(len(names))
        w = 0.38 if base else 0.6
        ax.bar(
            [x - (w / 2 if base else 0) for x in xs],
            [cand[m] for m in names],
            w,
            label="candidate",
            color="#3b6fb6",
        )
        if base:
            ax.bar(
                [x + w / 2 for x in xs],
                [base.get(m, 0.0) for m in names],
                w,
                label="baseline",
                color="#b0b0b0",
            )
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _read_rows(path: Path | None) -> list[dict] | None:
    if path is None or not Path(path).is_file():
        return None
    from airloom.data.splits import read_jsonl

    return read_jsonl(path)


def _worst_examples(rows: list[dict] | None, n: int = _WORST_N) -> list[dict]:
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: (float(r.get("f1", 0.0)), float(r.get("exact_match", 0.0))))
    return rows[:n]


def write_report(
    out_dir: Path,
    candidate: dict,
    baseline: dict | None = None,
    gates: list[dict] | None = None,
    predictions_path: Path | None = None,
    *,
    baseline_predictions_path: Path | None = None,
    bias: dict | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Path:
    """Write ``report.html`` and ``comparison.json`` into ``out_dir``.

    Args:
        candidate: the candidate's ``metrics.json`` content.
        baseline: the production model's ``metrics.json`` content, if there is one.
        gates: results of ``check_gates``.
        predictions_path: the candidate's ``predictions.jsonl``; its 10 lowest-F1 rows are shown.
        baseline_predictions_path: the baseline's ``predictions.jsonl``. With both files (or
            ``per_example`` rows with ids in both metrics), every per-example metric's change gets a
            paired bootstrap interval (``n_resamples``, ``seed``, ``confidence``), stored under
            ``metrics.<name>.paired`` in ``comparison.json`` and shown in the table.
        bias: a ``run_bias_probes`` report; adds a bias section and ``bias`` (without the pair
            rows) to ``comparison.json``.

    Returns:
        Path of ``report.html``.
    """
    from airloom.evaluation.compare import paired_comparison

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = compare(candidate, baseline)
    cand_file_rows = _read_rows(predictions_path)
    cand_rows = cand_file_rows
    if cand_rows is None and isinstance(candidate.get("per_example"), list):
        cand_rows = candidate["per_example"]
    base_rows = _read_rows(baseline_predictions_path)
    if base_rows is None and baseline and isinstance(baseline.get("per_example"), list):
        base_rows = baseline["per_example"]
    paired = {}
    if baseline is not None and cand_rows and base_rows:
        paired = paired_comparison(
            cand_rows, base_rows, n_resamples=n_resamples, seed=seed, confidence=confidence
        )
        for name, stats in paired.items():
            if name in comparison:
                comparison[name]["paired"] = stats
    gates = gates or []
    all_passed = all(g.get("passed") for g in gates) if gates else None
    summary = {
        "candidate_model": candidate.get("model"),
        "baseline_model": baseline.get("model") if baseline else None,
        "metrics": comparison,
        "gates_passed": all_passed,
    }
    if paired:
        summary["bootstrap"] = {"n_resamples": n_resamples, "seed": seed, "confidence": confidence}
    if bias is not None:
        summary["bias"] = {k: v for k, v in bias.items() if k != "pairs"}
    (out_dir / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    pairs = sorted((bias or {}).get("pairs") or [], key=lambda p: -float(p.get("jaccard_distance", 0.0)))
    page = render(
        "eval.html.j2",
        candidate=candidate,
        baseline=baseline,
        all_passed=all_passed,
        chart=_chart_png(candidate, baseline),
        comparison=comparison,
        paired=bool(paired),
        confidence=confidence,
        gates=gates,
        bias=bias,
        divergent=pairs[:_WORST_N],
        worst=_worst_examples(cand_file_rows),
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
