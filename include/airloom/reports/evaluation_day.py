"""One day of the daily evaluation backfill as a page: that day's ``metrics.json`` and the model's trend.

The plugin renders it on request (``/airloom/evaluation-day/<metrics.json>``) rather than a task writing
it, because the chart that matters is the latest one: ``trend`` runs after each day's evaluation, so a
page written by the evaluation would never show its own day on the chart.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from airloom.reports import render


def find_trend(metrics_path: Path, stop: Path) -> Path | None:
    """The nearest folder above ``metrics_path`` (up to ``stop``) holding ``trend.json`` or ``trend.png``.

    ``build_trend`` writes them in the model's folder, above every ``ds=<date>/`` partition, whatever
    levels the partitions have below it.
    """
    for folder in Path(metrics_path).parents:
        if not folder.is_relative_to(stop):
            return None
        if (folder / "trend.json").is_file() or (folder / "trend.png").is_file():
            return folder
    return None


def render_evaluation_day(metrics_path: Path, stop: Path) -> str:
    """The page for ``metrics_path`` (a partition's ``metrics.json``); trend files are looked up to ``stop``.

    :raises ValueError: naming the file when it is not a partition's metrics (no ``aggregate`` mapping).
    """
    metrics_path = Path(metrics_path)
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{metrics_path}: not readable as JSON ({e})") from e
    if not isinstance(metrics, dict) or not isinstance(metrics.get("aggregate"), dict):
        raise ValueError(f"{metrics_path}: no 'aggregate' mapping: not a day's metrics.json")
    ds = metrics.get("ds") or next((p.name[3:] for p in metrics_path.parents if p.name.startswith("ds=")), "")
    folder = find_trend(metrics_path, stop)
    chart = rows = None
    if folder is not None:
        if (folder / "trend.png").is_file():
            chart = base64.b64encode((folder / "trend.png").read_bytes()).decode("ascii")
        if (folder / "trend.json").is_file():
            rows = json.loads((folder / "trend.json").read_text()).get("rows")
    columns: list[str] = []
    for row in rows or []:
        columns += [k for k in row if k not in columns]
    return render(
        "evaluation_day.html.j2",
        ds=ds,
        metrics=metrics,
        by_task=metrics.get("by_task") or {},
        chart=chart,
        rows=rows or [],
        columns=columns,
        is_day=lambda row: _same_day(row, ds, metrics),
    )


def _same_day(row: dict[str, Any], ds: str, metrics: dict[str, Any]) -> bool:
    return row.get("ds") == ds and row.get("model_ref", metrics.get("model_ref")) == metrics.get("model_ref")
