"""Text checks every data stage shares: personal data (PII), stray HTML, control characters, normalisation
and the identity of a row for duplicate detection.

Validation, EDA, preparation and the serving traffic log all call these, so each stage flags and scrubs
exactly the rows the others do.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable
from typing import Any

EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
PHONE_RE = re.compile(
    r"(?<![\w.+-])(?:"
    r"(?:\+?1[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American
    r"|\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}\d"  # international, must start with +
    r")(?![\w-])"
)
IPV4_RE = re.compile(  # [0-9], not \d: an address is ASCII digits (ipaddress rejects others)
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?![\w.])"
)
CARD_RE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
CONTROL_CHARS_PATTERN = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
CONTROL_CHARS_RE = re.compile(CONTROL_CHARS_PATTERN)
MARKUP_RE = re.compile(
    r"</(?:html|head|body|div|span|p|a|iframe|script|style|table|tr|td|th|ul|ol|li|form|button|h[1-6]"
    r"|b|i|em|strong|pre|font|center|section|article|nav|footer|header)\s*>"
    r"|<(?:!doctype|html|body|head|iframe|script|style|meta|br|img|link)\b[^<>]*>",
    re.IGNORECASE,
)
_ASKS_FOR_MARKUP_RE = re.compile(
    r"\b(?:x?html5?|xml|svg|jsx|tsx|markup|web ?pages?|webpage|websites?|browsers?|dom|css|tags?|elements?"
    r"|buttons?|paragraphs?|forms?|div|php|jquery|react|vue|angular)\b",
    re.IGNORECASE,
)
PII_PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>", "card": "<CARD>"}
# Cheap pre-check: phones, cards and IPs all need 7+ characters of digits and separators.
_NUMBERISH_RE = re.compile(r"\d[\d .()+-]{5,}\d")
# The same search on ASCII text, ~2x faster: each character replaced by its class in that pattern ("0" a
# digit, "." a separator; others are neither), which lets the search start from a literal "0" that re
# finds far faster than a digit.
_NUMBERISH_CLASSES = bytes.maketrans(b"123456789 ()+-", b"000000000.....")
_NUMBERISH_CLASSES_RE = re.compile(rb"0[0.]{5,}0")


def numberish(text: str) -> bool:
    """Whether ``_NUMBERISH_RE`` (phones, cards and IPs need such a run) finds something in ``text``."""
    if text.isascii():
        return _NUMBERISH_CLASSES_RE.search(text.encode("ascii").translate(_NUMBERISH_CLASSES)) is not None
    return _NUMBERISH_RE.search(text) is not None


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ip_is_personal(text: str) -> bool:
    """Loopback, unspecified and netmask-like addresses are code, not someone's address."""
    ip = ipaddress.IPv4Address(text)
    return not (ip.is_loopback or ip.is_unspecified or text.startswith("255.") or ip.is_multicast)


def _card_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and _luhn_ok(digits)


