"""Text-overlap and final-answer metrics for generated answers, computed offline.

``evaluate.load("rouge")`` fetches the metric script from the Hugging Face hub, which this project
cannot reach, so the underlying packages (``rouge_score``, ``sacrebleu``) are called directly here,
and the same functions are wrapped as ``evaluate`` modules shipped with the project
(``airloom/evaluation/modules/``, see ``load_metric``). Scores are kept per example as well as
aggregated, so reports can show the worst answers and compare models example by example.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from airloom.evaluation.modules import MODULES_DIR
from airloom.exceptions import UsageError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
METRIC_NAMES = ("exact_match", "f1", *ROUGE_TYPES, "bleu", "chrf", "math_exact_match")
# Scores that exist for each example (BLEU and chrF are corpus-level only): what a paired
# comparison between two models can resample.
PER_EXAMPLE_METRICS = ("exact_match", "f1", *ROUGE_TYPES, "math_exact_match")
MATH_TASK = "math"

# Short names users may pass to ``load_metric`` for the modules shipped with the project.
LOCAL_METRICS = {
    "airloom_rouge": "airloom_rouge",
    "airloom_bleu": "airloom_bleu",
    "airloom_chrf": "airloom_chrf",
    "airloom_squad": "airloom_squad",
    "airloom_math": "airloom_math",
    "rouge": "airloom_rouge",
    "bleu": "airloom_bleu",
    "chrf": "airloom_chrf",
    "math": "airloom_math",
    "gsm8k": "airloom_math",
}

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


def rouge_per_example(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    """ROUGE F-measures of each prediction against its best reference (by rougeL), one dict per example."""
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
    rows = rouge_per_example(preds, refs_list)
    if not rows:
        return {k: 0.0 for k in ROUGE_TYPES}
    return {k: sum(r[k] for r in rows) / len(rows) for k in ROUGE_TYPES}


def transpose_refs(refs_list: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-example reference lists to sacrebleu's reference streams, padded with ``None``.

    sacrebleu ignores ``None`` (but not ``""``, which would count as a real, empty reference).
    """
    width = max((len(r) for r in refs_list), default=0)
    return [[refs[j] if j < len(refs) else None for refs in refs_list] for j in range(width)]


def corpus_bleu(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's default settings (13a tokenizer, exp smoothing)."""
    import sacrebleu

    _check_inputs(preds, refs_list)
    if not preds:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(preds), transpose_refs(refs_list)).score)


