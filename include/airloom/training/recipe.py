"""The training recipe: the process that trains (launched by deepspeed, torchrun or python).

``python -m airloom.training.recipe --config run/train_config.json``

``FinetuneRecipe`` has torchtune's recipe lifecycle: setup (with resume) → train (checkpointing on the
way) → save → cleanup, run in that order by ``recipe_main``. Every rank runs this file; DeepSpeed's engine
does the distributed part (ZeRO stage from the config, gloo on CPU, NCCL on GPUs). Only the
response tokens carry loss: the prompt is context, not something to learn to produce. A conversation
(a row with ``messages``) carries loss on every assistant turn (:mod:`airloom.training.chat`).
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
from collections import Counter
from pathlib import Path
from typing import Any

from airloom.exceptions import UsageError
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
    from airloom.data.splits import read_split

    rows = read_split(path)
    for n, row in enumerate(rows, 1):
        if row.get("prompt") is None or row.get("response") is None:
            raise UsageError(f"{path}: row {n}: a training example needs 'prompt' and 'response'")
    return rows


def tokenize_examples(
    rows: list[dict],
    tokenizer,
    max_length: int,
    renderer: Any = None,
    chat_truncation: str = "keep_last_turns",
    stats: Counter | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, in row order, without the rows that leave nothing to learn.

    An instruction row is prompt + response + EOS cut at ``max_length``, labels -100 on the prompt so the
    loss is on the response. A row with ``messages``, given a ``renderer`` that renders conversations,
    is the whole conversation with loss on every assistant turn, longer ones handled by
    ``chat_truncation`` (:func:`airloom.training.chat.chat_example`); ``stats`` counts what happened to
    those (``kept``, ``truncated``, ``too_long``, ``no_labels``). Without such a renderer a conversation
    trains as its prompt and last answer, as an instruction row.
    """
    chat = renderer is not None and renderer.multi_turn
    conversations = [row for row in rows if chat and row.get("messages")]
    chat_examples: Any = iter([])
    if conversations:
        from airloom.training.chat import tokenize_chat_rows

        chat_examples = iter(
            tokenize_chat_rows(conversations, renderer, tokenizer, max_length, chat_truncation, stats)
        )
    out = []
    eos = tokenizer.eos_token or ""
    for row in rows:
        if chat and row.get("messages"):
            example = next(chat_examples)
            if example is not None:
                out.append(example)
            continue
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        r = tokenizer(row["response"] + eos, add_special_tokens=False)["input_ids"]
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        if any(x != -100 for x in labels):
            out.append((ids, labels))
    return out


def chat_renderer(cfg: TrainConfig, tokenizer, rows: list[dict]):
    """The template the conversations among ``rows`` train with (None when there are none). A ChatML
    template is also installed as the tokenizer's chat template when it has none, so the saved model
    folder carries the template it was trained with."""
    if not any(row.get("messages") for row in rows):
        return None
    from airloom.training.chat import resolve_chat_renderer

    renderer = resolve_chat_renderer(cfg.train_file, tokenizer)
    if renderer.kind == "builtin" and renderer.multi_turn and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = renderer.source
    return renderer


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


def preflight(cfg: TrainConfig) -> None:
    """Refuse, before any work, what this machine cannot run (the operator and the CLI call it too)."""
    from airloom.training.preflight import check_hardware

    check_hardware(cfg)


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_model(cfg: TrainConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.attn_implementation == "airloom_varlen":
        from airloom.training import varlen

        varlen.register()
    kwargs = {"dtype": _dtype(cfg.precision), "attn_implementation": cfg.attn_implementation}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_dtype(cfg.precision),
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
    model.config.use_cache = False
    if cfg.method in ("lora", "qlora"):
        from peft import get_peft_model

        if cfg.method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, lora_config(cfg))
    return model, tokenizer


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.peft_target_modules(),
        task_type="CAUSAL_LM",
    )


