"""Counterfactual bias probes: does swapping a name, pronoun or group term change the model?

Each template is rendered once per group (e.g. "Emily" / "James"); every two renderings of the same
set form a counterfactual pair. For each pair the report gives how much the two generated answers
differ once the swapped terms are masked (token-level Jaccard distance, exact equality), and for each
group the mean log-likelihood of a fixed, neutral continuation and the mean answer length, so a
model that finds "highly qualified" less likely after one group's name shows a gap.

The probe set ships with the project (``bias_templates.yaml``); pass another file with the same
layout to probe other terms.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from pathlib import Path

from airloom.exceptions import UsageError

DEFAULT_TEMPLATES = Path(__file__).resolve().parent / "bias_templates.yaml"
_SLOT = re.compile(r"\{(\w+)\}")


def _fail(source: str, where: str, what: str) -> UsageError:
    return UsageError(f"{source}: {where}: {what}")


def load_bias_templates(path: str | Path | None = None) -> dict:
    """Read and check a probe set (default: the project's ``bias_templates.yaml``).

    Returns:
        ``{"dimensions": {name: {"groups": [...], "sets": [{group: {slot: value}}]}},
        "templates": [{"id", "dimension", "instruction", "continuation"}], "source": str}``.
    """
    from airloom.configfile import load_yaml_mapping

    path = path if path is not None else DEFAULT_TEMPLATES
    return validate_bias_templates(load_yaml_mapping(path, "bias templates"), source=str(path))


def validate_bias_templates(data, source: str = "bias templates") -> dict:
    """Check a probe set's layout; messages name the dimension, set or template at fault."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{source}: expected a mapping with 'dimensions' and 'templates'")
    dims = data.get("dimensions")
    templates = data.get("templates")
    if not isinstance(dims, Mapping) or not dims:
        raise _fail(source, "dimensions", "must be a non-empty mapping of dimension name to groups and sets")
    if not isinstance(templates, list) or not templates:
        raise _fail(source, "templates", "must be a non-empty list")
    clean_dims: dict[str, dict] = {}
    for name, dim in dims.items():
        where = f"dimension {name!r}"
        if not isinstance(dim, Mapping):
            raise _fail(source, where, "must be a mapping with 'groups' and 'sets'")
        groups = dim.get("groups")
        if not isinstance(groups, list) or len(groups) < 2 or len(set(groups)) != len(groups):
            raise _fail(source, where, "'groups' must list at least two distinct group names")
        sets = dim.get("sets")
        if not isinstance(sets, list) or not sets:
            raise _fail(source, where, "'sets' must be a non-empty list")
        clean_sets = []
        for k, item in enumerate(sets):
            if not isinstance(item, Mapping) or set(item) != set(groups):
                raise _fail(source, f"{where}, set {k}", f"must give a value for exactly the groups {groups}")
            row = {}
            for group in groups:
                value = item[group]
                if isinstance(value, str):
                    value = {"term": value}
                if not isinstance(value, Mapping) or not all(
                    isinstance(s, str) and isinstance(v, str) and v for s, v in value.items()
                ):
                    raise _fail(
                        source,
                        f"{where}, set {k}, group {group!r}",
                        "must map slot names to non-empty strings",
                    )
                row[group] = dict(value)
            slots = {frozenset(v) for v in row.values()}
            if len(slots) != 1:
                raise _fail(source, f"{where}, set {k}", "every group must fill the same slots")
            clean_sets.append(row)
        clean_dims[str(name)] = {"groups": list(groups), "sets": clean_sets}
    clean_templates = []
    seen = set()
    for i, tpl in enumerate(templates):
        where = f"template {i}"
        if not isinstance(tpl, Mapping):
            raise _fail(source, where, "must be a mapping")
        missing = [k for k in ("id", "dimension", "instruction", "continuation") if not tpl.get(k)]
        if missing:
            raise _fail(
                source,
                where,
                f"missing {missing}; each template needs id, dimension, instruction, continuation",
            )
        where = f"template {tpl['id']!r}"
        if tpl["id"] in seen:
            raise _fail(source, where, "id used twice")
        seen.add(tpl["id"])
        if tpl["dimension"] not in clean_dims:
            raise _fail(source, where, f"unknown dimension {tpl['dimension']!r}; known: {sorted(clean_dims)}")
        if _SLOT.search(tpl["continuation"]):
            raise _fail(
                source, where, "the continuation must not use slots: every group must score the same text"
            )
        available = set.intersection(
            *(set(next(iter(row.values()))) for row in clean_dims[tpl["dimension"]]["sets"])
        )
        used = {s.lower() for s in _SLOT.findall(tpl["instruction"])}
        if not used:
            raise _fail(source, where, "the instruction uses no slot, so nothing is swapped")
        if used - available:
            raise _fail(
                source,
                where,
                f"slot(s) {sorted(used - available)} not filled by dimension {tpl['dimension']!r} "
                f"(its slots: {sorted(available)})",
            )
        clean_templates.append({k: str(tpl[k]) for k in ("id", "dimension", "instruction", "continuation")})
    return {"dimensions": clean_dims, "templates": clean_templates, "source": source}


def fill_slots(text: str, values: Mapping[str, str]) -> str:
    """Replace ``{slot}`` with its value; ``{Slot}`` capitalises the value's first letter."""

    def sub(m: re.Match) -> str:
        slot = m.group(1)
        if slot in values:
            return values[slot]
        if slot.lower() in values:
            value = values[slot.lower()]
            return value[:1].upper() + value[1:]
        raise UsageError(f"no value for slot {{{slot}}} in {text!r}")

    return _SLOT.sub(sub, text)


def _masked_tokens(text: str, swapped: set[str]) -> list[str]:
    from airloom.evaluation.metrics import normalize_answer

    return [t for t in normalize_answer(text).split() if t not in swapped]


def jaccard_distance(a: list[str], b: list[str]) -> float:
    """1 - |A and B| / |A or B| over token sets; two empty answers are identical (0.0)."""
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 0.0
    return 1.0 - len(sa & sb) / len(sa | sb)


def continuation_loglik(
    model, tokenizer, prompts: list[str], continuations: list[str], batch_size: int = 32
) -> list[float]:
    """Mean log-probability per token of each continuation given its prompt."""
    import torch

    from airloom.evaluation.generation import ensure_pad_token
    from airloom.tokens import encode

    ensure_pad_token(tokenizer)
    examples = []
    for prompt, cont in zip(prompts, continuations, strict=True):
        p_ids = encode(tokenizer, prompt)["input_ids"]
        c_ids = encode(tokenizer, cont)["input_ids"]
        if not c_ids:
            raise UsageError(f"continuation {cont!r} has no tokens")
        examples.append((p_ids, c_ids))
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            seqs = [p + c for p, c in batch]
            width = max(len(s) for s in seqs)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
            logprobs = torch.log_softmax(
                model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1
            )
            for row, (p, c) in enumerate(batch):
                # Token at position t is predicted by the logits at t - 1.
                positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=device)
                targets = torch.tensor(c, device=device)
                out.append(float(logprobs[row, positions, targets].mean()))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_bias_probes(
    model,
    tokenizer,
    templates: dict | str | Path | None = None,
    max_new_tokens: int = 32,
    *,
    prompt_template: str | None = "alpaca",
    batch_size: int = 32,
) -> dict:
    """Generate for every counterfactual prompt and report output divergence and score gaps.

    Args:
        model, tokenizer: a causal LM in eval mode and its tokenizer (as ``load_model`` returns).
        templates: a probe set (``load_bias_templates``'s result), a path to one, or ``None`` for the
            project's set.
        max_new_tokens: answer length; decoding is greedy so a rerun gives the same report.
        prompt_template: how instructions are wrapped, matching the format the model was trained on:
            ``render_prompt``'s templates, ``"model"`` for one user turn as the model is served (its
            chat template, else alpaca: :func:`airloom.evaluation.chat.chat_prompt`), ``None`` for the
            instruction as it is.

    Returns:
        ``{"n_templates", "n_prompts", "n_pairs", "overall": {exact_equal_rate,
        mean_jaccard_distance, max_loglik_gap}, "by_dimension": {dim: {n_pairs, exact_equal_rate,
        mean_jaccard_distance, groups: {group: {n, mean_loglik, mean_length}}, loglik_gap,
        length_gap}}, "pairs": [...], "settings": {...}}``. ``loglik_gap``/``length_gap`` are the
        highest minus the lowest group mean; each pair row has the template, groups, prompts,
        outputs, ``jaccard_distance``, ``equal`` and both continuation log-likelihoods.
    """
    from airloom.evaluation.chat import chat_prompt, model_template, turn_end
    from airloom.evaluation.generation import generate
    from airloom.prompts import render_prompt

    if templates is None or isinstance(templates, str | Path):
        probe_set = load_bias_templates(templates)
    else:
        probe_set = validate_bias_templates(templates, source=str(templates.get("source", "bias templates")))
    dims = probe_set["dimensions"]

    chat = model_template(tokenizer) if prompt_template == "model" else None
    end = turn_end(chat)  # a chat model ends its answer there (see airloom.evaluation.chat)
    # One prompt per (template, set, group).
    items = []
    for tpl in probe_set["templates"]:
        dim = dims[tpl["dimension"]]
        for set_index, values_by_group in enumerate(dim["sets"]):
            for group in dim["groups"]:
                instruction = fill_slots(tpl["instruction"], values_by_group[group])
                if prompt_template == "model":
                    prompt = chat_prompt([{"role": "user", "content": instruction}], tokenizer, chat)
                elif prompt_template:
                    prompt = render_prompt(instruction, template=prompt_template)
                else:
                    prompt = instruction
                items.append(
                    {
                        "template": tpl,
                        "set": set_index,
                        "group": group,
                        "prompt": prompt,
                        "instruction": instruction,
                    }
                )
    prompts = [it["prompt"] for it in items]
    outputs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_strings=[end] if end else None,
    )
    logliks = continuation_loglik(
        model, tokenizer, prompts, [it["template"]["continuation"] for it in items], batch_size=batch_size
    )
    by_key = {}
    for it, text, ll in zip(items, outputs, logliks, strict=True):
        it["output"], it["loglik"] = text, ll
        it["length"] = len(text.split())
        by_key[(it["template"]["id"], it["set"], it["group"])] = it

    from airloom.evaluation.metrics import normalize_answer

    pairs = []
    for tpl in probe_set["templates"]:
        dim = dims[tpl["dimension"]]
        for set_index, values_by_group in enumerate(dim["sets"]):
            for ga, gb in itertools.combinations(dim["groups"], 2):
                a, b = by_key[(tpl["id"], set_index, ga)], by_key[(tpl["id"], set_index, gb)]
                swapped = {
                    tok
                    for group in (ga, gb)
                    for value in values_by_group[group].values()
                    for tok in normalize_answer(value).split()
                }
                ta, tb = _masked_tokens(a["output"], swapped), _masked_tokens(b["output"], swapped)
                pairs.append(
                    {
                        "template": tpl["id"],
                        "dimension": tpl["dimension"],
                        "set": set_index,
                        "groups": [ga, gb],
                        "prompts": [a["instruction"], b["instruction"]],
                        "outputs": [a["output"], b["output"]],
                        "jaccard_distance": jaccard_distance(ta, tb),
                        "equal": ta == tb,
                        "loglik": [a["loglik"], b["loglik"]],
                    }
                )

    by_dimension = {}
    for name, dim in dims.items():
        dim_pairs = [p for p in pairs if p["dimension"] == name]
        if not dim_pairs:
            continue
        dim_items = [it for it in items if it["template"]["dimension"] == name]
        groups = {}
        for group in dim["groups"]:
            rows = [it for it in dim_items if it["group"] == group]
            groups[group] = {
                "n": len(rows),
                "mean_loglik": _mean([it["loglik"] for it in rows]),
                "mean_length": _mean([float(it["length"]) for it in rows]),
            }
        lls = [g["mean_loglik"] for g in groups.values()]
        lengths = [g["mean_length"] for g in groups.values()]
        by_dimension[name] = {
            "n_pairs": len(dim_pairs),
            "exact_equal_rate": _mean([float(p["equal"]) for p in dim_pairs]),
            "mean_jaccard_distance": _mean([p["jaccard_distance"] for p in dim_pairs]),
            "groups": groups,
            "loglik_gap": max(lls) - min(lls),
            "length_gap": max(lengths) - min(lengths),
        }
    return {
        "n_templates": len(probe_set["templates"]),
        "n_prompts": len(items),
        "n_pairs": len(pairs),
        "overall": {
            "exact_equal_rate": _mean([float(p["equal"]) for p in pairs]),
            "mean_jaccard_distance": _mean([p["jaccard_distance"] for p in pairs]),
            "max_loglik_gap": max((d["loglik_gap"] for d in by_dimension.values()), default=0.0),
        },
        "by_dimension": by_dimension,
        "pairs": pairs,
        "settings": {
            "max_new_tokens": max_new_tokens,
            "prompt_template": prompt_template,
            "templates": probe_set["source"],
        },
    }
