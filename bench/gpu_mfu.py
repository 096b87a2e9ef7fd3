"""Training throughput and MFU of the Airloom recipe on one GPU: a ~1B Llama, bf16, seq 2048, ZeRO-2, packing.

The model is Llama-shaped like TinyLlama-1.1B (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP
5632, vocabulary 32,000), built from its config with random weights: nothing is downloaded. The
data are the project's synthetic instructions, packed into rows of ``--seq`` tokens. Training runs
exactly as in production: ``airloom.training.recipe`` as a child of the ``deepspeed`` launcher.

Model FLOPs per token = 6 x (parameters in matmuls, lm_head included, embedding lookup excluded)
+ 6 x layers x hidden x mean example length (causal attention inside each packed example).
MFU = achieved model FLOP/s / peak, with two peaks: 989 TFLOP/s (H100/H200 dense bf16 datasheet)
and 790 TFLOP/s (the bf16 matmul rate measured on this H200). Throughput is the steady state:
tokens and time between the ``--skip``-th logged step and the last.

    bash bench/gpu_mfu.sh                          # on the GPU machine
    .venv/bin/python bench/gpu_mfu.py --tiny       # a CPU smoke run of the same path, seconds

The last line is ``key=value`` pairs: ``mfu=… tokens_per_s=… tflops=… params_b=… …``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DATASHEET_PEAK = 989e12
MEASURED_PEAK = 790e12


def build_model(out: Path, a, log) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from airloom.data.synth import generate_records
    from airloom.training.base import train_tokenizer

    t0 = time.monotonic()
    texts = [
        r["instruction"] + " " + (r.get("input") or "") + " " + r["response"]
        for r in generate_records(5000, seed=1)
    ]
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    tokenizer.model_max_length = a.seq
    config = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.seq,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if a.precision == "bf16" else torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    matmul = params - model.get_input_embeddings().weight.numel()
    del model
    log(f"built {params / 1e9:.3f}B-parameter model in {time.monotonic() - t0:.1f}s")
    return {"params": params, "matmul_params": matmul}


def write_data(path: Path, n: int) -> None:
    from airloom.data.synth import generate_records, write_jsonl
    from airloom.prompts import render_prompt

    write_jsonl(
        [
            {"prompt": render_prompt(r["instruction"], r.get("input") or None), "response": r["response"]}
            for r in generate_records(n, seed=2)
        ],
        path,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8, help="packed rows per step")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=2, help="logged points left out of the steady state")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument(
        "--attn", default="airloom_varlen", help="airloom_varlen (flash, per example), sdpa (dense mask)"
    )
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: a few-layer model, fp32, seq 256")
    a = p.parse_args(argv)
    if a.tiny:
        a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate, a.vocab = 64, 2, 4, 2, 128, 2048
        a.seq, a.micro_batch, a.steps, a.precision, a.skip = 256, 2, 8, "fp32", 1

    from airloom.training.config import TrainConfig
    from airloom.training.launcher import LaunchSpec, TrainingProcess, build_command, child_env

    def log(msg: str) -> None:
        print(msg, flush=True)

    work = a.workdir or Path(tempfile.mkdtemp(prefix="airloom-mfu-"))
    work.mkdir(parents=True, exist_ok=True)
    info = build_model(work / "base", a, log)
    # ~38 tokens per synthetic example: enough examples for every step's rows, with margin.
    # The synthetic families run out of distinct items near 7k; the recipe runs more epochs if needed.
    write_data(work / "train.jsonl", 6000)
    log_every = max(1, a.steps // 10)
    cfg = TrainConfig(
        base_model=str(work / "base"),
        train_file=str(work / "train.jsonl"),
        output_dir=str(work / "run"),
        max_steps=a.steps,
        batch_size=a.micro_batch,
        packing=True,
        max_length=a.seq,
        precision=a.precision,
        zero_stage=a.zero_stage,
        learning_rate=1e-4,
        warmup_steps=2,
        log_every=log_every,
        attn_implementation=a.attn,
        launcher="deepspeed",
    )
    (work / "run").mkdir(exist_ok=True)
    spec = LaunchSpec(config_path=cfg.save(work / "run" / "train_config.json"), launcher="deepspeed")
    t0 = time.monotonic()
    TrainingProcess(build_command(spec), child_env()).run(log=log)
    wall = time.monotonic() - t0
    m = json.loads((work / "run" / "train_metrics.json").read_text())
    hist = m["history"]
    first, last = hist[min(a.skip, len(hist) - 2)], hist[-1]
    rate = (last["run_tokens"] - first["run_tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    mean_len = m["mean_example_tokens"]
    flops_per_token = 6 * info["matmul_params"] + 6 * a.layers * a.hidden * mean_len
    achieved = rate * flops_per_token
    result = {
        "params_b": round(info["params"] / 1e9, 3),
        "seq": a.seq,
        "micro_batch": a.micro_batch,
        "zero_stage": a.zero_stage,
        "precision": a.precision,
        "attn": a.attn,
        "steps": m["steps"],
        "non_pad_share": m["non_pad_share"],
        "tokens_per_s": round(rate),
        "tflops": round(achieved / 1e12, 1),
        "mfu": round(achieved / DATASHEET_PEAK, 4),
        "mfu_vs_measured_peak": round(achieved / MEASURED_PEAK, 4),
        "mean_example_tokens": round(mean_len, 1),
        "train_wall_s": round(wall, 1),
    }
    log(json.dumps(result, indent=1))
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
