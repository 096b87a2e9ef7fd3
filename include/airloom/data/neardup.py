"""Near-duplicate rows: MinHash over word shingles, an LSH index, and exact Jaccard to confirm.

Rows are compared as *sets of word k-shingles* (default 5): the text is lower-cased, punctuation
becomes a space and it is split on whitespace (:func:`words`), so case, punctuation and spacing
changes do not hide a copy. A row with fewer than k words is one shingle of all its words.

Everything runs on numpy arrays in batches, so 100k+ rows take seconds, not minutes:

1. Words are cut and hashed on the UTF-8 bytes of a whole batch at once (:func:`scan_words`), not
   one Python string per word.
2. MinHash signatures are bit for bit those of ``datasketch.MinHash(num_perm, seed=seed,
   hashfunc=lambda h: h)`` (scheme ``affine32``) updated with the row's shingle hashes, so a
   signature can be wrapped in ``datasketch.LeanMinHash`` and used with datasketch's own indexes.
3. LSH banding (``bands`` x ``rows_per_band``) is chosen so that a pair exactly at the threshold
   becomes a candidate with probability >= 99% (more above it); rows sharing a band are candidates.
4. Candidates are ranked by the Jaccard their signatures estimate, those more than 3 standard
   errors below the threshold dropped, and the rest confirmed with the *exact* Jaccard of the two
   shingle sets (at most three per row), so every reported similarity is exact and >= threshold.
   Recall is probabilistic (steps 3-4); in tests against brute force it misses about 1 in 1000.

Rows are kept greedily in order: a row is a near-duplicate when it reaches the threshold with an
earlier row that is itself kept (the most similar one is named), so a chain A~B~C where C is far
from A keeps A and C.
"""

from __future__ import annotations

import itertools
import mmap
import re
import shutil
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.8
DEFAULT_SHINGLE_SIZE = 5
DEFAULT_NUM_PERM = 128
DEFAULT_SEED = 1
_MAX32 = np.uint32(0xFFFFFFFF)
_CHUNK = 32768  # shingles per permutation block: P x 32768 uint32 = 16 MiB at P=128
_CANDIDATES_PER_BAND = 2  # earliest and nearest-earlier bucket mates taken per band
_CHECKS_PER_ROW = 3  # earlier kept rows (best estimates first) checked exactly per row
_ROW_BLOCK = 8192  # rows whose candidate pairs are ranked and checked together
_GAP = 32  # signature rows this close are read together (see _Spill.signatures)
_SPAN = 2048  # signature rows read at a time: 1 MiB at 128 permutations
_RECALL = 0.99  # wanted chance that a pair exactly at the threshold becomes a candidate
_RELEASE_EVERY = 128  # exact checks between releases of mapped pages (each maps up to ~64 KiB: fault-around)

