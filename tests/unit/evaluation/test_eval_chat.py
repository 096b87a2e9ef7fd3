"""Evaluation of conversations: the last assistant turn is generated from the earlier turns rendered with
the template training used, stops where the template ends a turn, and its perplexity is over the tokens
training puts loss on; instruction rows are evaluated as before."""

from __future__ import annotations

import json
import logging

import pytest

from airloom.data.splits import read_jsonl, read_split
from airloom.evaluation.chat import answer_example, dataset_template, turn_end
from airloom.evaluation.generation import example_perplexity, generate
from airloom.evaluation.harness import evaluate_model
from airloom.exceptions import UsageError
from airloom.prompts import load_template, render_prompt

COUNTRIES = ["France", "Italy", "Spain", "Peru", "Chile", "Japan", "Kenya", "Egypt", "Nepal", "Cuba"]
CAPITALS = ["Paris", "Rome", "Madrid", "Lima", "Santiago", "Tokyo", "Nairobi", "Cairo", "Kathmandu", "Havana"]


def _chat(i: int) -> dict:
    """A conversation of two exchanges (every third with a system turn), distinct per ``i``."""
    a, b = i % len(COUNTRIES), (i * 3 + 1) % len(COUNTRIES)
    turns = [
        {"role": "user", "content": f"What is the capital of {COUNTRIES[a]}? (question {i})"},
        {"role": "assistant", "content": CAPITALS[a]},
        {"role": "user", "content": f"And of {COUNTRIES[b]}?"},
        {"role": "assistant", "content": CAPITALS[b]},
    ]
    if i % 3 == 0:
        turns.insert(0, {"role": "system", "content": "Answer with the city only."})
    return {"id": f"c{i}", "messages": turns, "task": "qa"}


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_prepared_conversations_are_rendered_as_training_rendered_them(
    template, tiny_model_dir, tiny_model, tmp_path
):
    from airloom.data.prepare import prepare

    prepare(
        [_chat(i) for i in range(24)], tmp_path / "ds", template=template, test_fraction=0.5, near_dedup=None
    )
    test_file = tmp_path / "ds" / "test.parquet"
    rows = read_split(test_file)
    assert len(rows) >= 6 and all(len(r["messages"]) >= 4 for r in rows)

    metrics = evaluate_model(
        tiny_model_dir, rows, tmp_path / "eval", max_new_tokens=6, dataset_file=test_file
    )
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert metrics["n"] == len(rows) and [p["id"] for p in predictions] == [r["id"] for r in rows]
    # the earlier turns rendered with the dataset's template: the prompt preparation rendered for training
    assert [p["prompt"] for p in predictions] == [r["prompt"] for r in rows]
    opening = "<|im_start|>" if template == "chatml" else "### Instruction:\n"
    assert all(p["prompt"].startswith(opening) for p in predictions)
    first = rows[0]["messages"]
    if template == "chatml":  # every earlier turn, the earlier answer too, then the generation prompt
        assert f"<|im_start|>assistant\n{first[-3]['content']}<|im_end|>\n" in predictions[0]["prompt"]
        assert predictions[0]["prompt"].endswith(f"{first[-2]['content']}<|im_end|>\n<|im_start|>assistant\n")
    else:  # single-turn: the last question is the instruction, the earlier turns its input
        assert predictions[0]["prompt"] == render_prompt(
            first[-2]["content"], "\n".join(f"{t['role']}: {t['content']}" for t in first[:-2])
        )
    assert [p["reference"] for p in predictions] == [r["messages"][-1]["content"] for r in rows]
    # ChatML answers end where the template ends a turn; alpaca ones where the next section starts
    model, tokenizer = tiny_model
    stops = ["<|im_end|>"] if template == "chatml" else ["\n### "]
    expected = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=6, stop_strings=stops)
    assert [p["prediction"] for p in predictions] == expected
    assert metrics["aggregate"]["perplexity"] > 1 and set(metrics["by_task"]) == {"qa"}


