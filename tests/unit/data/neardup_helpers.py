"""Test-only conveniences over :class:`airloom.data.neardup.NearDuplicateFinder`: one-call search over a list
of texts, and one text's shingle hashes and MinHash signature (to hold them to datasketch's)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from airloom.data.neardup import (
    DEFAULT_NUM_PERM,
    DEFAULT_SEED,
    DEFAULT_SHINGLE_SIZE,
    DEFAULT_THRESHOLD,
    NearDuplicateFinder,
    NearDuplicates,
    scan_words,
)


def find_near_duplicates(
    texts: Iterable[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    shingle_size: int = DEFAULT_SHINGLE_SIZE,
    num_perm: int = DEFAULT_NUM_PERM,
    seed: int = DEFAULT_SEED,
    eligible: Sequence[bool] | np.ndarray | None = None,
    batch_size: int = 4096,
    spill_dir: str | Path | None = None,
) -> NearDuplicates:
    """Near-duplicates among ``texts`` (index order decides which copy is first), fed to the finder in
    batches of ``batch_size``; ``eligible`` as in :meth:`NearDuplicateFinder.add_texts`."""
    finder = NearDuplicateFinder(threshold, shingle_size, num_perm, seed, spill_dir=spill_dir)
    flags = None if eligible is None else np.asarray(eligible, dtype=bool)
    if flags is not None and isinstance(texts, Sequence) and len(texts) != len(flags):
        raise ValueError(f"eligible has {len(flags)} entries for {len(texts)} texts")
    batch: list[str] = []
    start = 0
    for text in chain(texts, [None]):
        if text is not None:
            batch.append(text)
        if batch and (len(batch) == batch_size or text is None):
            if flags is not None and start + len(batch) > len(flags):
                raise ValueError(f"eligible has {len(flags)} entries, fewer than the texts")
            finder.add_texts(batch, None if flags is None else flags[start : start + len(batch)])
            start += len(batch)
            batch = []
    if flags is not None and start != len(flags):
        raise ValueError(f"eligible has {len(flags)} entries for {start} texts")
    return finder.result()


def shingle_hashes(finder: NearDuplicateFinder, text: str) -> np.ndarray:
    """The distinct shingle hashes of one text, sorted (what its signature is made of)."""
    scan = scan_words([text])
    h, _ = finder._shingle_hashes(scan.hashes, scan.lengths)
    return np.unique(h)


def signature(finder: NearDuplicateFinder, text: str) -> np.ndarray:
    """The MinHash signature of one text (uint32, ``num_perm`` values), as the finder computes it for a row."""
    values = shingle_hashes(finder, text)
    sig = finder._signatures(values, np.zeros(len(values), dtype=np.int64), np.array([len(values)]))
    return sig[:, 0].copy()


def lean_minhash(signature: np.ndarray, seed: int = DEFAULT_SEED) -> Any:
    """A ``datasketch.LeanMinHash`` of a signature from :func:`signature`."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=seed, hashvalues=signature, scheme="affine32")
