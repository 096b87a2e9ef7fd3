"""Near-duplicate search: datasketch-compatible signatures, exact Jaccard, and the same answer as brute force."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash

from airloom.data.neardup import (
    WHITESPACE,
    NearDuplicateFinder,
    lsh_bands,
    scan_words,
    words,
)
from tests.unit.data.neardup_helpers import find_near_duplicates, lean_minhash, shingle_hashes, signature

TEXT = "Write a Python function that returns the sum of the squares of a list of numbers, then print it."


def _shingles(text: str, k: int = 5) -> set[tuple[str, ...]]:
    toks = words(text)
    if len(toks) < k:
        return {tuple(toks)} if toks else set()
    return {tuple(toks[i : i + k]) for i in range(len(toks) - k + 1)}


def _jaccard(a: str, b: str) -> float:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 0.0


def _brute_force(texts: list[str], t: float) -> dict[int, float]:
    """Greedy in row order over exact Jaccard: row -> Jaccard with the earlier kept row it repeats best."""
    sets = [_shingles(text) for text in texts]
    kept: list[int] = []
    out: dict[int, float] = {}
    for i, s in enumerate(sets):
        best = max((len(s & sets[c]) / len(s | sets[c]) for c in kept), default=0.0)
        if best >= t:
            out[i] = best
        else:
            kept.append(i)
    return out


@pytest.mark.parametrize("num_perm", [64, 128])
def test_signatures_are_datasketch_minhashes(num_perm):
    finder = NearDuplicateFinder(num_perm=num_perm, seed=7)
    for text in (TEXT, "short text", "x"):
        ours = signature(finder, text)
        theirs = MinHash(num_perm=num_perm, seed=7, hashfunc=lambda h: h)
        theirs.update_batch([int(h) for h in shingle_hashes(finder, text)])
        assert ours.dtype == np.uint32
        np.testing.assert_array_equal(ours, theirs.hashvalues)
    other = TEXT.replace("print it", "show the result")
    estimate = lean_minhash(signature(finder, TEXT), seed=7).jaccard(
        lean_minhash(signature(finder, other), seed=7)
    )
    assert estimate == pytest.approx(_jaccard(TEXT, other), abs=0.2)


def test_same_answer_as_brute_force_on_planted_near_duplicates(tmp_path):
    """In memory and spilled to files (as validation does for big corpora) alike."""
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(400)]
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randint(60, 120))) for _ in range(120)]
    texts = list(base)
    for _ in range(120):  # copies with 0-4 words replaced: Jaccard from 1.0 down to well under 0.8
        toks = rng.choice(base).split()
        for _ in range(rng.randint(0, 4)):
            toks[rng.randrange(len(toks))] = rng.choice(vocab)
        texts.insert(rng.randrange(len(texts) + 1), " ".join(toks))

    expected = _brute_force(texts, 0.8)
    found = find_near_duplicates(texts, threshold=0.8, batch_size=64)  # several batches
    spilled = find_near_duplicates(texts, threshold=0.8, batch_size=64, spill_dir=tmp_path)
    assert spilled.of == found.of and spilled.pairs_checked == found.pairs_checked
    assert list(tmp_path.iterdir()) == []  # the scratch files are gone
    assert 50 < len(expected) < 110  # the fixture plants copies above and below the threshold
    assert set(found.of) == set(expected)
    for row, (first, jaccard) in found.of.items():
        assert first < row and first not in found.of  # points at an earlier row that is kept
        assert jaccard == round(_jaccard(texts[first], texts[row]), 4) >= 0.8
        assert jaccard == pytest.approx(expected[row], abs=1e-4)
    assert found.count == len(expected)
    clusters = found.clusters()
    assert sum(len(g) - 1 for g in clusters) == found.count
    assert all(g[0] not in found.of and all(found.of[r][0] == g[0] for r in g[1:]) for g in clusters)


def test_case_punctuation_and_spacing_do_not_hide_a_copy_and_chains_keep_the_far_end():
    a = "one two three four five six seven eight nine ten"
    b = "one two three four five six seven eight nine ten eleven"  # 6/7 shingles shared with a
    c = "one two three four five six seven eight nine ten eleven twelve"  # 6/8 with a, 7/8 with b
    texts = [a, "ONE, two;  three four five six seven eight nine ten!", b, c, "", "Hi there", "hi... THERE"]
    found = find_near_duplicates(texts, threshold=0.8)
    assert found.of == {1: (0, 1.0), 2: (0, 0.8571), 6: (5, 1.0)}  # 3 is kept: only b (removed) is close
    assert _jaccard(a, c) < 0.8 <= _jaccard(b, c)


def test_ineligible_rows_are_neither_flagged_nor_kept_as_first_copies():
    texts = [TEXT, TEXT + " now", TEXT + " again"]
    assert set(find_near_duplicates(texts).of) == {1, 2}
    found = find_near_duplicates(texts, eligible=[False, True, True])
    assert found.of == {2: (1, pytest.approx(_jaccard(texts[1], texts[2]), abs=1e-4))}
    with pytest.raises(ValueError, match="eligible has 2 entries for 3 texts"):
        find_near_duplicates(texts, eligible=[True, True])


def test_bands_catch_a_pair_at_the_threshold_and_settings_are_checked():
    for t in (0.5, 0.7, 0.8, 0.9):
        for p in (64, 128):
            b, r = lsh_bands(t, p)
            assert b * r <= p and 1 - (1 - t**r) ** b >= 0.99
    assert lsh_bands(0.8, 128) == (21, 6)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        NearDuplicateFinder(threshold=0)
    with pytest.raises(ValueError, match="num_perm must be 2..256"):
        NearDuplicateFinder(num_perm=1000)


def test_word_hashes_are_stable_and_distinct():
    first, again = scan_words(["b a b c"]), scan_words(["c", "b", "a"])
    assert first.hashes[[3, 0, 1]].tolist() == again.hashes.tolist()  # a word's hash, wherever it is
    assert first.hashes[0] == first.hashes[2]
    assert len(set(scan_words([f"w{i}" for i in range(5000)]).hashes.tolist())) == 5000
    assert find_near_duplicates([]).count == 0


def test_the_fast_byte_split_is_words_and_both_entry_points_agree():
    assert "".join(ch for ch in map(chr, range(0x110000)) if ch.isspace()) == WHITESPACE
    texts = [
        "Hello, World!  It's\tfine\u00a0here\u2003now\u3000ok\u201csaid\u201d",
        "ÉCOLE naïve Straße İstanbul — café… «quoted» 「日本語」のテキスト",
        "def f(x_1):\n    return x_1 ** 2  # snake_case stays\x1cwhole",
        "",
        "   \n\t ",
        "Привет, мир! Это тест. Мы проверяем слова",
    ]
    scan = scan_words(texts)
    expected = [words(t) for t in texts]
    assert scan.lengths.tolist() == [len(w) for w in expected]
    one_by_one = [h for ws in expected for w in ws for h in scan_words([w]).hashes.tolist()]
    assert scan.hashes.tolist() == one_by_one
    assert [scan.word(k) for k in range(len(scan.hashes))] == [w for ws in expected for w in ws]
    assert expected[0] == ["hello", "world", "it", "s", "fine", "here", "now", "ok", "said"]
    # every non-ASCII separator, each replaced in the UTF-8 bytes
    separated = "ä" + "ö".join(WHITESPACE[10:]) + "ü¡¿·‐‑‒–—‘’‚“”„…‹›、。《》「」【】！（），：；？end"
    assert [scan_words([separated]).word(k) for k in range(len(words(separated)))] == words(separated)
    assert len(words(separated)) == len(WHITESPACE) - 10 + 2

    by_text, by_hashes = NearDuplicateFinder(threshold=0.5), NearDuplicateFinder(threshold=0.5)
    more = [*texts, texts[1] + " encore", texts[5] + " Ещё"]
    by_text.add_texts(more)
    words_of_each = [words(t) for t in more]
    flat = [h for ws in words_of_each for w in ws for h in scan_words([w]).hashes.tolist()]
    by_hashes.add_hashes(np.array(flat, dtype=np.uint32), np.array([len(ws) for ws in words_of_each]))
    assert by_text.result().of == by_hashes.result().of == {6: (1, 0.8), 7: (5, 0.75)}
    assert by_text._store._keys[0].tolist() == by_hashes._store._keys[0].tolist()