def test_answer_tokens_are_those_training_puts_loss_on(tiny_model):
    """Perplexity scores the last answer's tokens exactly as training labels them: a conversation whose
    earlier answers have weight 0 trains on the last one only, and an instruction row on its response."""
    from airloom.training.chat import chat_example
    from airloom.training.recipe import tokenize_examples

    _, tokenizer = tiny_model
    turns = _chat(3)["messages"]
    chatml = load_template("chatml")
    only_last = [{**t, "weight": 0} if t["role"] == "assistant" else t for t in turns[:-1]] + turns[-1:]
    trained, outcome = chat_example(only_last, chatml, tokenizer, 1024)
    prompt = chatml.render_turns(turns[:-1], add_generation_prompt=True)
    ours = answer_example(tokenizer, prompt, turns[-1]["content"], turns[:-1], chatml)
    assert outcome == "kept" and ours == trained
    assert tokenizer.decode([t for t in ours[1] if t != -100]) == f"{turns[-1]['content']}<|im_end|></s>"

    prompt = render_prompt("Name a primary colour.")
    (trained,) = tokenize_examples([{"prompt": prompt, "response": "Red"}], tokenizer, 1024)
    assert answer_example(tokenizer, prompt, "Red") == trained


def test_mixed_rows_each_in_their_format(tiny_model_dir, tiny_model, tmp_path):
    """Instruction rows keep their prompt and the alpaca stop; chat rows (no dataset: the model's chat
    template, here ChatML as it has none) stop at the turn's end, and perplexity is over both."""
    model, tokenizer = tiny_model
    instruction = {"id": "i1", "prompt": render_prompt("Name a primary colour."), "response": "Red"}
    chat = _chat(1)
    request = {"id": "r1", "messages": chat["messages"][:-1], "response": "Santiago"}  # answer apart
    metrics = evaluate_model(tiny_model_dir, [instruction, chat, request], tmp_path, max_new_tokens=6)
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    chatml = load_template("chatml")
    prompt = chatml.render_turns(chat["messages"][:-1], add_generation_prompt=True)
    assert [r["prompt"] for r in rows] == [instruction["prompt"], prompt, prompt]
    assert [r["reference"] for r in rows] == ["Red", chat["messages"][-1]["content"], "Santiago"]
    assert (
        rows[0]["prediction"]
        == generate(model, tokenizer, [instruction["prompt"]], max_new_tokens=6, stop_strings=["\n### "])[0]
    )
    assert (
        rows[1]["prediction"]
        == generate(model, tokenizer, [prompt], max_new_tokens=6, stop_strings=["<|im_end|>"])[0]
    )
    examples = [
        answer_example(tokenizer, instruction["prompt"], "Red"),
        answer_example(tokenizer, prompt, chat["messages"][-1]["content"], chat["messages"][:-1], chatml),
        answer_example(tokenizer, prompt, "Santiago", chat["messages"][:-1], chatml),
    ]
    assert metrics["aggregate"]["perplexity"] == pytest.approx(
        example_perplexity(model, tokenizer, examples, 32)
    )
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 3


def test_chat_records_are_checked(tiny_model_dir, tmp_path):
    turns = _chat(2)["messages"]
    with pytest.raises(UsageError, match="record 0: missing field 'id'"):
        evaluate_model(tiny_model_dir, [{"messages": turns}], tmp_path)
    with pytest.raises(
        UsageError, match=r"record 0 \(id 'x'\): 'messages' must end with the assistant's answer"
    ):
        evaluate_model(tiny_model_dir, [{"id": "x", "messages": turns[:-1]}], tmp_path)
    with pytest.raises(UsageError, match=r"every turn of 'messages' needs a 'role' and a text 'content'"):
        evaluate_model(tiny_model_dir, [{"id": "x", "messages": [{"role": "user"}]}], tmp_path)


def test_turn_end_of_templates(tmp_path):
    assert turn_end(load_template("chatml")) == "<|im_end|>"
    assert turn_end(load_template("alpaca")) == ""  # single-turn: the answer ends with EOS
    assert turn_end(None) == ""
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }} [end]\n\n{% endfor %}")
    assert turn_end(load_template(str(custom))) == "[end]"


def test_dataset_template_follows_the_manifest_and_falls_back(tiny_model, tmp_path, caplog):
    _, tokenizer = tiny_model
    split = tmp_path / "test.parquet"
    assert dataset_template(None, tokenizer).name == "chatml"  # no chat template: ChatML, as training
    assert dataset_template(split, tokenizer).name == "chatml"  # no manifest beside it
    manifest = {"template": {"name": "alpaca", "kind": "builtin", "sha256": load_template("alpaca").sha256}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert dataset_template(split, tokenizer).name == "alpaca"
    # prepared with a chat template this model's tokenizer lacks (a baseline): its own, with a warning
    manifest["template"] = {"name": "chat_template", "kind": "tokenizer", "sha256": "0" * 64}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="airloom.evaluation.chat"):
        assert dataset_template(split, tokenizer).name == "chatml"
    assert "prepared with a tokenizer's chat template" in caplog.text
