"""Near-duplicate rows: MinHash over word shingles, an LSH index, and exact Jaccard to confirm.

Rows are compared as *sets of word k-shingles* (default 5): the text is lower-cased, punctuation
becomes a space and it is split on whitespace (:func:`words`), so case, punctuation and spacing
changes do not hide a copy. A row with fewer than k words is one shingle of all its words.

Everything runs on numpy arrays in batches, so 100k+ rows take seconds, not minutes:

1. Words are cut and hashed on the UTF-8 bytes of a whole batch at once (:func:`scan_words`), not
   one Python string per word.
2. MinHash signatures are bit for bit those of ``datasketch.MinHash(num_perm, seed=seed,
   hashfunc=lambda h: h)`` (scheme ``affine32``) updated with the row's shingle hashes, so a
   signature can be wrapped in ``datasketch.LeanMinHash`` (:func:`lean_minhash`) and used with
   datasketch's own indexes.
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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
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
_RECALL = 0.99  # wanted chance that a pair exactly at the threshold becomes a candidate

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
# The same split done on UTF-8 bytes (see scan_words): non-ASCII characters first, as text...
_NON_ASCII = str.maketrans(dict.fromkeys(_OTHER_PUNCT + WHITESPACE[10:], " "))
# ... then ASCII punctuation and whitespace as bytes.
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
        hashes: Each word's 32-bit :func:`hash_words` hash, all texts' words end to end.
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
        parts.append(
            (text if text.isascii() else text.translate(_NON_ASCII)).encode("utf-8", "surrogatepass")
        )
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


def hash_words(ws: Sequence[str]) -> np.ndarray:
    """The 32-bit hash of each word (as :func:`words` returns them), the one every signature is built on."""
    scan = scan_words([" ".join(ws)])
    if len(scan.hashes) != len(ws):
        raise ValueError("hash_words takes words as words() returns them (no spaces or punctuation)")
    return scan.hashes


def _text_word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hash of every word of every text, words per text): :func:`words` + :func:`hash_words`, faster."""
    scan = scan_words(texts)
    return scan.hashes, scan.lengths


