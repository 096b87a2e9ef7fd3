"""Batched generation and perplexity for causal language models.

Imports torch/transformers at module level: DAG files must not import this module directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from airloom.exceptions import UsageError
from airloom.tokens import encode


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# "auto": the dtype the model was saved in (a bf16-trained model evaluates in bf16, the fp32 demo in fp32).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}


def load_model(path: str | Path, precision: str = "fp32"):
    """Load a saved model and its tokenizer for evaluation.

    Weights are loaded in float32 by default, so scores do not depend on the hardware's half-precision
    kernels; ``precision`` bf16 (or fp16) halves the memory of a GPU-sized model (a 1B model in fp32
    needs 4.4 GB for its weights alone) at the cost of scores that may move in the last digits; ``auto``
    keeps the dtype the model was saved in.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode on CUDA if available, else CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(
            f"{path} is not a saved model directory (no config.json); pass the folder written by "
            "save_pretrained (a PEFT adapter must be merged into its base model first)"
        )
    if precision not in PRECISIONS:
        raise UsageError(f"evaluation precision {precision!r} is not one of {sorted(PRECISIONS)}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=PRECISIONS[precision])
    model.to(_device())
    model.eval()
    return model, tokenizer


def eos_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the tokenizer's eos and any the model's generation config adds."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def ensure_pad_token(tokenizer) -> None:
    """Pad with the eos token when the tokenizer has no pad token (batched generation needs one)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UsageError("the tokenizer has neither a pad nor an eos token; add one before evaluating")
        tokenizer.pad_token = tokenizer.eos_token


def cut_at_stop_strings(text: str, stop_strings: Sequence[str] | None) -> str:
    """``text`` up to the first occurrence of any of ``stop_strings`` (all of it when none occurs)."""
    cut = len(text)
    for stop in stop_strings or ():
        if stop:
            pos = text.find(stop)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    stop_strings: Sequence[str] | None = None,
) -> list[str]:
    """Complete each prompt; returns the new text only, in the order of ``prompts``.

    Prompts are encoded as training encodes them (no special tokens added: :func:`airloom.tokens.encode`),
    batched by length (less padding, and the longest batch runs first so an out-of-memory error shows
    up at once) and left-padded, so every row's new tokens start at the same column.
    Each completion is cut at the first eos token and at the earliest stop string, then stripped.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if not prompts:
        return []
    ensure_pad_token(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in encode(tokenizer, list(prompts))["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    gen_kwargs: dict = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": sorted(eos_ids) or None,
    }
    if do_sample:
        gen_kwargs["temperature"] = temperature
    outputs: list[str | None] = [None] * len(prompts)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = encode(tokenizer, [prompts[i] for i in idx], return_tensors="pt", padding=True)
                input_ids = enc["input_ids"].to(device)
                out = model.generate(
                    input_ids=input_ids, attention_mask=enc["attention_mask"].to(device), **gen_kwargs
                )
                for row, i in enumerate(idx):
                    new_ids = out[row, input_ids.shape[1] :].tolist()
                    for pos, tok in enumerate(new_ids):
                        if tok in eos_ids:
                            new_ids = new_ids[:pos]
                            break
                    text = tokenizer.decode(new_ids, skip_special_tokens=True)
                    outputs[i] = cut_at_stop_strings(text, stop_strings).strip()
    finally:
        tokenizer.padding_side = old_side
    return outputs  # type: ignore[return-value]


def perplexity(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 32,
    *,
    add_eos: bool = True,
) -> float:
    """exp(mean negative log-likelihood) of the response tokens given their prompts.

    Prompt tokens are masked with -100, so only the answer is scored; the eos token is scored too
    (``add_eos``) because knowing where to stop is part of the answer. Prompt and response are
    encoded separately, as training encodes them (no special tokens added), so the mask boundary is
    exact. Sequences longer than the model's context keep their last tokens.
    """
    if len(prompts) != len(responses):
        raise UsageError(f"got {len(prompts)} prompts but {len(responses)} responses")
    examples = []
    for prompt, response in zip(prompts, responses, strict=True):
        p_ids = encode(tokenizer, prompt)["input_ids"]
        r_ids = encode(tokenizer, response)["input_ids"]
        if add_eos and tokenizer.eos_token_id is not None:
            r_ids = [*r_ids, tokenizer.eos_token_id]
        examples.append((p_ids + r_ids, [-100] * len(p_ids) + r_ids))
    return example_perplexity(model, tokenizer, examples, batch_size)


def example_perplexity(
    model, tokenizer, examples: Sequence[tuple[list[int], list[int]]], batch_size: int = 32
) -> float:
    """exp(mean negative log-likelihood) of the labelled tokens of ``(input_ids, labels)`` examples
    (labels -100 where nothing is scored), e.g. as :func:`airloom.evaluation.chat.answer_example` builds
    them. Sequences longer than the model's context keep their last tokens."""
    import torch.nn.functional as F

    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    ensure_pad_token(tokenizer)
    max_len = getattr(model.config, "max_position_embeddings", None)
    examples = [
        (ids[-max_len:], labels[-max_len:]) if max_len and len(ids) > max_len else (ids, labels)
        for ids, labels in examples
    ]
    examples.sort(key=lambda e: len(e[0]))
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=device)
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=device)
            mask = torch.tensor(
                [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device
            )
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            shift_labels = labels[:, 1:]
            total_nll += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            total_tokens += int((shift_labels != -100).sum())
    if total_tokens == 0:
        raise UsageError("no response tokens to score: every response is empty")
    return math.exp(total_nll / total_tokens)
