"""A synthetic instruction dataset a tiny model can learn on a CPU in minutes.

Each task family has one exact answer per prompt, so exact match measures learning honestly.
Families were chosen by measurement (FACTS.md): sorting letters and spelling out dates are
learnt by a 0.5M-parameter model in about a minute; copying and arithmetic are harder and keep
the score from saturating.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "maple",
    "tiger",
    "ocean",
    "pixel",
    "lemon",
    "amber",
    "cedar",
    "delta",
    "ember",
    "flint",
    "grove",
    "heron",
    "ivory",
    "jolly",
    "koala",
    "lunar",
]


ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_in_words(n: int) -> str:
    if n >= 100:
        hundreds, rest = divmod(n, 100)
        return ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_in_words(rest))
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])


def _number_words(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 999)
    return "Write the number in words.", str(n), number_in_words(n)


def _date_words(rng: random.Random) -> tuple[str, str, str]:
    d = date(1990, 1, 1) + timedelta(days=rng.randint(0, 365 * 40))
    return "Write the date in words.", d.isoformat(), f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def _last_word(rng: random.Random) -> tuple[str, str, str]:
    ws = rng.sample(WORDS, rng.randint(2, 6))
    return "What is the last word?", " ".join(ws), ws[-1]


def _count_words(rng: random.Random) -> tuple[str, str, str]:
    ws = rng.choices(WORDS, k=rng.randint(2, 7))
    return "How many words are there?", " ".join(ws), str(len(ws))


def _sort_letters(rng: random.Random) -> tuple[str, str, str]:
    # Letters are spaced so that each one is a token: the task is sorting, not spelling BPE merges.
    s = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))]
    return "Sort the letters alphabetically.", " ".join(s), " ".join(sorted(s))


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


# Every family has thousands of distinct items, so a realistic duplicate check passes.
# Lookups and single-token copies are learnt in about a minute; sorting and carrying additions
# are not, which keeps the score from saturating and leaves room for better recipes to show.
TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "number_words": _number_words,
    "date_words": _date_words,
    "last_word": _last_word,
    "count_words": _count_words,
    "sort_letters": _sort_letters,
    "add": _add,
}


def generate_records(n: int, seed: int = 0, tasks: list[str] | None = None) -> Iterator[dict]:
    """Yield ``n`` distinct instruction records cycling through the task families.

    Distinct, because a real corpus is deduplicated before training: repeats would only
    inflate the duplicate rate the validation suite rightly rejects.
    """
    names = tasks or list(TASKS)
    unknown = set(names) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown synthetic tasks {sorted(unknown)}; known: {sorted(TASKS)}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    for i in range(n):
        task = names[i % len(names)]
        for _ in range(1000):
            instruction, inp, response = TASKS[task](rng)
            if (instruction, inp) not in seen:
                break
        else:
            raise ValueError(f"task {task} has too few distinct items for {n} records")
        seen.add((instruction, inp))
        yield {
            "id": f"{task}-{seed}-{i}",
            "task": task,
            "instruction": instruction,
            "input": inp,
            "response": response,
        }


def write_jsonl(records, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def write_history(root: Path, days: list[date], per_day: int, seed: int = 1) -> list[Path]:
    """Dated partitions ``root/ds=YYYY-MM-DD/records.jsonl`` of historical prompts with references.

    Each day gets its own seed so partitions differ, as real traffic would.
    """
    from airloom.prompts import render_prompt

    paths = []
    for k, day in enumerate(days):
        recs = []
        for r in generate_records(per_day, seed=seed * 100_003 + k):
            recs.append(
                {
                    "id": f"{day.isoformat()}-{r['id']}",
                    "task": r["task"],
                    "prompt": render_prompt(r["instruction"], r["input"]),
                    "response": r["response"],
                }
            )
        paths.append(write_jsonl(recs, root / f"ds={day.isoformat()}" / "records.jsonl"))
    return paths


def pretraining_text(n_lines: int, seed: int = 7) -> Iterator[str]:
    """Generic text for the base model: the prompt *format* with the input echoed back.

    Echoing is a different job from every task (no task's answer equals its input), so the base
    model starts near zero on the tasks, but it has learnt the format and to attend to the input.
    """
    from airloom.prompts import render_prompt

    rng = random.Random(seed)
    names = list(TASKS)
    for i in range(n_lines):
        instruction, inp, _ = TASKS[names[i % len(names)]](rng)
        yield render_prompt(instruction, inp) + inp


def vocabulary_text() -> list[str]:
    """Lines holding every word the tasks can answer with, for training the tokenizer only."""
    numbers = [number_in_words(n) for n in range(100)] + ["hundred"]
    return [
        " ".join(WORDS),
        " ".join(MONTHS),
        " ".join(numbers),
        " ".join(string.ascii_lowercase),
        " ".join(str(n) for n in range(200)),
    ] * 20
