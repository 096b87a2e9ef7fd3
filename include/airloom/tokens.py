"""Token ids as the model sees them: how every stage encodes text, and the data stage's token counter
(the model's tokenizer loaded the light way, its context and its chat template).

Special tokens are settled once, in :func:`encode`: text is encoded without the tokenizer's own
special tokens (no BOS, no EOS) in training, evaluation, serving and token counts alike. The prompt
template is the one place a special token can come from: a chat template that writes ``{{ bos_token }}``
puts it in the text, and encoding that text gives its id once, where a tokenizer that also adds its own
would give it twice (Hugging Face's ``apply_chat_template`` encodes the same way).

A folder with ``tokenizer.json`` (every fast Hugging Face tokenizer has one) is read with the
``tokenizers`` library alone, which imports in milliseconds; anything else (a slow tokenizer, a hub
id) goes through ``transformers.AutoTokenizer``. References are what the rest of Airloom takes: a
folder, ``registry:NAME[/N|@ALIAS]``, ``s3://`` or a hub id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airloom.exceptions import AirloomError, UsageError

_BATCH = 256  # texts per tokenizer call
# A model_max_length above this is transformers' "no limit" placeholder (int(1e30)), not a context.
_NO_CONTEXT = 10**7
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def encode(tokenizer: Any, text: str | list[str], **kwargs: Any) -> Any:
    """``tokenizer(text, **kwargs)`` without the tokenizer's own special tokens: the ids a prompt or an
    answer has in training (``airloom.training.recipe.tokenize_examples``), so evaluation and serving feed
    the model the ids it was trained on (see the module docstring)."""
    return tokenizer(text, add_special_tokens=False, **kwargs)


@dataclass
class TokenCounter:
    """A tokenizer that counts tokens (no special tokens added), the model's context in tokens, and the
    model folder's chat template (None when it has none).

    It renders conversations as a Hugging Face tokenizer does (:meth:`apply_chat_template`), so
    ``airloom.prompts.load_template("chat_template", tokenizer=counter)`` gives the model's own
    template also where the tokenizer was loaded without transformers.
    """

    ref: str | None
    context: int | None
    tokenizer: Any
    chat_template: str | None = None
    #: ``bos_token``, ``eos_token``... as text: what a chat template reads besides the messages
    special_tokens: dict[str, str] = field(default_factory=dict)

    def lengths(self, texts: list[str]) -> list[int]:
        """Tokens of each text, in batches (an encoding holds tokens, offsets and masks: ~100 bytes a token)."""
        out: list[int] = []
        for i in range(0, len(texts), _BATCH):
            batch = texts[i : i + _BATCH]
            if hasattr(self.tokenizer, "encode_batch"):  # tokenizers.Tokenizer
                # encode_batch_fast (tokenizers >= 0.21) skips the offsets: the same ids for ~2/3 the CPU
                batch_encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
                out += [len(enc.ids) for enc in batch_encode(batch, add_special_tokens=False)]
            else:
                out += [len(ids) for ids in encode(self.tokenizer, batch)["input_ids"]]
        return out

    def apply_chat_template(
        self, conversation: list[dict], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        """The conversation rendered with :attr:`chat_template`, as Hugging Face renders it (the same
        Jinja environment and variables); text only.

        Raises:
            ValueError: no chat template, or ``tokenize``; the template's own errors pass through.
        """
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.ref or ''!r} has no chat template")
        if tokenize:
            raise ValueError("a TokenCounter renders text only: count its tokens with lengths()")
        if hasattr(self.tokenizer, "apply_chat_template"):  # a Hugging Face tokenizer renders its own
            return self.tokenizer.apply_chat_template(
                conversation,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        # Imported here: transformers takes seconds to import, and only a chat template needs it.
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[conversation],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )
        return rendered[0]


def as_token_counter(tokenizer: Any) -> TokenCounter | None:
    """``tokenizer`` as a :class:`TokenCounter`: one already, a Hugging Face tokenizer or a
    ``tokenizers.Tokenizer`` (its context from ``model_max_length`` when it has one); None stays None."""
    if tokenizer is None or isinstance(tokenizer, TokenCounter):
        return tokenizer
    limit = getattr(tokenizer, "model_max_length", None)
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates: the default one renders chats
        source = source.get("default")
    special = getattr(tokenizer, "special_tokens_map", None) or {}
    return TokenCounter(
        None,
        limit if isinstance(limit, int) and 0 < limit < _NO_CONTEXT else None,
        tokenizer,
        source if isinstance(source, str) and source else None,
        {k: v for k, v in special.items() if k in _SPECIAL_TOKENS and isinstance(v, str)},
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
        return TokenCounter(ref, _context(folder), tokenizer, *_chat_template(folder))
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - not found, no network, bad files: all a usage problem here
        raise UsageError(
            f"cannot load tokenizer {ref!r} (a model folder, registry:NAME or hub id): {exc}"
        ) from exc
    counter = as_token_counter(tokenizer)
    counter.ref = ref
    if counter.context is None:
        counter.context = _context(folder)
    return counter


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


def _chat_template(folder: Path) -> tuple[str | None, dict[str, str]]:
    """The folder's chat template and special tokens, read as ``AutoTokenizer`` reads them:
    ``chat_template.jinja`` (what ``save_pretrained`` writes), else ``tokenizer_config.json``'s
    ``chat_template`` (text, or named templates of which ``default`` renders chats)."""
    config: dict = {}
    special: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
        try:
            loaded = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(loaded, dict):
            continue
        config = loaded if name == "tokenizer_config.json" else config
        for key in _SPECIAL_TOKENS:
            value = loaded.get(key)
            value = value.get("content") if isinstance(value, dict) else value  # an AddedToken's fields
            if isinstance(value, str):
                special[key] = value
    try:
        return (folder / "chat_template.jinja").read_text(encoding="utf-8"), special
    except (OSError, UnicodeDecodeError):
        pass
    source = config.get("chat_template")
    if isinstance(source, list):
        source = next(
            (t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None
        )
    return (source if isinstance(source, str) and source else None), special