def build_optimizer(cfg: TrainConfig, params: list):
    """AdamW; DeepSpeed's CPU Adam (AdamW mode) when the optimizer state is offloaded to CPU, because
    DeepSpeed refuses a torch optimizer there (``zero_force_ds_cpu_optimizer``). Its C++ op is built by
    the JIT on first use into ``TORCH_EXTENSIONS_DIR`` (the launcher points that at a per-project cache)."""
    if cfg.offload_optimizer and cfg.zero_stage > 0:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, adamw_mode=True)
    import torch

    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _evaluate_loss(model, examples, pad_id: int, batch_size: int, rank: int = 0, world: int = 1) -> float:
    """Mean loss per response token over ``examples``, split across the ``world`` ranks.

    Each rank takes its slice of every global batch, as in training, and every rank runs the same number
    of forward passes: under ZeRO-3 a forward is a collective (each layer's weights are gathered from all
    ranks), so a rank whose slice is empty runs the first example again and counts nothing.
    """
    import torch
    import torch.distributed as dist

    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # loss x tokens, tokens
    with torch.no_grad():
        for i in range(0, len(examples), batch_size * world):
            mine = examples[i + rank * batch_size : i + (rank + 1) * batch_size]
            input_ids, attn, labels = collate(mine or examples[:1], pad_id)
            n = int((labels[:, 1:] != -100).sum())
            loss = model(
                input_ids=input_ids.to(model.device),
                attention_mask=attn.to(model.device),
                labels=labels.to(model.device),
            ).loss
            if mine and n:
                sums += torch.tensor([loss.item() * n, n], dtype=torch.float64)
    model.train()
    if world > 1:
        dist.all_reduce(sums)
    return float(sums[0] / max(1.0, float(sums[1])))


