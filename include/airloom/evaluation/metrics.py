"""Text-overlap metrics for generated answers, computed offline.

``evaluate.load(...)`` fetches metric scripts from the Hugging Face hub, which this project cannot
reach, so the underlying packages (``rouge_score``, ``sacrebleu``) are called directly. Scores are
kept per example as well as aggregated, so reports can show the worst answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from airloom.exceptions import UsageError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
METRIC_NAMES = ("exact_match", "f1", *ROUGE_TYPES, "bleu", "chrf")

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, refs: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    norm = normalize_answer(pred)
    return float(any(norm == normalize_answer(r) for r in refs))


def _f1_single(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        # SQuAD v2 convention: two empty answers agree, one empty answer scores nothing.
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, refs: Sequence[str]) -> float:
    """SQuAD token-overlap F1 against the best-matching reference."""
    pred_tokens = normalize_answer(pred).split()
    return max((_f1_single(pred_tokens, normalize_answer(r).split()) for r in refs), default=0.0)


def sentence_lines(text: str) -> str:
    """One sentence per line, which is what rougeLsum splits summaries on.

    A simple punctuation split instead of nltk's punkt, whose data files need a download.
    """
    lines = []
    for line in text.strip().splitlines():
        lines.extend(s for s in _SENTENCE_END.split(line.strip()) if s)
    return "\n".join(lines)


def _check_inputs(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(refs_list):
        raise UsageError(
            f"got {len(preds)} predictions but {len(refs_list)} reference lists; pass one list of "
            "references per prediction"
        )
    for i, refs in enumerate(refs_list):
        if isinstance(refs, str) or not refs:
            raise UsageError(f"references of example {i} must be a non-empty list of strings, got {refs!r}")


def _rouge_per_example(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rows = []
    for pred, refs in zip(preds, refs_list, strict=True):
        pred_lines = sentence_lines(pred)
        # The best reference is chosen once (by rougeL F) so all four scores describe the same pair.
        best = max(
            (scorer.score(sentence_lines(ref), pred_lines) for ref in refs),
            key=lambda s: s["rougeL"].fmeasure,
        )
        rows.append({k: best[k].fmeasure for k in ROUGE_TYPES})
    return rows


def rouge_scores(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE F-measures (0-1); with several references the best one (by rougeL F) counts."""
    _check_inputs(preds, refs_list)
    rows = _rouge_per_example(preds, refs_list)
    if not rows:
        return {k: 0.0 for k in ROUGE_TYPES}
    return {k: sum(r[k] for r in rows) / len(rows) for k in ROUGE_TYPES}


def transpose_refs(refs_list: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-example reference lists to sacrebleu's reference streams, padded with ``None``.

    sacrebleu ignores ``None`` (but not ``""``, which would count as a real, empty reference).
    """
    width = max((len(r) for r in refs_list), default=0)
    return [[refs[j] if j < len(refs) else None for refs in refs_list] for j in range(width)]


def bleu_chrf(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (0-100) with sacrebleu's default settings."""
    import sacrebleu

    _check_inputs(preds, refs_list)
    if not preds:
        return {"bleu": 0.0, "chrf": 0.0}
    streams = transpose_refs(refs_list)
    return {
        "bleu": float(sacrebleu.corpus_bleu(list(preds), streams).score),
        "chrf": float(sacrebleu.corpus_chrf(list(preds), streams).score),
    }


def score_predictions(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> dict:
    """All metrics, aggregated and per example.

    Returns:
        ``{"aggregate": {exact_match, f1, rouge1, rouge2, rougeL, rougeLsum, bleu, chrf},
        "per_example": [{exact_match, f1, rouge1, rouge2, rougeL, rougeLsum}, ...]}``; EM, F1 and
        ROUGE are 0-1, BLEU and chrF 0-100 (corpus-level only).
    """
    _check_inputs(preds, refs_list)
    if not preds:
        raise UsageError("no predictions to score: the evaluation set is empty")
    rouge_rows = _rouge_per_example(preds, refs_list)
    per_example = [
        {"exact_match": exact_match(p, refs), "f1": token_f1(p, refs), **rouge}
        for p, refs, rouge in zip(preds, refs_list, rouge_rows, strict=True)
    ]
    n = len(per_example)
    aggregate = {k: sum(row[k] for row in per_example) / n for k in ("exact_match", "f1", *ROUGE_TYPES)}
    aggregate.update(bleu_chrf(preds, refs_list))
    return {"aggregate": aggregate, "per_example": per_example}