def find_pii(text: str) -> dict[str, list[str]]:
    """Personal data found in ``text``, by kind (``email``, ``phone``, ``ip``, ``card``); empty if none."""
    found: dict[str, list[str]] = {}
    if "@" in text and (emails := EMAIL_RE.findall(text)):
        found["email"] = emails
    if not numberish(text):
        return found
    if cards := [m for m in CARD_RE.findall(text) if _card_ok(m)]:
        found["card"] = cards
    if phones := [m for m in PHONE_RE.findall(text) if not _card_ok(m)]:
        found["phone"] = phones
    if "." in text and (ips := [m for m in IPV4_RE.findall(text) if _ip_is_personal(m)]):
        found["ip"] = ips
    return found


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace personal data with placeholders (``<EMAIL>``, ``<PHONE>``, ``<IP>``, ``<CARD>``).

    Returns:
        The scrubbed text and the number of replacements per kind.
    """
    counts: dict[str, int] = {}
    if "@" in text:
        text, n = EMAIL_RE.subn(PII_PLACEHOLDERS["email"], text)
        if n:
            counts["email"] = n
    if not numberish(text):
        return text, counts

    def sub(kind: str, pattern: re.Pattern, keep: Any) -> None:
        nonlocal text

        def repl(m: re.Match) -> str:
            if not keep(m.group(0)):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return PII_PLACEHOLDERS[kind]

        text = pattern.sub(repl, text)

    sub("card", CARD_RE, _card_ok)
    sub("phone", PHONE_RE, lambda m: True)
    sub("ip", IPV4_RE, _ip_is_personal)
    return text, counts


def has_markup(instruction: str, input: str, response: str) -> bool:
    """HTML in a row that is not about HTML: scraped-page junk rather than an answer.

    A row is about HTML when its input holds markup, or its instruction (tags aside) names HTML,
    the DOM, page elements or a web framework.
    """
    if not (MARKUP_RE.search(response) or MARKUP_RE.search(instruction)):
        return False
    if MARKUP_RE.search(input):
        return False
    return not _ASKS_FOR_MARKUP_RE.search(MARKUP_RE.sub(" ", f"{instruction}\n{input}"))


def normalize_text(text: str) -> str:
    """Unicode NFC, ``\\n`` line ends, no trailing spaces on lines, no blank ends; indentation is kept."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def dedup_key(instruction: str, input: str, response: str) -> str:
    """Identity of a row for duplicate detection: NFC text with whitespace runs collapsed."""
    return "\x1f".join(
        " ".join(
            (
                t if t.isascii() or unicodedata.is_normalized("NFC", t) else unicodedata.normalize("NFC", t)
            ).split()
        )
        for t in (instruction, input, response)
    )


# Letters (any script) and whitespace; what is left is digits, punctuation and symbols.
_ALPHA_OR_SPACE_RE = re.compile(r"(?:[^\W\d_]|\s)+")
_ASCII_ALPHA_OR_SPACE = bytes(c for c in range(128) if chr(c).isalpha() or chr(c).isspace())
QUALITY_NGRAM = 5  # words per n-gram of the repetition measure (Gopher's shortest "duplicate n-gram")


def repetition(text: str, ngram_floor: float = 0.0) -> tuple[float, float, int]:
    """How much a text repeats itself, as pre-training filters judge it (Rae et al. 2021, "Gopher",
    appendix A): ``(repeated_line_fraction, repeated_ngram_fraction, words)``.

    - repeated lines: the share of the text's characters (in non-blank lines, stripped) that sit in a
      line repeating an earlier one; weighted by characters, so the many ``}`` of code count little;
    - repeated n-grams: the share of word 5-grams that repeat an earlier one (a phrase repeated
      thousands of times scores ~1.0). A 5-gram can only repeat where its first word does, so
      ``(words - distinct words) / 5-grams`` bounds it; when that bound is at most ``ngram_floor``
      (the threshold a caller judges by) the bound is returned instead of counting every 5-gram.
    """
    words = text.split()
    n_words = len(words)
    seen: set[str] = set()
    line_chars = repeated_chars = 0
    for line in text.splitlines():
        line = line.strip()
        if line:
            line_chars += len(line)
            if line in seen:
                repeated_chars += len(line)
            else:
                seen.add(line)
    grams = n_words - QUALITY_NGRAM + 1
    repeated_grams = 0.0
    if grams > 0:
        repeated_grams = min(1.0, (n_words - len(set(words))) / grams)
        if repeated_grams > ngram_floor:
            distinct = len(set(zip(*(words[i:] for i in range(QUALITY_NGRAM)), strict=False)))
            repeated_grams = (grams - distinct) / grams
    return (repeated_chars / line_chars if line_chars else 0.0), repeated_grams, n_words


def composition(text: str) -> tuple[float, float, int]:
    """``(non_alpha_fraction, mean_word_length, words)``: the share of characters that are neither
    letters (any script) nor whitespace, and the mean length of whitespace-separated words."""
    words = text.split()
    if not words:
        return 0.0, 0.0, 0
    if text.isascii():  # bytes.translate deletes in C, ~20x faster than the regex
        non_alpha = len(text.encode("ascii").translate(None, _ASCII_ALPHA_OR_SPACE))
    else:
        non_alpha = len(text) - int(_ALPHA_OR_SPACE(text).sum())
    return non_alpha / len(text), sum(map(len, words)) / len(words), len(words)


