"""Conversations: the chat layouts Airloom reads, the checks a conversation must pass, and its
instruction view.

A conversation record holds ``messages``, a list of turns ``{"role", "content"}`` with roles
``system`` (optional, first), then ``user`` and ``assistant`` alternating, ending with an assistant
turn. OpenAI's fine-tuning files are read as they are (a turn's optional ``weight`` of 0 or 1 is
kept: 0 = do not train on this assistant turn); ShareGPT files (``conversations`` of
``{"from", "value"}`` with ``human``/``gpt``) are mapped onto the same shape. Another layout is named
with a field map (see :func:`layout_from_field_map`).

Findings name the turn as the source file spells it, e.g. ``conversations[3].value`` (0-based,
as ``jq`` and Python index), so the user can go straight to it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
#: Canonical targets of a field map that describe a chat layout (see :func:`layout_from_field_map`).
CHAT_TARGETS = ("messages", "role", "content", *ROLES)


@dataclass(frozen=True)
class ChatLayout:
    """Where a source row keeps its turns and how a turn spells its role and text."""

    name: str
    field: str  # key of the list of turns
    role_key: str = "role"
    content_key: str = "content"
    role_names: Mapping[str, str] = field(default_factory=dict)  # source role name -> role

    def role_of(self, name: str) -> str:
        return self.role_names.get(name, self.role_names.get(name.lower(), name))


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "assistant": "assistant",
    "system": "system",
}
LAYOUTS: dict[str, ChatLayout] = {
    "openai": ChatLayout("openai", "messages"),
    "sharegpt": ChatLayout("sharegpt", "conversations", "from", "value", _SHAREGPT_ROLES),
}


def detect_layout(objects: list[dict]) -> ChatLayout | None:
    """The chat layout most of ``objects`` (a file's first rows) follow, or None for instruction rows."""
    best, best_hits = None, 0
    for layout in LAYOUTS.values():
        hits = sum(1 for o in objects if _looks_like_turns(o.get(layout.field)))
        if hits > best_hits:
            best, best_hits = layout, hits
    return best if best_hits * 2 >= len(objects) and best_hits else None


def _looks_like_turns(value: Any) -> bool:
    if isinstance(value, str):  # a CSV cell holding the JSON list
        return value.lstrip().startswith("[")
    return isinstance(value, list)


def layout_from_field_map(field_map: Mapping[str, str]) -> ChatLayout | None:
    """A chat layout named by a field map, or None when the map names no chat field.

    ``{"dialog": "messages", "speaker": "role", "text": "content", "bot": "assistant"}`` reads turns
    from ``dialog``, each ``{"speaker", "text"}``, with role ``bot`` meaning ``assistant``. Keys that
    are left out take OpenAI's names (``role``, ``content``), or ShareGPT's when the list is
    ``conversations``; role names not mapped keep ShareGPT's and OpenAI's meanings.
    """
    by_target = {dst: src for src, dst in field_map.items()}
    if "messages" not in by_target:
        if set(by_target) & set(CHAT_TARGETS):
            named = ", ".join(f"{s}={d}" for s, d in field_map.items() if d in CHAT_TARGETS)
            raise ValueError(
                f"field map {named} describes chat turns but names no list of turns (KEY=messages)"
            )
        return None
    turns_key = by_target["messages"]
    base = LAYOUTS["sharegpt"] if turns_key == "conversations" else LAYOUTS["openai"]
    roles = {**_SHAREGPT_ROLES, **{src: dst for src, dst in field_map.items() if dst in ROLES}}
    return ChatLayout(
        "field_map",
        turns_key,
        by_target.get("role", base.role_key),
        by_target.get("content", base.content_key),
        roles,
    )


Problem = tuple[str, str, str]  # (key, check, message), key as the source spells it


def read_turns(value: Any, layout: ChatLayout) -> tuple[list[dict] | None, list[Problem]]:
    """The turns of one row's chat field, as ``{"role", "content"[, "weight"]}``, and what makes them
    unreadable (wrong types, missing keys); None when they cannot be read at all."""
    key = layout.field
    if isinstance(value, str) and value.lstrip().startswith("["):  # CSV: the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return None, [
                (key, "invalid_json", f"{key} is not a JSON list of turns ({exc.msg} at column {exc.colno})")
            ]
    if not isinstance(value, list):
        return None, [(key, "wrong_type", f"{key} must be a list of turns, got {type_name(value)}")]
    turns: list[dict] = []
    problems: list[Problem] = []
    for i, turn in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            problems.append(
                (
                    where,
                    "wrong_type",
                    f"{where} must be an object with {layout.role_key!r} and {layout.content_key!r}, got {type_name(turn)}",
                )
            )
            continue
        role, content = turn.get(layout.role_key), turn.get(layout.content_key)
        if not isinstance(role, str) or not role:
            what = "is missing" if layout.role_key not in turn else f"must be text, got {type_name(role)}"
            problems.append(
                (
                    f"{where}.{layout.role_key}",
                    "missing_field" if role is None else "wrong_type",
                    f"{where}.{layout.role_key} {what}",
                )
            )
            continue
        content = _text_of(content)
        if not isinstance(content, str):
            if content is None:
                check, what = "missing_field", f"{where}.{layout.content_key} is missing or null"
            else:
                check, what = (
                    "wrong_type",
                    f"{where}.{layout.content_key} must be text, got {type_name(content)}",
                )
            problems.append((f"{where}.{layout.content_key}", check, what))
            continue
        out = {"role": layout.role_of(role), "content": content}
        weight = turn.get("weight")
        if weight is not None:
            if weight not in (0, 1) or isinstance(weight, bool):
                problems.append(
                    (f"{where}.weight", "wrong_type", f"{where}.weight must be 0 or 1, got {weight!r}")
                )
                continue
            out["weight"] = int(weight)
        turns.append(out)
    return (None if problems else turns), problems


