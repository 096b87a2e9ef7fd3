"""The CUDA path: the recipe under the DeepSpeed launcher on a GPU (NCCL, bf16), and batched generation.

Run on a machine with a GPU: ``pytest -m gpu tests/gpu``. ``make test`` deselects these
(``-m "not gpu"``); they are not skipped silently in CI, they are not collected there.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from airloom.data.synth import generate_records, write_jsonl
    from airloom.prompts import render_prompt
    from airloom.training.base import BaseModelSpec, build_base_model

    root = tmp_path_factory.mktemp("tiny")
    build_base_model(root / "base", BaseModelSpec(), log=lambda m: None)
    rows = [
        {
            "id": r["id"],
            "task": r["task"],
            "prompt": render_prompt(r["instruction"], r["input"]),
            "response": r["response"],
        }
        for r in generate_records(3000, seed=3)
    ]
    write_jsonl(rows[:2700], root / "train.jsonl")
    write_jsonl(rows[2700:], root / "test.jsonl")
    return root


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_bf16_on_gpu_learns(tiny, tmp_path, zero_stage):
    from airloom.data.splits import read_jsonl
    from airloom.evaluation.harness import evaluate_model
    from airloom.training.config import TrainConfig
    from airloom.training.launcher import LaunchSpec, TrainingProcess, build_command, child_env

    out = tmp_path / "run"
    out.mkdir()
    cfg = TrainConfig(
        base_model=str(tiny / "base"),
        train_file=str(tiny / "train.jsonl"),
        output_dir=str(out),
        max_steps=600,
        batch_size=32,
        learning_rate=3e-3,
        zero_stage=zero_stage,
        precision="bf16",
        launcher="deepspeed",
        log_every=50,
    )
    spec = LaunchSpec(config_path=cfg.save(out / "train_config.json"), launcher="deepspeed", nproc_per_node=1)
    lines: list[str] = []
    TrainingProcess(build_command(spec), child_env()).run(log=lines.append)
    metrics = json.loads((out / "train_metrics.json").read_text())
    print(
        f"zero{zero_stage}: {metrics['train_seconds']}s, {metrics['tokens_per_s']} tok/s, loss {metrics['final_loss']}"
    )
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"] * 0.5
    result = evaluate_model(
        str(out / "model"), read_jsonl(tiny / "test.jsonl"), tmp_path / "eval", max_new_tokens=24
    )
    print(f"zero{zero_stage}: exact match {result['aggregate']['exact_match']:.3f}")
    assert result["aggregate"]["exact_match"] > 0.3


def test_batched_generation_matches_one_at_a_time_on_gpu(tiny):
    from airloom.evaluation.generation import generate, load_model
    from airloom.prompts import render_prompt

    model, tokenizer = load_model(tiny / "base")
    assert next(model.parameters()).device.type == "cuda"
    prompts = [render_prompt("Write the number in words.", str(n)) for n in (3, 42, 512, 7, 99, 100)]
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=8)
    single = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_varlen_flash_attention_matches_sdpa_on_packed_rows_on_gpu():
    """The flash varlen kernel gives sdpa's packed-row result in bf16 (what bench/gpu_mfu.sh runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from airloom.training import varlen
    from airloom.training.packing import collate_packed, pack_examples

    varlen.register()
    cfg = dict(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    sdpa = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).cuda().bfloat16()
    fast = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=varlen.NAME)).cuda().bfloat16()
    fast.load_state_dict(sdpa.state_dict())
    g = torch.Generator().manual_seed(1)
    examples = [
        (ids, ids)
        for ids in (
            torch.randint(1, 255, (int(n),), generator=g).tolist()
            for n in torch.randint(8, 120, (40,), generator=g)
        )
    ]
    input_ids, position_ids, labels = (t.cuda() for t in collate_packed(pack_examples(examples, 512), 0, 512))
    with torch.no_grad():
        a = sdpa(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False)
        b = fast(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False)
    assert varlen._flash_varlen() is not None
    assert abs(a.loss.item() - b.loss.item()) < 1e-2
    assert (a.logits.float() - b.logits.float()).abs().max().item() < 0.1
