"""The EDA report: a profile (:mod:`airloom.data.eda`) and its per-row length series as one HTML page."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from airloom.reports import render

_UNITS = ("chars", "words", "tokens")


def render_profile(profile: dict, series: dict) -> str:
    """``report.html``: the profile's numbers, with histograms of ``series`` (unit -> field -> lengths)."""
    fields = profile["fields"]
    text_fields = [f for f, stats in fields.items() if "chars_histogram" in stats]  # those measured
    lengths, stat_keys = {}, []
    for unit in _UNITS:
        rows = [(f, fields[f][unit]) for f in text_fields if unit in fields[f]]
        if rows and f"total_{unit}" in fields:
            rows.append(("total", fields[f"total_{unit}"]))
        if rows:
            lengths[unit] = rows
            stat_keys = [k for k in rows[0][1] if k != "count"]  # min, mean, the quantiles, max
    drift = profile.get("drift") or {}
    conv = profile.get("conversations")
    conv_lengths = {}
    if conv:
        conv_lengths = {unit: list(by_role.items()) for unit, by_role in conv["lengths"].items()}
        if conv.get("tokens") and "tokens" in conv_lengths:
            conv_lengths["tokens"].append(("whole conversation, rendered", conv["tokens"]["rendered"]))
    return render(
        "eda.html.j2",
        profile=profile,
        figs=_figures(profile, series, text_fields),
        lengths=lengths,
        conv_lengths=conv_lengths,
        stat_keys=stat_keys,
        length_psi=[
            (f"{f} {unit}", v["psi"], v["verdict"])
            for unit, by_field in (drift.get("length_psi") or {}).items()
            for f, v in by_field.items()
        ],
    )


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)  # tight_layout already fitted it; "tight" would draw twice
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _histograms(panels: list[tuple[str, np.ndarray]]) -> str:
    """One row of length histograms over ``[0, p99]`` (longer values piled at the right edge)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 2.8))
    FigureCanvasAgg(fig)
    for k, (title, values) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        values = values if len(values) else np.zeros(1)
        top = max(1.0, float(np.quantile(values, 0.99)))
        counts, edges = np.histogram(np.clip(values, 0, top), bins=30, range=(0.0, top))
        ax.stairs(counts, edges, fill=True, color="#4a6fa5")
        clipped = int((values > top).sum())
        ax.set_title(title + (f", {clipped} > p99 at edge" if clipped else ""), fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def _figures(profile: dict, series: dict, text_fields: list[str]) -> dict[str, str]:
    """Base64 PNGs, drawn with the Agg canvas directly so no global pyplot state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figs: dict[str, str] = {}
    for unit in _UNITS:
        data = series[unit]
        if data:
            figs[unit] = _histograms([(f"{f} ({unit})", data[f]) for f in text_fields])
    conv, conv_series = profile.get("conversations"), series.get("conversations") or {}
    if conv:
        hist = conv["turns_histogram"]
        fig = Figure(figsize=(8, 2.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(hist["turns"], hist["counts"], color="#4a6fa5")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        more = f", {hist['above']} longer not shown" if hist["above"] else ""
        ax.set_title(f"conversations by number of turns{more}", fontsize=9)
        ax.set_xlabel("turns (system turns included)", fontsize=8)
        ax.tick_params(labelsize=8)
        fig.tight_layout()
        figs["conv_turns"] = _png(fig)
        for unit in ("chars", "tokens"):
            panels = [
                (f"{role} turns ({unit})", conv_series[f"{unit}:{role}"])
                for role in conv["lengths"].get(unit, {})
                if f"{unit}:{role}" in conv_series
            ]
            if unit == "tokens" and "tokens:rendered" in conv_series:
                panels.append(("rendered (tokens)", conv_series["tokens:rendered"]))
            if panels:
                figs[f"conv_{unit}"] = _histograms(panels)
    if profile["tasks"]:
        items = list(profile["tasks"].items())[:30]
        fig = Figure(figsize=(8, 0.3 * len(items) + 1))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.barh([t for t, _ in items][::-1], [c for _, c in items][::-1], color="#4a6fa5")
        ax.set_title("task mix (rows)", fontsize=9)
        ax.tick_params(labelsize=8)
        fig.tight_layout()
        figs["tasks"] = _png(fig)
    return figs
