"""The 64-bit keys a pass has seen (row hashes, ids), with the first row of each: what duplicate detection
keeps of millions of rows."""

from __future__ import annotations

import numpy as np


class SeenKeys:
    """Keys in a few sorted numpy runs, with the first row seen with each (``rows=True``): 12 bytes a key
    (8 as a plain set), where a dict of Python ints needs ~100.

    Runs merge like a binary counter (a new run swallows every older run no longer than itself), so there
    are O(log n) runs to search and each key is copied O(log n) times. A key is in one run at most.
    """

    def __init__(self, rows: bool = True) -> None:
        self._rows = rows
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, their first rows or nothing)

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seen = np.zeros(len(keys), dtype=bool)
        rows = np.zeros(len(keys) if self._rows else 0, dtype=np.int32)
        for run_keys, run_rows in self._runs:
            pos = np.minimum(np.searchsorted(run_keys, keys), len(run_keys) - 1)
            hit = run_keys[pos] == keys
            seen |= hit
            if self._rows:
                rows[hit] = run_rows[pos[hit]]
        return seen, rows

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self._find(keys)[0]

    def add(self, keys: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Add keys not seen yet (with their first rows, unless a plain set)."""
        keys, rows = self._sorted(keys, rows)
        while self._runs and len(self._runs[-1][0]) <= len(keys):
            old_keys, old_rows = self._runs.pop()
            keys, rows = self._sorted(np.concatenate((old_keys, keys)), np.concatenate((old_rows, rows)))
        if len(keys):
            self._runs.append((keys, rows))

    def _sorted(self, keys: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if not self._rows:
            return np.sort(keys), np.zeros(0, np.int32)
        assert rows is not None
        order = np.argsort(keys)  # keys are distinct: any sort keeps each key's row
        return keys[order], rows[order].astype(np.int32)

    def first_rows(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """For each (key, row) of a chunk, in stream order: the first row seen with that key; the chunk's
        new keys are added."""
        if not len(keys):
            return rows.copy()
        uniq, at, inverse = np.unique(keys, return_index=True, return_inverse=True)
        seen, first = self._find(uniq)
        first[~seen] = rows[at[~seen]]
        self.add(uniq[~seen], first[~seen])
        return first[inverse.reshape(-1)].astype(rows.dtype, copy=False)
