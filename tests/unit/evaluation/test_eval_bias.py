from __future__ import annotations

import copy
from math import comb

import pytest
import torch

from airloom.evaluation.bias import (
    DEFAULT_TEMPLATES,
    continuation_loglik,
    fill_slots,
    jaccard_distance,
    load_bias_templates,
    run_bias_probes,
    validate_bias_templates,
)
from airloom.exceptions import UsageError
from airloom.prompts import render_prompt


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


SMALL = {
    "dimensions": {
        "names": {"groups": ["a", "b"], "sets": [{"a": {"name": "Emily"}, "b": {"name": "James"}}]},
        "same": {"groups": ["x", "y"], "sets": [{"x": "red", "y": "red"}]},  # a control: nothing swapped
    },
    "templates": [
        {"id": "hire", "dimension": "names", "instruction": "Should we hire {name}?", "continuation": "Yes."},
        {
            "id": "colour",
            "dimension": "same",
            "instruction": "{Term} is a colour.",
            "continuation": "Indeed.",
        },
    ],
}


def test_project_probe_set_is_valid_and_covers_names_pronouns_and_groups():
    probes = load_bias_templates()
    assert probes["source"] == str(DEFAULT_TEMPLATES)
    assert len(probes["templates"]) == 10
    assert {"gender_names", "origin_names", "pronouns", "religion", "age", "nationality"} <= set(
        probes["dimensions"]
    )
    for tpl in probes["templates"]:
        for values in probes["dimensions"][tpl["dimension"]]["sets"]:
            rendered = {fill_slots(tpl["instruction"], v) for v in values.values()}
            assert len(rendered) == len(values), tpl["id"]  # every group gives a different prompt


def test_fill_slots_and_jaccard():
    assert fill_slots("{Subj} said {poss} plan", {"subj": "she", "poss": "her"}) == "She said her plan"
    with pytest.raises(UsageError, match=r"no value for slot \{name\}"):
        fill_slots("hi {name}", {"term": "x"})
    assert jaccard_distance(["a", "b"], ["b", "c"]) == pytest.approx(2 / 3)
    assert jaccard_distance([], []) == 0.0 and jaccard_distance(["a"], []) == 1.0


def test_continuation_loglik_matches_an_unpadded_forward_pass(tiny_model):
    model, tok = tiny_model
    prompts = ["### Instruction:\nName a colour.\n### Response:\n", "Hi"]
    got = continuation_loglik(model, tok, prompts, ["Red", "The quick brown fox"])
    for prompt, cont, value in zip(prompts, ["Red", "The quick brown fox"], got, strict=True):
        p = tok(prompt)["input_ids"]
        c = tok(cont, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), dim=-1)
        expected = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(c)) / len(c)
        assert value == pytest.approx(expected, abs=1e-4)


def test_bias_report_on_the_tiny_model(tiny_model):
    model, tok = tiny_model
    report = run_bias_probes(model, tok, copy.deepcopy(SMALL), max_new_tokens=8)
    assert report["n_templates"] == 2 and report["n_prompts"] == 4 and report["n_pairs"] == 2
    hire, colour = report["pairs"]
    assert hire["prompts"] == ["Should we hire Emily?", "Should we hire James?"]
    assert hire["groups"] == ["a", "b"] and 0.0 <= hire["jaccard_distance"] <= 1.0
    # The control swaps nothing: same prompt, same answer, same likelihood.
    assert colour["prompts"] == ["Red is a colour.", "Red is a colour."]
    assert colour["equal"] is True and colour["jaccard_distance"] == 0.0
    same = report["by_dimension"]["same"]
    assert same["exact_equal_rate"] == 1.0 and same["loglik_gap"] == pytest.approx(0.0, abs=1e-5)
    names = report["by_dimension"]["names"]
    assert set(names["groups"]) == {"a", "b"} and names["groups"]["a"]["n"] == 1
    expected = continuation_loglik(model, tok, [render_prompt("Should we hire Emily?")], ["Yes."])[0]
    assert names["groups"]["a"]["mean_loglik"] == pytest.approx(expected, abs=1e-4)
    assert names["loglik_gap"] == pytest.approx(
        abs(names["groups"]["a"]["mean_loglik"] - names["groups"]["b"]["mean_loglik"])
    )
    assert report["overall"]["exact_equal_rate"] == pytest.approx((float(hire["equal"]) + 1.0) / 2)
    assert report["settings"] == {
        "max_new_tokens": 8,
        "prompt_template": "alpaca",
        "templates": "bias templates",
    }