class WordTable:
    """A growing word -> id table with each word's 32-bit hash, so each distinct word is hashed once."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.words: list[str] = []  # words[id]
        self._hashes = np.zeros(1024, dtype=np.uint32)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def hashes(self) -> np.ndarray:
        """``hashes[id]`` is the word's :func:`hash_words` hash (stable across runs, unlike ``hash()``)."""
        return self._hashes[: len(self.index)]

    def ids(self, flat: list[str]) -> np.ndarray:
        """Ids of ``flat`` (int64), adding the words not seen before."""
        ids = np.fromiter(map(self.index.get, flat, repeat(-1)), dtype=np.int64, count=len(flat))
        missing = np.flatnonzero(ids < 0)
        if missing.size:
            index, new = self.index, []
            for pos in missing.tolist():
                w = flat[pos]
                i = index.get(w)
                if i is None:
                    i = index[w] = len(index)
                    new.append(w)
                ids[pos] = i
            self.words += new
            size = len(index)
            if size > len(self._hashes):
                grown = np.zeros(max(size, 2 * len(self._hashes)), dtype=np.uint32)
                grown[: len(self._hashes)] = self._hashes
                self._hashes = grown
            self._hashes[size - len(new) : size] = hash_words(new)
        return ids


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort + compare: many times faster than ``np.unique`` on uint64 here)."""
    values = np.sort(values)
    if values.size < 2:
        return values
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


@dataclass
class NearDuplicates:
    """Which rows nearly repeat an earlier kept row.

    Attributes:
        of: Row index -> (index of the earlier kept row it repeats, exact Jaccard of their shingle sets).
        threshold, shingle_size, num_perm, bands, rows_per_band: The settings used.
        rows: Rows looked at.
        pairs_checked: Candidate pairs whose Jaccard was computed (a measure of LSH work).
    """

    of: dict[int, tuple[int, float]]
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
        return len(self.of)

    def clusters(self) -> list[list[int]]:
        """Groups of rows: the kept row first, then the rows that repeat it; biggest groups first."""
        groups: dict[int, list[int]] = {}
        for row, (first, _) in sorted(self.of.items()):
            groups.setdefault(first, [first]).append(row)
        return sorted(groups.values(), key=lambda g: (-len(g), g[0]))

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
    """Feed rows in batches (:meth:`add_texts` or :meth:`add_ids`), then ask for :meth:`result`.

    Memory per row: the row's distinct shingle hashes (4 bytes each) and ``bands`` 8-byte band keys;
    signatures are dropped once banded.
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        shingle_size: int = DEFAULT_SHINGLE_SIZE,
        num_perm: int = DEFAULT_NUM_PERM,
        seed: int = DEFAULT_SEED,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if not 1 <= shingle_size <= len(_SHINGLE_MUL):
            raise ValueError(f"shingle_size must be 1..{len(_SHINGLE_MUL)}, got {shingle_size!r}")
        if not 2 <= num_perm <= len(_BAND_MUL):
            raise ValueError(f"num_perm must be 2..{len(_BAND_MUL)}, got {num_perm!r}")
        try:
            from datasketch import MinHash
        except ImportError as exc:  # a dependency of the project; say what to do if it is missing
            raise ImportError(
                "near-duplicate detection needs datasketch (pip install datasketch==2.0.0); "
                "or turn it off (near_duplicate_threshold: null)"
            ) from exc

        self.threshold, self.shingle_size, self.num_perm, self.seed = threshold, shingle_size, num_perm, seed
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self._a = np.ascontiguousarray(a, dtype=np.uint32)[:, None]
        self._b = np.ascontiguousarray(b, dtype=np.uint32)[:, None]
        self.bands, self.rows_per_band = lsh_bands(threshold, num_perm)
        self._rows = 0
        self._shingles: list[np.ndarray] = []  # distinct shingle hashes per batch, sorted within each row
        self._counts: list[np.ndarray] = []  # distinct shingles per row
        self._keys: list[np.ndarray] = []  # (bands, rows) band keys per batch
        self._sigs: list[np.ndarray] = []  # (rows, num_perm) signatures per batch, to rank candidates
        self._eligible: list[np.ndarray] = []
        self._buf = np.empty((num_perm, _CHUNK), dtype=np.uint32)

    # --- input ------------------------------------------------------------------------------------

    def add_texts(self, texts: Sequence[str], eligible: Sequence[bool] | np.ndarray | None = None) -> None:
        """Add one batch of rows (a few thousand at a time keeps the temporary arrays small)."""
        hashes, lengths = _text_word_hashes(texts)
        self.add_hashes(hashes, lengths, eligible)

    def add_ids(
        self,
        ids: np.ndarray,
        lengths: np.ndarray,
        word_hashes: np.ndarray,
        eligible: Sequence[bool] | np.ndarray | None = None,
    ) -> None:
        """Add one batch given as word ids (all rows' words end to end) and words per row.

        This is the entry point for a caller that already tokenized with :func:`words` into its own
        :class:`WordTable` (EDA does, to count the vocabulary in the same pass); the result is the same
        as :meth:`add_texts` on the texts.
        """
        self.add_hashes(word_hashes[ids], lengths, eligible)

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
        self._shingles.append(values)
        self._counts.append(counts)
        self._eligible.append(ok & (counts > 0))
        sig = self._signatures(values, rows, counts)
        self._keys.append(self._band_keys(sig))
        self._sigs.append(np.ascontiguousarray(sig.T))
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

    # --- single rows (for checks and interop) -----------------------------------------------------

    def shingle_hashes(self, text: str) -> np.ndarray:
        """The distinct shingle hashes of one text, sorted (what the signature is made of)."""
        hashes, lengths = _text_word_hashes([text])
        h, _ = self._shingle_hashes(hashes, lengths)
        return _unique(h)

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature of one text (uint32, ``num_perm`` values)."""
        values = self.shingle_hashes(text)
        sig = self._signatures(values, np.zeros(len(values), dtype=np.int64), np.array([len(values)]))
        return sig[:, 0].copy()

    # --- result -----------------------------------------------------------------------------------

    def result(self) -> NearDuplicates:
        """Confirm the LSH candidates with exact Jaccard and decide which rows repeat which.

        Candidates are ranked by the Jaccard their signatures estimate; those estimated well below
        the threshold (more than 3 standard errors) are dropped unchecked, and for each row the
        most similar of its (at most three) best-estimated earlier kept rows, confirmed exactly, wins.
        """
        n = self._rows
        out = NearDuplicates(
            {}, self.threshold, self.shingle_size, self.num_perm, self.bands, self.rows_per_band, n
        )
        if n == 0:
            return out
        counts = np.concatenate(self._counts)
        rows = np.flatnonzero(np.concatenate(self._eligible))
        pairs = self._candidate_pairs(np.concatenate(self._keys, axis=1)[:, rows], rows)
        if not pairs.size:
            return out
        later = (pairs >> np.uint64(32)).astype(np.int64)
        earlier = (pairs & np.uint64(0xFFFFFFFF)).astype(np.int64)
        del pairs
        t, p = self.threshold, self.num_perm
        # |A|/|B| bounds the Jaccard of A and B from above
        small, big = np.minimum(counts[later], counts[earlier]), np.maximum(counts[later], counts[earlier])
        ok = small >= t * big
        later, earlier = later[ok], earlier[ok]
        sigs = np.concatenate(self._sigs)
        estimate = np.empty(len(later), dtype=np.float32)
        for c0 in range(0, len(later), 16384):
            c1 = c0 + 16384
            same = sigs[later[c0:c1]] == sigs[earlier[c0:c1]]
            estimate[c0:c1] = np.count_nonzero(same, axis=1) / p
        del sigs
        ok = estimate >= t - max(0.05, 3 * (t * (1 - t) / p) ** 0.5)
        later, earlier, estimate = later[ok], earlier[ok], estimate[ok]
        order = np.lexsort((-estimate, later))
        later, earlier = later[order].tolist(), earlier[order].tolist()

        offsets = np.concatenate(([0], np.cumsum(counts))).tolist()
        shingles = np.concatenate(self._shingles)
        size = counts.tolist()
        removed: set[int] = set()
        best: dict[int, tuple[int, float]] = {}
        checked = 0
        current, tries = -1, 0
        for i, c in zip(later, earlier, strict=True):
            if i != current:
                current, tries = i, 0
            if tries >= _CHECKS_PER_ROW or c in removed:
                continue
            tries += 1
            checked += 1
            si, sc = size[i], size[c]
            a = shingles[offsets[i] : offsets[i + 1]]
            b = shingles[offsets[c] : offsets[c + 1]]
            pos = b.searchsorted(a)
            np.minimum(pos, sc - 1, out=pos)
            inter = int(np.count_nonzero(b[pos] == a))
            jac = inter / (si + sc - inter)
            if jac >= t and (i not in best or jac > best[i][1]):
                best[i] = (c, jac)
                removed.add(i)
        out.of = {i: (c, round(jac, 4)) for i, (c, jac) in best.items()}
        out.pairs_checked = checked
        return out

    def _candidate_pairs(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Distinct (later << 32 | earlier) row pairs that share a band key."""
        m = len(rows)
        if m < 2:
            return np.zeros(0, dtype=np.uint64)
        found = []
        pos = np.arange(m)
        for band in range(keys.shape[0]):
            order = np.argsort(keys[band], kind="stable")
            sk, sr = keys[band][order], rows[order]
            new = np.concatenate(([True], sk[1:] != sk[:-1]))
            if new.all():
                continue
            run_start = np.maximum.accumulate(np.where(new, pos, 0))
            for d in range(_CANDIDATES_PER_BAND):
                lead = run_start + d  # the run's first members: likely the kept copies
                ok = lead < pos
                found.append((sr[ok].astype(np.uint64) << np.uint64(32)) | sr[lead[ok]].astype(np.uint64))
                near = pos[d + 1 :]  # nearest earlier members of the same run
                ok = run_start[near] <= near - d - 1
                found.append(
                    (sr[near[ok]].astype(np.uint64) << np.uint64(32)) | sr[near[ok] - d - 1].astype(np.uint64)
                )
        if not found:
            return np.zeros(0, dtype=np.uint64)
        return _unique(np.concatenate(found))


