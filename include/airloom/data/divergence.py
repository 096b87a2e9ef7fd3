"""Distances between two distributions, for drift: the population stability index and Jensen-Shannon.

The EDA's drift section (a profile against the one before) and monitoring's drift of served traffic
against the training data both measure with these, so the two report the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def psi(expected: Sequence[float], actual: Sequence[float], eps: float = 1e-4) -> float:
    """Population stability index of two histograms over the same bins.

    ``sum((a - e) * ln(a / e))`` over the bins' shares, with empty bins counted as ``eps`` so one
    empty bin does not make it infinite. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 major.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or not e.sum() or not a.sum():
        raise ValueError("psi needs two non-empty histograms over the same bins")
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_verdict(value: float) -> str:
    """The rule of thumb of :func:`psi` in words."""
    return "stable" if value < 0.1 else "moderate shift" if value < 0.25 else "major shift"


def js_divergence(p: dict[str, int], p_total: int, q: dict[str, int], q_total: int) -> float:
    """Jensen-Shannon divergence (base 2, 0..1) of two word distributions known by their top words.

    Words outside a profile's list are pooled into one "other" word of that profile.
    """
    names = list(dict.fromkeys([*p, *q]))
    pv = np.array([p.get(w, 0) / p_total for w in names] + [0.0])
    qv = np.array([q.get(w, 0) / q_total for w in names] + [0.0])
    pv[-1], qv[-1] = max(0.0, 1 - pv.sum()), max(0.0, 1 - qv.sum())
    m = (pv + qv) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return round(max(0.0, (kl(pv) + kl(qv)) / 2), 6)
