"""The synthetic instruction dataset: distinct, reproducible, and every answer right."""

from __future__ import annotations

import json
import re
import string
from datetime import date

import pytest

from airloom.data.synth import (
    MONTHS,
    TASKS,
    WORDS,
    generate_records,
    number_in_words,
    pretraining_text,
    vocabulary_text,
    write_history,
    write_jsonl,
)
from airloom.prompts import render_prompt


def oracle(task: str, inp: str) -> str:
    """The right answer, computed independently of synth's generators."""
    if task == "number_words":
        return number_in_words(int(inp))
    if task == "date_words":
        d = date.fromisoformat(inp)
        return f"{d.day} {MONTHS[d.month - 1]} {d.year}"
    if task == "last_word":
        return inp.split()[-1]
    if task == "count_words":
        return str(len(inp.split()))
    if task == "sort_letters":
        return " ".join(sorted(inp.split()))
    if task == "add":
        a, b = inp.split(" + ")
        return str(int(a) + int(b))
    raise AssertionError(task)


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (42, "forty-two"),
        (90, "ninety"),
        (100, "one hundred"),
        (105, "one hundred five"),
        (342, "three hundred forty-two"),
        (999, "nine hundred ninety-nine"),
    ],
)
def test_number_in_words(n, words):
    assert number_in_words(n) == words


def test_records_are_distinct_and_cycle_tasks():
    records = list(generate_records(600, seed=5))
    assert len(records) == 600
    assert len({r["id"] for r in records}) == 600
    assert len({(r["instruction"], r["input"]) for r in records}) == 600
    names = list(TASKS)
    assert [r["task"] for r in records[:12]] == names * 2
    for r in records:
        assert set(r) == {"id", "task", "instruction", "input", "response"}
        assert all(isinstance(r[k], str) and r[k] for k in ("instruction", "input", "response"))


def test_deterministic_per_seed():
    assert list(generate_records(60, seed=11)) == list(generate_records(60, seed=11))
    a = [(r["input"], r["response"]) for r in generate_records(60, seed=11)]
    b = [(r["input"], r["response"]) for r in generate_records(60, seed=12)]
    assert a != b


def test_every_answer_is_correct():
    for r in generate_records(1200, seed=2):
        assert r["response"] == oracle(r["task"], r["input"]), r


def test_task_specific_shapes():
    by_task = {}
    for r in generate_records(600, seed=8):
        by_task.setdefault(r["task"], []).append(r)
    for r in by_task["add"]:
        a, b = map(int, r["input"].split(" + "))
        assert 0 <= a <= 99 and 0 <= b <= 99
    for r in by_task["sort_letters"]:
        letters = r["input"].split(" ")
        assert 3 <= len(letters) <= 6 and all(ch in string.ascii_lowercase for ch in letters)
    for r in by_task["last_word"] + by_task["count_words"]:
        assert set(r["input"].split()) <= set(WORDS)
    for r in by_task["date_words"]:
        assert date(1990, 1, 1) <= date.fromisoformat(r["input"]) <= date(2030, 12, 31)


def test_subset_of_tasks_and_unknown_task():
    records = list(generate_records(10, seed=0, tasks=["add"]))
    assert {r["task"] for r in records} == {"add"}
    with pytest.raises(ValueError, match=r"unknown synthetic tasks \['poetry'\]"):
        list(generate_records(3, tasks=["add", "poetry"]))


def test_too_few_distinct_items_is_reported():
    # The add task has only 100 * 100 distinct inputs, so 10,001 distinct records cannot exist.
    with pytest.raises(ValueError, match=r"task add has too few distinct items for 10001 records"):
        list(generate_records(10_001, seed=0, tasks=["add"]))


def test_write_jsonl_round_trip(tmp_path):
    recs = list(generate_records(5))
    path = write_jsonl(recs, tmp_path / "deep" / "out.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == recs
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_history_partitions(tmp_path):
    days = [date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)]
    paths = write_history(tmp_path, days, per_day=12, seed=1)
    assert paths == [tmp_path / f"ds={d.isoformat()}" / "records.jsonl" for d in days]
    parts = [[json.loads(line) for line in p.read_text().splitlines()] for p in paths]
    assert [len(p) for p in parts] == [12, 12, 12]
    for day, rows in zip(days, parts, strict=True):
        for row in rows:
            assert set(row) == {"id", "task", "prompt", "response"}
            assert row["id"].startswith(day.isoformat() + "-")
            m = re.fullmatch(
                r"### Instruction:\n(.*)\n### Input:\n(.*)\n### Response:\n", row["prompt"], re.S
            )
            assert m, row["prompt"]
            assert row["prompt"] == render_prompt(m.group(1), m.group(2))
            assert row["response"] == oracle(row["task"], m.group(2))
    # Each day differs, as real traffic would; the same call writes the same files.
    assert parts[0] != parts[1] != parts[2]
    again = write_history(tmp_path / "again", days, per_day=12, seed=1)
    assert [p.read_text() for p in again] == [p.read_text() for p in paths]


def test_pretraining_text_echoes_input_never_the_answer():
    instruction_to_task = {}
    for r in generate_records(len(TASKS)):
        instruction_to_task[r["instruction"]] = r["task"]
    lines = list(pretraining_text(600, seed=3))
    assert len(lines) == 600
    differing = 0
    for line in lines:
        m = re.fullmatch(r"### Instruction:\n(.*)\n### Input:\n(.*)\n### Response:\n(.*)", line, re.S)
        assert m, line
        instruction, inp, response = m.groups()
        answer = oracle(instruction_to_task[instruction], inp)
        assert response == inp
        if answer != inp:
            differing += 1
            assert response != answer, line
    assert differing > 550  # only an already-sorted letter list has answer == input
    assert list(pretraining_text(20, seed=3)) == lines[:20]


def test_vocabulary_text_covers_answer_words():
    vocab = set(" ".join(vocabulary_text()).replace("-", " ").split())
    for r in generate_records(600, seed=4):
        for word in r["response"].replace("-", " ").split():
            if not word.isdigit():
                assert word in vocab, (r["task"], word)
