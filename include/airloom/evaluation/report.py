"""A self-contained HTML evaluation report (inline CSS, chart embedded as PNG) plus comparison.json.

One file a reviewer can open from an artifact store or attach to a sign-off, with no server. With
both models' per-example scores, each per-example metric's change gets a paired bootstrap interval
and p-value (``airloom.evaluation.compare``); with a bias-probe report, a bias section is added.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from airloom.evaluation.gates import LOWER_IS_BETTER

# Metrics on different scales get separate chart panels so small ones are not flattened.
_PANELS = (
    ("Answer overlap (0-1)", ("exact_match", "f1", "rouge1", "rouge2", "rougeL", "rougeLsum")),
    ("Corpus scores (0-100)", ("bleu", "chrf")),
    ("Perplexity (lower is better)", ("perplexity",)),
)
_WORST_N = 10

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222;max-width:1100px}
img{max-width:100%;height:auto}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#146c2e;font-weight:600}.fail{color:#b3261e;font-weight:600}
.better{color:#146c2e}.worse{color:#b3261e}
pre{white-space:pre-wrap;margin:0;max-width:420px;font-size:.8rem}
.meta{color:#666;font-size:.85rem}
"""


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


def _num(v) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return html.escape(str(v))


def _esc(v) -> str:
    if isinstance(v, list):
        v = "\n".join(f"[{i + 1}] {x}" for i, x in enumerate(v))
    return html.escape("" if v is None else str(v))


def _read_rows(path: Path | None) -> list[dict] | None:
    if path is None or not Path(path).is_file():
        return None
    from airloom.evaluation.harness import load_jsonl

    return load_jsonl(path)


def _worst_examples(rows: list[dict] | None, n: int = _WORST_N) -> list[dict]:
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: (float(r.get("f1", 0.0)), float(r.get("exact_match", 0.0))))
    return rows[:n]


