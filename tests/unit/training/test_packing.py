"""Sequence packing: rows are full, deterministic, and packed examples never see each other."""

from __future__ import annotations

import random

import pytest

from airloom.training.packing import collate_packed, pack, pack_examples


def test_pack_fills_rows_and_keeps_every_example_once():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(2000)]
    rows = pack(lengths, 128)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # Best-fit decreasing on this spread wastes little: measured 99.6% full.
    assert sum(lengths) / (len(rows) * 128) > 0.97
    assert pack(lengths, 128) == rows  # deterministic


def test_pack_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        pack([3, 9], 8)


def test_collate_packed_resets_positions_and_masks_boundaries():
    rows = pack_examples([([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9], [6, 7, 8, 9])], 8)
    input_ids, position_ids, labels = collate_packed(rows, pad_id=0, width=8)
    # Row 0: the 4-token example then the 3-token one, one pad; row 1: the 2-token example.
    assert input_ids.tolist() == [[6, 7, 8, 9, 1, 2, 3, 0], [4, 5, 0, 0, 0, 0, 0, 0]]
    assert position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3, 4, 5]]
    # No example is trained to follow the previous one; pads carry no loss.
    assert labels.tolist() == [[-100, 7, 8, 9, -100, 2, 3, -100], [-100, 5] + [-100] * 6]


def test_packed_examples_do_not_attend_to_each_other(tmp_path):
    """Logits of an example inside a packed row equal its logits alone (no cross-contamination)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            attn_implementation="sdpa",
        )
    ).eval()
    a, b = [5, 9, 11, 3, 7], [8, 2, 30, 31]
    input_ids, position_ids, _ = collate_packed([[(a, a), (b, b)]], pad_id=0)
    with torch.no_grad():
        packed = model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False
        ).logits
        alone_b = model(input_ids=torch.tensor([b]), use_cache=False).logits
        # Without position resets the second example does see the first: the check can fail.
        leaky = model(input_ids=input_ids, use_cache=False).logits
    assert torch.allclose(packed[0, len(a) :], alone_b[0], atol=1e-5)
    assert not torch.allclose(leaky[0, len(a) :], alone_b[0], atol=1e-3)


def test_varlen_attention_matches_sdpa_on_packed_rows():
    """``airloom_varlen`` (per-example attention from position ids) gives sdpa's packed logits and grads."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from airloom.training import varlen

    varlen.register()
    cfg = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    sdpa = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    fast = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=varlen.NAME))
    fast.load_state_dict(sdpa.state_dict())
    rows = pack_examples(
        [
            ([5, 9, 11, 3, 7], [5, 9, 11, 3, 7]),
            ([8, 2, 30], [8, 2, 30]),
            ([4] * 6, [4] * 6),
            ([1, 2], [1, 2]),
        ],
        12,
    )
    input_ids, position_ids, labels = collate_packed(rows, pad_id=0, width=12)
    out_a = sdpa(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False)
    out_b = fast(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False)
    assert torch.allclose(out_a.logits, out_b.logits, atol=1e-5)
    out_a.loss.backward()
    out_b.loss.backward()
    grad_a = sdpa.model.layers[0].self_attn.q_proj.weight.grad
    grad_b = fast.model.layers[0].self_attn.q_proj.weight.grad
    assert torch.allclose(grad_a, grad_b, atol=1e-5)
    # With a padding mask (evaluation batches) it is plain causal attention over the unpadded tokens.
    mask = torch.tensor([[1] * 5 + [0] * 7])
    with torch.no_grad():
        a = sdpa(input_ids=input_ids[:1], attention_mask=mask, use_cache=False).logits[0, :5]
        b = fast(input_ids=input_ids[:1], attention_mask=mask, use_cache=False).logits[0, :5]
    assert torch.allclose(a, b, atol=1e-5)
