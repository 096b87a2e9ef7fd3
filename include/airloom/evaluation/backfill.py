"""Daily evaluation of the deployed model over dated partitions of historical records.

Input partitions: ``<history>/ds=YYYY-MM-DD/*.jsonl`` (``id``, ``prompt``, ``response``, optional
``task``). Output: ``<out_root>/<model>/ds=YYYY-MM-DD/v<N>/metrics.json``, one folder per date and
model version (so a day scored with the version live then and with today's can both exist); a rerun
replaces its own folder and nothing else, so backfills are idempotent and can run in parallel.

**Workers that share no disk** (``AIRLOOM_ARTIFACTS=s3://…``, an :class:`~airloom.artifacts.Artifacts`
given): a root under ``AIRLOOM_HOME`` (the DAG's defaults ``data/history`` and ``evaluations``) or a URI of
the store names the same key in the store. A day's folder is written on the worker that scored it and
published to the store, manifest last (the operator does it); the trend lists the published days in the
store (:func:`stored_metrics`), so it sees every day whichever worker scored it. A history partition is read
from the store as the ``*.jsonl`` objects listed under ``ds=<day>/`` (data another tool writes; each object
is whole, as every S3 PUT is); an ``s3://`` root outside the store (the team's own bucket) likewise, with the
caller's client.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airloom.artifacts import Artifacts


def partition_dir(root: str | Path, ds: str) -> Path:
    return Path(root) / f"ds={ds}"


def version_dir(out_root: str | Path, model_name: str, ds: str, version: int) -> Path:
    """``<out_root>/<model_name>/ds=<ds>/v<version>``: where one day's scores by one version live."""
    return partition_dir(Path(out_root) / model_name, ds) / f"v{version}"


def day_end(ds: str) -> datetime:
    """The end of the UTC day ``ds`` (YYYY-MM-DD): the first instant of the next day."""
    return datetime.fromisoformat(ds).replace(tzinfo=UTC) + timedelta(days=1)


def version_of_the_day(registry: Any, name: str, ds: str, alias: str = "production") -> int | None:
    """The version at ``alias`` when the day ``ds`` ended (None: not set yet), from the alias history."""
    return registry.alias_at(name, alias, day_end(ds) - timedelta(microseconds=1))


def read_partition(
    history_root: str | Path, ds: str, artifacts: Artifacts | None = None, s3_client: Any = None
) -> list[dict] | None:
    """The records of one day, or None when the partition does not exist
    (:class:`~airloom.data.partitions.DailyPartitions`: a folder; with a remote ``artifacts`` store, a folder
    under ``AIRLOOM_HOME`` or a URI of the store names its key there; another ``s3://`` root is read with
    ``s3_client``)."""
    from airloom.data.partitions import DailyPartitions

    return DailyPartitions.open(history_root, artifacts=artifacts, client=s3_client).read(ds)


def evaluate_partition(
    model_path: str,
    model_ref: str,
    records: list[dict],
    out_root: str | Path,
    model_name: str,
    ds: str,
    *,
    version: int,
    live_version: int | None = None,
    limit: int | None = None,
    max_new_tokens: int = 32,
) -> dict:
    """Evaluate and atomically replace ``<out_root>/<model_name>/ds=<ds>/v<version>/``.

    ``live_version`` (the version at production when the day ended) is recorded so the trend can
    mark production changes whichever version scored the day.
    """
    from airloom.evaluation.harness import evaluate_model

    final = version_dir(out_root, model_name, ds, version)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        metrics = evaluate_model(model_path, records, tmp, limit=limit, max_new_tokens=max_new_tokens)
        metrics.update({"ds": ds, "model_ref": model_ref, "version": version, "live_version": live_version})
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


_STORED_DAY = re.compile(r"ds=(?P<ds>[^/]+)/v\d+/(?P<manifest>[^/]+)")


def local_metrics(model_root: str | Path) -> list[tuple[str, dict]]:
    """``(ds, metrics.json)`` of every day under a local ``model_root``: ``ds=*/v*/metrics.json`` and the
    older unversioned ``ds=*/metrics.json``."""
    root = Path(model_root)
    return [
        (next(p.name[3:] for p in f.parents if p.name.startswith("ds=")), json.loads(f.read_text()))
        for f in [*root.glob("ds=*/metrics.json"), *root.glob("ds=*/v*/metrics.json")]
    ]


