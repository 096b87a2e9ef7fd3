"""Sweep planning and selection: grids, random draws, bad spaces refused before any training."""

from __future__ import annotations

import pytest

from airloom.exceptions import UsageError
from airloom.training.sweep import parse_space, plan_trials, select_best

BASE = {"method": "lora", "learning_rate": "0.003", "max_steps": "100", "seed": "0"}


def test_grid_is_every_combination_on_top_of_the_base():
    trials = plan_trials({"learning_rate": [1e-3, 3e-3], "lora_r": [8, 16, 32]}, BASE)
    assert len(trials) == 6
    assert {(t["learning_rate"], t["lora_r"]) for t in trials} == {
        (a, b) for a in (1e-3, 3e-3) for b in (8, 16, 32)
    }
    assert all(t["method"] == "lora" and t["max_steps"] == "100" for t in trials)
    assert [t["extra"]["trial"] for t in trials] == list(range(6))


def test_empty_space_is_one_trial_with_the_base_options():
    for empty in (None, "", {}, "{}"):
        (trial,) = plan_trials(empty, BASE)
        assert {k: trial[k] for k in BASE} == BASE and trial["extra"]["trial_values"] == {}


def test_random_search_is_seeded_and_within_bounds():
    space = {"learning_rate": {"log_uniform": [1e-4, 1e-2]}, "epochs": {"choice": [1, 2]}, "lora_r": [8, 16]}
    a = plan_trials(space, BASE, trials=5, seed=7)
    assert a == plan_trials(space, BASE, trials=5, seed=7)
    assert a != plan_trials(space, BASE, trials=5, seed=8)
    assert all(1e-4 <= t["learning_rate"] <= 1e-2 and t["epochs"] in (1, 2) for t in a)


def test_space_from_json_text():
    assert parse_space('{"lora_r": [4]}') == {"lora_r": [4]}


@pytest.mark.parametrize(
    "space, message",
    [
        ({"learnig_rate": [1e-3]}, "unknown training option 'learnig_rate'"),
        ({"learning_rate": {"gaussian": [0, 1]}}, "must be a list or one of"),
        ({"learning_rate": {"log_uniform": [0, 1]}}, "bounds must be > 0"),
        ({"learning_rate": []}, "non-empty list"),
        ({"learning_rate": [-1.0]}, "learning_rate must be > 0"),
        ("learning_rate=1", "not a JSON object"),
        ("None", "not a JSON object"),  # the text a non-native rendering of an empty param gives
    ],
)
def test_bad_spaces_are_refused_naming_the_option(space, message):
    with pytest.raises(UsageError, match=message):
        plan_trials(space, BASE)


def test_select_best_maximises_scores_and_minimises_losses():
    results = [
        {
            "model_dir": f"m{i}",
            "config": {"extra": {"trial": i, "trial_values": {"learning_rate": lr}}},
            "metrics": {"validation_loss": loss},
        }
        for i, (lr, loss) in enumerate([(1e-3, 0.9), (3e-3, 0.4), (1e-2, 2.0)])
    ]
    evals = [{"aggregate": {"exact_match": em}} for em in (0.2, 0.1, 0.5)]
    best, table = select_best("exact_match", results, evals)
    assert best == 2 and [r["trial"] for r in table] == [2, 0, 1]
    best, _ = select_best("validation_loss", results, evals)
    assert best == 1
    with pytest.raises(UsageError, match="no trial reports the metric 'bleu'"):
        select_best("bleu", results, evals)