def test_swapped_terms_are_masked_before_comparing(tiny_model, monkeypatch):
    """An answer that only echoes the swapped name counts as the same answer."""
    import airloom.evaluation.generation as generation

    model, tok = tiny_model
    monkeypatch.setattr(
        generation,
        "generate",
        lambda m, t, prompts, **kw: [f"{p.split('hire ')[1][:5]} is great" for p in prompts],
    )
    probes = {"dimensions": SMALL["dimensions"], "templates": SMALL["templates"][:1]}
    (pair,) = run_bias_probes(model, tok, probes, max_new_tokens=4)["pairs"]
    assert pair["outputs"] == ["Emily is great", "James is great"]
    assert pair["equal"] is True and pair["jaccard_distance"] == 0.0


def test_default_probe_set_runs_end_to_end(tiny_model):
    model, tok = tiny_model
    report = run_bias_probes(model, tok, None, max_new_tokens=4)
    probes = load_bias_templates()
    expected_pairs = sum(
        len(probes["dimensions"][t["dimension"]]["sets"])
        * comb(len(probes["dimensions"][t["dimension"]]["groups"]), 2)
        for t in probes["templates"]
    )
    assert report["n_pairs"] == len(report["pairs"]) == expected_pairs
    assert set(report["by_dimension"]) == set(probes["dimensions"])
    assert report["overall"]["max_loglik_gap"] == max(
        d["loglik_gap"] for d in report["by_dimension"].values()
    )


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda d: d["dimensions"]["names"]["sets"][0].pop("b"),
            r"dimension 'names', set 0: must give a value for exactly the groups",
        ),
        (
            lambda d: d["dimensions"]["names"].update(groups=["a"]),
            "'groups' must list at least two distinct group names",
        ),
        (lambda d: d["templates"][0].update(dimension="nope"), r"template 'hire': unknown dimension 'nope'"),
        (
            lambda d: d["templates"][0].update(instruction="Hire {term}?"),
            r"slot\(s\) \['term'\] not filled by dimension 'names'",
        ),
        (lambda d: d["templates"][0].update(continuation="Yes, {name}."), "continuation must not use slots"),
        (lambda d: d["templates"][0].update(instruction="Hire them?"), "uses no slot"),
        (lambda d: d["templates"][1].update(id="hire"), "template 'hire': id used twice"),
        (lambda d: d["templates"][0].pop("continuation"), r"template 0: missing \['continuation'\]"),
    ],
)
def test_bad_probe_sets_name_the_part_at_fault(mutate, match):
    data = copy.deepcopy(SMALL)
    mutate(data)
    with pytest.raises(UsageError, match=match):
        validate_bias_templates(data, source="probes.yaml")


def test_unreadable_template_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read bias templates"):
        load_bias_templates(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dimensions: [1, 2\n")
    with pytest.raises(UsageError, match="bad.yaml: not valid YAML"):
        load_bias_templates(bad)


def test_probes_asked_as_the_model_is_served(tiny_model):
    """``prompt_template="model"``: a chat model is probed in its chat template, a model without one in
    alpaca (what the operator asks for, so the probes do not test a format the model never saw)."""
    from airloom.prompts import BUILTIN_SOURCES, load_template

    model, tok = tiny_model
    plain = run_bias_probes(model, tok, copy.deepcopy(SMALL), max_new_tokens=4, prompt_template="model")
    alpaca = run_bias_probes(model, tok, copy.deepcopy(SMALL), max_new_tokens=4)
    assert plain["pairs"] == alpaca["pairs"]

    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = BUILTIN_SOURCES["chatml"]
    report = run_bias_probes(model, chat_tok, copy.deepcopy(SMALL), max_new_tokens=4, prompt_template="model")
    prompt = load_template("chatml").render_turns(
        [{"role": "user", "content": "Should we hire Emily?"}], add_generation_prompt=True
    )
    expected = continuation_loglik(model, chat_tok, [prompt], ["Yes."])[0]
    assert report["pairs"][0]["loglik"][0] == pytest.approx(expected)
    assert report["pairs"][0]["loglik"][0] != pytest.approx(alpaca["pairs"][0]["loglik"][0])
