"""Prompt templates shared by preparation, training and evaluation.

Training and evaluation must render prompts identically, so the templates live in one place.

Two layers:

- :func:`render_prompt` renders the historic ``alpaca`` format with ``str.format``; training,
  evaluation and the synthetic data call it, and models trained on it depend on its exact bytes.
- :func:`load_template` gives a :class:`PromptRenderer` for preparation and training: the built-ins
  ``alpaca`` (byte-identical to :func:`render_prompt`), ``chatml`` and ``chat_template`` (the
  tokenizer's own chat template; ChatML when the tokenizer has none), or a user's Jinja2 file. User
  templates are untrusted text, so they run in Jinja2's immutable sandbox with strict undefined
  variables: a template can read the record and nothing else, and a typo fails loudly instead of
  rendering an empty string.

Every template sees the same variables: ``instruction``, ``input`` (``""`` when absent),
``messages`` (the turns, a list of ``{"role", "content"}``; a record without ``messages`` becomes
one user turn), ``system`` (the first turn's content when it is a system turn, else ``""``),
``task`` (or ``None``) and ``add_generation_prompt`` (true when rendering a prompt, which then ends
where the assistant's answer starts; false when rendering a whole conversation for training), as
Hugging Face chat templates see ``messages`` and ``add_generation_prompt``.

A template that reads ``messages`` renders conversations (:attr:`PromptRenderer.multi_turn`):
:func:`render_conversation` gives a conversation's text and where each assistant turn lies in it, which
training turns into labels. ``alpaca`` and other templates that read only ``instruction``/``input``
are single-turn: a conversation is trained on its last assistant turn, as its prompt shows it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from airloom.exceptions import UsageError


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    with_input: str
    without_input: str

    def render(self, instruction: str, input: str | None = None) -> str:
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)


TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        name="alpaca",
        with_input="### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n",
        without_input="### Instruction:\n{instruction}\n### Response:\n",
    ),
}
DEFAULT_TEMPLATE = "alpaca"

# Jinja2 sources of the built-ins. ``alpaca`` must stay byte-identical to TEMPLATES["alpaca"].
BUILTIN_SOURCES: dict[str, str] = {
    "alpaca": (
        "### Instruction:\n{{ instruction }}\n"
        "{% if input %}### Input:\n{{ input }}\n{% endif %}"
        "### Response:\n"
    ),
    # A Hugging Face chat template as well (no whitespace around block tags, so Hugging Face's
    # trim_blocks/lstrip_blocks render it alike): a model trained on it carries it as its chat_template.
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
CHAT_TEMPLATE = "chat_template"
BUILTIN_TEMPLATES: tuple[str, ...] = ("alpaca", "chatml", CHAT_TEMPLATE)
#: A trained model folder's copy of the template file its conversations trained with (a user's Jinja2
#: file renders in our sandbox, not in Hugging Face's chat-template environment, so it is not installed
#: as the tokenizer's chat template); evaluation, serving and the canary render with it.
MODEL_TEMPLATE_FILE = "airloom_chat_template.jinja"
#: Preparation's choice by the data: ``chat_template`` when it holds conversations, else ``alpaca``.
AUTO_TEMPLATE = "auto"
#: What each template serves, for forms and help texts.
TEMPLATE_HELP: dict[str, str] = {
    AUTO_TEMPLATE: "auto: the tokenizer's chat template (ChatML if it has none) when the data holds "
    "conversations, else alpaca",
    "alpaca": "alpaca: instruction rows; a conversation trains on its last answer only",
    "chatml": "chatml: conversations (loss on every assistant turn), instruction rows as one user turn",
    CHAT_TEMPLATE: "chat_template: the tokenizer's own (ChatML if it has none), for conversations and "
    "instruction rows",
}


def render_prompt(instruction: str, input: str | None = None, template: str = DEFAULT_TEMPLATE) -> str:
    """Render one prompt with a built-in template that needs no tokenizer (``alpaca`` or ``chatml``)."""
    if template in TEMPLATES:
        return TEMPLATES[template].render(instruction, input)
    if template in BUILTIN_SOURCES:
        return _builtin(template).render(prompt_context(instruction, input or ""))
    raise ValueError(f"unknown prompt template {template!r}; known: {sorted(BUILTIN_SOURCES)}")


def split_alpaca(prompt: str) -> tuple[str, str]:
    """``(instruction, input)`` back from an alpaca prompt; text in another shape is all instruction."""
    tpl = TEMPLATES["alpaca"]
    head, resp = tpl.without_input.split("{instruction}")
    input_marker = tpl.with_input.split("{instruction}")[1].split("{input}")[0]
    if not (prompt.startswith(head) and prompt.endswith(resp)):
        return prompt.strip(), ""
    instruction, sep, inp = prompt[len(head) : -len(resp)].partition(input_marker)
    return instruction.strip(), inp.strip() if sep else ""


def chat_fields(turns: list[dict], labels: bool = True) -> dict[str, str]:
    """The instruction view of a conversation, which the row-level checks (duplicates, PII, markup,
    lengths) and single-turn templates read: ``response`` the last assistant turn, ``instruction`` the
    last user turn before it, ``input`` every other earlier turn as ``role: content`` lines (without
    ``labels``, the contents alone: what word statistics should count). Empty strings where a turn is
    missing (a conversation that fails :func:`conversation_problems`)."""
    roles = [t["role"] for t in turns]  # list searches in C: this runs on every chat row of every stage
    last = len(roles) - 1 - roles[::-1].index("assistant") if "assistant" in roles else len(roles)
    before = roles[:last]
    user = last - 1 - before[::-1].index("user") if "user" in before else None
    others = turns[:last] if user is None else turns[:user] + turns[user + 1 : last]
    return {
        "instruction": turns[user]["content"] if user is not None else "",
        "input": "\n".join(
            [f"{t['role']}: {t['content']}" for t in others] if labels else [t["content"] for t in others]
        ),
        "response": turns[last]["content"] if last < len(turns) else "",
    }


def prompt_context(
    instruction: str,
    input: str = "",
    messages: Sequence[dict] | None = None,
    task: str | None = None,
    add_generation_prompt: bool = True,
) -> dict[str, Any]:
    """The variables a template sees; no ``messages`` = one user turn: instruction, blank line, input."""
    if messages is None:
        content = f"{instruction}\n\n{input}" if input else instruction
        messages = [{"role": "user", "content": content}]
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    system = turns[0]["content"] if turns and turns[0]["role"] == "system" else ""
    return {
        "instruction": instruction,
        "input": input,
        "messages": turns,
        "system": system,
        "task": task,
        "add_generation_prompt": add_generation_prompt,
    }


@dataclass(frozen=True)
class PromptRenderer:
    """A loaded template. ``sha256`` identifies its source, so a manifest pins the exact template.

    Attributes:
        name: the built-in name, or the file path as given.
        kind: ``builtin``, ``file`` or ``tokenizer`` (the tokenizer's chat template).
        source: the Jinja2 text.
        sha256: hex digest of ``source`` (UTF-8).
        multi_turn: whether it renders conversations turn by turn (it reads ``messages``).
        requested: the spec asked for, when another template stands in for it (``chat_template`` on a
            tokenizer without one gives ``chatml``).
    """

    name: str
    kind: str
    source: str
    sha256: str
    multi_turn: bool = False
    requested: str | None = None
    _compiled: Any = field(repr=False, compare=False, default=None)
    _tokenizer: Any = field(repr=False, compare=False, default=None)
    _fast: Any = field(repr=False, compare=False, default=None)

    def render(self, context: dict[str, Any], where: str = "a record") -> str:
        """Render one prompt; any failure is a :class:`UsageError` naming the template and ``where``."""
        from jinja2.exceptions import SecurityError, TemplateError

        if self._fast is not None:
            return self._fast(context)
        try:
            if self._tokenizer is not None:
                text = self._tokenizer.apply_chat_template(
                    context["messages"],
                    tokenize=False,
                    add_generation_prompt=context.get("add_generation_prompt", True),
                )
            else:
                text = self._compiled.render(**context)
        except SecurityError as exc:
            raise UsageError(
                f"template {self.name!r} on {where}: blocked by the sandbox ({exc}); templates may only "
                "read the record's variables (instruction, input, messages, system, task)"
            ) from exc
        except TemplateError as exc:
            raise UsageError(
                f"template {self.name!r} on {where}: {exc.message or type(exc).__name__}; fix the template "
                "or the record (variables: instruction, input, messages, system, task)"
            ) from exc
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise UsageError(f"template {self.name!r} on {where}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(text, str):
            raise UsageError(f"template {self.name!r} on {where}: rendered {type(text).__name__}, not text")
        return text

    def render_turns(
        self,
        turns: Sequence[dict],
        add_generation_prompt: bool,
        task: str | None = None,
        where: str = "a record",
    ) -> str:
        """Render a list of turns: a prompt (``add_generation_prompt``) or a whole conversation.

        ``instruction``/``input`` are the turns' instruction view (the last user turn, the others as
        ``role: content`` lines), for templates that read them too.
        """
        view = chat_fields([*turns, {"role": "assistant", "content": ""}] if add_generation_prompt else turns)
        context = prompt_context(view["instruction"], view["input"], turns, task, add_generation_prompt)
        return self.render(context, where=where)

    def as_manifest(self) -> dict[str, str]:
        out = {"name": self.name, "kind": self.kind, "sha256": self.sha256}
        if self.requested is not None:
            out["requested"] = self.requested
        return out


@dataclass(frozen=True)
class Conversation:
    """A conversation rendered for training: its text, and the character spans of the assistant turns that
    carry loss (each turn's content and its end-of-turn text, the EOS token after the last turn)."""

    text: str
    spans: list[tuple[int, int]]


def render_conversation(
    renderer: PromptRenderer,
    turns: Sequence[dict],
    eos_token: str | None = None,
    task: str | None = None,
    where: str = "a record",
    spans: bool = True,
) -> Conversation:
    """The text a conversation trains on, and where its assistant turns lie in it.

    Rendered prefix by prefix, which works for any template that renders a conversation as the text of
    its earlier turns followed by the new one: an assistant turn ``i`` starts where ``turns[:i]`` with the
    generation prompt ends, and ends where ``turns[:i + 1]`` ends, trailing whitespace excluded (so the
    span holds the content and the end-of-turn marker, e.g. ChatML's ``<|im_end|>`` without its line
    break). Turns with ``weight`` 0 get no span. The text stops at the end of the last assistant turn; when
    the template does not end that turn with ``eos_token``, the token is appended (and joins the last
    turn's span), as instruction rows end with EOS, so the trained model stops after its answer.

    Args:
        renderer: a template that renders conversations (:attr:`PromptRenderer.multi_turn`).
        turns: ``{"role", "content"[, "weight"]}``, ending with an assistant turn.
        eos_token: the tokenizer's EOS token, or None to append nothing.
        spans: False for the text only (one render), e.g. to count its tokens.

    Raises:
        UsageError: the template fails on the turns, or does not render them prefix by prefix (e.g. it adds
            its generation prompt whatever ``add_generation_prompt`` says); the message names ``where``.
    """
    if not renderer.multi_turn:
        raise UsageError(f"template {renderer.name!r} renders single prompts, not conversations")
    turns = list(turns)
    if not turns or turns[-1]["role"] != "assistant":
        raise UsageError(f"{where}: a conversation to train on must end with an assistant turn")
    full = renderer.render_turns(turns, add_generation_prompt=False, task=task, where=where)
    found: list[tuple[int, int]] = []
    if spans:
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = renderer.render_turns(turns[:i], add_generation_prompt=True, task=task, where=where)
            upto = renderer.render_turns(turns[: i + 1], add_generation_prompt=False, task=task, where=where)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise UsageError(
                    f"template {renderer.name!r} on {where}: turn {i} is not rendered after the turns "
                    "before it, so its place in the conversation cannot be found; a template must render "
                    "the generation prompt only when add_generation_prompt is true, and earlier turns the "
                    "same whatever follows them"
                )
            end = len(upto.rstrip())
            if turn.get("weight", 1) and end > len(before):
                found.append((len(before), end))
    text = full.rstrip()
    if eos_token and not text.endswith(eos_token):
        trained_last = bool(found) and found[-1][1] == len(text)
        text += eos_token
        if trained_last:
            found[-1] = (found[-1][0], len(text))
    return Conversation(text, found)


def sandbox():
    """The Jinja2 environment every non-tokenizer template runs in."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # keep_trailing_newline: the built-ins end in "\n" and must render it.
    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False
    )


def load_template(spec: str, tokenizer: Any = None) -> PromptRenderer:
    """Load a built-in template by name, or a Jinja2 template file by path.

    Args:
        spec: ``alpaca``, ``chatml``, ``chat_template`` or the path of a UTF-8 Jinja2 file.
        tokenizer: a loaded Hugging Face tokenizer; required for ``chat_template``. A tokenizer without
            a chat template gets ``chatml`` (named so, with ``requested="chat_template"``).

    Raises:
        UsageError: Unknown name/missing file, unreadable file, a syntax error (with its line), or
            ``chat_template`` without a tokenizer.
    """
    from jinja2.exceptions import TemplateSyntaxError

    if not spec:
        raise UsageError(f"empty prompt template; use one of {', '.join(BUILTIN_TEMPLATES)} or a file path")
    if spec == CHAT_TEMPLATE:
        if tokenizer is None:
            raise UsageError("template 'chat_template' uses the tokenizer's chat template: give a tokenizer")
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # several named templates: the default one is the chat template
            source = source.get("default")
        if not isinstance(source, str) or not source:
            return replace(_builtin("chatml"), requested=CHAT_TEMPLATE)
        return PromptRenderer(
            CHAT_TEMPLATE, "tokenizer", source, _sha256(source), multi_turn=True, _tokenizer=tokenizer
        )
    if spec in BUILTIN_SOURCES:
        source, kind = BUILTIN_SOURCES[spec], "builtin"
    else:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(
                f"unknown prompt template {spec!r}: not a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
                "and no such file"
            )
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read prompt template {path}: {exc}") from exc
        kind = "file"
    from jinja2 import meta

    env = sandbox()
    try:
        compiled = env.from_string(source)
        multi_turn = "messages" in meta.find_undeclared_variables(env.parse(source))
    except TemplateSyntaxError as exc:
        raise UsageError(f"template {spec!r}, line {exc.lineno}: syntax error: {exc.message}") from exc
    # The built-in alpaca renders through str.format, ~10x faster than Jinja on large corpora; the
    # tests hold both to the same bytes, and the manifest still pins the Jinja source.
    fast = _render_alpaca if spec == "alpaca" else None
    return PromptRenderer(
        spec, kind, source, _sha256(source), multi_turn=multi_turn, _compiled=compiled, _fast=fast
    )


def _render_alpaca(context: dict[str, Any]) -> str:
    return TEMPLATES["alpaca"].render(context["instruction"], context["input"])


@cache
def _builtin(name: str) -> PromptRenderer:
    return load_template(name)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