def find_near_duplicates(
    texts: Iterable[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    shingle_size: int = DEFAULT_SHINGLE_SIZE,
    num_perm: int = DEFAULT_NUM_PERM,
    seed: int = DEFAULT_SEED,
    eligible: Sequence[bool] | np.ndarray | None = None,
    batch_size: int = 4096,
) -> NearDuplicates:
    """Near-duplicates among ``texts`` (index order decides which copy is first).

    Args:
        texts: One string per row (e.g. instruction, input and response joined by newlines).
        threshold: Least Jaccard similarity of the word-shingle sets to count as a near-duplicate.
        shingle_size: Words per shingle.
        num_perm: MinHash permutations (64-128 is plenty: candidates are confirmed exactly).
        seed: Seed of the permutations (datasketch's ``seed``).
        eligible: Rows that take part; the others are neither flagged nor kept as first copies
            (e.g. rows already quarantined, or exact duplicates already counted).
        batch_size: Rows per batch.
    """
    finder = NearDuplicateFinder(threshold, shingle_size, num_perm, seed)
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


def lean_minhash(signature: np.ndarray, seed: int = DEFAULT_SEED) -> Any:
    """A ``datasketch.LeanMinHash`` of a signature from :meth:`NearDuplicateFinder.signature`."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=seed, hashvalues=signature, scheme="affine32")