def corpus_chrf(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (0-100) with sacrebleu's default settings (chrF2, character 6-grams)."""
    import sacrebleu

    _check_inputs(preds, refs_list)
    if not preds:
        return 0.0
    return float(sacrebleu.corpus_chrf(list(preds), transpose_refs(refs_list)).score)


def bleu_chrf(preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (0-100) with sacrebleu's default settings."""
    return {"bleu": corpus_bleu(preds, refs_list), "chrf": corpus_chrf(preds, refs_list)}


# -- math: gsm8k-style final answers ---------------------------------------------------------------

# A number with optional sign, "$", thousands commas ("1,234") and decimals. "1,2,3" is three numbers.
_NUMBER = re.compile(r"(?<![\w.])-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def normalize_number(text: str) -> str | None:
    """Canonical form of a number: no ``$`` or commas, no trailing zeros ("72.0" -> "72").

    Returns ``None`` if ``text`` is not a number.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize()
    # normalize() writes 100 as 1E+2; quantize back to a plain integer when there is no fraction.
    if value == value.to_integral_value():
        value = value.quantize(Decimal(1))
    return "0" if value == 0 else str(value)


def last_number(text: str) -> str | None:
    """The last number in ``text``, normalised (how a model's worked answer is usually read)."""
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def is_gsm8k_reference(text: str) -> bool:
    """True if ``text`` ends in gsm8k's ``#### <number>`` final-answer line."""
    m = _GSM8K_ANSWER.search(text)
    return bool(m) and last_number(m.group(1)) is not None


def reference_answer(reference: str) -> str | None:
    """The final answer of a math reference: the number after ``####``, else its last number."""
    m = _GSM8K_ANSWER.search(reference)
    if m:
        number = normalize_number(m.group(1))
        if number is not None:
            return number
        return last_number(m.group(1))
    return last_number(reference)


def math_exact_match(pred: str, refs: Sequence[str]) -> float:
    """1.0 if the last number in ``pred`` equals the final answer of any reference, else 0.0."""
    answer = last_number(pred)
    if answer is None:
        return 0.0
    return float(any(answer == reference_answer(r) for r in refs))


def _math_flags(refs_list: Sequence[Sequence[str]], task: str | Sequence[str | None] | None) -> list[bool]:
    n = len(refs_list)
    if task is None or isinstance(task, str):
        tasks: Sequence[str | None] = [task] * n
    else:
        tasks = list(task)
        if len(tasks) != n:
            raise UsageError(
                f"got {len(tasks)} task names for {n} examples; pass one per example or one string"
            )
    flags = []
    for i, (t, refs) in enumerate(zip(tasks, refs_list, strict=True)):
        if t == MATH_TASK:
            if not any(reference_answer(r) is not None for r in refs):
                raise UsageError(
                    f"example {i} is a math example but none of its references holds a number "
                    f"({refs[0][:60]!r}); end the reference with '#### <answer>'"
                )
            flags.append(True)
        else:
            flags.append(any(is_gsm8k_reference(r) for r in refs))
    return flags


def score_predictions(
    preds: Sequence[str],
    refs_list: Sequence[Sequence[str]],
    task: str | Sequence[str | None] | None = None,
) -> dict:
    """All metrics, aggregated and per example.

    Args:
        task: ``"math"`` scores every example's final numeric answer as well (``math_exact_match``);
            a list gives each example's task. Without it, examples whose references end in gsm8k's
            ``#### <number>`` are recognised as math.

    Returns:
        ``{"aggregate": {exact_match, f1, rouge1, rouge2, rougeL, rougeLsum, bleu, chrf
        [, math_exact_match]}, "per_example": [{exact_match, f1, rouge1, rouge2, rougeL, rougeLsum
        [, math_exact_match]}, ...]}``; EM, F1 and ROUGE are 0-1, BLEU and chrF 0-100 (corpus-level
        only). ``math_exact_match`` is present on math examples only and averaged over them.
    """
    _check_inputs(preds, refs_list)
    if not preds:
        raise UsageError("no predictions to score: the evaluation set is empty")
    is_math = _math_flags(refs_list, task)
    rouge_rows = rouge_per_example(preds, refs_list)
    per_example = []
    for p, refs, rouge, math in zip(preds, refs_list, rouge_rows, is_math, strict=True):
        row = {"exact_match": exact_match(p, refs), "f1": token_f1(p, refs), **rouge}
        if math:
            row["math_exact_match"] = math_exact_match(p, refs)
        per_example.append(row)
    n = len(per_example)
    aggregate = {k: sum(row[k] for row in per_example) / n for k in ("exact_match", "f1", *ROUGE_TYPES)}
    aggregate.update(bleu_chrf(preds, refs_list))
    math_rows = [row["math_exact_match"] for row in per_example if "math_exact_match" in row]
    if math_rows:
        aggregate["math_exact_match"] = sum(math_rows) / len(math_rows)
    return {"aggregate": aggregate, "per_example": per_example}


def reference_lists(references: Sequence) -> list[list[str]]:
    """``evaluate``-style references (one string, or a list of strings, per example) as lists."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


def load_metric(name: str, **kwargs):
    """An ``evaluate`` module: the project's own for the names it ships, else ``evaluate.load(name)``.

    The project's modules (``airloom_rouge``, ``airloom_bleu``, ``airloom_chrf``, ``airloom_squad``,
    ``airloom_math``; short names ``rouge``, ``bleu``, ``chrf``, ``math``/``gsm8k``) load from this
    package without network access and give the same numbers as this module's functions. Any other
    name (or a path) goes to ``evaluate.load``, which needs the hub for hub ids.

    Args:
        kwargs: passed to ``evaluate.load`` (e.g. ``keep_in_memory=True``, ``cache_dir``).
    """
    import evaluate

    local = LOCAL_METRICS.get(name)
    if local is not None:
        return evaluate.load(str(MODULES_DIR / local), **kwargs)
    return evaluate.load(name, **kwargs)
