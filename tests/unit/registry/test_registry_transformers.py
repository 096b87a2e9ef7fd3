"""A downloaded version is a folder transformers can load (tiny randomly initialised GPT-2, offline)."""

from __future__ import annotations

import pytest

from airloom.registry.registry import ModelRegistry


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(folder)
    return model, folder


def test_download_loads_with_from_pretrained(store, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model, folder = tiny_model
    reg = ModelRegistry(store)
    reg.register("tiny-gpt2", folder, metadata={"base_model": "gpt2"}, actor="ci")
    reg.set_alias("tiny-gpt2", "production", 1, actor="alice")
    dest = reg.download("tiny-gpt2", reg.resolve("tiny-gpt2@production").version, tmp_path / "serve")
    loaded = AutoModelForCausalLM.from_pretrained(dest)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