_ASCII_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~"  # "_" stays: it is part of identifiers
_OTHER_PUNCT = (
    "\u00a1\u00ab\u00b7\u00bb\u00bf\u2010\u2011\u2012\u2013\u2014\u2018\u2019\u201a\u201c\u201d\u201e"
    "\u2026\u2039\u203a\u3001\u3002\u300a\u300b\u300c\u300d\u3010\u3011\uff01\uff08\uff09\uff0c\uff1a"
    "\uff1b\uff1f"
)
#: Every character ``str.split()`` splits on, the 10 ASCII ones first.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_PUNCT = str.maketrans(dict.fromkeys(_ASCII_PUNCT + _OTHER_PUNCT, " "))
# The same split done on UTF-8 bytes (see scan_words): the non-ASCII punctuation and whitespace first (a
# regex over the bytes: str.translate with a dict looks up every character, ~5x slower on non-ASCII text)...
_NON_ASCII_RE = re.compile(
    b"|".join(re.escape(c.encode()) for c in sorted(set(_OTHER_PUNCT + WHITESPACE[10:])))
)
# ... then ASCII punctuation and whitespace.
_ASCII_BYTES = bytes.maketrans((_ASCII_PUNCT + WHITESPACE[:10]).encode(), b" " * (len(_ASCII_PUNCT) + 10))
# Word hash: polynomial over the word's UTF-8 bytes mod 2**32, plus its length, then MurmurHash3's finalizer.
_WORD_P, _WORD_P2 = 0x9E3779B1, 0x7FEB352D
# Odd 64-bit multipliers: shingle positions, then band positions (multiply-shift hashing).
_rng = np.random.default_rng(20240611)
_SHINGLE_MUL = _rng.integers(0, 2**63, 64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_BAND_MUL = _rng.integers(0, 2**63, 256, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
del _rng


def words(text: str) -> list[str]:
    """The words shingles are made of: lower-cased, punctuation removed, split on whitespace."""
    return text.lower().translate(_PUNCT).split()


_POWERS: dict[int, np.ndarray] = {}


def _word_powers(base: int, n: int) -> np.ndarray:
    """``base**k mod 2**32`` for k < n, cached (numpy's uint32 products wrap: that is the modulo)."""
    powers = _POWERS.get(base)
    if powers is None or len(powers) < n:
        powers = np.full(max(n, 1024), base, dtype=np.uint32)
        powers[0] = 1
        _POWERS[base] = powers = np.cumprod(powers, out=powers)
    return powers[:n]


@dataclass
class WordScan:
    """The words of a batch of texts (what :func:`words` returns) as arrays, not one string per word.

    Attributes:
        hashes: Each word's 32-bit hash (what every signature is built on), all texts' words end to end.
        lengths: Words per text.
        keys: Each word's 64-bit identity (a second, independent hash in the high half), when asked for.
        blob: The lower-cased bytes, punctuation turned to spaces, the words were cut from.
        starts, sizes: Each word's place in ``blob``.
    """

    hashes: np.ndarray
    lengths: np.ndarray
    keys: np.ndarray | None
    blob: bytes
    starts: np.ndarray
    sizes: np.ndarray

    def word(self, k: int) -> str:
        """The k-th word as text."""
        start = int(self.starts[k])
        return self.blob[start : start + int(self.sizes[k])].decode("utf-8", "surrogatepass")


def _hash_bytes(arr: np.ndarray, is_word: np.ndarray, sizes: np.ndarray, base: int, salt: int) -> np.ndarray:
    """Per word: the bytes weighted by powers of ``base`` for their place in the word, summed, mixed."""
    offsets = np.cumsum(sizes) - sizes  # where each word starts among the word bytes
    place = np.ones(int(offsets[-1] + sizes[-1]), dtype=np.int64)
    place[0] = 0
    place[offsets[1:]] = 1 - sizes[:-1]  # back to 0 at each word's first byte
    np.cumsum(place, out=place)
    weighted = arr[is_word].astype(np.uint32) * _word_powers(base, int(sizes.max()))[place]
    total = np.add.reduceat(weighted, offsets, dtype=np.uint32)
    return _fmix32(total + sizes.astype(np.uint32) * np.uint32(salt))


def scan_words(texts: Sequence[str], keys: bool = False) -> WordScan:
    """:func:`words` of each text and their hashes, vectorized over the UTF-8 bytes of the whole batch.

    Only the lower-casing (and, for non-ASCII text, the non-ASCII punctuation and whitespace) is done
    per text; splitting and hashing run on the joined bytes.
    """
    parts = []
    for text in texts:
        text = text.lower()
        encoded = text.encode("utf-8", "surrogatepass")
        parts.append(encoded if text.isascii() else _NON_ASCII_RE.sub(b" ", encoded))
    blob = b" ".join(parts).translate(_ASCII_BYTES)  # a space between texts ends their last words
    arr = np.frombuffer(blob, dtype=np.uint8)
    is_word = arr != 32
    edges = np.flatnonzero(np.diff(is_word, prepend=False, append=False))
    starts, sizes = edges[0::2], edges[1::2] - edges[0::2]
    text_sizes = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    text_starts = np.cumsum(text_sizes + 1) - text_sizes - 1
    lengths = np.bincount(np.searchsorted(text_starts, starts, side="right") - 1, minlength=len(parts))
    if not len(starts):
        empty = np.zeros(0, dtype=np.uint32)
        return WordScan(empty, lengths, empty.astype(np.uint64) if keys else None, blob, starts, sizes)
    hashes = _hash_bytes(arr, is_word, sizes, _WORD_P, 1)
    ids = None
    if keys:
        high = _hash_bytes(arr, is_word, sizes, _WORD_P2, 0x85EBCA6B).astype(np.uint64) << np.uint64(32)
        ids = high | hashes.astype(np.uint64)
    return WordScan(hashes, lengths.astype(np.int64), ids, blob, starts, sizes)


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort + compare: many times faster than ``np.unique`` on uint64 here)."""
    values = np.sort(values)
    if values.size < 2:
        return values
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


@dataclass
class NearDuplicates:
    """Which rows nearly repeat an earlier kept row, as three parallel arrays (a few bytes per row
    found, however many there are).

    Attributes:
        members: The rows that repeat an earlier row, ascending (int32).
        firsts: For each of ``members``, the earlier kept row it repeats (int32).
        jaccards: For each of ``members``, the exact Jaccard of the two rows' shingle sets (4 decimals).
        threshold, shingle_size, num_perm, bands, rows_per_band: The settings used.
        rows: Rows looked at.
        pairs_checked: Candidate pairs whose Jaccard was computed (a measure of LSH work).
    """

    members: np.ndarray
    firsts: np.ndarray
    jaccards: np.ndarray
    threshold: float
    shingle_size: int
    num_perm: int
    bands: int
    rows_per_band: int
    rows: int
    pairs_checked: int = 0

    @property
    def count(self) -> int:
        """Rows that would be removed: each near-duplicate counts once, its first copy not at all."""
        return len(self.members)

    @property
    def of(self) -> dict[int, tuple[int, float]]:
        """Row -> (the earlier kept row it repeats, Jaccard), as a dict (for small results and tests)."""
        return dict(
            zip(
                self.members.tolist(),
                zip(self.firsts.tolist(), self.jaccards.tolist(), strict=True),
                strict=True,
            )
        )

    def first_of(self, row: int) -> tuple[int, float] | None:
        """(the earlier kept row ``row`` repeats, Jaccard), or None when it repeats none."""
        k = int(np.searchsorted(self.members, row))
        if k < len(self.members) and self.members[k] == row:
            return int(self.firsts[k]), float(self.jaccards[k])
        return None

    def flags(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """One bool per row of ``[start, stop)`` (default: all rows): does it repeat an earlier row?"""
        stop = self.rows if stop is None else stop
        flags = np.zeros(stop - start, dtype=bool)
        lo, hi = np.searchsorted(self.members, [start, stop])
        flags[self.members[lo:hi] - start] = True
        return flags

    @property
    def cluster_count(self) -> int:
        """Groups of a kept row and the rows that repeat it."""
        return len(np.unique(self.firsts))

    def clusters(self, limit: int | None = None) -> list[list[int]]:
        """Groups of rows: the kept row first, then the rows that repeat it; biggest groups first
        (ties: the earlier kept row first); the first ``limit`` groups only when given."""
        firsts, sizes = np.unique(self.firsts, return_counts=True)
        order = np.lexsort((firsts, -sizes))[:limit]
        by_first = np.argsort(self.firsts, kind="stable")  # members ascending within a group
        starts = np.concatenate(([0], np.cumsum(sizes)))
        return [
            [int(firsts[g]), *self.members[by_first[starts[g] : starts[g + 1]]].tolist()]
            for g in order.tolist()
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "shingle_size": self.shingle_size,
            "num_perm": self.num_perm,
            "bands": self.bands,
            "rows_per_band": self.rows_per_band,
        }


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): the longest bands that still catch a pair at ``threshold`` 99% of the time.

    Longer bands mean fewer false candidates; the exact Jaccard check removes those that remain.
    """
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= _RECALL:
            return b, r
    return num_perm, 1


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch applies it before its affine32 permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class NearDuplicateFinder:
    """Feed rows in batches (:meth:`add_texts`, or :meth:`add_hashes` with words already scanned), then
    ask for :meth:`result`.

    Memory per row: the row's distinct shingle hashes (4 bytes each) and ``bands`` 8-byte band keys;
    signatures are dropped once banded.
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        shingle_size: int = DEFAULT_SHINGLE_SIZE,
        num_perm: int = DEFAULT_NUM_PERM,
        seed: int = DEFAULT_SEED,
        spill_dir: str | Path | None = None,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if not 1 <= shingle_size <= len(_SHINGLE_MUL):
            raise ValueError(f"shingle_size must be 1..{len(_SHINGLE_MUL)}, got {shingle_size!r}")
        if not 2 <= num_perm <= len(_BAND_MUL):
            raise ValueError(f"num_perm must be 2..{len(_BAND_MUL)}, got {num_perm!r}")
        self.threshold, self.shingle_size, self.num_perm, self.seed = threshold, shingle_size, num_perm, seed
        # datasketch 2.0's affine32 permutations (MinHash._init_permutations), drawn the same way here
        # rather than importing datasketch (half a second); a test holds the signatures to datasketch's
        gen = np.random.RandomState(seed)
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        self._a = np.ascontiguousarray(a)[:, None]
        self._b = np.ascontiguousarray(b)[:, None]
        self.bands, self.rows_per_band = lsh_bands(threshold, num_perm)
        self._rows = 0
        self._counts: list[np.ndarray] = []  # distinct shingles per row
        self._eligible: list[np.ndarray] = []
        # per row: its distinct shingle hashes (sorted), its signature (to rank candidates) and its band
        # keys; in memory, or appended to files under spill_dir and read back in slices
        self._store = (
            _Store(self.bands, num_perm) if spill_dir is None else _Spill(spill_dir, self.bands, num_perm)
        )
        self._buf = np.empty((num_perm, _CHUNK), dtype=np.uint32)

    # --- input ------------------------------------------------------------------------------------

    def add_texts(self, texts: Sequence[str], eligible: Sequence[bool] | np.ndarray | None = None) -> None:
        """Add one batch of rows (a few thousand at a time keeps the temporary arrays small)."""
        scan = scan_words(texts)
        self.add_hashes(scan.hashes, scan.lengths, eligible)

    def add_hashes(
        self,
        token_hashes: np.ndarray,
        lengths: np.ndarray,
        eligible: Sequence[bool] | np.ndarray | None = None,
    ) -> None:
        """Add one batch given as word hashes (:attr:`WordScan.hashes`, all rows end to end) and words per row."""
        n = len(lengths)
        ok = np.ones(n, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
        if len(ok) != n:
            raise ValueError(f"eligible has {len(ok)} entries for {n} rows")
        shingles, row_of = self._shingle_hashes(token_hashes, np.asarray(lengths, dtype=np.int64))
        keep = ok[row_of]
        # distinct (row, shingle) pairs, sorted by row then hash
        pairs = _unique((row_of[keep].astype(np.uint64) << np.uint64(32)) | shingles[keep].astype(np.uint64))
        rows = (pairs >> np.uint64(32)).astype(np.int64)
        values = (pairs & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        counts = np.bincount(rows, minlength=n).astype(np.int64)
        self._counts.append(counts.astype(np.int32))
        self._eligible.append(ok & (counts > 0))
        sig = self._signatures(values, rows, counts)
        self._store.append(values, np.ascontiguousarray(sig.T), self._band_keys(sig))
        self._rows += n

    def _shingle_hashes(self, th: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hash of each shingle and the (batch) row it belongs to."""
        k = self.shingle_size
        n, m = len(lengths), len(th)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        t64 = th.astype(np.uint64)
        parts_h, parts_row = [], []
        if m >= k:
            acc = t64[: m - k + 1] * _SHINGLE_MUL[0]
            for j in range(1, k):
                acc += t64[j : m - k + 1 + j] * _SHINGLE_MUL[j]
            row_of_pos = np.repeat(np.arange(n), lengths)[: m - k + 1]
            valid = np.arange(m - k + 1) + k <= ends[row_of_pos]
            parts_h.append(acc[valid])
            parts_row.append(row_of_pos[valid])
        short = np.flatnonzero((lengths > 0) & (lengths < k))
        if short.size:  # one shingle of all the row's words
            acc = np.zeros(short.size, dtype=np.uint64)
            for j in range(k - 1):
                has = lengths[short] > j
                acc[has] += t64[starts[short[has]] + j] * _SHINGLE_MUL[j]
            parts_h.append(acc)
            parts_row.append(short)
        if not parts_h:
            return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
        h = np.concatenate(parts_h)
        return (h >> np.uint64(32)).astype(np.uint32), np.concatenate(parts_row)

    def _signatures(self, values: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(num_perm, rows) MinHash values; rows without shingles keep the empty value 2**32-1."""
        n = len(counts)
        sig = np.full((self.num_perm, n), _MAX32, dtype=np.uint32)
        if not values.size:
            return sig
        mixed = _fmix32(values)
        seg_starts = np.concatenate(([0], np.cumsum(counts)[:-1]))[counts > 0]
        for c0 in range(0, len(mixed), _CHUNK):
            c1 = min(c0 + _CHUNK, len(mixed))
            buf = self._buf[:, : c1 - c0]
            np.multiply(self._a, mixed[None, c0:c1], out=buf)
            np.add(buf, self._b, out=buf)
            inside = seg_starts[(seg_starts > c0) & (seg_starts < c1)]
            idx = np.concatenate(([c0], inside)) - c0
            target = rows[c0 + idx]
            sig[:, target] = np.minimum(sig[:, target], np.minimum.reduceat(buf, idx, axis=1))
        return sig

    def _band_keys(self, sig: np.ndarray) -> np.ndarray:
        r = self.rows_per_band
        keys = np.empty((self.bands, sig.shape[1]), dtype=np.uint64)
        for band in range(self.bands):
            block = sig[band * r : (band + 1) * r].astype(np.uint64)
            keys[band] = (block * _BAND_MUL[:r, None]).sum(axis=0, dtype=np.uint64) ^ np.uint64(band)
        return keys

    def close(self) -> None:
        """Remove the scratch files, if any (:meth:`result` does too)."""
        self._store.close()

    # --- result -----------------------------------------------------------------------------------

    def result(self) -> NearDuplicates:
        """Confirm the LSH candidates with exact Jaccard and decide which rows repeat which.

        Candidates are ranked by the Jaccard their signatures estimate; those estimated well below
        the threshold (more than 3 standard errors) are dropped unchecked, and for each row the
        most similar of its (at most three) best-estimated earlier kept rows, confirmed exactly, wins.
        """
        n = self._rows
        members, firsts, jaccards = array("i"), array("i"), array("d")  # what is found, compactly

        def found(checked: int = 0) -> NearDuplicates:
            return NearDuplicates(
                np.array(members, dtype=np.int32), np.array(firsts, dtype=np.int32),
                np.array(jaccards, dtype=np.float64), self.threshold, self.shingle_size, self.num_perm,
                self.bands, self.rows_per_band, n, checked,
            )  # fmt: skip

        if n == 0:
            return found()
        store = self._store
        store.seal()
        counts = np.concatenate(self._counts)
        offsets = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
        rows = np.flatnonzero(np.concatenate(self._eligible)).astype(np.int32)
        if len(rows) > 1:
            for band in range(self.bands):
                store.put_partners(band, _partners(_take(store.band_keys(band), rows), rows))
        t, p = self.threshold, self.num_perm
        floor = t - max(0.05, 3 * (t * (1 - t) / p) ** 0.5)
        removed = bytearray(n)  # 1: the row repeats an earlier one, so it is no row's first copy
        checked = 0
        current, tries, best, best_jac = -1, 0, -1, 0.0
        shingles = store.all_shingles()
        # Rows in blocks, in order: each block's candidate pairs are made, ranked and checked before the
        # next block's exist, so memory holds one block's pairs, not the corpus's (tens of millions).
        for r0 in range(0, len(rows) if len(rows) > 1 else 0, _ROW_BLOCK):
            r1 = min(r0 + _ROW_BLOCK, len(rows))
            slots = np.concatenate([store.partners(band, r0, r1) for band in range(self.bands)], axis=1)
            # each row's distinct partners (-1: none) in (later, earlier) order: sorting each row's few
            # dozen slots costs a fraction of sorting the block's pairs as 64-bit keys
            slots.sort(axis=1)
            new = slots >= 0
            new[:, 1:] &= slots[:, 1:] != slots[:, :-1]
            later = np.repeat(rows[r0:r1], slots.shape[1])[new.reshape(-1)]
            earlier = slots[new]
            # |A|/|B| bounds the Jaccard of A and B from above
            a, b = counts[later], counts[earlier]
            ok = np.minimum(a, b) >= t * np.maximum(a, b)
            later, earlier = later[ok], earlier[ok]
            estimate = np.empty(len(later), dtype=np.float32)
            for c0 in range(0, len(later), 4096):  # 4096 rows' signatures: ~2 MiB, up to 16 MiB of pages
                c1 = c0 + 4096
                same = store.signatures(later[c0:c1]) == store.signatures(earlier[c0:c1])
                estimate[c0:c1] = np.count_nonzero(same, axis=1) / p
            ok = estimate >= floor  # well below the threshold: dropped unchecked
            later, earlier, estimate = later[ok], earlier[ok], estimate[ok]
            order = np.lexsort((-estimate, later))
            later, earlier = later[order], earlier[order]
            for c0 in range(0, len(later), 16384):  # as Python numbers a slice at a time
                li, ei = later[c0 : c0 + 16384], earlier[c0 : c0 + 16384]
                for i, c, a0, a1, b0, b1 in zip(
                    li.tolist(), ei.tolist(), offsets[li].tolist(), offsets[li + 1].tolist(),
                    offsets[ei].tolist(), offsets[ei + 1].tolist(), strict=True,
                ):  # fmt: skip
                    if i != current:  # rows come in order, so the last row's verdict is final
                        if best >= 0:
                            members.append(current)
                            firsts.append(best)
                            jaccards.append(round(best_jac, 4))
                        current, tries, best = i, 0, -1
                    if tries >= _CHECKS_PER_ROW or removed[c]:
                        continue
                    tries += 1
                    checked += 1
                    # counted here, not in release(): a method call per pair adds up
                    if not checked % _RELEASE_EVERY:
                        store.release()
                    sa = shingles[a0:a1]
                    sb = shingles[b0:b1]
                    # take(clip) maps a past-the-end position onto sb's last value, which then differs
                    inter = int(np.count_nonzero(sb.take(sb.searchsorted(sa), mode="clip") == sa))
                    jac = inter / (a1 - a0 + b1 - b0 - inter)
                    if jac >= t and (best < 0 or jac > best_jac):
                        best, best_jac = c, jac
                        removed[i] = 1
        if best >= 0:
            members.append(current)
            firsts.append(best)
            jaccards.append(round(best_jac, 4))
        store.close()
        return found(checked)


def _take(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values[rows]``, without a copy when ``rows`` is every row."""
    return values if len(rows) == len(values) else values[rows]


def _partners(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each of ``rows`` (in order), the earlier rows sharing its band key that it is compared with.

    Returns (len(rows), 2 * _CANDIDATES_PER_BAND) row numbers, -1 for none: the first members of its
    run of equal keys (likely the kept copies), then its nearest earlier members. (Temporaries are
    int32 and freed early: at millions of rows this is the near-duplicate search's largest moment.)
    """
    m = len(rows)
    slots = np.full((m, 2 * _CANDIDATES_PER_BAND), -1, dtype=np.int32)
    order = np.argsort(keys)  # numpy's SIMD quicksort, ~5x its stable sort; row order restored below
    new = np.empty(m, dtype=bool)
    new[0] = True
    sorted_keys = keys[order]
    del keys  # the caller passes a temporary: this frees it
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
    del sorted_keys
    if new.all():
        return slots
    # equal keys in row order: (run number, position) sorted as one int64, in place, then the position
    composite = np.cumsum(new, dtype=np.int64)
    composite -= 1
    composite *= m
    composite += order
    del order
    composite.sort()
    composite %= m
    order = composite.astype(np.int32)
    del composite
    pos = np.arange(m, dtype=np.int32)
    run_start = np.where(new, pos, np.int32(0))
    del new
    np.maximum.accumulate(run_start, out=run_start)
    sorted_rows = rows[order]
    for d in range(_CANDIDATES_PER_BAND):
        lead = run_start + np.int32(d)
        ok = lead < pos
        slots[order[ok], 2 * d] = sorted_rows[lead[ok]]
        del lead, ok
        near = pos[d + 1 :]
        near = near[run_start[near] <= near - d - 1]
        slots[order[near], 2 * d + 1] = sorted_rows[near - d - 1]
    return slots


class _Store:
    """Per-row shingles, signatures and band keys of a :class:`NearDuplicateFinder`, in memory."""

    def __init__(self, bands: int, num_perm: int) -> None:
        self._shingles: list[np.ndarray] = []
        self._sigs: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []  # (bands, rows) per batch
        self._partners: dict[int, np.ndarray] = {}  # band -> _partners() of the eligible rows

    def append(self, shingles: np.ndarray, sigs: np.ndarray, keys: np.ndarray) -> None:
        self._shingles.append(shingles)
        self._sigs.append(sigs)
        self._keys.append(keys)

    def seal(self) -> None:
        for parts in (self._shingles, self._sigs):
            if len(parts) > 1:
                parts[:] = [np.concatenate(parts)]
        if len(self._keys) > 1:
            self._keys[:] = [np.concatenate(self._keys, axis=1)]

    def band_keys(self, band: int) -> np.ndarray:
        return self._keys[0][band]

    def put_partners(self, band: int, slots: np.ndarray) -> None:
        self._partners[band] = slots

    def partners(self, band: int, start: int, end: int) -> np.ndarray:
        return self._partners[band][start:end]

    def signatures(self, rows: np.ndarray) -> np.ndarray:
        return self._sigs[0][rows]

    def all_shingles(self) -> np.ndarray:
        """Every row's distinct shingle hashes end to end, sorted within a row (read-only)."""
        return self._shingles[0] if self._shingles else np.zeros(0, dtype=np.uint32)

    def release(self) -> None:
        """Called every ``_RELEASE_EVERY`` reads of :meth:`all_shingles`: a store on disk lets go of the
        pages read."""

    def close(self) -> None:
        pass


class _Spill(_Store):
    """The same, appended to files as rows come and read back through memory maps whose pages are
    released as they are passed, so memory stays flat however many rows there are (the page cache,
    not the process, holds the data)."""

    def __init__(self, spill_dir: str | Path, bands: int, num_perm: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="neardup.", dir=spill_dir))
        self.num_perm = num_perm
        self._files = {
            "shingles": open(self.dir / "shingles.u32", "wb"),  # noqa: SIM115 - closed in seal()
            "sigs": open(self.dir / "sigs.u32", "wb"),  # noqa: SIM115
            **{f"band{b}": open(self.dir / f"band{b}.u64", "wb") for b in range(bands)},  # noqa: SIM115
        }
        self._maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}
        self._sig_file: Any = None

    def append(self, shingles: np.ndarray, sigs: np.ndarray, keys: np.ndarray) -> None:
        self._files["shingles"].write(np.ascontiguousarray(shingles, dtype=np.uint32).tobytes())
        self._files["sigs"].write(np.ascontiguousarray(sigs, dtype=np.uint32).tobytes())
        for b, row in enumerate(keys):
            self._files[f"band{b}"].write(np.ascontiguousarray(row, dtype=np.uint64).tobytes())

    def seal(self) -> None:
        for fh in self._files.values():
            fh.close()

    def _map(self, name: str, dtype: Any) -> np.ndarray:
        """The file as a flat array over a read-only memory map (a plain ndarray: slicing it is cheap)."""
        got = self._maps.get(name)
        if got is None:
            path = self.dir / name
            if not path.stat().st_size:
                return np.zeros(0, dtype=dtype)
            with open(path, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            got = self._maps[name] = (mapped, np.frombuffer(mapped, dtype=dtype))
        return got[1]

    def release(self) -> None:
        for mapped, _ in self._maps.values():
            mapped.madvise(mmap.MADV_DONTNEED)  # drop the pages from this process, not the file

    def band_keys(self, band: int) -> np.ndarray:
        return np.fromfile(self.dir / f"band{band}.u64", dtype=np.uint64)

    def put_partners(self, band: int, slots: np.ndarray) -> None:
        slots.tofile(self.dir / f"partners{band}.i32")
        self._width = slots.shape[1]

    def partners(self, band: int, start: int, end: int) -> np.ndarray:
        w = self._width
        got = np.fromfile(
            self.dir / f"partners{band}.i32", dtype=np.int32, count=(end - start) * w, offset=4 * start * w
        )
        return got.reshape(-1, w)

    def signatures(self, rows: np.ndarray) -> np.ndarray:
        # Read, not mapped: a page fault maps its neighbours too (fault-around, whole large folios), so a
        # few thousand scattered rows through a memory map would put hundreds of MiB in the process.
        if self._sig_file is None:
            self._sig_file = open(self.dir / "sigs.u32", "rb")  # noqa: SIM115 - closed in close()
        p = self.num_perm
        uniq, inverse = np.unique(rows, return_inverse=True)
        got = np.empty((len(uniq), p), dtype=np.uint32)
        # Rows less than _GAP apart are read as one span (the rows between read and dropped): one read
        # costs more than copying a few dozen rows more, and wanted rows often cluster.
        cut = np.flatnonzero(np.diff(uniq) > _GAP) + 1
        bounds = np.concatenate(([0], cut, [len(uniq)])).tolist()
        buf = np.empty((_SPAN, p), dtype=np.uint32)
        for k0, k1 in itertools.pairwise(bounds):
            first, last = int(uniq[k0]), int(uniq[k1 - 1])
            if first == last:
                self._sig_file.seek(first * 4 * p)
                self._sig_file.readinto(memoryview(got[k0]).cast("B"))
                continue
            k = k0
            for s0 in range(first, last + 1, _SPAN):  # a long span in pieces: memory stays small
                s1 = min(s0 + _SPAN, last + 1)
                self._sig_file.seek(s0 * 4 * p)
                self._sig_file.readinto(memoryview(buf[: s1 - s0]).cast("B"))
                k_end = k + int(np.searchsorted(uniq[k:k1], s1))
                got[k:k_end] = buf[uniq[k:k_end] - s0]
                k = k_end
        return got[inverse.reshape(-1)]

    def all_shingles(self) -> np.ndarray:
        return self._map("shingles.u32", np.uint32)

    def close(self) -> None:
        self.seal()
        if self._sig_file is not None:
            self._sig_file.close()
        self._maps.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
