"""Evaluate a saved model on a held-out set and write predictions and metrics to disk.

Instruction records are answered from their rendered ``prompt``. Chat records (``messages``) are
answered as the model was trained on them: the last assistant turn is generated from the turns before
it, rendered with the dataset's template (:mod:`airloom.evaluation.chat`), and scored with the same
metrics; their perplexity is that of the tokens training puts loss on for that turn.

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
from typing import TYPE_CHECKING

from airloom.exceptions import UsageError

if TYPE_CHECKING:
    from airloom.prompts import PromptRenderer

DEFAULT_TASK = "default"
# The alpaca template starts every section with "### "; a model that keeps going after its answer
# usually starts the next one.
DEFAULT_STOP_STRINGS = ("\n### ",)


def _check_records(records: Sequence[dict]) -> None:
    for i, rec in enumerate(records):
        chat = isinstance(rec.get("messages"), list) and bool(rec["messages"])
        needed = ("id",) if chat else ("id", "prompt", "response")
        for field in needed:
            if field not in rec:
                raise UsageError(
                    f"record {i}: missing field {field!r}; every record needs id, and prompt and response "
                    "or messages"
                )
        where = f"record {i} (id {rec['id']!r})"
        for field in needed[1:]:
            if not isinstance(rec[field], str):
                raise UsageError(f"{where}: field {field!r} must be a string")
        if chat:
            turns = rec["messages"]
            if not all(
                isinstance(t, dict) and t.get("role") and isinstance(t.get("content"), str) for t in turns
            ):
                raise UsageError(f"{where}: every turn of 'messages' needs a 'role' and a text 'content'")
            if turns[-1]["role"] != "assistant" and not isinstance(rec.get("response"), str):
                raise UsageError(
                    f"{where}: 'messages' must end with the assistant's answer, or 'response' must hold it"
                )
        refs = rec.get("references")
        if refs is not None and (
            isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs)
        ):
            raise UsageError(f"{where}: field 'references' must be a non-empty list of strings")


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
    dataset_file: str | Path | None = None,
    template: PromptRenderer | None = None,
    precision: str = "fp32",
) -> dict:
    """Generate an answer for every record, score it against the reference and write the results.

    Args:
        model_path: folder written by ``save_pretrained`` (model and tokenizer).
        records: dicts with ``id``, ``prompt``, ``response`` (the reference) and optional ``task``;
            an optional ``references`` list replaces ``response`` as the set of accepted answers. A chat
            record has ``id`` and ``messages`` (ending with the reference answer, or with a user turn
            and the answer in ``response``) instead of ``prompt``.
        out_dir: where ``predictions.jsonl`` and ``metrics.json`` go (created if missing).
        limit: evaluate only the first ``limit`` records (quick smoke runs).
        stop_strings: where an answer to a rendered ``prompt`` ends. A chat record rendered with a
            template that renders conversations ends where the template ends an assistant turn.
        dataset_file: the prepared split ``records`` come from: chat records are rendered with the
            template its ``manifest.json`` names, as training renders them
            (:func:`airloom.evaluation.chat.dataset_template`); without it, with the model's chat
            template, else ChatML.
        template: renders the chat records instead (overrides ``dataset_file``).
        precision: the weights' dtype while evaluating (``fp32``; ``bf16`` for a GPU-sized model).

    Returns:
        The dict written to ``metrics.json``.
    """
    from airloom.evaluation.chat import answer_example, dataset_template, split_turns, turn_end
    from airloom.evaluation.generation import example_perplexity, generate, load_model
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

    model, tokenizer = load_model(model_path, precision)
    chats = [split_turns(r) for r in records]
    renderer = None
    if any(chats):
        renderer = template or dataset_template(dataset_file, tokenizer)
        chat_stops = (turn_end(renderer),) if renderer.multi_turn else tuple(stop_strings or ())
    prompts, answers, stops = [], [], []
    for i, (rec, chat) in enumerate(zip(records, chats, strict=True)):
        if chat is None:
            prompts.append(rec["prompt"])
            answers.append(rec["response"])
            stops.append(tuple(stop_strings or ()))
            continue
        where = f"record {i} (id {rec['id']!r})"
        prompts.append(
            renderer.render_turns(chat[0], add_generation_prompt=True, task=rec.get("task"), where=where)
        )
        answers.append(chat[1])
        stops.append(chat_stops)
    refs_list = [list(r.get("references") or [a]) for r, a in zip(records, answers, strict=True)]
    preds: list[str] = [""] * len(records)
    for group in dict.fromkeys(stops):  # one generate call per way of stopping, in first-seen order
        idx = [i for i, s in enumerate(stops) if s == group]
        out = generate(
            model,
            tokenizer,
            [prompts[i] for i in idx],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            stop_strings=[s for s in group if s],
        )
        for i, pred in zip(idx, out, strict=True):
            preds[i] = pred
    scores = score_predictions(preds, refs_list, task=[r.get("task") for r in records])
    examples = [
        answer_example(tokenizer, p, a, chat[0] if chat else None, renderer, rec.get("task"))
        for rec, chat, p, a in zip(records, chats, prompts, answers, strict=True)
    ]
    ppl = example_perplexity(model, tokenizer, examples, batch_size=max(1, batch_size // 2))

    by_task: dict[str, dict] = {}
    pred_lines = []
    for rec, prompt, pred, refs, row in zip(
        records, prompts, preds, refs_list, scores["per_example"], strict=True
    ):
        task = rec.get("task") or DEFAULT_TASK
        agg = by_task.setdefault(task, {"exact_match": 0.0, "f1": 0.0, "n": 0})
        agg["exact_match"] += row["exact_match"]
        agg["f1"] += row["f1"]
        agg["n"] += 1
        pred_lines.append(
            {
                "id": rec["id"],
                "task": task,
                "prompt": prompt,
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
