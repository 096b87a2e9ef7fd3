"""Prompts at evaluation and serving time: rendered with the template the model trained with.

Training renders a conversation with its prepared dataset's template (the ``template`` entry of
``manifest.json``) and saves that template as the model folder's chat template when it renders
conversations (``airloom.training.recipe.chat_renderer``). Evaluation renders a test conversation's
earlier turns with the dataset's template (:func:`dataset_template`); serving and the canary, which
have no dataset, with the model folder's chat template (:func:`model_template`), and with alpaca on
the last user turn for a model trained without one (instruction rows). Every prompt is then encoded
without added special tokens (:func:`airloom.tokens.encode`), as training encodes it.

A template that renders conversations closes each assistant turn with text of its own (ChatML's
``<|im_end|>``), which the model learns to write before EOS: generation stops there too
(:func:`turn_end`), or the answer would end with the marker wherever the tokenizer does not know it as
a special token.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airloom.exceptions import UsageError
from airloom.prompts import (
    CHAT_TEMPLATE,
    MODEL_TEMPLATE_FILE,
    PromptRenderer,
    load_template,
    render_prompt,
)

log = logging.getLogger(__name__)

# The answer of the probe conversation :func:`turn_end` renders: text no template adds or changes.
_PROBE = "airloom-probe-answer"


def model_template(tokenizer: Any) -> PromptRenderer | None:
    """The template the model's conversations trained with: the template file its folder carries
    (:data:`airloom.prompts.MODEL_TEMPLATE_FILE`, a user's Jinja2 file, rendered in the sandbox as
    in training), else its tokenizer's chat template; None when the model has neither."""
    if tokenizer is None:  # nothing to read a template from
        return None
    folder = getattr(tokenizer, "name_or_path", None)
    if folder and (Path(folder) / MODEL_TEMPLATE_FILE).is_file():
        return _file_template(str(Path(folder) / MODEL_TEMPLATE_FILE))
    renderer = load_template(CHAT_TEMPLATE, tokenizer=tokenizer)
    return renderer if renderer.kind == "tokenizer" else None


@functools.lru_cache(maxsize=8)
def _file_template(path: str) -> PromptRenderer:
    return load_template(path)  # compiled once per model folder: serving renders every request with it


def dataset_template(dataset_file: str | Path | None, tokenizer: Any) -> PromptRenderer:
    """The template the conversations of ``dataset_file`` (a prepared split) train with: the one its
    ``manifest.json`` names, else the model's chat template, else ChatML, resolved as training resolves
    it (:func:`airloom.training.chat.resolve_chat_renderer`).

    A model that cannot render the dataset's template (a baseline with another tokenizer's chat template)
    gets its own chat template, with a warning: that is how it would be served.
    """
    from airloom.training.chat import resolve_chat_renderer

    if dataset_file is None:
        return load_template(CHAT_TEMPLATE, tokenizer=tokenizer)
    try:
        return resolve_chat_renderer(dataset_file, tokenizer)
    except UsageError as exc:
        log.warning("%s; rendering with the model's own chat template instead", exc)
        return load_template(CHAT_TEMPLATE, tokenizer=tokenizer)


def turn_end(renderer: PromptRenderer | None) -> str:
    """The text ``renderer`` closes an assistant turn with (``<|im_end|>`` for ChatML), or ``""`` for a
    single-turn template or one that closes it with nothing but whitespace."""
    if renderer is None or not renderer.multi_turn:
        return ""
    probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _PROBE}]
    try:
        text = renderer.render_turns(probe, add_generation_prompt=False, where="a probe conversation")
    except UsageError:
        return ""
    at = text.rfind(_PROBE)
    return text[at + len(_PROBE) :].strip() if at != -1 else ""


def split_turns(record: dict) -> tuple[list[dict], str] | None:
    """A chat record's prompt turns and reference answer: the turns before its last assistant turn and
    that turn's content; when no assistant turn ends it (a logged request), all of its turns and its
    ``response``. None for an instruction record (no ``messages``)."""
    turns = record.get("messages")
    if not isinstance(turns, list) or not turns:
        return None
    turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    if turns[-1]["role"] == "assistant":
        return turns[:-1], turns[-1]["content"]
    return turns, str(record.get("response") or "")


def chat_prompt(turns: Sequence[dict], tokenizer: Any, renderer: PromptRenderer | None = None) -> str:
    """A conversation's prompt for its next assistant turn, as the model reads it: rendered with
    ``renderer``, else the model's chat template, else alpaca on the last user turn (a blank line
    parts instruction from input: the inverse of how an instruction row becomes one user turn, see
    :func:`airloom.prompts.prompt_context`).

    Raises:
        UsageError: no user turn to render with alpaca, or a template that fails on the turns.
    """
    renderer = renderer or model_template(tokenizer)
    if renderer is not None:
        return renderer.render_turns(list(turns), add_generation_prompt=True, where="the messages")
    users = [t["content"] for t in turns if t["role"] == "user"]
    if not users:
        raise UsageError("messages must contain a user message")
    instruction, _, inp = users[-1].partition("\n\n")
    return render_prompt(instruction.strip(), inp.strip() or None)


def answer_example(
    tokenizer: Any,
    prompt: str,
    answer: str,
    turns: Sequence[dict] | None = None,
    renderer: PromptRenderer | None = None,
    task: str | None = None,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a prompt and its answer, labels -100 but on the answer, as training
    builds them (the same ids, the same tokens carry loss; EOS counts as part of the answer).

    An instruction row (or a conversation under a single-turn template): ``prompt`` and ``answer`` + EOS
    encoded apart (``airloom.training.recipe.tokenize_examples``). A conversation under ``renderer``
    rendering conversations: ``turns`` + the answer rendered and encoded whole, the answer's assistant
    turn (with its end-of-turn text and EOS) labelled (``airloom.training.chat.chat_example``).
    """
    from airloom.prompts import render_conversation
    from airloom.tokens import encode

    eos = tokenizer.eos_token or ""
    if turns is None or renderer is None or not renderer.multi_turn:
        p = encode(tokenizer, prompt)["input_ids"]
        r = encode(tokenizer, answer + eos)["input_ids"]
        return p + r, [-100] * len(p) + r
    from airloom.training.chat import label_spans

    conversation = render_conversation(
        renderer, [*turns, {"role": "assistant", "content": answer}], eos or None, task, spans=True
    )
    spans = conversation.spans
    # The answer's span ends the text (EOS joins it); without one (an empty answer under a template that
    # closes the turn with nothing), nothing is scored.
    last = spans[-1:] if spans and spans[-1][1] == len(conversation.text) else []
    return label_spans(tokenizer, conversation.text, last)
