"""The recipe's pure pieces: loss masking, padding, the shared batch stream and the LR schedule."""

from __future__ import annotations

import itertools

import pytest

from airloom.exceptions import UsageError
from airloom.training.recipe import collate, global_batches, lr_lambda, read_examples, tokenize_examples


@pytest.fixture(scope="module")
def tokenizer():
    from airloom.training.base import train_tokenizer

    lines = [
        "### Instruction:\nAdd the two numbers.\n### Input:\n12 + 30\n### Response:\n42",
        "Write the number in words. three hundred forty-two",
        "Sort the letters. a b c",
    ] * 20
    return train_tokenizer(lines, vocab_size=300)


ROWS = [
    {
        "prompt": "### Instruction:\nAdd the two numbers.\n### Input:\n12 + 30\n### Response:\n",
        "response": "42",
    },
    {"prompt": "### Instruction:\nSort the letters.\n### Response:\n", "response": "a b c"},
]


def test_prompt_tokens_are_masked_and_response_plus_eos_kept(tokenizer):
    examples = tokenize_examples(ROWS, tokenizer, max_length=128)
    assert len(examples) == 2
    for row, (ids, labels) in zip(ROWS, examples, strict=True):
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        r = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        assert len(ids) == len(labels) == len(p) + len(r) + 1
        assert ids == p + r + [tokenizer.eos_token_id]
        assert labels[: len(p)] == [-100] * len(p)
        assert labels[len(p) :] == r + [tokenizer.eos_token_id]
        assert tokenizer.decode(ids[len(p) : -1]) == row["response"]


def test_truncation_keeps_labels_aligned_and_drops_examples_without_response(tokenizer):
    p_len = len(tokenizer(ROWS[0]["prompt"], add_special_tokens=False)["input_ids"])
    ((ids, labels),) = tokenize_examples(ROWS[:1], tokenizer, max_length=p_len + 1)
    assert len(ids) == len(labels) == p_len + 1
    assert labels[-1] != -100 and labels[:-1] == [-100] * p_len
    # Cut inside the prompt: nothing left to learn, so the example is dropped.
    assert tokenize_examples(ROWS[:1], tokenizer, max_length=p_len) == []


def test_collate_pads_right_with_pad_id_and_ignore_index():
    batch = [([5, 6, 7], [-100, 6, 7]), ([8], [8]), ([9, 10], [-100, 10])]
    input_ids, attn, labels = collate(batch, pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert attn.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 10, -100]]
    import torch

    assert input_ids.dtype == attn.dtype == labels.dtype == torch.long


@pytest.mark.parametrize(("n", "size"), [(10, 3), (12, 4), (5, 8), (7, 7)])
def test_global_batches_cover_every_index_once_per_epoch(n, size):
    stream = global_batches(n, size, seed=1)
    batches = list(itertools.islice(stream, 4 * n))  # enough for several epochs at any size
    assert all(len(b) == size for b in batches)
    flat = [i for b in batches for i in b]
    epochs = [flat[k : k + n] for k in range(0, len(flat) - n + 1, n)]
    assert len(epochs) >= 3
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] or n < 3  # reshuffled each epoch


def test_global_batches_deterministic_per_seed():
    def take(seed):
        return list(itertools.islice(global_batches(50, 8, seed), 20))

    assert take(3) == take(3)  # every rank draws the same stream
    assert take(3) != take(4)


def test_lr_lambda_warmup_then_cosine_decay_with_floor():
    f = lr_lambda(warmup=10, total=110)
    warm = [f(s) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    decay = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert f(60) == pytest.approx(0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.05) and f(10_000) == pytest.approx(0.05)  # floor, never zero
    assert min(decay) == pytest.approx(0.05)


def test_lr_lambda_without_warmup():
    f = lr_lambda(warmup=0, total=4)
    assert f(0) == pytest.approx(1.0)
    assert f(2) == pytest.approx(0.5)


def test_read_examples_names_the_bad_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n\n{"prompt": "only"}\n')
    with pytest.raises(
        UsageError, match=r"train\.jsonl: row 2: a training example needs 'prompt' and 'response'"
    ):
        read_examples(path)
    path.write_text('{"prompt": "p", "response": "r"}\n\n')
    assert read_examples(path) == [{"prompt": "p", "response": "r"}]
