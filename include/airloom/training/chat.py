"""Conversations as training examples: loss on every assistant turn, nothing else.

A prepared row with ``messages`` is rendered whole with the dataset's template
(:func:`airloom.prompts.render_conversation` finds each assistant turn's characters by rendering
the conversation prefix by prefix, which works for any chat template), tokenized once with offsets,
and a token carries its id as label when it overlaps an assistant turn the row trains on (``weight``
absent or 1), else -100: system, user and template tokens, and assistant turns with ``weight`` 0.

A conversation longer than ``max_length`` tokens follows ``TrainConfig.chat_truncation``: ``drop``
the row, or ``keep_last_turns``: keep the system turn (if any) and the latest whole user/assistant
exchanges that fit, dropping the row when not even the last exchange fits.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from airloom.exceptions import UsageError
from airloom.prompts import PromptRenderer, load_template, render_conversation
from airloom.training.config import CHAT_TRUNCATIONS

Example = tuple[list[int], list[int]]  # (input_ids, labels)


def label_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> Example:
    """Token ids of ``text`` (no special tokens added) and labels: the id where the token overlaps a span
    of ``spans`` (sorted character ranges), else -100.

    A fast tokenizer tokenizes the text once and places tokens by their character offsets; a slow one
    (no offsets) tokenizes the pieces between span edges one by one.
    """
    if not getattr(tokenizer, "is_fast", False):
        return _label_pieces(tokenizer, text, spans)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, labels, j = enc["input_ids"], [], 0
    for token, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        inside = j < len(spans) and start < spans[j][1] and end > spans[j][0]
        labels.append(token if inside else -100)
    return list(ids), labels


def _label_pieces(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    at = 0
    for start, end in [*spans, (len(text), len(text))]:
        for a, b, trained in ((at, start, False), (start, end, True)):
            if b > a:
                piece = tokenizer(text[a:b], add_special_tokens=False, verbose=False)["input_ids"]
                ids += piece
                labels += piece if trained else [-100] * len(piece)
        at = end
    return ids, labels


def exchanges(turns: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """The system turn (a list of one, or empty) and the exchanges after it: runs of turns that each end
    with an assistant turn (a user turn and its answer, in a well-formed conversation)."""
    system = turns[:1] if turns and turns[0]["role"] == "system" else []
    groups: list[list[dict]] = []
    current: list[dict] = []
    for turn in turns[len(system) :]:
        current.append(turn)
        if turn["role"] == "assistant":
            groups.append(current)
            current = []
    return system, groups  # turns after the last answer (none in a prepared row) have nothing to learn


def chat_example(
    turns: list[dict],
    renderer: PromptRenderer,
    tokenizer: Any,
    max_length: int,
    truncation: str = "keep_last_turns",
    task: str | None = None,
    where: str = "a row",
) -> tuple[Example | None, str]:
    """One conversation as ``(input_ids, labels)``, and what happened to it: ``kept``, ``truncated``
    (earlier exchanges dropped to fit ``max_length``), ``too_long`` (dropped by the policy) or
    ``no_labels`` (no assistant turn left to train on: every one has weight 0).

    Raises:
        UsageError: an unknown ``truncation``, or a template that cannot render the turns.
    """
    if truncation not in CHAT_TRUNCATIONS:
        raise UsageError(f"chat_truncation {truncation!r} is not one of {', '.join(CHAT_TRUNCATIONS)}")
    eos = tokenizer.eos_token or None
    system, groups = exchanges(turns)
    if not groups:
        return None, "no_labels"
    # Fewest exchanges dropped first. A shorter candidate is first measured by its text alone (one
    # render), which spares the prefix-by-prefix renders of those that do not fit.
    for skip in range(len(groups) if truncation == "keep_last_turns" else 1):
        kept = system + [t for group in groups[skip:] for t in group]
        if skip:
            text = render_conversation(renderer, kept, eos, task, where, spans=False).text
            if len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) > max_length:
                continue
        conversation = render_conversation(renderer, kept, eos, task, where)
        if not conversation.spans:
            return None, "no_labels"
        ids, labels = label_spans(tokenizer, conversation.text, conversation.spans)
        if len(ids) <= max_length:
            return (ids, labels), "truncated" if skip else "kept"
    return None, "too_long"


def tokenize_chat_rows(
    rows: list[dict],
    renderer: PromptRenderer,
    tokenizer: Any,
    max_length: int,
    truncation: str,
    stats: Counter | None = None,
) -> list[Example | None]:
    """:func:`chat_example` per row (None where the row is dropped); ``stats`` counts the outcomes."""
    out = []
    for n, row in enumerate(rows, 1):
        where = f"row {n}" + (f" (id {row['id']})" if row.get("id") else "")
        example, outcome = chat_example(
            row["messages"], renderer, tokenizer, max_length, truncation, row.get("task"), where
        )
        if stats is not None:
            stats[outcome] += 1
        out.append(example)
    return out


def resolve_chat_renderer(train_file: str | Path, tokenizer: Any) -> PromptRenderer:
    """The template the conversations of ``train_file`` train with: the one its prepared dataset's
    ``manifest.json`` (beside it) names, else the tokenizer's chat template, else ChatML.

    Raises:
        UsageError: the dataset was prepared with a chat template this tokenizer does not have, or with a
            template file missing here or changed since (the messages say what to do).
    """
    manifest_path = Path(train_file).parent / "manifest.json"
    template = None
    if manifest_path.is_file():
        try:
            template = json.loads(manifest_path.read_text(encoding="utf-8")).get("template")
        except (OSError, ValueError, AttributeError):
            template = None  # not a prepared dataset's manifest
    if not isinstance(template, dict) or "kind" not in template:
        return load_template("chat_template", tokenizer=tokenizer)
    kind, name, sha = template["kind"], template.get("name", ""), template.get("sha256")
    if kind == "tokenizer":
        renderer = load_template("chat_template", tokenizer=tokenizer)
        if renderer.kind != "tokenizer" or renderer.sha256 != sha:
            has = "another chat template" if renderer.kind == "tokenizer" else "no chat template"
            raise UsageError(
                f"{manifest_path.parent} was prepared with a tokenizer's chat template (sha256 {sha}) but "
                f"the base model's tokenizer has {has}: prepare the data with this model's tokenizer, or "
                "train the model it was prepared for"
            )
        return renderer
    if kind == "file":
        if not Path(name).is_file():
            raise UsageError(
                f"{manifest_path.parent} was prepared with template file {name}, which is not on this "
                "machine: make it available at that path, or prepare the data with a built-in template"
            )
        renderer = load_template(name)
        if renderer.sha256 != sha:
            raise UsageError(
                f"template file {name} changed since {manifest_path.parent} was prepared with it "
                f"(sha256 {sha}, now {renderer.sha256}): prepare the data again"
            )
        return renderer
    # A built-in: this version's source (prompts render the same as the one the dataset was prepared with).
    return load_template(name)