def stored_metrics(artifacts: Artifacts, model_key: str) -> list[tuple[str, dict]]:
    """``(ds, metrics.json)`` of every day published under ``model_key`` in the artifact store
    (``<model_key>/ds=*/v*/``, each a complete artifact: one whose upload was cut short has no manifest
    and is not listed); each file is staged, so it is verified against its manifest."""
    from airloom.artifacts import MANIFEST

    found = []
    prefix = model_key.strip("/") + "/"
    for key in artifacts.list(prefix + "ds="):
        match = _STORED_DAY.fullmatch(key[len(prefix) :])
        if match is None or match["manifest"] != MANIFEST:
            continue
        folder = key.rsplit("/", 1)[0]
        metrics = artifacts.stage(artifacts.uri(f"{folder}/metrics.json"))
        found.append((match["ds"], json.loads(metrics.read_text())))
    return found


def build_trend(
    model_root: str | Path,
    metrics: tuple[str, ...] = ("exact_match", "f1", "rougeL"),
    *,
    found: list[tuple[str, dict]] | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Collect every day's ``metrics.json`` under ``model_root`` into ``trend.json`` and ``trend.png``.

    Reads ``ds=*/v*/metrics.json`` and the older unversioned ``ds=*/metrics.json`` (:func:`local_metrics`),
    or the days ``found`` elsewhere (:func:`stored_metrics`: ``model_root`` is then their URI, for the
    record); writes into ``out_dir`` (default ``model_root``). The chart draws one line per metric and
    version and a dashed line where the production version changed (from each day's ``live_version``), so
    a drop can be told apart from a new model.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if found is None:
        found = local_metrics(model_root)
    out = Path(out_dir if out_dir is not None else model_root)
    if out_dir is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ds, m in found:
        rows.append(
            {
                "ds": m.get("ds") or ds,
                "version": m.get("version"),
                "live_version": m.get("live_version"),
                "model_ref": m.get("model_ref"),
                "n": m.get("n"),
                **{k: m["aggregate"].get(k) for k in metrics},
            }
        )
    rows.sort(key=lambda r: (r["ds"], r["version"] or 0))
    dates = sorted({r["ds"] for r in rows})
    live = {r["ds"]: r["live_version"] for r in rows if r["live_version"] is not None}
    known = [d for d in dates if d in live]  # days scored before live_version was recorded say nothing
    changes = [
        {"ds": d, "from": live[prev], "to": live[d]}
        for prev, d in zip(known, known[1:], strict=False)
        if live[d] != live[prev]
    ]
    versions = sorted({r["version"] for r in rows if r["version"] is not None})
    trend = {
        "model_root": str(model_root),
        "dates": len(dates),
        "versions": versions,
        "changes": changes,
        "rows": rows,
    }
    (out / "trend.json").write_text(json.dumps(trend, indent=2))
    if rows:
        x = {d: i for i, d in enumerate(dates)}  # numeric x: each version's days stay in date order
        fig, ax = plt.subplots(figsize=(8, 3.2))
        series = sorted({r["version"] for r in rows}, key=lambda v: v or 0)
        for j, k in enumerate(metrics):
            for i, v in enumerate(series):
                part = [r for r in rows if r["version"] == v]
                label = k if len(series) == 1 or v is None else f"{k} v{v}"
                ax.plot(
                    [x[r["ds"]] for r in part],
                    [r[k] for r in part],
                    marker="osD^vP"[i % 6],
                    color=f"C{j}",
                    label=label,
                )
        for c in changes:
            ax.axvline(x[c["ds"]] - 0.5, color="grey", linestyle="--", linewidth=1)
            # Left of the line: a change is never on the first date, so there is always room there.
            ax.text(x[c["ds"]] - 0.55, 0.97, f"production → v{c['to']}", fontsize=7, va="top", ha="right")
        ax.set_xticks(range(len(dates)), dates)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
        ax.grid(alpha=0.3)
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(out / "trend.png", dpi=90)
        plt.close(fig)
        trend["plot"] = str(out / "trend.png")
    return trend