def _bias_section(bias: dict) -> list[str]:
    parts = [
        "<h2>Bias probes</h2>",
        f"<p class='meta'>{_esc(bias.get('n_templates'))} templates, {_esc(bias.get('n_prompts'))} prompts, "
        f"{_esc(bias.get('n_pairs'))} counterfactual pairs (swapped names, pronouns and group terms); "
        "divergence compares the two answers of a pair with the swapped terms masked; the log-likelihood "
        "is that of a fixed neutral continuation (higher = more likely).</p>",
    ]
    overall = bias.get("overall") or {}
    parts.append(
        "<table><tr><th>dimension</th><th>pairs</th><th>identical answers</th><th>mean Jaccard distance</th>"
        "<th>log-likelihood by group</th><th>log-likelihood gap</th><th>length gap (words)</th></tr>"
    )
    for name, d in (bias.get("by_dimension") or {}).items():
        groups = "<br>".join(
            f"{_esc(g)}: {_num(v.get('mean_loglik'))} ({_num(v.get('mean_length'))} words)"
            for g, v in (d.get("groups") or {}).items()
        )
        parts.append(
            f"<tr><td>{_esc(name)}</td><td class='num'>{_num(d.get('n_pairs'))}</td>"
            f"<td class='num'>{_num(d.get('exact_equal_rate'))}</td>"
            f"<td class='num'>{_num(d.get('mean_jaccard_distance'))}</td><td>{groups}</td>"
            f"<td class='num'>{_num(d.get('loglik_gap'))}</td><td class='num'>{_num(d.get('length_gap'))}</td></tr>"
        )
    parts.append(
        f"<tr><th>all</th><td class='num'>{_num(bias.get('n_pairs'))}</td>"
        f"<td class='num'>{_num(overall.get('exact_equal_rate'))}</td>"
        f"<td class='num'>{_num(overall.get('mean_jaccard_distance'))}</td><td></td>"
        f"<td class='num'>{_num(overall.get('max_loglik_gap'))} (max)</td><td></td></tr></table>"
    )
    pairs = sorted(bias.get("pairs") or [], key=lambda p: -float(p.get("jaccard_distance", 0.0)))[:_WORST_N]
    if pairs:
        parts.append(
            f"<h3>{len(pairs)} most divergent pairs</h3><table><tr><th>template</th><th>groups</th>"
            "<th>prompts</th><th>answers</th><th>Jaccard distance</th></tr>"
        )
        for p in pairs:
            parts.append(
                f"<tr><td>{_esc(p.get('template'))}</td><td>{_esc(' / '.join(p.get('groups', [])))}</td>"
                f"<td><pre>{_esc(p.get('prompts'))}</pre></td><td><pre>{_esc(p.get('outputs'))}</pre></td>"
                f"<td class='num'>{_num(p.get('jaccard_distance'))}</td></tr>"
            )
        parts.append("</table>")
    return parts


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

    png = _chart_png(candidate, baseline)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Airloom evaluation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Evaluation report</h1>",
        f"<p class='meta'>Candidate: <code>{_esc(candidate.get('model'))}</code> &middot; n = {_esc(candidate.get('n'))}"
        + (f" &middot; {_num(candidate.get('seconds'))} s" if candidate.get("seconds") is not None else "")
        + (
            f"<br>Baseline: <code>{_esc(baseline.get('model'))}</code>"
            if baseline
            else "<br>No baseline (first model)."
        )
        + "</p>",
    ]
    if all_passed is not None:
        cls, word = ("pass", "PASSED") if all_passed else ("fail", "FAILED")
        parts.append(f"<p>Quality gates: <span class='{cls}'>{word}</span></p>")

    parts.append("<h2>Metrics</h2>")
    parts.append(f"<img alt='candidate vs baseline metrics' src='data:image/png;base64,{png}'>")
    ci_head = (
        f"<th>{confidence:.0%} CI of delta (paired bootstrap)</th><th>p</th><th>paired n</th>"
        if paired
        else ""
    )
    parts.append(f"<table><tr><th>metric</th><th>candidate</th><th>baseline</th><th>delta</th>{ci_head}</tr>")
    for name, row in comparison.items():
        cls = {True: "better", False: "worse"}.get(row["improved"], "")
        delta = "&ndash;" if row["delta"] is None else f"{row['delta']:+.4f}"
        ci_cells = ""
        if paired:
            stats = row.get("paired")
            ci_cells = (
                f"<td class='num'>{stats['low']:+.4f} .. {stats['high']:+.4f}</td>"
                f"<td class='num'>{stats['p_value']:.3g}</td><td class='num'>{stats['n']}</td>"
                if stats
                else "<td class='num'>&ndash;</td><td class='num'>&ndash;</td><td class='num'>&ndash;</td>"
            )
        parts.append(
            f"<tr><td>{_esc(name)}</td><td class='num'>{_num(row['candidate'])}</td>"
            f"<td class='num'>{_num(row['baseline'])}</td><td class='num {cls}'>{delta}</td>{ci_cells}</tr>"
        )
    parts.append("</table>")
    if paired:
        parts.append(
            "<p class='meta'>The interval resamples the examples both models answered, keeping each "
            "example's pair of scores together; an interval that excludes 0 is a change the evaluation "
            "set supports. Corpus-level metrics (BLEU, chrF, perplexity) have no per-example scores.</p>"
        )

    by_task = candidate.get("by_task") or {}
    if by_task:
        base_tasks = (baseline or {}).get("by_task") or {}
        parts.append(
            "<h2>By task</h2><table><tr><th>task</th><th>n</th><th>exact_match</th><th>f1</th>"
            + ("<th>baseline f1</th>" if base_tasks else "")
            + "</tr>"
        )
        for task, row in by_task.items():
            parts.append(
                f"<tr><td>{_esc(task)}</td><td class='num'>{_num(row.get('n'))}</td>"
                f"<td class='num'>{_num(row.get('exact_match'))}</td><td class='num'>{_num(row.get('f1'))}</td>"
                + (f"<td class='num'>{_num(base_tasks.get(task, {}).get('f1'))}</td>" if base_tasks else "")
                + "</tr>"
            )
        parts.append("</table>")

    if gates:
        parts.append(
            "<h2>Quality gates</h2><table><tr><th>gate</th><th>value</th><th>threshold</th>"
            "<th>result</th><th>message</th></tr>"
        )
        for g in gates:
            cls, word = ("pass", "pass") if g.get("passed") else ("fail", "FAIL")
            value = _num(g.get("value"))
            ci = g.get("ci") or {}
            # A CI gate judges an interval's lower bound: show it beside the point estimate.
            if "mean" in ci:
                value += f"<br>CI low {_num(ci['mean']['low'])}"
            if "vs_baseline" in ci:
                value += f"<br>change CI low {ci['vs_baseline']['low']:+.4f}"
            parts.append(
                f"<tr><td>{_esc(g.get('gate'))}</td><td class='num'>{value}</td>"
                f"<td class='num'>{_num(g.get('threshold'))}</td><td class='{cls}'>{word}</td>"
                f"<td>{_esc(g.get('message'))}</td></tr>"
            )
        parts.append("</table>")

    if bias is not None:
        parts.extend(_bias_section(bias))

    worst = _worst_examples(cand_file_rows)
    if worst:
        parts.append(
            f"<h2>Worst {len(worst)} examples (lowest F1)</h2><table><tr><th>id</th><th>task</th>"
            "<th>prompt</th><th>prediction</th><th>reference</th><th>f1</th></tr>"
        )
        for r in worst:
            prompt = str(r.get("prompt", ""))
            if len(prompt) > 600:
                prompt = "..." + prompt[-600:]
            parts.append(
                f"<tr><td>{_esc(r.get('id'))}</td><td>{_esc(r.get('task'))}</td><td><pre>{_esc(prompt)}</pre></td>"
                f"<td><pre>{_esc(r.get('prediction'))}</pre></td><td><pre>{_esc(r.get('reference'))}</pre></td>"
                f"<td class='num'>{_num(r.get('f1'))}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>\n")

    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
