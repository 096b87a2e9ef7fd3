"""The embedded base model: a digit-splitting BPE tokenizer and a tiny Llama saved as an HF folder."""

from __future__ import annotations

import json

import pytest

from airloom.data.synth import pretraining_text, vocabulary_text
from airloom.training.base import SPECIAL_TOKENS, BaseModelSpec, build_base_model, train_tokenizer

TINY = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=128,
    pretrain_lines=200,
    batch_size=4,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(list(pretraining_text(300, seed=1)) + vocabulary_text(), vocab_size=320)


def test_digits_are_split_one_by_one(tokenizer):
    for number in ("342", "1990-04-17", "7 + 88"):
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(number, add_special_tokens=False)["input_ids"])
        digit_pieces = [p for p in pieces if any(ch.isdigit() for ch in p)]
        assert digit_pieces == [ch for ch in number if ch.isdigit()], (number, pieces)


def test_round_trip_decode(tokenizer):
    texts = [
        "### Instruction:\nAdd the two numbers.\n### Input:\n12 + 30\n### Response:\n42",
        "three hundred forty-two",
        "17 March 2004",
        "a b c d",
        "unseen wörds ünïcode ✓",
    ]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer):
    for attr, token in SPECIAL_TOKENS.items():
        assert getattr(tokenizer, attr) == token
        assert getattr(tokenizer, attr + "_id") is not None
    assert (
        len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id})
        == 4
    )
    assert len(tokenizer) <= 320


def test_saved_tokenizer_reloads_with_same_ids(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    samples = list(pretraining_text(20, seed=99)) + ["Write the number in words.\n905<|eos|>"]
    for text in samples:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.eos_token == SPECIAL_TOKENS["eos_token"]
    assert reloaded.pad_token_id == tokenizer.pad_token_id


def test_build_base_model_writes_a_loadable_folder(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "base"
    logs: list[str] = []
    info = build_base_model(out, BaseModelSpec(**TINY, pretrain_seconds=0), log=logs.append)
    assert info["pretrain_steps"] == 0 and info["final_loss"] is None
    assert info["params"] > 0
    assert json.loads((out / "airloom_base.json").read_text()) == info
    assert not (tmp_path / "base.tmp").exists()
    assert any("base model saved" in line for line in logs)

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    prompt = tok(
        "### Instruction:\nAdd the two numbers.\n### Input:\n1 + 2\n### Response:\n", return_tensors="pt"
    )
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert (
        gen.shape[0] == 1 and prompt["input_ids"].shape[1] < gen.shape[1] <= prompt["input_ids"].shape[1] + 5
    )
    assert gen[0, : prompt["input_ids"].shape[1]].tolist() == prompt["input_ids"][0].tolist()
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_rebuild_replaces_the_folder(tmp_path):
    out = tmp_path / "base"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    build_base_model(out, BaseModelSpec(**TINY, pretrain_seconds=0), log=lambda _: None)
    assert not (out / "stale.bin").exists()
    assert (out / "config.json").exists()


def test_pretraining_runs_steps(tmp_path):
    info = build_base_model(
        tmp_path / "base", BaseModelSpec(**TINY, pretrain_seconds=2, pretrain_max_steps=5), log=lambda _: None
    )
    assert 0 < info["pretrain_steps"] <= 5
    assert info["final_loss"] is not None and info["final_loss"] > 0
