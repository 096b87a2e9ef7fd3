"""Champion vs. challenger: paired bootstrap confidence intervals on per-example scores.

Both models answer the same examples, so the question is whether the *per-example differences*
average away from zero; resampling examples (not each model separately) keeps the pairing and gives
much tighter intervals than comparing two independent means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from airloom.exceptions import UsageError

PerExample = Mapping[str, float] | Sequence[float]


def _paired_arrays(candidate_scores: PerExample, baseline_scores: PerExample):
    import numpy as np

    if isinstance(candidate_scores, Mapping) != isinstance(baseline_scores, Mapping):
        raise UsageError("pass both score sets keyed by example id, or both as lists in the same order")
    if isinstance(candidate_scores, Mapping):
        ids = [i for i in candidate_scores if i in baseline_scores]
        if not ids:
            raise UsageError(
                "candidate and baseline share no example ids; they must be scored on the same evaluation set"
            )
        cand = [candidate_scores[i] for i in ids]
        base = [baseline_scores[i] for i in ids]
    else:
        cand, base = list(candidate_scores), list(baseline_scores)
        if len(cand) != len(base):
            raise UsageError(
                f"got {len(cand)} candidate but {len(base)} baseline scores; pair them by id instead"
            )
        if not cand:
            raise UsageError("no scores to compare: the evaluation set is empty")
    return np.asarray(cand, dtype=float), np.asarray(base, dtype=float)


def _check_settings(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise UsageError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")


def paired_bootstrap(
    candidate_scores: PerExample,
    baseline_scores: PerExample,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Mean difference (candidate - baseline) with a paired bootstrap percentile interval.

    Args:
        candidate_scores: per-example scores, ``{id: score}`` (paired by id; ids only one side has are
            left out) or a list in the same order as ``baseline_scores``.
        baseline_scores: the production model's scores on the same examples.
        n_resamples: bootstrap resamples of the examples.
        seed: the resampling is deterministic for a given seed.
        confidence: width of the interval.

    Returns:
        ``delta`` (mean difference), ``low``/``high`` (percentile interval of the resampled mean
        differences), ``p_value`` (two-sided, for "no difference": the share of resampled
        differences, re-centred on zero, at least as far from zero as ``delta``; ``1.0`` when
        ``delta`` is 0) and ``n`` (paired examples).
    """
    import numpy as np

    _check_settings(n_resamples, confidence)
    cand, base = _paired_arrays(candidate_scores, baseline_scores)
    diff = cand - base
    n = len(diff)
    delta = float(diff.mean())
    rng = np.random.default_rng(seed)
    # Chunks bound memory on large sets: (chunk x n) indices at a time.
    chunk = max(1, min(n_resamples, 2_000_000 // max(n, 1)))
    means = np.concatenate(
        [
            diff[rng.integers(0, n, size=(min(chunk, n_resamples - start), n))].mean(axis=1)
            for start in range(0, n_resamples, chunk)
        ]
    )
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    if delta == 0:
        p_value = 1.0
    else:
        extreme = np.abs(means - delta) >= abs(delta) - 1e-12
        p_value = float((1 + extreme.sum()) / (1 + n_resamples))
    return {"delta": delta, "low": float(low), "high": float(high), "p_value": p_value, "n": n}


def bootstrap_mean(
    scores: PerExample, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, float]:
    """Mean of one model's per-example scores with a bootstrap percentile interval.

    Returns:
        ``mean``, ``low``, ``high`` and ``n``.
    """
    import numpy as np

    _check_settings(n_resamples, confidence)
    values = np.asarray(list(scores.values()) if isinstance(scores, Mapping) else list(scores), dtype=float)
    if values.size == 0:
        raise UsageError("no scores: the evaluation set is empty")
    rng = np.random.default_rng(seed)
    n = len(values)
    chunk = max(1, min(n_resamples, 2_000_000 // n))
    means = np.concatenate(
        [
            values[rng.integers(0, n, size=(min(chunk, n_resamples - start), n))].mean(axis=1)
            for start in range(0, n_resamples, chunk)
        ]
    )
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": n}


def scores_by_id(rows: Iterable[Mapping] | None, metric: str, source: str = "per-example scores") -> dict:
    """``{id: score}`` for one metric from rows such as ``predictions.jsonl`` or ``per_example``.

    Rows without the metric (e.g. ``math_exact_match`` on non-math examples) are left out.
    """
    out: dict = {}
    for i, row in enumerate(rows or []):
        value = row.get(metric)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if "id" not in row:
            raise UsageError(f"{source}: row {i} has no 'id'; per-example scores are paired by id")
        key = row["id"]
        if key in out:
            raise UsageError(f"{source}: id {key!r} appears twice; example ids must be unique")
        out[key] = float(value)
    return out


def paired_comparison(
    candidate_rows: Iterable[Mapping],
    baseline_rows: Iterable[Mapping],
    metrics: Sequence[str] | None = None,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """``paired_bootstrap`` for every per-example metric both models have, keyed by metric name.

    Args:
        candidate_rows: the candidate's per-example rows with ``id`` (``predictions.jsonl``).
        baseline_rows: the baseline's rows for the same examples.
        metrics: which to compare; default: the per-example metrics of ``metrics.PER_EXAMPLE_METRICS``.
    """
    from airloom.evaluation.metrics import PER_EXAMPLE_METRICS

    candidate_rows, baseline_rows = list(candidate_rows), list(baseline_rows)
    out = {}
    for metric in metrics or PER_EXAMPLE_METRICS:
        cand = scores_by_id(candidate_rows, metric, "candidate")
        base = scores_by_id(baseline_rows, metric, "baseline")
        if not (cand.keys() & base.keys()):
            continue
        out[metric] = paired_bootstrap(cand, base, n_resamples=n_resamples, seed=seed, confidence=confidence)
    return out
