"""A tiny random Llama model and BPE tokenizer, built once per session and saved like a real model."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = [
    "### Instruction:\nWhat is the capital of France?\n### Response:\nParis",
    "### Instruction:\nName a primary colour.\n### Response:\nRed",
    "The quick brown fox jumps over the lazy dog.",
    "Airflow schedules tasks; models answer questions about the weather and the sea.",
    "One two three four five six seven eight nine ten.",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(CORPUS * 4, trainer=trainer)
    # No pad token on purpose: generation must fall back to eos, as with most base models.
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,  # larger than usual, so greedy argmax has clear winners
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from airloom.evaluation.generation import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for the module: on a shared 2-core machine, tiny models train and generate
    15x slower with 2 threads than with 1 (the threads spin waiting for each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
