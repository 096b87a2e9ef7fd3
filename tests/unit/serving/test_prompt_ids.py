"""One template, no skew: the token ids serving and evaluation feed the model for a prompt are the ids
training used for the same prompt, for a multi-turn conversation and an instruction row, with the
project's own tokenizer (``airloom.training.base.train_tokenizer``) and with one that adds a BOS token
by itself (where an encoder that adds special tokens would differ from training).

The model is a stand-in that records what ``generate`` is given, so no weights are needed.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

TURNS = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome"},
]
CORPUS = [
    "What is the capital of France? Paris. And of Italy? Rome. Answer in one word.",
    "### Instruction:\nWrite the number in words.\n### Input:\n42\n### Response:\nforty-two",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def tokenizers():
    """The project's tiny tokenizer, and a copy whose post-processor puts BOS before every text."""
    from tokenizers import processors

    from airloom.training.base import train_tokenizer

    plain = train_tokenizer(CORPUS * 3, 300)
    with_bos = copy.deepcopy(plain)
    bos = with_bos.bos_token
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, with_bos.bos_token_id)]
    )
    # the check can fail: this tokenizer adds BOS unless told not to
    assert with_bos("Paris")["input_ids"][0] == with_bos.bos_token_id != plain("Paris")["input_ids"][0]
    return {"plain": plain, "bos": with_bos}


class Recorder:
    """A model that records the unpadded ids of each row ``generate`` gets, and answers EOS."""

    def __init__(self, eos_id: int) -> None:
        import torch

        self.eos_id = eos_id
        self.seen: list[list[int]] = []
        self.config = SimpleNamespace(max_position_embeddings=1024)
        self.generation_config = SimpleNamespace(eos_token_id=eos_id)
        self._param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self._param

    def generate(self, input_ids, attention_mask, **kwargs):
        import torch

        for row, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            self.seen.append([t for t, m in zip(row, mask, strict=True) if m])
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), self.eos_id)], dim=1)


def _trained(tokenizer, rows, tmp_path):
    """What training does with ``rows``: its template (installed as the tokenizer's chat template, as
    the recipe does before saving the model folder) and its (input_ids, labels)."""
    from airloom.training.recipe import chat_renderer, tokenize_examples

    renderer = chat_renderer(SimpleNamespace(train_file=str(tmp_path / "train.parquet")), tokenizer, rows)
    return tokenize_examples(rows, tokenizer, 1024, renderer)


def _saved_and_loaded(tokenizer, tmp_path):
    """The tokenizer as serving loads it from the model folder training saved."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "model")
    return AutoTokenizer.from_pretrained(tmp_path / "model")


def _served_ids(tokenizer, prompt: str) -> tuple[list[int], int]:
    """The ids the serving engine feeds the model for ``prompt``, and the prompt tokens it reports."""
    from airloom.serving.engine import GenRequest, LoadedModel, generate_rows

    model = Recorder(tokenizer.eos_token_id)
    loaded = LoadedModel("tiny", 1, "unused", model, tokenizer, counting_tokenizer=copy.deepcopy(tokenizer))
    (result,) = generate_rows(loaded, [GenRequest(prompt, max_tokens=4, temperature=0)])
    return model.seen[0], result.prompt_tokens


@pytest.mark.parametrize("kind", ["plain", "bos"])
def test_served_chat_prompt_ids_are_the_training_prefix(tokenizers, tmp_path, kind):
    from airloom.evaluation.generation import generate
    from airloom.serving.app import ChatMessage, render_chat

    tokenizer = copy.deepcopy(tokenizers[kind])
    row = {"id": "c1", "prompt": "unused", "response": "Rome", "messages": TURNS}
    ((ids, labels),) = _trained(tokenizer, [row], tmp_path)
    # the prefix before the last assistant turn: every label after it belongs to that turn
    start = max(i for i, label in enumerate(labels) if label == -100) + 1
    prefix = ids[:start]
    assert tokenizer.decode(ids[start:], skip_special_tokens=True).startswith("Rome<|im_end|>")
    assert tokenizer.bos_token_id not in prefix  # training adds no special tokens

    served = _saved_and_loaded(tokenizer, tmp_path)
    assert served.chat_template == tokenizer.chat_template  # the model folder carries its template
    prompt = render_chat([ChatMessage(**t) for t in TURNS[:-1]], served)
    assert _served_ids(served, prompt) == (prefix, len(prefix))
    # evaluation feeds the same ids
    model = Recorder(served.eos_token_id)
    generate(model, served, [prompt], max_new_tokens=2)
    assert model.seen == [prefix]


@pytest.mark.parametrize("kind", ["plain", "bos"])
def test_instruction_prompt_ids_are_the_training_prompt(tokenizers, tmp_path, kind):
    from airloom.prompts import render_prompt
    from airloom.serving.app import ChatMessage, render_chat

    tokenizer = copy.deepcopy(tokenizers[kind])
    prompt = render_prompt("Write the number in words.", "42")
    ((ids, labels),) = _trained(tokenizer, [{"prompt": prompt, "response": "forty-two"}], tmp_path)
    trained_prompt = ids[: labels.index(next(x for x in labels if x != -100))]
    assert tokenizer.chat_template is None  # no conversations: the folder carries no chat template

    served = _saved_and_loaded(tokenizer, tmp_path)
    assert _served_ids(served, prompt) == (trained_prompt, len(trained_prompt))  # /v1/completions
    # /v1/chat/completions on a model without a chat template: the alpaca prompt of the user turn
    chat = render_chat([ChatMessage(role="user", content="Write the number in words.\n\n42")], served)
    assert chat == prompt and _served_ids(served, chat)[0] == trained_prompt


def test_chat_answers_stop_at_the_templates_end_of_turn(tokenizers):
    """A model trained on ChatML writes "<|im_end|>" before EOS; as plain text to this tokenizer it would
    end every answer, so serving stops there (and a model without a chat template has no such stop)."""
    from airloom.prompts import BUILTIN_SOURCES
    from airloom.serving.engine import GenRequest, LoadedModel, _finish

    chat_tok = copy.deepcopy(tokenizers["plain"])
    chat_tok.chat_template = BUILTIN_SOURCES["chatml"]
    loaded = LoadedModel("tiny", 1, "unused", None, chat_tok)
    assert loaded.turn_end == "<|im_end|>"
    assert LoadedModel("tiny", 1, "unused", None, tokenizers["plain"]).turn_end == ""
    answer = chat_tok("Rome<|im_end|>\n", add_special_tokens=False)["input_ids"]
    result = _finish(chat_tok, GenRequest("p", 16, stop=(loaded.turn_end,)), answer, set(), 3)
    assert (result.text, result.finish_reason) == ("Rome", "stop")
