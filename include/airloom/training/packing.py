"""Sequence packing: several examples share one row of ``max_length`` tokens without seeing each other.

Rows are filled best-fit-decreasing. Each example keeps its own position ids (0, 1, 2, … restarting
at every example); with ``attention_mask=None`` transformers reads those resets as sequence
boundaries and builds a block-diagonal causal mask (sdpa/eager/flex) or varlen calls (flash
attention), so no token attends across examples. Only the tail of a row is padding.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

Example = tuple[list[int], list[int]]  # (input_ids, labels); labels -100 where no loss


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows whose total is ≤ ``capacity`` (best-fit decreasing).

    Deterministic: ties keep input order. O(n log n) with a sorted list of the rows' free space.
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be > 0, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {capacity}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - n, row))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


def pack_examples(examples: Sequence[Example], capacity: int) -> list[list[Example]]:
    return [[examples[i] for i in row] for row in pack([len(ids) for ids, _ in examples], capacity)]


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int, width: int | None = None):
    """Tensors ``input_ids, position_ids, labels`` for packed rows (pass ``attention_mask=None``).

    The first label of every example is masked so no token is trained to follow the previous
    example; the padding tail gets positions of its own block, so it never joins an example.
    """
    import torch

    width = width or max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ids, lab in row:
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids)
            labels[r, at : at + n] = torch.tensor(lab)
            labels[r, at] = -100
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return input_ids, position_ids, labels
