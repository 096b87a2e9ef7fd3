"""Token counts for the data stage: the model's tokenizer, loaded the light way, and its context.

A folder with ``tokenizer.json`` (every fast Hugging Face tokenizer has one) is read with the
``tokenizers`` library alone, which imports in milliseconds; anything else (a slow tokenizer, a hub
id) goes through ``transformers.AutoTokenizer``. References are what the rest of Airloom takes: a
folder, ``registry:NAME[/N|@ALIAS]``, ``s3://`` or a hub id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airloom.exceptions import AirloomError, UsageError

_BATCH = 256  # texts per tokenizer call
# A model_max_length above this is transformers' "no limit" placeholder (int(1e30)), not a context.
_NO_CONTEXT = 10**7


@dataclass
class TokenCounter:
    """A tokenizer that counts tokens (no special tokens added), and the model's context in tokens."""

    ref: str | None
    context: int | None
    tokenizer: Any

    def lengths(self, texts: list[str]) -> list[int]:
        """Tokens of each text, in batches (an encoding holds tokens, offsets and masks: ~100 bytes a token)."""
        out: list[int] = []
        for i in range(0, len(texts), _BATCH):
            batch = texts[i : i + _BATCH]
            if hasattr(self.tokenizer, "encode_batch"):  # tokenizers.Tokenizer
                out += [len(enc.ids) for enc in self.tokenizer.encode_batch(batch, add_special_tokens=False)]
            else:
                out += [len(ids) for ids in self.tokenizer(batch, add_special_tokens=False)["input_ids"]]
        return out


def as_token_counter(tokenizer: Any) -> TokenCounter | None:
    """``tokenizer`` as a :class:`TokenCounter`: one already, a Hugging Face tokenizer or a
    ``tokenizers.Tokenizer`` (its context from ``model_max_length`` when it has one); None stays None."""
    if tokenizer is None or isinstance(tokenizer, TokenCounter):
        return tokenizer
    limit = getattr(tokenizer, "model_max_length", None)
    return TokenCounter(
        None, limit if isinstance(limit, int) and 0 < limit < _NO_CONTEXT else None, tokenizer
    )


def load_token_counter(ref: str) -> TokenCounter:
    """The tokenizer of ``ref`` (see the module docstring); a :class:`UsageError` names what is wrong."""
    from airloom.registry.resolve import resolve_model

    try:
        folder = Path(resolve_model(ref)["path"])
    except (ValueError, OSError, AirloomError) as exc:  # no such model or version, unreadable registry
        raise UsageError(f"cannot resolve tokenizer {ref!r}: {exc}") from exc
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - a broken file: say which
            raise UsageError(f"tokenizer {ref!r}: cannot read {folder / 'tokenizer.json'}: {exc}") from exc
        return TokenCounter(ref, _context(folder), tokenizer)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - not found, no network, bad files: all a usage problem here
        raise UsageError(
            f"cannot load tokenizer {ref!r} (a model folder, registry:NAME or hub id): {exc}"
        ) from exc
    counter = as_token_counter(tokenizer)
    return TokenCounter(ref, counter.context if counter.context is not None else _context(folder), tokenizer)


def _context(folder: Path) -> int | None:
    """The model's context from the folder's files: the tokenizer's ``model_max_length``, else the
    model config's ``max_position_embeddings``."""
    for name, key in (
        ("tokenizer_config.json", "model_max_length"),
        ("config.json", "max_position_embeddings"),
    ):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and 0 < value < _NO_CONTEXT:
            return value
    return None
