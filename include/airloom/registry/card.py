"""Hugging Face model cards (README.md) rendered from registry metadata.

The card is written into every registered version so the folder is self-describing when copied to the
Hub or into a serving image. Recognised metadata keys (all optional): ``summary``, ``base_model``,
``datasets``, ``eval_dataset``, ``tags``, ``license``, ``language``, ``pipeline_tag``, ``metrics``
(name → number), ``lineage`` (name → value), ``training`` (hyper-parameters), ``intended_use``,
``limitations``.
"""

from __future__ import annotations

import json
from typing import Any

from airloom.registry.store import json_default
from airloom.reports import rounded


def _plain(value: Any) -> Any:
    """JSON-able builtins only, so numpy scalars or Paths never reach YAML as python tags."""

    def default(obj: Any) -> Any:
        try:
            return json_default(obj)
        except TypeError:
            return str(obj)

    return json.loads(json.dumps(value, default=default))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: dict[str, Any], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows.items()]
    return lines


def front_matter(name: str, version: int, metadata: dict[str, Any]) -> dict[str, Any]:
    """The YAML header as a dict (exposed so callers and tests can inspect it without parsing)."""
    meta = _plain(metadata)
    header: dict[str, Any] = {"library_name": "transformers"}
    for key in ("license", "language", "base_model"):
        if meta.get(key):
            header[key] = meta[key]
    datasets = [str(d) for d in _as_list(meta.get("datasets"))]
    if datasets:
        header["datasets"] = datasets
    header["pipeline_tag"] = meta.get("pipeline_tag") or "text-generation"
    header["tags"] = ["airloom", *[str(t) for t in _as_list(meta.get("tags")) if str(t) != "airloom"]]
    metrics = {k: v for k, v in (meta.get("metrics") or {}).items() if _is_number(v)}
    if metrics:
        eval_dataset = str(meta.get("eval_dataset") or (datasets[0] if datasets else "held-out"))
        header["model-index"] = [
            {
                "name": f"{name}-v{version}",
                "results": [
                    {
                        "task": {"type": header["pipeline_tag"]},
                        "dataset": {"name": eval_dataset, "type": eval_dataset},
                        "metrics": [{"type": k, "name": k, "value": v} for k, v in metrics.items()],
                    }
                ],
            }
        ]
    return header


def render_model_card(name: str, version: int, metadata: dict[str, Any]) -> str:
    """Render README.md: YAML front matter plus summary, lineage, evaluation, use, limits, sign-offs."""
    import yaml

    meta = _plain(metadata)
    header = yaml.safe_dump(front_matter(name, version, meta), sort_keys=False, allow_unicode=True)
    summary = meta.get("summary") or (
        f"`{name}` version {version}, fine-tuned from `{meta['base_model']}` with Airloom."
        if meta.get("base_model")
        else f"`{name}` version {version}, registered with Airloom."
    )
    out = [
        "---",
        header.rstrip("\n"),
        "---",
        "",
        f"# {name} (version {version})",
        "",
        "## Summary",
        "",
        summary,
    ]

    out += ["", "## Training data and lineage", ""]
    datasets = _as_list(meta.get("datasets"))
    if meta.get("base_model"):
        out.append(f"- Base model: `{meta['base_model']}`")
    out += [f"- Dataset: `{d}`" for d in datasets]
    if meta.get("lineage"):
        out += ["", *_table(dict(meta["lineage"]), ("Lineage", "Value"))]
    if meta.get("training"):
        out += ["", *_table(dict(meta["training"]), ("Training parameter", "Value"))]
    if not (datasets or meta.get("base_model") or meta.get("lineage") or meta.get("training")):
        out.append("_No lineage was recorded at registration._")

    out += ["", "## Evaluation", ""]
    metrics = meta.get("metrics") or {}
    # rounded for reading; the exact values stay in the front matter's model-index and in metadata.json
    readable = {k: rounded(v) if _is_number(v) else v for k, v in metrics.items()}
    out += _table(readable, ("Metric", "Value")) if metrics else ["_No evaluation metrics were recorded._"]

    out += ["", "## Intended use", ""]
    out.append(
        meta.get("intended_use")
        or "Internal evaluation and, once signed off, serving for the task it was fine-tuned on."
    )
    out += ["", "## Limitations", ""]
    out.append(
        meta.get("limitations")
        or "Fine-tuned on a narrow dataset: expect errors outside its domain and check outputs before use."
    )
    out += [
        "",
        "## Sign-offs",
        "",
        f"Sign-off requests and decisions are recorded in the Airloom registry under `signoffs/{version}/` "
        "of this model; this card is written at registration, before any sign-off.",
        "",
    ]
    return "\n".join(out)
