"""The canary asks the deployed model in the format it trained on: its chat template for a chat model,
the alpaca prompt of the user turn for an instruction model, from the same default conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.defaults import CANARY_PROMPTS
from airloom.airflow.operators.registry import CanaryOperator
from airloom.data.prompts import BUILTIN_SOURCES, load_template, render_prompt


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with the project's tokenizer (no chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from airloom.training.base import train_tokenizer

    out = tmp_path_factory.mktemp("canary_model")
    tok = train_tokenizer(["Write the number in words. 42 forty-two", "What is the last word?"] * 3, 300)
    tok.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _canary_prompts(registry, folder, context, chat_template: str | None) -> list[str]:
    import shutil

    from transformers import AutoTokenizer

    model = folder.parent / f"{folder.name}-{'chat' if chat_template else 'plain'}"
    shutil.copytree(folder, model, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = chat_template
    tok.save_pretrained(model)
    version = registry.register("bot", model, metadata={}, actor="test").version
    registry.set_alias("bot", "production", version, actor="test")
    try:
        CanaryOperator(task_id="canary", model_name="bot", prompts=CANARY_PROMPTS).execute(context)
    except AirflowFailException:  # a random model may say nothing; the answers are written first
        pass
    (report,) = [v for k, v in context["ti"].pushed if k == "canary_report"]
    written = json.loads((Path(report).parent / "canary.json").read_text())
    assert written["model"] == f"registry:bot/{version}" and len(written["outputs"]) == len(CANARY_PROMPTS)
    return [row["prompt"] for row in written["outputs"]]


def test_an_instruction_model_gets_alpaca_prompts(registry, tiny_folder, context):
    prompts = _canary_prompts(registry, tiny_folder, context, None)
    assert prompts == [
        render_prompt("Write the number in words.", "42"),
        render_prompt("Write the date in words.", "2026-03-14"),
        render_prompt("What is the last word?", "apple river stone"),
    ]
    assert all(p.endswith("### Response:\n") for p in prompts)


def test_a_chat_model_gets_its_chat_template(registry, tiny_folder, context):
    prompts = _canary_prompts(registry, tiny_folder, context, BUILTIN_SOURCES["chatml"])
    chatml = load_template("chatml")
    assert prompts == [chatml.render_turns(turns, add_generation_prompt=True) for turns in CANARY_PROMPTS]
    assert (
        prompts[0] == "<|im_start|>user\nWrite the number in words.\n\n42<|im_end|>\n<|im_start|>assistant\n"
    )
