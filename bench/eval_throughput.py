"""Evaluation generation throughput: batched (left padding, sorted by length) vs. one prompt at a time.

Both modes run ``airloom.evaluation.generation.generate`` -- the function the evaluation harness
uses -- on the same model and the same prompts (the demo's synthetic instructions in the alpaca
template), greedy, ``--max-new-tokens`` each. Each mode runs ``--runs`` times, alternating, after
one warm-up batch; the median wall time counts. Goal: batched >= 5x the prompts per second of one at a time.

    .venv/bin/python bench/eval_throughput.py [--model DIR] [--prompts 500] [--batch-size 64]
                                              [--max-new-tokens 32] [--runs 3] [--threads N]

Without ``--model`` it builds the project's embedded base model (``airloom.training.base``: byte-level
BPE, Llama architecture, random weights) in a temporary folder, which takes a few seconds. A CUDA
device is used if there is one.

The last line is machine-readable ``key=value`` pairs, e.g.
``speedup=7.3 batched_prompts_per_s=120.5 single_prompts_per_s=16.5 prompts=500 batch_size=64 ...``.
Exit status: 0, or 1 with ``--check`` when the speedup is under the goal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

GOAL = 5.0


def _prompts(n: int) -> list[str]:
    from airloom.data.synth import generate_records
    from airloom.prompts import render_prompt

    return [render_prompt(r["instruction"], r.get("input") or None) for r in generate_records(n, seed=11)]


def _load(model_dir: Path | None, workdir: Path):
    """``(model, tokenizer)`` from ``model_dir``, or the embedded base built in ``workdir``."""
    from airloom.evaluation.generation import load_model

    if model_dir is None:
        from airloom.training.base import BaseModelSpec, build_base_model

        model_dir = workdir / "base"
        build_base_model(model_dir, BaseModelSpec(pretrain_lines=2_000), log=lambda _line: None)
    return load_model(model_dir)


def _time_once(fn) -> tuple[float, list[str]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="saved model folder (default: build the embedded base)")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if the speedup is under {GOAL}x")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.batch_size < 1 or args.runs < 1 or args.max_new_tokens < 1:
        parser.error("--prompts, --batch-size, --runs and --max-new-tokens must be positive")

    import torch

    from airloom.evaluation.generation import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = _prompts(args.prompts)
    with tempfile.TemporaryDirectory(prefix="airloom-bench-") as tmp:
        model, tokenizer = _load(args.model, Path(tmp))
        device = next(model.parameters()).device
        n_params = sum(p.numel() for p in model.parameters())

        def run(batch_size: int) -> list[str]:
            out = generate(
                model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=batch_size
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        # Warm-up: first calls pay for lazy initialisation (kernels, allocator, tokenizer caches).
        generate(model, tokenizer, prompts[: args.batch_size], max_new_tokens=4, batch_size=args.batch_size)
        generate(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=1)

        # Runs alternate between the modes, so a neighbour's load on a shared machine hits both alike.
        batched_times, single_times = [], []
        for _ in range(args.runs):
            seconds, batched_out = _time_once(lambda: run(args.batch_size))
            batched_times.append(seconds)
            seconds, single_out = _time_once(lambda: run(1))
            single_times.append(seconds)
        batched_s, single_s = statistics.median(batched_times), statistics.median(single_times)

    n = len(prompts)
    same = sum(a == b for a, b in zip(batched_out, single_out, strict=True)) / n
    batched_rate, single_rate = n / batched_s, n / single_s
    speedup = single_s / batched_s
    print(
        f"model: {args.model or 'embedded base (random weights)'} ({n_params / 1e6:.2f}M params) on {device}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{n} prompts, max_new_tokens={args.max_new_tokens}, median of {args.runs} runs\n")
    print(f"{'mode':<22}{'median s':>10}{'prompts/s':>12}  runs (s)")
    for name, med, times, rate in (
        (f"batched (bs={args.batch_size})", batched_s, batched_times, batched_rate),
        ("one at a time", single_s, single_times, single_rate),
    ):
        print(f"{name:<22}{med:>10.2f}{rate:>12.1f}  {' '.join(f'{t:.2f}' for t in times)}")
    print(f"\nspeedup {speedup:.1f}x (goal {GOAL:.0f}x); identical outputs in both modes: {same:.1%}")
    ok = speedup >= GOAL
    print(
        f"speedup={speedup:.2f} batched_prompts_per_s={batched_rate:.1f} single_prompts_per_s={single_rate:.1f} "
        f"prompts={n} batch_size={args.batch_size} max_new_tokens={args.max_new_tokens} runs={args.runs} "
        f"device={device.type} same_outputs={same:.3f} goal={GOAL:g} ok={str(ok).lower()}"
    )
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
