"""The character-class tables (numpy over code points) give what the per-character code they replace gave:
the non-letter share of composition (a regex before) and a row's script mix (a Counter before)."""

from __future__ import annotations

import random
from collections import Counter

from airloom.data import eda, text


def _scripts_by_counter(row: str) -> tuple[str, bool]:
    letters: Counter[str] = Counter()
    for ch, k in Counter(row).items():
        if ch.isalpha():
            letters[text.script_of(ch)] += k
    if not letters:
        return "none", False
    ranked = letters.most_common()  # ties: the script seen first
    return ranked[0][0], len(ranked) > 1 and ranked[1][1] >= 0.1 * sum(letters.values())


def test_tables_match_the_per_character_code():
    rng = random.Random(0)
    pool = "aбγ中あアא١ 1!é\u0301_²½Ⅻ\t\u00a0\u2028\udc80" + "".join(
        chr(rng.randint(0x80, 0x2FFFF)) for _ in range(2000)
    )
    rows = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    rows += ["ab вг", "вг ab", "aб", "бa", "１２３", "ǅ", "Ωmega"]  # ties both ways, no letters, title case
    for row in rows:
        assert eda._row_scripts(row) == _scripts_by_counter(row), row
        if row.split():
            non_alpha = len(text._ALPHA_OR_SPACE_RE.sub("", row))
            assert text.composition(row)[0] == non_alpha / len(row), row
