"""Daily evaluation of the deployed model over dated partitions of historical records.

Input partitions: ``<history>/ds=YYYY-MM-DD/*.jsonl`` (``id``, ``prompt``, ``response``, optional
``task``). Output: ``<out_root>/<model>/ds=YYYY-MM-DD/metrics.json``; a rerun of one date
replaces that partition and nothing else, so backfills are idempotent and can run in parallel.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path


def partition_dir(root: str | Path, ds: str) -> Path:
    return Path(root) / f"ds={ds}"


def read_partition(history_root: str | Path, ds: str) -> list[dict] | None:
    """The records of one day, or None when the partition does not exist."""
    from airloom.data.splits import read_jsonl

    part = partition_dir(history_root, ds)
    files = sorted(part.glob("*.jsonl")) if part.is_dir() else []
    if not files:
        return None
    return [r for f in files for r in read_jsonl(f)]


def evaluate_partition(
    model_path: str,
    model_ref: str,
    records: list[dict],
    out_root: str | Path,
    model_name: str,
    ds: str,
    *,
    limit: int | None = None,
    max_new_tokens: int = 32,
) -> dict:
    """Evaluate and atomically replace ``<out_root>/<model_name>/ds=<ds>/``."""
    from airloom.evaluation.harness import evaluate_model

    final = partition_dir(Path(out_root) / model_name, ds)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        metrics = evaluate_model(model_path, records, tmp, limit=limit, max_new_tokens=max_new_tokens)
        metrics.update({"ds": ds, "model_ref": model_ref})
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def build_trend(model_root: str | Path, metrics: tuple[str, ...] = ("exact_match", "f1", "rougeL")) -> dict:
    """Collect every ``ds=*/metrics.json`` under ``model_root`` into ``trend.json`` and ``trend.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(model_root)
    rows = []
    for f in sorted(root.glob("ds=*/metrics.json")):
        m = json.loads(f.read_text())
        rows.append(
            {
                "ds": m.get("ds") or f.parent.name[3:],
                "model_ref": m.get("model_ref"),
                "n": m.get("n"),
                **{k: m["aggregate"].get(k) for k in metrics},
            }
        )
    trend = {"model_root": str(root), "dates": len(rows), "rows": rows}
    (root / "trend.json").write_text(json.dumps(trend, indent=2))
    if rows:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for k in metrics:
            ax.plot([r["ds"] for r in rows], [r[k] for r in rows], marker="o", label=k)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        ax.legend(loc="lower left")
        ax.grid(alpha=0.3)
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(root / "trend.png", dpi=90)
        plt.close(fig)
        trend["plot"] = str(root / "trend.png")
    return trend
