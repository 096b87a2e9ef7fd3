"""SeenKeys against a dict and a set: the first row of each key over many chunks (enough to merge runs)."""

from __future__ import annotations

import numpy as np

from airloom.data.seen import SeenKeys


def test_first_rows_and_membership_match_a_dict_and_a_set():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 3000, 20_000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # repeats, spread
    first: dict[int, int] = {}
    members: set[int] = set()
    seen, plain = SeenKeys(), SeenKeys(rows=False)
    start = 0
    for size in rng.integers(0, 900, 60):  # uneven chunks, empty ones too
        chunk = keys[start : start + size]
        rows = np.arange(start, start + len(chunk), dtype=np.int32)
        want = [first.setdefault(int(k), int(r)) for k, r in zip(chunk, rows, strict=True)]
        assert seen.first_rows(chunk, rows).tolist() == want
        known = plain.contains(chunk)
        assert known.tolist() == [int(k) in members for k in chunk]
        plain.add(np.unique(chunk[~known]))
        members.update(int(k) for k in chunk)
        start += len(chunk)
    assert len(first) > 2500 and len(seen._runs) <= 1 + int(np.log2(len(first)))  # a binary counter's runs