def _text_of(content: Any) -> Any:
    """OpenAI's content may be a list of parts; the text parts joined are the turn's text."""
    if (
        isinstance(content, list)
        and content
        and all(isinstance(p, dict) and p.get("type") == "text" for p in content)
    ):
        texts = [p.get("text") for p in content]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return content


def conversation_problems(turns: list[dict], layout: ChatLayout) -> list[Problem]:
    """What makes a readable conversation unfit for training, one problem per turn at fault.

    Checks: at least one turn; known roles; a system turn only first; user and assistant alternating
    after it, starting with user; the last turn an assistant turn; no empty turn.
    """
    key, role_key, content_key = layout.field, layout.role_key, layout.content_key
    if not turns:
        return [(key, "empty_conversation", f"{key} holds no turns")]
    problems: list[Problem] = []
    previous = None
    for i, turn in enumerate(turns):
        role, where = turn["role"], f"{key}[{i}]"
        if role not in ROLES:
            problems.append(
                (
                    f"{where}.{role_key}",
                    "unknown_role",
                    f"role {role!r} is not one of {', '.join(ROLES)}; map it with field_map (e.g. {role}=assistant)",
                )
            )
        elif role == "system" and i:
            problems.append(
                (f"{where}.{role_key}", "roles_not_alternating", "a system turn may only come first")
            )
            role = previous  # reported; the turns around it are judged as if it were not there
        elif role != "system":
            expected = "user" if previous in (None, "system", "assistant") else "assistant"
            if role != expected:
                after = (
                    f"after {previous!r}"
                    if previous not in (None, "system")
                    else "first (after an optional system turn)"
                )
                problems.append(
                    (
                        f"{where}.{role_key}",
                        "roles_not_alternating",
                        f"{role!r} turn where {expected!r} is expected {after}; user and assistant turns must alternate",
                    )
                )
        if not turn["content"].strip():
            problems.append((f"{where}.{content_key}", "empty_turn", f"the {turn['role']} turn is empty"))
        previous = role
    if turns[-1]["role"] in ("system", "user"):  # an unknown role was reported above
        last = len(turns) - 1
        problems.append(
            (
                f"{key}[{last}].{role_key}",
                "no_final_assistant",
                f"the conversation ends with a {turns[-1]['role']!r} turn; it must end with the assistant's answer",
            )
        )
    return problems


def longest_turns(turns: list[dict]) -> dict[str, tuple[int, int]]:
    """Role -> (characters, index) of its longest turn."""
    out: dict[str, tuple[int, int]] = {}
    for i, turn in enumerate(turns):
        n = len(turn["content"])
        if n > out.get(turn["role"], (-1, -1))[0]:
            out[turn["role"]] = (n, i)
    return out


def type_name(value: Any) -> str:
    """How a finding names the type of a value it did not expect (the loader's messages use it too)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
