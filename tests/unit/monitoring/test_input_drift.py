"""Input drift of served traffic vs. the training data's EDA profile: length, vocabulary, language."""

from __future__ import annotations

import json

import pytest

from airloom.data.eda import build_profile
from airloom.data.synth import generate_records
from airloom.monitoring.drift import decide_input_drift, input_drift, profile_records
from airloom.prompts import render_prompt


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return build_profile(
        list(generate_records(400, seed=0)), tmp_path_factory.mktemp("ref"), near_duplicate_threshold=None
    )


def served(records: list[dict]) -> list[dict]:
    """Rows as airloom serve logs them: the rendered prompt and the answer."""
    return [
        {"id": str(i), "prompt": render_prompt(r["instruction"], r["input"]), "response": r["response"]}
        for i, r in enumerate(records)
    ]


def test_profile_records_parse_prompts_back_and_keep_split_rows():
    rows = profile_records(
        [
            {"prompt": render_prompt("Sort the letters.", "dcba"), "response": "abcd"},
            {"prompt": "<|user|>hi", "response": None},
            {"instruction": "Add.", "input": "1 2", "response": "3", "prompt": "ignored"},
        ]
    )
    assert [(r["instruction"], r["input"], r["response"]) for r in rows] == [
        ("Sort the letters.", "dcba", "abcd"),
        ("<|user|>hi", "", ""),
        ("Add.", "1 2", "3"),
    ]
    assert [r["_line"] for r in rows] == [1, 2, 3]


def test_same_distribution_is_stable(reference, tmp_path):
    drift = input_drift(reference, served(list(generate_records(60, seed=5))), tmp_path / "day")
    assert drift["reference_rows"] == 400 and drift["current_rows"] == 60
    assert drift["input_psi"] < 0.25, drift
    assert drift["language"]["psi_scripts"] == 0.0 and drift["language"]["scripts"]["current"] == {
        "Latin": 1.0
    }
    assert drift["vocabulary"]["js_divergence"] < 0.3
    assert decide_input_drift(drift) == []
    # the traffic's own EDA profile and report, next to the dashboard
    written = json.loads((tmp_path / "day" / "profile.json").read_text())
    assert written["rows"] == 60 and "drift" in written
    assert (tmp_path / "day" / "report.html").is_file()


def test_longer_prompts_in_another_language_cross_the_threshold(reference, tmp_path):
    french = [
        {
            "instruction": "Écris ce nombre en toutes lettres, s'il te plaît, pour mon exercice de français "
            "de demain matin.",
            "input": str(1000 + i),
            "response": "mille",
        }
        for i in range(40)
    ]
    drift = input_drift(reference, served(french), tmp_path / "fr")
    assert drift["length_psi"]["instruction"] > 0.25
    assert drift["language"]["languages"]["current"] == {"fr": 1.0}
    assert drift["language"]["psi_languages"] > 0.25
    assert drift["vocabulary"]["new_top_words_share"] > 0.5
    assert drift["input_psi"] == max(
        drift["length_psi"]["instruction"],
        drift["length_psi"]["input"],
        drift["language"]["psi_scripts"],
        drift["language"]["psi_languages"],
    )
    (reason,) = decide_input_drift(drift, max_input_psi=0.25)
    assert reason.startswith(f"input drift vs training profile {drift['input_psi']:.3f} > 0.25 (")
    assert "instruction length" in reason and "languages" in reason
    assert decide_input_drift(drift, max_input_psi=1000) == []


def test_another_script_is_a_language_shift(reference, tmp_path):
    greek = [
        {"instruction": "Γράψε τον αριθμό με λέξεις.", "input": str(i), "response": "x"} for i in range(30)
    ]
    drift = input_drift(reference, served(greek), tmp_path / "el")
    assert drift["language"]["scripts"]["current"] == {"Greek": 1.0}
    assert drift["language"]["psi_scripts"] > 0.25


def test_no_drift_decision_without_a_comparison():
    assert decide_input_drift(None) == []
    assert decide_input_drift({"input_psi": None}) == []


