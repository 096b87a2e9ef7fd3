"""The training recipe: the process that trains (launched by deepspeed, torchrun or python).

``python -m airloom.training.recipe --config run/train_config.json``

setup → train → save, as torchtune's recipes. Every rank runs this file; DeepSpeed's engine
does the distributed part (ZeRO stage from the config, gloo on CPU, NCCL on GPUs). Only the
response tokens carry loss: the prompt is context, not something to learn to produce.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

from airloom.training.config import TrainConfig
from airloom.training.launcher import PROGRESS_PREFIX


def _ensure_dist_env() -> None:
    # Without these, deepspeed.initialize falls into MPI discovery (needs mpi4py) when run by plain python.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from airloom.training.launcher import free_port

        os.environ["MASTER_PORT"] = str(free_port())


def read_examples(path: str | Path) -> list[dict]:
    """Training examples from a prepared split: ``.parquet``, or JSON lines (prepared before Parquet)."""
    if Path(path).suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [c for c in ("prompt", "response") if c not in table.column_names]
        if missing:
            raise ValueError(
                f"{path}: a training example needs 'prompt' and 'response'; no column {missing[0]!r}"
            )
        rows = table.to_pylist()
        for n, row in enumerate(rows, 1):
            if row["prompt"] is None or row["response"] is None:
                raise ValueError(f"{path}: row {n}: a training example needs 'prompt' and 'response'")
        return rows
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "response" not in row:
                raise ValueError(f"{path}:{n}: a training example needs 'prompt' and 'response'")
            rows.append(row)
    return rows


def tokenize_examples(rows: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; labels are -100 on the prompt so loss is on the response."""
    out = []
    eos = tokenizer.eos_token or ""
    for row in rows:
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        r = tokenizer(row["response"] + eos, add_special_tokens=False)["input_ids"]
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        if any(x != -100 for x in labels):
            out.append((ids, labels))
    return out


def collate(batch, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attn[i, : len(ids)] = 1
    return input_ids, attn, labels


def global_batches(n: int, size: int, seed: int):
    """Endless stream of index batches, reshuffled every epoch; every rank draws the same stream
    and takes its own slice, so no sampler state has to be shared."""
    rng = random.Random(seed)
    pending: list[int] = []
    while True:
        while len(pending) < size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            pending.extend(epoch)
        yield pending[:size]
        pending = pending[size:]


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.05, 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    return f


def load_model(cfg: TrainConfig):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    return model, tokenizer


def _evaluate_loss(engine, examples, pad_id: int, batch_size: int) -> float:
    import torch

    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            input_ids, attn, labels = collate(examples[i : i + batch_size], pad_id)
            n = int((labels[:, 1:] != -100).sum())
            loss = engine(input_ids=input_ids.to(engine.device), attention_mask=attn.to(engine.device),
                          labels=labels.to(engine.device)).loss
            total += loss.item() * n
            count += n
    engine.train()
    return total / max(1, count)


def train(cfg: TrainConfig) -> dict:
    _ensure_dist_env()
    import deepspeed
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")

    model, tokenizer = load_model(cfg)
    examples = tokenize_examples(read_examples(cfg.train_file), tokenizer, cfg.max_length)
    if not examples:
        raise ValueError(f"{cfg.train_file}: no usable training examples")
    micro = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, len(examples) // (micro * world * cfg.gradient_accumulation_steps))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, total))
    ds_config = cfg.deepspeed_config(world)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))

    history: list[dict] = []
    batches = global_batches(len(examples), micro * world, cfg.seed)
    step, tokens, t0 = 0, 0, time.monotonic()
    engine.train()
    while step < total:
        loss_sum = 0.0
        for _ in range(cfg.gradient_accumulation_steps):
            chunk = next(batches)
            mine = [examples[i] for i in chunk[rank * micro : (rank + 1) * micro]]
            input_ids, attn, labels = collate(mine, tokenizer.pad_token_id)
            loss = engine(input_ids=input_ids.to(engine.device), attention_mask=attn.to(engine.device),
                          labels=labels.to(engine.device)).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
            tokens += int(attn.sum()) * world
        step += 1
        loss_val = loss_sum / cfg.gradient_accumulation_steps
        elapsed = time.monotonic() - t0
        stop = cfg.max_seconds is not None and elapsed > cfg.max_seconds
        if world > 1:
            flag = torch.tensor([1.0 if stop else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            stop = bool(flag.item())
        if rank == 0 and (step % cfg.log_every == 0 or step == total or stop):
            lr = scheduler.get_last_lr()[0]
            rate = tokens / max(elapsed, 1e-9)
            eta = (total - step) * elapsed / step
            rec = {"step": step, "total": total, "loss": round(loss_val, 5), "lr": lr,
                   "tokens_per_s": round(rate, 1), "eta_s": round(eta, 1), "elapsed_s": round(elapsed, 1)}
            history.append(rec)
            print(PROGRESS_PREFIX + json.dumps(rec), flush=True)
        if stop:
            break

    metrics = {"steps": step, "planned_steps": total, "examples": len(examples), "world_size": world,
               "train_seconds": round(time.monotonic() - t0, 2), "tokens": tokens,
               "tokens_per_s": round(tokens / max(time.monotonic() - t0, 1e-9), 1),
               "final_loss": history[-1]["loss"] if history else None, "history": history,
               "zero_stage": cfg.zero_stage, "method": cfg.method}
    if cfg.validation_file and rank == 0:
        val = tokenize_examples(read_examples(cfg.validation_file), tokenizer, cfg.max_length)
        metrics["validation_loss"] = round(_evaluate_loss(engine, val, tokenizer.pad_token_id, micro), 5)
    save(engine, tokenizer, cfg, out, rank, metrics)
    if dist.is_initialized():
        dist.barrier()
        # Without an orderly shutdown a rank can abort at exit ("terminate called without an
        # active exception") while gloo's threads are still alive, failing a finished run.
        dist.destroy_process_group()
    return metrics


def save(engine, tokenizer, cfg: TrainConfig, out: Path, rank: int, metrics: dict) -> None:
    """Write ``out/model`` (HF folder, merged if LoRA) atomically: a failed run leaves no half model."""
    state_dict = None
    if cfg.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    if rank != 0:
        return
    model = engine.module
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.method == "lora":
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=False)
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
        state_dict = None
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    final = out / "model"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_loss(metrics["history"], out / "loss_curve.png")


def plot_loss(history: list[dict], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON/YAML training config (TrainConfig fields)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_file(args.config)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
