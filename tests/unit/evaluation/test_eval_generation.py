from __future__ import annotations

import json
import math

import pytest
import torch

from airloom.data.splits import read_jsonl
from airloom.evaluation.generation import generate, load_model, perplexity
from airloom.evaluation.harness import evaluate_model
from airloom.exceptions import UsageError

PROMPTS = [
    "### Instruction:\nWhat is the capital of France?\n### Response:\n",
    "Red",
    "The quick brown fox jumps over",
    "One two",
    "Airflow schedules tasks; models answer questions about the",
]


def test_load_model_gives_eval_mode_float32(tiny_model):
    model, tokenizer = tiny_model
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == "</s>"


def test_load_model_in_bf16_halves_the_weights_and_still_generates(tiny_model_dir):
    import torch

    model, tokenizer = load_model(tiny_model_dir, "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    [answer] = generate(model, tokenizer, ["Reverse the word.\n\nriver"], max_new_tokens=4)
    assert isinstance(answer, str)
    model.save_pretrained(tiny_model_dir.parent / "bf16")
    tokenizer.save_pretrained(tiny_model_dir.parent / "bf16")
    auto, _ = load_model(tiny_model_dir.parent / "bf16", "auto")  # the dtype it was saved in
    assert next(auto.parameters()).dtype == torch.bfloat16
    assert next(load_model(tiny_model_dir, "auto")[0].parameters()).dtype == torch.float32
    with pytest.raises(UsageError, match="evaluation precision 'int3' is not one of"):
        load_model(tiny_model_dir, "int3")


def test_load_model_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        load_model(tmp_path)


def test_batched_greedy_equals_one_at_a_time_and_keeps_order(tiny_model):
    model, tokenizer = tiny_model
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1  # a model that says the same thing everywhere proves nothing about order
    reversed_out = generate(model, tokenizer, PROMPTS[::-1], max_new_tokens=8, batch_size=64)
    assert reversed_out == batched[::-1]
    assert tokenizer.pad_token == tokenizer.eos_token  # no pad token: eos stands in


def test_generation_stops_at_stop_strings(tiny_model):
    model, tokenizer = tiny_model
    full = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=12)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()
    cut = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=12, stop_strings=["zzz-never", stop])[0]
    assert cut == full[: full.find(stop)].strip()


def test_generation_stops_at_eos(tiny_model):
    model, tokenizer = tiny_model
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new_ids = out[0, enc["input_ids"].shape[1] :].tolist()
    stop_id = new_ids[3]
    expected = tokenizer.decode(new_ids[: new_ids.index(stop_id)], skip_special_tokens=True).strip()
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_id]  # pretend that token is eos
    try:
        got = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=6)[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert got == expected


def test_perplexity_scores_only_response_tokens(tiny_model):
    model, tokenizer = tiny_model
    responses = ["Paris", "Blue and green", "the lazy dog", "three", "weather"]
    ppl = perplexity(model, tokenizer, PROMPTS, responses, batch_size=2)
    assert math.isfinite(ppl) and ppl > 1
    # Same value one example at a time: right padding must not leak into the score.
    assert perplexity(model, tokenizer, PROMPTS, responses, batch_size=1) == pytest.approx(ppl, rel=1e-4)

    # Hand-computed NLL over response tokens (+ eos) only.
    nll, count = 0.0, 0
    for prompt, response in zip(PROMPTS, responses, strict=True):
        p = tokenizer(prompt)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].float(), dim=-1)
        for j, tok in enumerate(r):
            nll -= logp[len(p) + j - 1, tok].item()
            count += 1
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_perplexity_rejects_mismatched_inputs(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(UsageError, match="2 prompts but 1 responses"):
        perplexity(model, tokenizer, ["a", "b"], ["x"])


def _records():
    return [
        {"id": f"r{i}", "prompt": p, "response": r, **({"task": t} if t else {})}
        for i, (p, r, t) in enumerate(
            zip(
                PROMPTS,
                ["Paris", "Blue", "the lazy dog", "three", "weather"],
                ["qa", "qa", "complete", None, "qa"],
                strict=True,
            )
        )
    ]


def test_harness_writes_predictions_and_metrics(tiny_model_dir, tiny_model, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate_model(tiny_model_dir, _records(), out, max_new_tokens=6, batch_size=2)

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["model"] == str(tiny_model_dir)
    assert metrics["n"] == 5
    assert set(metrics["aggregate"]) == {
        "exact_match",
        "f1",
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "bleu",
        "chrf",
        "perplexity",
    }
    assert metrics["aggregate"]["perplexity"] > 1
    assert metrics["by_task"]["qa"]["n"] == 3
    assert metrics["by_task"]["default"]["n"] == 1
    assert set(metrics["by_task"]["complete"]) == {"exact_match", "f1", "n"}
    assert metrics["seconds"] > 0

    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]
    # Every per-example score is kept, so two models can be compared example by example.
    assert set(rows[0]) == {
        "id",
        "task",
        "prompt",
        "prediction",
        "reference",
        "exact_match",
        "f1",
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
    }
    model, tokenizer = tiny_model
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=6, stop_strings=["\n### "])
    assert [r["prediction"] for r in rows] == expected
    assert rows[2]["reference"] == "the lazy dog"


def test_harness_limit_and_record_checks(tiny_model_dir, tmp_path):
    metrics = evaluate_model(tiny_model_dir, _records(), tmp_path / "a", max_new_tokens=2, limit=2)
    assert metrics["n"] == 2
    assert len(read_jsonl(tmp_path / "a" / "predictions.jsonl")) == 2
    bad = _records()
    del bad[1]["response"]
    with pytest.raises(UsageError, match="record 1: missing field 'response'"):
        evaluate_model(tiny_model_dir, bad, tmp_path / "b")
    with pytest.raises(UsageError, match="evaluation set is empty"):
        evaluate_model(tiny_model_dir, [], tmp_path / "c")
