"""The token counter carries the model folder's chat template, so EDA and validation count a
conversation's tokens as the model reads it; and every stage encodes without added special tokens."""

from __future__ import annotations

import copy
import json

import pytest

from airloom.tokens import encode, load_token_counter

# A template unlike ChatML: a long header before every turn, BOS and EOS from the special tokens.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}### turn of the {{ m.role }} speaker follows here\n"
    "{{ m.content }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}### assistant\n{% endif %}"
)
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris"},
]


@pytest.fixture(scope="module")
def tokenizer():
    from airloom.training.base import train_tokenizer

    return train_tokenizer(
        ["What is the capital of France? Paris. turn of the speaker follows here"] * 3, 300
    )


def _folder(tokenizer, tmp_path, template: str | None, where: str = "jinja"):
    """A saved tokenizer whose chat template is in ``chat_template.jinja`` or in tokenizer_config.json."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    folder = tmp_path / where
    tokenizer.save_pretrained(folder)
    if where == "config" and template:
        (folder / "chat_template.jinja").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = [
            {"name": "default", "template": template},
            {"name": "tool_use", "template": "x"},
        ]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("where", ["jinja", "config"])
def test_the_counter_carries_the_folders_chat_template(tokenizer, tmp_path, where):
    from transformers import AutoTokenizer

    folder = _folder(tokenizer, tmp_path, TEMPLATE, where)
    counter = load_token_counter(str(folder))
    assert type(counter.tokenizer).__module__.startswith("tokenizers")  # still the light way
    assert counter.chat_template == TEMPLATE
    assert (
        counter.special_tokens["bos_token"] == "<|bos|>" and counter.special_tokens["eos_token"] == "<|eos|>"
    )
    hf = AutoTokenizer.from_pretrained(folder)
    for generation in (False, True):
        ours = counter.apply_chat_template(TURNS, add_generation_prompt=generation)
        assert ours == hf.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=generation)
    assert ours.startswith("<|bos|>### turn of the user speaker") and ours.endswith("### assistant\n")

    assert load_token_counter(str(_folder(tokenizer, tmp_path / "none", None))).chat_template is None


def test_eda_counts_conversations_with_the_models_template(tokenizer, tmp_path):
    """The share of conversations longer than the context comes from the model's own template: between its
    count and ChatML's, the context is exceeded by one and not the other."""
    from airloom.data.eda import build_profile
    from airloom.prompts import load_template

    records = [{"id": str(i), "messages": TURNS, **_view()} for i in range(4)]
    counter = load_token_counter(str(_folder(tokenizer, tmp_path, TEMPLATE)))
    text = counter.apply_chat_template(TURNS)
    own, chatml = counter.lengths([text, load_template("chatml").render_turns(TURNS, False)])
    assert abs(chatml - own) > 4  # the tokenizer learnt the header's words; ChatML's markers are bytes
    counter.context = (chatml + own) // 2
    info = build_profile(records, tmp_path / "own", tokenizer=counter, languages=False)["conversations"][
        "tokens"
    ]
    assert info["template"]["name"] == "chat_template" and info["template"]["kind"] == "tokenizer"
    assert (info["rendered"]["max"], info["over_context_rate"]) == (own, float(own > counter.context))

    bare = load_token_counter(str(_folder(tokenizer, tmp_path / "bare", None)))
    bare.context = counter.context
    info = build_profile(records, tmp_path / "chatml", tokenizer=bare, languages=False)["conversations"][
        "tokens"
    ]
    assert (
        info["template"]["name"] == "chatml"
        and info["template"]["turn"] == "<|im_start|>{role}\n{content}<|im_end|>\n"
    )
    assert (info["rendered"]["max"], info["over_context_rate"]) == (chatml, float(chatml > bare.context))


def _view() -> dict:
    return {"instruction": TURNS[0]["content"], "input": "", "response": TURNS[1]["content"]}


def test_encode_adds_no_special_tokens(tokenizer):
    from tokenizers import processors

    with_bos = copy.deepcopy(tokenizer)
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", with_bos.bos_token_id)]
    )
    assert with_bos("Paris")["input_ids"][0] == with_bos.bos_token_id
    assert encode(with_bos, "Paris")["input_ids"] == tokenizer("Paris")["input_ids"]
    assert encode(with_bos, ["Paris", "France"])["input_ids"][1] == tokenizer("France")["input_ids"]


def test_counts_are_the_tokenizers_own(tokenizer, tmp_path):
    """The light counter (encode_batch_fast, without offsets) counts what the Hugging Face tokenizer
    encodes, over more texts than one batch."""
    folder = _folder(tokenizer, tmp_path, None)
    counter = load_token_counter(str(folder))
    texts = [f"What is the capital of France? {'Paris ' * (i % 7)}turn {i}" for i in range(600)] + ["", " "]
    assert counter.lengths(texts) == [len(ids) for ids in encode(tokenizer, texts)["input_ids"]]
    assert counter.lengths(texts)[0] > 0