class CharClasses:
    """A class (0-254) of every character of a text, as a numpy array: ``classify(ch)`` is asked once per
    code point ever seen and kept in a table over all of Unicode (1.1 MB), so a non-ASCII text is
    classified at numpy's pace instead of a regex's or a Python loop's over its characters."""

    def __init__(self, classify: Callable[[str], int]) -> None:
        self.classify = classify
        self.table: Any = None  # code point -> class; 255: not asked yet

    def __call__(self, text: str) -> Any:
        import numpy as np

        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if self.table is None:
            self.table = np.full(0x110000, 255, dtype=np.uint8)
        classes = self.table[points]
        if (new := classes == 255).any():
            for point in np.unique(points[new]).tolist():
                self.table[point] = self.classify(chr(point))
            classes = self.table[points]
        return classes


_ALPHA_OR_SPACE = CharClasses(lambda ch: _ALPHA_OR_SPACE_RE.fullmatch(ch) is not None)

#: A letter's Unicode script, by the first word of its character name (no data files needed).
SCRIPTS = {
    "LATIN": "Latin", "CYRILLIC": "Cyrillic", "GREEK": "Greek", "ARABIC": "Arabic", "HEBREW": "Hebrew",
    "CJK": "Han (CJK)", "KANGXI": "Han (CJK)", "IDEOGRAPHIC": "Han (CJK)", "HIRAGANA": "Hiragana",
    "KATAKANA": "Katakana", "HANGUL": "Hangul", "DEVANAGARI": "Devanagari", "BENGALI": "Bengali",
    "GURMUKHI": "Gurmukhi", "GUJARATI": "Gujarati", "ORIYA": "Oriya", "TAMIL": "Tamil", "TELUGU": "Telugu",
    "KANNADA": "Kannada", "MALAYALAM": "Malayalam", "SINHALA": "Sinhala", "THAI": "Thai", "LAO": "Lao",
    "TIBETAN": "Tibetan", "MYANMAR": "Myanmar", "GEORGIAN": "Georgian", "ARMENIAN": "Armenian",
    "ETHIOPIC": "Ethiopic", "KHMER": "Khmer", "MONGOLIAN": "Mongolian", "SYRIAC": "Syriac", "THAANA": "Thaana",
    "BOPOMOFO": "Bopomofo", "CHEROKEE": "Cherokee",
}  # fmt: skip
#: Scripts written without spaces between words: a whitespace-separated "word" there is a phrase or a
#: sentence, so word-length measures say nothing about such text.
UNSPACED_SCRIPTS = frozenset({"Han (CJK)", "Hiragana", "Katakana", "Thai", "Lao", "Khmer", "Myanmar"})


def script_of(ch: str) -> str:
    """Unicode script of a letter (``Other`` when :data:`SCRIPTS` does not name it)."""
    parts = unicodedata.name(ch, "").split(" ")
    script = SCRIPTS.get(parts[0])
    if script is None and len(parts) > 1:  # FULLWIDTH LATIN …, HALFWIDTH KATAKANA …
        script = SCRIPTS.get(parts[1])
    return script or "Other"


SCRIPT_NAMES = sorted({*SCRIPTS.values(), "Other"})
#: Per character: 0 not a letter, else 1 + its script's place in :data:`SCRIPT_NAMES`.
LETTER_SCRIPTS = CharClasses(lambda ch: 1 + SCRIPT_NAMES.index(script_of(ch)) if ch.isalpha() else 0)
_UNSPACED_CLASSES = [1 + SCRIPT_NAMES.index(s) for s in sorted(UNSPACED_SCRIPTS)]


def unspaced(text: str) -> bool:
    """Whether most of ``text``'s letters are in a script written without spaces (Chinese, Japanese, Thai…)."""
    if text.isascii():
        return False
    import numpy as np

    counts = np.bincount(LETTER_SCRIPTS(text), minlength=len(SCRIPT_NAMES) + 1)
    without = int(counts[_UNSPACED_CLASSES].sum())
    return without > int(counts[1:].sum()) - without