def test_a_handful_of_prompts_is_reported_but_decides_nothing(reference, tmp_path):
    """20 prompts from the training distribution itself: the length PSI is noise at that size."""
    same = served(list(generate_records(20, seed=5)))
    drift = input_drift(reference, same, tmp_path / "few")
    assert drift["current_rows"] == 20
    assert any("fewer than 30" in note for note in drift["notes"])
    assert decide_input_drift(drift, max_input_psi=0.0) == []  # even a zero threshold: too few rows
    assert drift["input_psi"] > 0 and decide_input_drift(drift, max_input_psi=0.0, min_rows=10)


def _conversations(n: int, seed: int) -> list[list[dict]]:
    """Two-exchange conversations from the synthetic instruction rows (every other one with a system turn)."""
    rows = list(generate_records(2 * n, seed=seed))
    out = []
    for i in range(n):
        turns = [{"role": "system", "content": "Answer briefly."}] if i % 2 else []
        for r in rows[2 * i : 2 * i + 2]:
            turns += [
                {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                {"role": "assistant", "content": r["response"]},
            ]
        out.append(turns)
    return out


def _prepared(conversations: list[list[dict]]) -> list[dict]:
    """Rows as a prepared chat split holds them: the instruction view, the ChatML prompt, the turns."""
    from airloom.prompts import chat_fields, load_template

    chatml = load_template("chatml")
    return [
        {
            "id": f"c{i}",
            **chat_fields(turns),
            "prompt": chatml.render_turns(turns[:-1], add_generation_prompt=True),
            "messages": turns,
        }
        for i, turns in enumerate(conversations)
    ]


def _served_chats(conversations: list[list[dict]]) -> list[dict]:
    """Chat requests as airloom serve logs them for a model with a ChatML chat template."""
    return [
        {
            "id": f"s{i}",
            "prompt": row["prompt"],
            "messages": row["messages"][:-1],
            "response": row["response"],
        }
        for i, row in enumerate(_prepared(conversations))
    ]


def test_profile_records_keep_conversations_in_their_own_shape():
    (turns,) = _conversations(1, seed=1)
    prepared, served_chat = _prepared([turns])[0], _served_chats([turns])[0]
    alpaca = {
        "prompt": render_prompt("Write the number in words.", "42"),
        "messages": [{"role": "user", "content": "Write the number in words.\n\n42"}],
        "response": "forty-two",
    }
    rows = profile_records([prepared, served_chat, alpaca])
    assert rows[0]["messages"] == turns and rows[1]["messages"] == turns  # request + served answer
    assert rows[0]["instruction"] == turns[-2]["content"] == rows[1]["instruction"]
    assert rows[1]["response"] == turns[-1]["content"] and rows[1]["input"] == prepared["input"]
    # served by a model without a chat template: the model read an instruction row, and so is it profiled
    assert "messages" not in rows[2]
    assert (rows[2]["instruction"], rows[2]["input"], rows[2]["response"]) == (
        "Write the number in words.",
        "42",
        "forty-two",
    )


def test_chat_traffic_against_a_chat_reference_is_stable(tmp_path):
    """The reference profile of a prepared chat split holds its conversations, and chat traffic of the
    same kind does not drift from it; read as parsed prompts (the old shape), the same traffic would."""
    reference = build_profile(
        profile_records(_prepared(_conversations(300, seed=0))),
        tmp_path / "ref",
        near_duplicate_threshold=None,
    )
    assert reference["conversations"]["count"] == 300
    assert reference["conversations"]["roles"]["system"]["conversations"] == 150
    traffic = _served_chats(_conversations(60, seed=5))
    drift = input_drift(reference, traffic, tmp_path / "day")
    assert drift["input_psi"] < 0.25, drift
    assert json.loads((tmp_path / "day" / "profile.json").read_text())["conversations"]["count"] == 60
    as_prompts = [{k: v for k, v in r.items() if k != "messages"} for r in traffic]
    assert input_drift(reference, as_prompts, tmp_path / "old")["input_psi"] > 0.25