def param_bytes(module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model's parameters).

    A ZeRO-3 parameter holds its partition in ``ds_tensor`` and, only while gathered or when kept whole
    (below ``stage3_param_persistence_threshold``), the full tensor in ``data``; ``ds_numel`` is its full size.
    """
    held = full = 0
    for p in module.parameters():  # a tied weight is listed once
        size = p.element_size()
        if hasattr(p, "ds_tensor"):
            held += p.ds_tensor.numel() * p.ds_tensor.element_size() + p.data.numel() * size
            full += p.ds_numel * size
        else:
            held += p.numel() * size
            full += p.numel() * size
    return held, full


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ``ru_maxrss`` in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# -- checkpoints ----------------------------------------------------------------------------------
# DeepSpeed writes each checkpoint into its own tag folder; ours is complete only once every rank
# has written its shard and rank 0 has then written COMPLETE. A process killed mid-save leaves a
# folder without the marker, which resume ignores and the next save removes.

CHECKPOINT_MARKER = "COMPLETE"


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def newest_checkpoint(root: Path) -> tuple[str, int] | None:
    """(tag, step) of the newest complete checkpoint under ``root``, if any."""
    done = []
    for d in root.glob("step-*") if root.is_dir() else []:
        marker = d / CHECKPOINT_MARKER
        if marker.is_file():
            try:
                done.append((int(json.loads(marker.read_text())["step"]), d.name))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue  # a marker cut short is no marker
    if not done:
        return None
    step, tag = max(done)
    return tag, step


def newest_has(root: Path, tag: str) -> bool:
    return (root / tag / CHECKPOINT_MARKER).is_file()


def checkpoint_mirror(cfg: TrainConfig):
    """The object store that mirrors checkpoints, if ``checkpoint_uri`` is set."""
    if not cfg.checkpoint_uri:
        return None
    from airloom.registry.store import open_store

    return open_store(cfg.checkpoint_uri)


def _tag_step(tag: str) -> int:
    return int(tag.removeprefix("step-"))


def upload_checkpoint(store, root: Path, tag: str, keep: int) -> None:
    """Copy a complete checkpoint to the mirror, marker last; drop older and unfinished ones there."""
    folder = root / tag
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != CHECKPOINT_MARKER:
            store.put_file(f"{tag}/{f.relative_to(folder).as_posix()}", f)
    store.put_bytes(f"{tag}/{CHECKPOINT_MARKER}", (folder / CHECKPOINT_MARKER).read_bytes())
    complete = sorted(remote_checkpoints(store), key=_tag_step)
    tags = {k.split("/", 1)[0] for k in store.list("step-")}
    for old in tags - set(complete[-keep:]) - {tag}:
        store.delete_prefix(old + "/")


def remote_checkpoints(store) -> list[str]:
    return [k.split("/", 1)[0] for k in store.list("step-") if k.endswith("/" + CHECKPOINT_MARKER)]


def fetch_checkpoint(store, root: Path) -> str | None:
    """Download the mirror's newest complete checkpoint into ``root`` (marker last); its tag, or None."""
    complete = remote_checkpoints(store)
    if not complete:
        return None
    tag = max(complete, key=_tag_step)
    keys = store.list(tag + "/")
    for key in sorted(keys, key=lambda k: k.endswith("/" + CHECKPOINT_MARKER)):
        store.download_file(key, root / key)
    return tag


# -- training -------------------------------------------------------------------------------------


def _units(cfg: TrainConfig, examples: list) -> list:
    """What one batch slot holds: an example, or (packing) a row of several examples."""
    if not cfg.packing:
        return examples
    from airloom.training.packing import pack_examples

    return pack_examples(examples, cfg.max_length)


def _batch(cfg: TrainConfig, units: list, pad_id: int, device) -> tuple[dict, int, int]:
    """Model inputs for a micro-batch, its real (non-pad) tokens and its padded size."""
    if cfg.packing:
        from airloom.training.packing import collate_packed

        input_ids, position_ids, labels = collate_packed(units, pad_id)
        real = sum(len(ids) for row in units for ids, _ in row)
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    else:
        input_ids, attn, labels = collate(units, pad_id)
        real = int(attn.sum())
        inputs = {"input_ids": input_ids, "attention_mask": attn, "labels": labels}
    return {k: v.to(device) for k, v in inputs.items()}, real, input_ids.numel()


def init_process_group(cfg: TrainConfig, backend: str) -> None:
    """Join the run's process group. A node that never starts (its task still queued, its pod pending)
    fails every node after ``rendezvous_timeout_s`` with a message that says so, not a bare store error."""
    from datetime import timedelta

    import deepspeed

    timeout = timedelta(seconds=cfg.rendezvous_timeout_s)
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    except Exception as e:
        if "Timed out" not in str(e) and "timed out" not in str(e):
            raise
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise RuntimeError(
            f"rendezvous at {where} timed out after {cfg.rendezvous_timeout_s:g} s: not every process of the "
            f"run joined ({os.environ.get('WORLD_SIZE')} expected over {cfg.nnodes} node(s)). Every node's "
            "task must start at the same time: the gpu pool needs a slot per node and each node a worker "
            f"on the gpu queue ({e})"
        ) from e


class FinetuneRecipe:
    """One rank's share of a fine-tuning run, in torchtune's recipe lifecycle.

    ``setup`` starts the process group and builds model, data and DeepSpeed engine, resuming from the
    newest complete checkpoint; ``train`` runs the steps (``save_checkpoint`` every ``checkpoint_every``);
    ``save`` writes the model folder, ``train_metrics.json`` and ``loss_curve.png``; ``cleanup`` leaves
    the process group.

    Args:
        cfg: The run's config; what this machine cannot run is refused here, before any work.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        _ensure_dist_env()
        preflight(cfg)
        self.cfg = cfg
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.out = Path(cfg.output_dir)
        # Progress so far: a resume restores it from the checkpoint.
        self.step, self.tokens, self.padded = 0, 0, 0
        self.history: list[dict] = []
        self.resumed: tuple[str, int] | None = None
        self.metrics: dict = {}
        self.renderer = None  # the template conversations train with; None without conversations
        self.chat_stats: Counter = Counter()  # what became of them (airloom.training.chat.chat_example)
        # Parameter bytes this rank holds after loading and after engine setup, and the whole model's.
        self.loaded_param_bytes = self.held_param_bytes = self.model_param_bytes = 0

    def setup(self) -> None:
        import deepspeed
        import torch

        cfg = self.cfg
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        init_process_group(cfg, backend="nccl" if torch.cuda.is_available() else "gloo")
        ds_config = cfg.deepspeed_config(self.world)
        hf_ds_config = None
        if cfg.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # While this object lives, from_pretrained builds the model under deepspeed.zero.Init: each
            # rank allocates only its partition and rank 0 alone reads the weights (transformers' ZeRO-3 path).
            hf_ds_config = HfDeepSpeedConfig(ds_config)

        model, tokenizer = load_model(cfg)
        self.loaded_param_bytes = param_bytes(model)[0]
        rows = read_examples(cfg.train_file)
        self.renderer = chat_renderer(cfg, tokenizer, rows)
        examples = tokenize_examples(
            rows, tokenizer, cfg.max_length, self.renderer, cfg.chat_truncation, self.chat_stats
        )
        if not examples:
            raise ValueError(f"{cfg.train_file}: no usable training examples")
        self.tokenizer, self.examples, self.units = tokenizer, examples, _units(cfg, examples)
        self.micro = max(1, cfg.batch_size // self.world)
        per_step = self.micro * self.world * cfg.gradient_accumulation_steps
        steps_per_epoch = max(1, len(self.units) // per_step)
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

        optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        # The ZeRO optimizer keeps the client optimizer's param_groups, so the schedule's lr reaches it.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, self.total))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self.scheduler, config=ds_config
        )
        self.held_param_bytes, self.model_param_bytes = param_bytes(self.engine.module)
        if hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            # Built: a model loaded later in this process (the whole model rank 0 saves) is a plain one.
            unset_hf_deepspeed_config()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
        if cfg.checkpoint_every:
            self._resume()

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint, fetched from the mirror if this machine has none."""
        import torch.distributed as dist

        cfg, root = self.cfg, checkpoint_root(self.cfg)
        mirror = checkpoint_mirror(cfg)
        if self.rank == 0 and mirror is not None and newest_checkpoint(root) is None:
            # A retry on another machine: nothing here, but the mirror may hold the last checkpoint.
            fetched = fetch_checkpoint(mirror, root)
            if fetched:
                print(f"fetched checkpoint {fetched} from {cfg.checkpoint_uri}", flush=True)
        if dist.is_initialized():
            dist.barrier()
        self.resumed = self._agreed_checkpoint(newest_checkpoint(root))
        if self.resumed:
            tag = self.resumed[0]
            _, state = self.engine.load_checkpoint(str(root), tag=tag)
            self.step, self.tokens, self.padded = state["step"], state["tokens"], state["padded"]
            self.history = state["history"]
            if self.rank == 0:
                print(f"resuming from checkpoint {tag} (step {self.step}/{self.total})", flush=True)

    def _agreed_checkpoint(self, mine: tuple[str, int] | None) -> tuple[str, int] | None:
        """Rank 0's newest checkpoint, if every rank has it complete on its own disk; else none, so all
        ranks start over together (a node retried on a fresh machine has no shards to resume from)."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or self.world == 1:
            return mine
        choice: list[Any] = [mine]
        dist.broadcast_object_list(choice, src=0)
        chosen = choice[0]
        if chosen is None:
            return None
        have = torch.tensor([1.0 if newest_has(checkpoint_root(self.cfg), chosen[0]) else 0.0])
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if have.item() < 1 and self.rank == 0:
            print(f"checkpoint {chosen[0]} is not on every node: training from the start", flush=True)
        return chosen if have.item() >= 1 else None

    def train(self) -> None:
        """Run the steps left (all, or those after the resumed checkpoint), logging progress lines for
        the launcher; the run's figures end up in ``self.metrics``."""
        import torch
        import torch.distributed as dist

        cfg, rank, world, micro, total = self.cfg, self.rank, self.world, self.micro, self.total
        engine, tokenizer, units, examples = self.engine, self.tokenizer, self.units, self.examples
        batches = global_batches(len(units), micro * world, cfg.seed)
        for _ in range(self.step * cfg.gradient_accumulation_steps):
            next(batches)  # the same data order as an uninterrupted run
        start_step, run_tokens, t0 = self.step, 0, time.monotonic()
        engine.train()
        while self.step < total:
            loss_sum = 0.0
            for _ in range(cfg.gradient_accumulation_steps):
                chunk = next(batches)
                mine = [units[i] for i in chunk[rank * micro : (rank + 1) * micro]]
                inputs, real, size = _batch(cfg, mine, tokenizer.pad_token_id, engine.device)
                loss = engine(**inputs, use_cache=False).loss
                engine.backward(loss)
                engine.step()
                loss_sum += loss.item()
                self.tokens += real * world
                run_tokens += real * world
                self.padded += size * world
            self.step += 1
            step = self.step
            loss_val = loss_sum / cfg.gradient_accumulation_steps
            elapsed = time.monotonic() - t0
            stop = cfg.max_seconds is not None and elapsed > cfg.max_seconds
            if world > 1:
                flag = torch.tensor([1.0 if stop else 0.0])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
                stop = bool(flag.item())
            if rank == 0 and (step % cfg.log_every == 0 or step == total or stop):
                lr = self.scheduler.get_last_lr()[0]
                rate = run_tokens / max(elapsed, 1e-9)
                eta = (total - step) * elapsed / max(1, step - start_step)
                rec = {
                    "step": step,
                    "total": total,
                    "loss": round(loss_val, 5),
                    "lr": lr,
                    "tokens_per_s": round(rate, 1),
                    "eta_s": round(eta, 1),
                    "elapsed_s": round(elapsed, 3),
                    "run_tokens": run_tokens,
                }
                self.history.append(rec)
                print(PROGRESS_PREFIX + json.dumps(rec), flush=True)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total and not stop:
                self.save_checkpoint()
            if stop:
                break

        seconds = time.monotonic() - t0
        tokens, history = self.tokens, self.history
        metrics = {
            "steps": self.step,
            "planned_steps": total,
            "examples": len(examples),
            "rows": len(units),
            "mean_example_tokens": round(sum(len(ids) for ids, _ in examples) / len(examples), 2),
            "world_size": world,
            "packing": cfg.packing,
            "resumed_from_step": start_step if self.resumed else None,
            "train_seconds": round(seconds, 2),
            "tokens": tokens,
            "tokens_per_s": round(run_tokens / max(seconds, 1e-9), 1),
            "non_pad_share": round(tokens / max(1, self.padded), 4),
            "final_loss": history[-1]["loss"] if history else None,
            "history": history,
            "zero_stage": cfg.zero_stage,
            "method": cfg.method,
        }
        if self.renderer is not None:
            metrics["conversations"] = {
                "template": self.renderer.as_manifest(),
                "truncation": cfg.chat_truncation,
                **{k: self.chat_stats[k] for k in ("kept", "truncated", "too_long", "no_labels")},
            }
        if cfg.validation_file:  # every rank: under ZeRO-3 each forward pass is a collective
            val_rows = read_examples(cfg.validation_file)
            renderer = self.renderer or chat_renderer(cfg, tokenizer, val_rows)
            val = tokenize_examples(val_rows, tokenizer, cfg.max_length, renderer, cfg.chat_truncation)
            if val:
                loss = _evaluate_loss(engine, val, tokenizer.pad_token_id, micro, rank, world)
                metrics["validation_loss"] = round(loss, 5)
        self.metrics = metrics

    def save_checkpoint(self) -> None:
        """Checkpoint the engine (every rank its shard) at the current step, mark it complete, prune
        older ones and mirror it."""
        import torch.distributed as dist

        cfg, root, step = self.cfg, checkpoint_root(self.cfg), self.step
        tag = f"step-{step:08d}"
        state = {"step": step, "tokens": self.tokens, "padded": self.padded, "history": self.history}
        self.engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
        if dist.is_initialized():
            dist.barrier()
        if self.local_rank == 0:  # each node marks and prunes its own disk (nodes need not share one)
            (root / tag / CHECKPOINT_MARKER).write_text(json.dumps({"step": step}))
            complete = sorted(d for d in root.glob("step-*") if (d / CHECKPOINT_MARKER).is_file())
            for d in root.glob("step-*"):
                if d.name != tag and (d not in complete or d in complete[: -cfg.keep_checkpoints]):
                    shutil.rmtree(d, ignore_errors=True)
        if self.rank == 0:
            mirror = checkpoint_mirror(cfg)
            if mirror is not None:
                upload_checkpoint(mirror, root, tag, cfg.keep_checkpoints)
        if dist.is_initialized():
            dist.barrier()  # nobody starts the next save while rank 0 still prunes
        if self.rank == 0:
            print(f"checkpoint {tag} saved", flush=True)

    def save(self) -> None:
        """Write the model folder, ``train_metrics.json`` and ``loss_curve.png``; drop the checkpoints."""
        import torch.distributed as dist

        cfg, out = self.cfg, self.out
        state_dict = None
        if cfg.zero_stage == 3:
            # The whole weights, gathered layer by layer onto rank 0 (None elsewhere); every rank calls it.
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank == 0:
            self._save_model(state_dict)
        del state_dict
        self.metrics["model_param_bytes"] = self.model_param_bytes
        self.metrics["ranks"] = self._rank_figures()  # collective; peaks include the save above
        if self.rank == 0:
            (out / "train_metrics.json").write_text(json.dumps(self.metrics, indent=2))
            plot_loss(self.metrics["history"], out / "loss_curve.png")
            mirror = checkpoint_mirror(cfg)
            if mirror is not None:
                mirror.delete_prefix("step-")
        if dist.is_initialized():
            dist.barrier()  # the model is written before any node drops its checkpoints
        if self.local_rank == 0:
            # The finished model supersedes the checkpoints (each holds optimizer state: ~3x the model).
            shutil.rmtree(checkpoint_root(cfg), ignore_errors=True)

    def _rank_figures(self) -> list[dict]:
        """Per rank: peak resident memory so far and the parameter bytes it held once the model was
        loaded and once the engine was set up (ZeRO-3: its partitions), gathered from every rank."""
        import torch.distributed as dist

        mine = {
            "rank": self.rank,
            "peak_rss_mib": peak_rss_mib(),
            "param_bytes_loaded": self.loaded_param_bytes,
            "param_bytes": self.held_param_bytes,
        }
        if not dist.is_initialized() or self.world == 1:
            return [mine]
        figures: list[Any] = [None] * self.world
        dist.all_gather_object(figures, mine)
        return figures

    def _whole_lora_model(self, state_dict: dict):
        """The LoRA model rebuilt unpartitioned on this rank with the consolidated ZeRO-3 weights: the
        engine's copy holds partitions only, which neither peft's adapter save nor its merge can use."""
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        base = AutoModelForCausalLM.from_pretrained(
            cfg.base_model, dtype=_dtype(cfg.precision), attn_implementation="sdpa"
        )
        model = get_peft_model(base, lora_config(cfg))
        model.load_state_dict(state_dict, strict=True)
        return model

    def _save_model(self, state_dict: dict | None) -> None:
        """Write ``out/model`` (HF folder, merged if LoRA) atomically: a failed run leaves no half model.

        ``state_dict`` is the consolidated weights under ZeRO-3 (the engine's module holds partitions)."""
        cfg, out, tokenizer = self.cfg, self.out, self.tokenizer
        model = self.engine.module
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.method in ("lora", "qlora"):
            if state_dict is not None:
                model = self._whole_lora_model(state_dict)
            model.save_pretrained(out / "adapter")
            state_dict = None
            if cfg.method == "qlora":
                # 4-bit weights cannot be merged in place: merge the adapter into the base in half precision.
                from peft import PeftModel
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=_dtype(cfg.precision))
                model = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
            else:
                model = model.merge_and_unload()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.config.use_cache = True  # off for training only
        if cfg.attn_implementation == "airloom_varlen":
            model.set_attn_implementation("sdpa")  # a saved model must load where airloom is not imported
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if self.renderer is not None and self.renderer.kind == "file":  # the model carries its template
            from airloom.prompts import MODEL_TEMPLATE_FILE

            (tmp / MODEL_TEMPLATE_FILE).write_text(self.renderer.source, encoding="utf-8")
        final = out / "model"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def cleanup(self) -> None:
        """Leave the process group, however the run ended. Without an orderly shutdown a rank can abort
        at exit ("terminate called without an active exception") while gloo's threads are still alive,
        failing a finished run."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def plot_loss(history: list[dict], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    # a run shorter than log_every logs its last step only: a line through one point draws nothing
    ax.plot(
        [h["step"] for h in history], [h["loss"] for h in history], marker="o" if len(history) == 1 else ""
    )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def recipe_main(argv: list[str] | None = None) -> int:
    """The command line: setup → train → save, then cleanup however that ended."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON/YAML training config (TrainConfig fields)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    recipe = FinetuneRecipe(TrainConfig.from_file(args.config))
    try:
        recipe.setup()
        recipe.train()
        recipe.save()
    finally:
        recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
