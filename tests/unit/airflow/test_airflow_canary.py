"""The canary asks a registry version through the serving gateway (``airloom serve``'s engine and app, in
process), in the format the model trained on: its chat template for a chat model, the alpaca prompt of
the user turn for an instruction model; before promotion, with the test split's own prompts. A version
that answers nothing fails it, naming the prompts; the answers are written first either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.defaults import CANARY_PROMPTS
from airloom.airflow.operators.registry import CanaryOperator
from airloom.exceptions import UsageError
from airloom.prompts import BUILTIN_SOURCES, load_template, render_prompt


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


def silenced(folder: Path, dest: Path) -> Path:
    """A copy of ``folder``'s model whose every logit is 0: greedy decoding picks token 0, a special token
    (pad or unk) that decoding drops, so every answer is empty though the model loads and generates."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(folder, dest, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(dest)
    return dest


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


TEST_SPLIT = [
    {"instruction": "Write the number in words.", "input": "42", "response": "forty-two", "task": "number"},
    {"instruction": "Write the number in words.", "input": "7", "response": "seven", "task": "number"},
    {
        "instruction": "What is the last word?",
        "input": "apple river stone",
        "response": "stone",
        "task": "last",
    },
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the last word?\n\nsun moon"},
            {"role": "assistant", "content": "moon"},
        ],
        "task": "last",
    },
]


@pytest.fixture
def test_split(tmp_path) -> Path:
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TEST_SPLIT))
    return path


def test_dataset_prompts_take_each_task_in_turn():
    from airloom.serving.canary import dataset_prompts

    asked = dataset_prompts(TEST_SPLIT, limit=3)
    assert asked == [
        [{"role": "user", "content": "Write the number in words.\n\n42"}],
        [{"role": "user", "content": "What is the last word?\n\napple river stone"}],
        [{"role": "user", "content": "Write the number in words.\n\n7"}],
    ]
    # a conversation is asked its turns before the last assistant turn
    assert dataset_prompts(TEST_SPLIT[3:], limit=8) == [TEST_SPLIT[3]["messages"][:2]]
    with pytest.raises(UsageError, match="no record has a prompt"):
        dataset_prompts([{"response": "x"}])


def _registered(registry, folder, alias: str = "canary") -> int:
    version = registry.register("bot", folder, metadata={}, actor="trainer").version
    registry.set_alias("bot", alias, version, actor="reviewer")
    return version


def test_the_canary_asks_the_test_splits_prompts_through_the_gateway(
    registry, tiny_folder, test_split, context
):
    version = _registered(registry, tiny_folder)
    canary = CanaryOperator(
        task_id="canary", model_name="bot", alias="canary", version=version, dataset_file=str(test_split)
    )
    out = canary.execute(context)
    assert out["version"] == version and out["model"] == f"registry:bot/{version}"
    assert [row["prompt"] for row in out["outputs"]] == [
        render_prompt("Write the number in words.", "42"),
        render_prompt("What is the last word?", "apple river stone"),
        render_prompt("Write the number in words.", "7"),
        render_prompt("What is the last word?", "sun moon"),  # no chat template: alpaca of the user turn
    ]
    assert all(row["status"] == 200 and row["output"].strip() for row in out["outputs"])
    folder = Path(dict(context["ti"].pushed)["canary_report"]).parent
    # the gateway logged the canary's requests in the task's folder, not in the served traffic
    (log,) = (folder / "gateway" / "traffic").glob("ds=*/part-*.jsonl")
    assert len(log.read_text().splitlines()) == 4
    assert {json.loads(line)["model"] for line in log.read_text().splitlines()} == {f"bot/{version}"}
    assert json.loads((folder / "canary.json").read_text())["passed"] is True


def test_a_silent_model_fails_the_canary_naming_its_prompts(
    registry, tiny_folder, test_split, context, tmp_path
):
    good = _registered(registry, tiny_folder, alias="production")
    version = _registered(registry, silenced(tiny_folder, tmp_path / "silent"))
    canary = CanaryOperator(
        task_id="canary",
        model_name="bot",
        alias="canary",
        version=version,
        dataset_file=str(test_split),
        limit=2,
    )
    with pytest.raises(AirflowFailException) as failed:
        canary.execute(context)
    assert str(failed.value) == (
        f"canary: bot/{version} (bot@canary) empty output for every prompt through the serving path; failing "
        "prompts: 1. 'Write the number in words. 42': empty answer; 2. 'What is the last word? apple river "
        f"stone': empty answer; bot@production was not moved (it stays at version {good})"
    )
    page = Path(dict(context["ti"].pushed)["canary_report"])
    assert "empty output for every prompt" in page.read_text() and page.read_text().count("(empty)") == 2
    assert registry.get_alias("bot", "production") == good


def test_the_canary_checks_the_version_this_run_deployed(registry, tiny_folder, test_split, context):
    version = _registered(registry, tiny_folder)
    canary = CanaryOperator(
        task_id="canary", model_name="bot", alias="canary", version=version + 1, dataset_file=str(test_split)
    )
    with pytest.raises(
        AirflowFailException, match=f"bot@canary points to version {version}, not {version + 1}"
    ):
        canary.execute(context)
    assert context["ti"].pushed == []  # nothing was asked


def test_refused_requests_and_min_answered(registry, tiny_folder, test_split, context, tmp_path):
    """A prompt the gateway refuses (longer than the model's context) fails like an empty answer, with the
    gateway's error; ``min_answered`` asks for a share of the prompts."""
    version = _registered(registry, tiny_folder)
    prompts = ["Write the number in words.", "word " * 3000]
    canary = CanaryOperator(task_id="canary", model_name="bot", alias="canary", prompts=prompts)
    out = canary.execute(context)  # one of two answered: enough by default
    assert out["outputs"][1]["status"] == 400 and "context" in out["outputs"][1]["error"]
    strict = CanaryOperator(
        task_id="canary", model_name="bot", alias="canary", prompts=prompts, min_answered=1.0
    )
    with pytest.raises(
        AirflowFailException, match=r"answered 1 of 2, 2 needed .*2\. 'word word.*…': HTTP 400: "
    ):
        strict.execute(context)
    page = Path(dict(context["ti"].pushed)["canary_report"]).read_text()
    assert "(refused: HTTP 400:" in page and version == 1


def test_the_canary_needs_prompts_or_a_dataset():
    with pytest.raises(ValueError, match="canary: give the canary prompts or a dataset_file"):
        CanaryOperator(task_id="canary", model_name="bot")
