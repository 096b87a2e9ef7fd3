"""DeepSpeed ZeRO on CPU, 2 processes over gloo: wall time, peak memory and parameter bytes per rank.

The recipe is launched exactly as in production (``deepspeed`` launcher, 2 processes) on a ~3.9M-parameter
Llama (hidden 384, MLP 1024, 2 layers; every matrix above ZeRO-3's persistence threshold, so ZeRO-3 really
partitions it), the same data, steps and sequence length for each configuration. Per rank it reports the
peak resident memory (``ru_maxrss``, up to and including the final save) and the parameter bytes the rank
held once the model was loaded and once the engine was set up, against the whole model's.

    .venv/bin/python bench/deepspeed_zero_cpu.py [--steps 12] [--threads 1]

The last line is ``key=value`` pairs: ``<config>_wall_s=… <config>_rss_mib=rank0/rank1 …``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "zero2": {"zero_stage": 2},
    "zero2_offload_opt": {"zero_stage": 2, "offload_optimizer": True},
    "zero3": {"zero_stage": 3},
    "zero3_offload_all": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    "zero3_lora": {"zero_stage": 3, "method": "lora", "lora_r": 8, "learning_rate": 1e-2},
}


def main() -> None:
    from airloom.data.synth import generate_records, write_jsonl
    from airloom.prompts import render_prompt
    from airloom.training.base import BaseModelSpec, build_base_model
    from airloom.training.config import TrainConfig
    from airloom.training.launcher import LaunchSpec, TrainingProcess, build_command, child_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    a = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ds-zero-"))
    spec = BaseModelSpec(
        hidden_size=384, intermediate_size=1024, num_layers=2, num_heads=6, pretrain_lines=2000
    )
    info = build_base_model(work / "base", spec, log=lambda m: None)
    rows = [
        {"prompt": render_prompt(r["instruction"], r["input"]), "response": r["response"]}
        for r in generate_records(280, seed=3)
    ]
    write_jsonl(rows[:256], work / "train.jsonl")
    write_jsonl(rows[256:], work / "val.jsonl")
    print(f"base model: {info['params'] / 1e6:.2f}M parameters; work dir {work}", flush=True)
    print(
        "| config | wall s | first → last loss | val loss | peak RSS MiB (rank 0 / 1) | param MiB held "
        "after load (rank 0 / 1) | after setup | whole model |"
    )
    summary = []
    for name, options in CONFIGS.items():
        out = work / name
        out.mkdir()
        settings = {
            "base_model": str(work / "base"),
            "train_file": str(work / "train.jsonl"),
            "validation_file": str(work / "val.jsonl"),
            "output_dir": str(out),
            "max_steps": a.steps,
            "batch_size": 8,
            "max_length": 64,
            "learning_rate": 3e-3,
            "warmup_steps": 2,
            "launcher": "deepspeed",
            "nproc_per_node": 2,
            "log_every": 2,
        }
        cfg = TrainConfig(**{**settings, **options})
        launch = LaunchSpec(
            config_path=cfg.save(out / "train_config.json"), launcher="deepspeed", nproc_per_node=2
        )
        t0 = time.monotonic()
        TrainingProcess(build_command(launch), child_env({"OMP_NUM_THREADS": str(a.threads)})).run(
            log=lambda line: None
        )
        wall = time.monotonic() - t0
        m = json.loads((out / "train_metrics.json").read_text())
        ranks, mib = m["ranks"], 2**20
        rss = "/".join(f"{r['peak_rss_mib']:.0f}" for r in ranks)
        loaded = " / ".join(f"{r['param_bytes_loaded'] / mib:.1f}" for r in ranks)
        held = " / ".join(f"{r['param_bytes'] / mib:.1f}" for r in ranks)
        h = m["history"]
        print(
            f"| {name} | {wall:.1f} | {h[0]['loss']:.2f} → {h[-1]['loss']:.2f} | {m['validation_loss']:.3f} | "
            f"{rss.replace('/', ' / ')} | {loaded} | {held} | {m['model_param_bytes'] / mib:.1f} |",
            flush=True,
        )
        summary.append(f"{name}_wall_s={wall:.1f} {name}_rss_mib={rss}")
    print(" ".join(summary))


if __name__ == "__main__":
    main()
