"""Evaluate a saved model on a held-out set and write predictions and metrics to disk.

Outputs (both overwritten on rerun):

- ``predictions.jsonl``: one line per example: id, task, prompt, prediction, reference and its scores
  (exact_match, f1, rouge*, and math_exact_match on math examples).
- ``metrics.json``: model, n, aggregate metrics (incl. perplexity), per-task EM/F1, seconds taken.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from airloom.exceptions import UsageError

DEFAULT_TASK = "default"
# The alpaca template starts every section with "### "; a model that keeps going after its answer
# usually starts the next one.
DEFAULT_STOP_STRINGS = ("\n### ",)


def _check_records(records: Sequence[dict]) -> None:
    for i, rec in enumerate(records):
        for field in ("id", "prompt", "response"):
            if field not in rec:
                raise UsageError(
                    f"record {i}: missing field {field!r}; every record needs id, prompt, response"
                )
        for field in ("prompt", "response"):
            if not isinstance(rec[field], str):
                raise UsageError(f"record {i} (id {rec['id']!r}): field {field!r} must be a string")
        refs = rec.get("references")
        if refs is not None and (
            isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs)
        ):
            raise UsageError(
                f"record {i} (id {rec['id']!r}): field 'references' must be a non-empty list of strings"
            )


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def evaluate_model(
    model_path: str | Path,
    records: list[dict],
    out_dir: Path,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    limit: int | None = None,
    stop_strings: Sequence[str] | None = DEFAULT_STOP_STRINGS,
) -> dict:
    """Generate an answer for every record, score it against the reference and write the results.

    Args:
        model_path: folder written by ``save_pretrained`` (model and tokenizer).
        records: dicts with ``id``, ``prompt``, ``response`` (the reference) and optional ``task``;
            an optional ``references`` list replaces ``response`` as the set of accepted answers.
        out_dir: where ``predictions.jsonl`` and ``metrics.json`` go (created if missing).
        limit: evaluate only the first ``limit`` records (quick smoke runs).

    Returns:
        The dict written to ``metrics.json``.
    """
    from airloom.evaluation.generation import generate, load_model, perplexity
    from airloom.evaluation.metrics import score_predictions

    started = time.monotonic()
    if limit is not None:
        if limit < 1:
            raise UsageError(f"limit must be a positive number of records, got {limit}")
        records = records[:limit]
    if not records:
        raise UsageError("no records to evaluate: the evaluation set is empty")
    _check_records(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_model(model_path)
    prompts = [r["prompt"] for r in records]
    refs_list = [list(r.get("references") or [r["response"]]) for r in records]
    preds = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_strings=stop_strings,
    )
    scores = score_predictions(preds, refs_list, task=[r.get("task") for r in records])
    ppl = perplexity(
        model, tokenizer, prompts, [r["response"] for r in records], batch_size=max(1, batch_size // 2)
    )

    by_task: dict[str, dict] = {}
    pred_lines = []
    for rec, pred, refs, row in zip(records, preds, refs_list, scores["per_example"], strict=True):
        task = rec.get("task") or DEFAULT_TASK
        agg = by_task.setdefault(task, {"exact_match": 0.0, "f1": 0.0, "n": 0})
        agg["exact_match"] += row["exact_match"]
        agg["f1"] += row["f1"]
        agg["n"] += 1
        pred_lines.append(
            {
                "id": rec["id"],
                "task": task,
                "prompt": rec["prompt"],
                "prediction": pred,
                "reference": refs[0] if len(refs) == 1 else refs,
                **row,  # exact_match, f1, rouge*, math_exact_match: per example, for paired comparisons
            }
        )
    for agg in by_task.values():
        agg["exact_match"] /= agg["n"]
        agg["f1"] /= agg["n"]

    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for line in pred_lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    metrics = {
        "model": str(model_path),
        "n": len(records),
        "aggregate": {**scores["aggregate"], "perplexity": ppl},
        "by_task": dict(sorted(by_task.items())),
        "seconds": round(time.monotonic() - started, 3),
    }
    _write_json(out_dir / "metrics.json", metrics)
    return metrics
