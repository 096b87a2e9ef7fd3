"""build_profile: exact numbers (checked against pandas), near duplicates, scripts, drift, the HTML report."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from airloom.data.divergence import psi
from airloom.data.eda import LENGTH_BIN_EDGES, QUANTILES, build_profile

RECORDS = [
    {"instruction": "Reverse the word cat", "input": "", "response": "tac", "task": "reverse", "_line": 1},
    {"instruction": "Reverse the word dog", "input": "", "response": "god", "task": "reverse", "_line": 2},
    {"instruction": "Reverse  the word cat", "input": "", "response": "tac", "task": "reverse", "_line": 3},
    {"instruction": "Add the numbers", "input": "2 3", "response": "5", "task": "add", "_line": 4},
    {
        "instruction": "Please email the answer",
        "input": "",
        "response": "Sent to ann@corp.example.com",
        "task": "email",
        "_line": 5,
    },
    {
        "instruction": "Sort the letters",
        "input": "bca",
        "response": "<html><body>abc</body></html>",
        "task": "sort",
        "_line": 6,
    },
]
KEYS = ("p25", "p50", "p75", "p90", "p95", "p99")


def test_profile_numbers_on_a_known_set(tmp_path):
    profile = build_profile(RECORDS, tmp_path, languages=False)
    assert json.loads((tmp_path / "profile.json").read_text()) == profile

    assert profile["rows"] == 6
    inp = profile["fields"]["input"]
    assert (inp["present"], inp["empty"], inp["completeness"]) == (2, 4, 0.3333)
    assert profile["fields"]["task"]["completeness"] == 1.0
    assert profile["fields"]["id"]["present"] == 0
    chars = profile["fields"]["response"]["chars"]
    assert (chars["min"], chars["max"]) == (1, 29)
    # instruction words 4 4 4 3 4 3: sorted 3 3 4 4 4 4, so p25 = 3 + 0.25 * (4 - 3) by linear interpolation
    assert profile["fields"]["instruction"]["words"] == {
        "count": 6,
        "min": 3,
        "mean": 22 / 6,
        "p25": 3.25,
        "p50": 4.0,
        "p75": 4.0,
        "p90": 4.0,
        "p95": 4.0,
        "p99": 4.0,
        "max": 4,
    }
    hist = profile["fields"]["response"]["chars_histogram"]
    assert sum(hist["counts"]) + hist["above"] == 6

    dup = profile["duplicates"]
    assert (dup["count"], dup["rate"], dup["groups"]) == (
        1,
        0.1667,
        1,
    )  # line 3 = line 1 once spaces collapse
    assert dup["examples"] == [{"copies": 2, "lines": [1, 3], "instruction": "Reverse the word cat"}]
    assert profile["near_duplicates"]["count"] == 0  # the exact copy is not counted twice
    assert profile["tasks"] == {"reverse": 3, "add": 1, "email": 1, "sort": 1}
    assert profile["leading_verbs"][:2] == [["reverse", 3], ["add", 1]]
    assert ["email", 1] in profile["leading_verbs"]  # "please" is skipped

    assert (profile["pii"]["rows"], profile["pii"]["by_kind"]) == (1, {"email": 1})
    masked = "an" + "*" * 14 + ".com"  # ann@corp.example.com, masked in the report
    assert profile["pii"]["examples"] == [{"line": 5, "field": "response", "kind": "email", "match": masked}]
    assert profile["markup"]["rows"] == 1 and profile["markup"]["examples"][0]["line"] == 6
    assert [o["line"] for o in profile["outliers"]["longest"][:2]] == [5, 6]  # 51 and 48 chars
    assert profile["outliers"]["shortest"][0]["line"] == 4

    vocab = profile["vocabulary"]
    # reverse the word cat dog tac god add numbers 2 3 5 please email answer sent to ann corp example com sort
    # letters bca html body abc
    assert vocab["size"] == 27 and vocab["total_words"] == 40
    assert vocab["top_words"][:2] == [["reverse", 3], ["word", 3]]
    assert vocab["top_bigrams"][0] == ["reverse word", 3]
    assert vocab["frequencies"][0] == ["the", 6]  # stop words count in the frequencies kept for drift
    assert profile["scripts"]["rows"] == {"Latin": 6}

    bins = profile["length_bins"]
    assert bins["lower_edges"] == list(LENGTH_BIN_EDGES)
    assert [sum(bins["chars"][f]) for f in ("instruction", "input", "response", "total")] == [6, 6, 6, 6]
    assert bins["chars"]["input"][0] == 4 and bins["chars"]["input"][LENGTH_BIN_EDGES.index(3)] == 2
    assert "changes" not in profile and "drift" not in profile


@pytest.mark.parametrize("n", [10, 11, 64])
def test_quantiles_means_and_duplicate_counts_match_pandas(tmp_path, n):
    rng = np.random.default_rng(n)
    lengths = rng.choice([0, 1, 2, 5, 5, 5, 8, 13, 13, 40, 300], size=n)  # many ties, even and odd n
    records = [
        {
            "instruction": " ".join(["word"] * int(rng.integers(1, 9))),
            "input": "x" * int(k // 3),
            "response": "y" * int(k),
            "_line": i + 1,
        }
        for i, k in enumerate(lengths)
    ]
    records += [dict(records[0], _line=n + 1), dict(records[0], _line=n + 2), dict(records[1], _line=n + 3)]
    profile = build_profile(records, tmp_path, languages=False, near_duplicate_threshold=None)

    df = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in records])
    for field in ("instruction", "input", "response"):
        for unit, series in (("chars", df[field].str.len()), ("words", df[field].str.split().str.len())):
            stats = profile["fields"][field][unit]
            assert stats["p50"] == series.median() == series.quantile(0.5)
            assert [stats[k] for k in KEYS] == [series.quantile(q) for q in QUANTILES]
            assert stats["mean"] == series.mean()
            assert (stats["min"], stats["max"], stats["count"]) == (series.min(), series.max(), len(series))
    total = df["instruction"].str.len() + df["input"].str.len() + df["response"].str.len()
    assert [profile["fields"]["total_chars"][k] for k in KEYS] == [total.quantile(q) for q in QUANTILES]
    # extra copies, as DataFrame.duplicated counts them; "groups" is what ydata-profiling calls duplicates
    assert profile["duplicates"]["count"] == df.duplicated().sum() >= 3
    assert profile["duplicates"]["groups"] == len(df[df.duplicated(keep=False)].drop_duplicates())


def test_near_duplicate_clusters_with_examples(tmp_path):
    text = "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces"
    records = [
        {"instruction": text, "input": "", "response": "def is_pal(s): return s == s[::-1]", "_line": 1},
        {"instruction": "Name a colour", "input": "", "response": "Red", "_line": 2},
        {
            "instruction": text + "!",
            "input": "",
            "response": "def is_pal(s): return s == s[::-1]",
            "_line": 3,
        },
        {"instruction": text, "input": "", "response": "def is_pal(s): return s == s[::-1]", "_line": 4},
        {
            "instruction": text.replace("Python", "Rust"),
            "input": "",
            "response": "fn is_pal() {}",
            "_line": 5,
        },
        {
            "instruction": text,
            "input": "",
            "response": "def is_pal(s): return s == s[::-1]  # works",
            "_line": 6,
        },
    ]
    profile = build_profile(records, tmp_path, languages=False)
    near = profile["near_duplicates"]
    # line 4 is an exact copy of line 1 (counted there), line 5 changed too much to count
    assert profile["duplicates"]["count"] == 1
    assert (near["count"], near["rate"], near["clusters"]) == (2, 0.3333, 1)
    (example,) = near["examples"]
    assert example["lines"] == [1, 3, 6] and example["rows"] == 3
    assert example["jaccard"] == [1.0, 0.95]  # "!" is punctuation; one more word makes 1 of 20 shingles new
    assert (
        example["first"] == "…rome, ignoring case and spaces / / def is_pal(s): return s == s[::-1]"
    )  # 30 before
    assert example["repeat"] == "…rome, ignoring case and spaces! / / def is_pal(s): return s == s[::-1]"
    assert near["settings"] == {
        "threshold": 0.8,
        "shingle_size": 5,
        "num_perm": 128,
        "bands": 21,
        "rows_per_band": 6,
    }
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<h2>Near duplicates</h2>" in html and "1, 3, 6" in html
    lenient = build_profile(records, tmp_path, near_duplicate_threshold=0.3, languages=False)
    assert lenient["near_duplicates"]["count"] == 3  # line 5 shares 3 of 8 shingles: Jaccard 0.375


def test_script_mix_and_language_guess(tmp_path):
    instructions = [
        ("Reverse the word cat and then explain what you did", "Latin"),
        ("Переведи это предложение на английский язык, пожалуйста", "Cyrillic"),
        ("请把这个句子翻译成英文，然后解释每个词的意思", "Han (CJK)"),
        ("ترجم هذه الجملة إلى اللغة الإنجليزية من فضلك", "Arabic"),
        ("Μετάφρασε αυτή την πρόταση στα αγγλικά", "Greek"),
        ("Translate the Russian word кошка into English", "Latin"),  # 5 of 36 letters Cyrillic: mixed
        ("12 + 30 = ?", "none"),
        ("Schreibe eine kurze Geschichte über einen Hund und eine Katze", "Latin"),
    ]
    records = [
        {"instruction": t, "input": "", "response": "42", "_line": i + 1}
        for i, (t, _) in enumerate(instructions)
    ]
    profile = build_profile(records, tmp_path, near_duplicate_threshold=None)
    scripts = profile["scripts"]
    assert scripts["rows"] == {"Latin": 3, "Cyrillic": 1, "Han (CJK)": 1, "Arabic": 1, "Greek": 1, "none": 1}
    assert scripts["shares"]["Latin"] == 0.375 and scripts["mixed_rows"] == 1
    assert scripts["examples"]["Latin + other"] == [{"line": 6, "instruction": instructions[5][0]}]
    assert scripts["examples"]["Arabic"][0]["line"] == 4

    pytest.importorskip("langdetect")
    lang = profile["languages"]
    assert lang["method"].startswith("langdetect") and lang["sample"] == 7  # "12 + 30 = ?" is too short
    assert {"en", "ru", "ar", "el", "de"} <= set(lang["shares"])
    assert math.isclose(sum(lang["shares"].values()), 1.0, abs_tol=1e-3)


def _rows(words: list[str], n: int, response_len: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "instruction": " ".join(rng.choice(words, size=6)),
            "input": "",
            "response": " ".join(rng.choice(words, size=response_len)),
            "_line": i + 1,
        }
        for i in range(n)
    ]


def test_drift_psi_and_vocabulary_shift_against_a_previous_profile(tmp_path):
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert psi([10, 0, 5], [10, 0, 5]) == 0.0

    old_words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    new_words = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white"]
    before = build_profile(_rows(old_words, 80, 4, 1), tmp_path / "a", languages=False)
    same = build_profile(_rows(old_words, 80, 4, 1), tmp_path / "b", previous_profile=before, languages=False)
    drift = same["drift"]
    assert all(v["psi"] == 0.0 for by in drift["length_psi"].values() for v in by.values())
    assert drift["vocabulary"]["new_top_words_share"] == 0.0 and drift["vocabulary"]["js_divergence"] == 0.0

    after = build_profile(
        _rows(old_words[:4] + new_words, 80, 60, 2), tmp_path / "c", previous_profile=before, languages=False
    )
    psis = after["drift"]["length_psi"]["chars"]
    assert psis["response"]["psi"] > 0.25 and psis["response"]["verdict"] == "major shift"
    assert psis["instruction"]["psi"] < 0.1 and psis["instruction"]["verdict"] == "stable"
    expected = psi(before["length_bins"]["chars"]["response"], after["length_bins"]["chars"]["response"])
    assert psis["response"]["psi"] == round(expected, 4)
    vocab = after["drift"]["vocabulary"]
    assert vocab["new_top_words_share"] == round(8 / 12, 4)  # 8 new words of the 12 words now
    assert {w for w, _ in vocab["new_top_words"]} == set(new_words)
    assert 0.3 < vocab["js_divergence"] < 1
    html = (tmp_path / "c" / "report.html").read_text(encoding="utf-8")
    assert "Changes since previous profile" in html and "major shift" in html and "Jensen" in html

    old_style = {k: v for k, v in before.items() if k not in ("length_bins",)}
    old_style["vocabulary"] = {k: v for k, v in before["vocabulary"].items() if k != "frequencies"}
    drift = build_profile(
        _rows(old_words, 5, 4, 3), tmp_path / "d", previous_profile=old_style, languages=False
    )["drift"]
    assert drift["length_psi"] == {} and drift["vocabulary"] is None
    assert any("no length bins" in n for n in drift["notes"]) and any(
        "no word frequencies" in n for n in drift["notes"]
    )


def test_report_is_self_contained_html_with_embedded_plots(tmp_path):
    build_profile(RECORDS, tmp_path, languages=False)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert (
        len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', html)) == 3
    )  # chars, words, tasks
    assert "<style>" in html and "<link" not in html and "<script" not in html
    for section in ("Lengths", "Vocabulary", "Scripts and languages", "Exact duplicates", "Near duplicates"):
        assert f"<h2>{section}</h2>" in html
    # data text is escaped, never injected as markup
    assert "<body>abc" not in html and "<td>&lt;html&gt;</td>" in html


def test_token_lengths_and_changes_since_previous(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "reverse": 1, "the": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")

    previous = build_profile(RECORDS[:3], tmp_path / "before", tokenizer=tokenizer, languages=False)
    profile = build_profile(
        RECORDS, tmp_path / "after", tokenizer=tokenizer, previous_profile=previous, languages=False
    )
    assert profile["fields"]["instruction"]["tokens"]["max"] == 4
    tokens = profile["fields"]["input"]["tokens"]  # 0 0 0 2 0 1
    assert (tokens["min"], tokens["mean"], tokens["p50"], tokens["p90"], tokens["max"]) == (
        0,
        0.5,
        0.0,
        1.5,
        2,
    )
    assert tokens["p99"] == pd.Series([0, 0, 0, 2, 0, 1]).quantile(0.99) == pytest.approx(1.95)
    # line 6: "Sort the letters" 3 + "bca" 1 + 11 pieces of "<html><body>abc</body></html>" (< html >< body …)
    assert profile["fields"]["total_tokens"]["max"] == 15
    changes = {c["metric"]: c for c in profile["changes"]}
    assert changes["rows"] == {"metric": "rows", "previous": 3, "current": 6, "change": 3, "relative": 1.0}
    assert (
        changes["task share: reverse"]["previous"] == 1.0 and changes["task share: reverse"]["current"] == 0.5
    )
    assert changes["task share: add"]["previous"] is None
    assert set(profile["drift"]["length_psi"]) == {"chars", "tokens"}
    assert set(profile["drift"]["length_psi"]["tokens"]) == {"instruction", "input", "response", "total"}
    html = (tmp_path / "after" / "report.html").read_text(encoding="utf-8")
    assert "Changes since previous profile" in html and "<h3>tokens</h3>" in html


def test_empty_input_still_writes_a_profile(tmp_path):
    profile = build_profile([], tmp_path, languages=False)
    assert profile["rows"] == 0 and profile["duplicates"]["count"] == 0
    assert profile["near_duplicates"]["count"] == 0 and profile["fields"]["response"]["chars"]["count"] == 0
    assert (tmp_path / "report.html").is_file()


def test_rows_without_any_word_pair_profile_cleanly(tmp_path):
    """One-word prompts (served traffic such as "Task 0") have no bigram to count."""
    records = [{"instruction": f"Task {i}", "input": "", "response": str(i)} for i in range(5)]
    profile = build_profile(records, tmp_path, languages=False, near_duplicate_threshold=None)
    assert profile["rows"] == 5


def test_token_lengths_of_an_even_sample_say_so(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "row": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    records = [{"instruction": "row " * (i % 7 + 1), "input": "", "response": "x"} for i in range(400)]
    profile = build_profile(
        records,
        tmp_path / "p",
        tokenizer=raw,
        token_sample=50,
        languages=False,
        near_duplicate_threshold=None,
    )
    info = profile["tokens"]
    assert info["sampled"] is True and 25 <= info["rows"] <= 50 and info["context"] is None
    stats = profile["fields"]["instruction"]["tokens"]
    assert (stats["min"], stats["max"]) == (1, 7) and 3 <= stats["p50"] <= 5  # every 7th length, evenly
    html = (tmp_path / "p" / "report.html").read_text()
    assert f"counted on an even sample of {info['rows']} rows" in html


# --- conversations -------------------------------------------------------------------------------

SHARED_SYSTEM = "You are a terse assistant. Write to ann@corp.example.com"


def _chat(line: int, turns: list[tuple[str, str]]) -> dict:
    """A chat record as the loader hands it on: the turns and their instruction view."""
    from airloom.prompts import chat_fields

    messages = [{"role": role, "content": content} for role, content in turns]
    return {"messages": messages, **chat_fields(messages), "_file": "chat.jsonl", "_line": line}


CHATS = [
    _chat(1, [("system", SHARED_SYSTEM), ("user", "add 2 and 3"), ("assistant", "5")]),
    _chat(
        2,
        [
            ("system", SHARED_SYSTEM),
            ("user", "add 4 and 4"),
            ("assistant", "8"),
            ("user", "double it"),
            ("assistant", "16"),
        ],
    ),
    _chat(3, [("system", "Answer in French."), ("user", "say hello"), ("assistant", "bonjour")]),
    _chat(4, [("user", "name a colour"), ("assistant", "red"), ("user", "another"), ("assistant", "blue")]),
    # the shared prompt again, only its whitespace differs
    _chat(
        5,
        [
            ("system", "  " + SHARED_SYSTEM.replace(". ", ".\n") + " "),
            ("user", "add 1 and 1"),
            ("assistant", "2"),
        ],
    ),
    {
        "instruction": "Reverse the word cat",
        "input": "",
        "response": "tac",
        "_file": "chat.jsonl",
        "_line": 6,
    },
]


def _word_tokenizer(context: int | None = None):
    """Every whitespace-separated piece is one token: the counts below can be worked out by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from airloom.tokens import TokenCounter

    raw = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TokenCounter("words", context, raw), raw


def test_conversations_turns_roles_system_prompts_and_context(tmp_path):
    counter, _ = _word_tokenizer(context=12)
    profile = build_profile(CHATS, tmp_path, tokenizer=counter, languages=False)
    conv = profile["conversations"]
    assert (conv["count"], conv["share_of_rows"]) == (5, 0.8333)
    turns = conv["turns"]  # 3 5 3 4 3
    assert (turns["min"], turns["mean"], turns["p50"], turns["max"]) == (3, 3.6, 3.0, 5)
    assert conv["turns_histogram"] == {"turns": [3, 4, 5], "counts": [3, 1, 1], "above": 0}
    assert conv["roles"] == {
        "system": {
            "turns": 4,
            "turn_share": 0.2222,
            "per_conversation": 0.8,
            "conversations": 4,
            "conversation_share": 0.8,
        },
        "user": {
            "turns": 7,
            "turn_share": 0.3889,
            "per_conversation": 1.4,
            "conversations": 5,
            "conversation_share": 1.0,
        },
        "assistant": {
            "turns": 7,
            "turn_share": 0.3889,
            "per_conversation": 1.4,
            "conversations": 5,
            "conversation_share": 1.0,
        },
    }
    assert (conv["with_system"], conv["with_system_rate"]) == (4, 0.8)
    prompts = conv["system_prompts"]
    assert (prompts["distinct"], prompts["distinct_exact"]) == (2, True)
    masked = "You are a terse assistant. Write to an" + "*" * 14 + ".com"
    assert prompts["top"] == [
        {"conversations": 3, "share": 0.6, "line": 1, "preview": masked},
        {"conversations": 1, "share": 0.2, "line": 3, "preview": "Answer in French."},
    ]
    chars = conv["lengths"]["chars"]
    assert (chars["assistant"]["count"], chars["assistant"]["min"], chars["assistant"]["max"]) == (7, 1, 7)
    assert chars["system"]["max"] == len(SHARED_SYSTEM) + 3  # the copy with extra spaces
    tokens = conv["lengths"]["tokens"]
    assert (tokens["user"]["min"], tokens["user"]["max"], tokens["user"]["mean"]) == (1, 4, 20 / 7)
    assert (tokens["system"]["min"], tokens["system"]["max"]) == (3, 8)
    # ChatML: each turn is its words plus "<|im_start|>role" (the last word carries "<|im_end|>")
    info = conv["tokens"]
    assert info["template"]["name"] == "chatml" and info["conversations"] == 5 and not info["sampled"]
    # (line 5's trailing space leaves "<|im_end|>" a token of its own): 16 21 9 10 17
    rendered = info["rendered"]
    assert (rendered["min"], rendered["p50"], rendered["max"], rendered["mean"]) == (9, 16.0, 21, 14.6)
    assert (info["context"], info["over_context"], info["over_context_rate"]) == (12, 3, 0.6)
    assert profile["fields"]["instruction"]["present"] == 6  # the instruction view is profiled as before

    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<h2>Conversations</h2>" in html and "<h3>System prompts</h3>" in html
    assert f"<td>{masked}</td>" in html and "rendered with ChatML" in html
    assert "<b>60.00%</b> of them (3) are longer than the model's context of 12 tokens" in html
    images = re.findall(r'alt="([^"]+)"', html)
    assert {"turns per conversation", "turn chars by role", "turn tokens by role"} <= set(images)

    # the same numbers chunk by chunk; tokens then come from an even sample of the rows
    from airloom.data.eda import profile_stream

    again = profile_stream(
        lambda: [CHATS[:2], CHATS[2:4], CHATS[4:]],
        tmp_path / "chunked",
        tokenizer=counter,
        token_sample=2,
        languages=False,
        previous_profile=profile,
    )
    changes = {c["metric"]: c for c in again["changes"]}
    assert changes["turns per conversation mean"]["change"] == 0.0
    assert changes["distinct system prompts"]["current"] == 2
    chunked = again["conversations"]
    assert {k: v for k, v in chunked.items() if k != "lengths" and k != "tokens"} == {
        k: v for k, v in conv.items() if k != "lengths" and k != "tokens"
    }
    assert chunked["lengths"]["chars"] == conv["lengths"]["chars"]
    assert chunked["tokens"]["sampled"] is True and 1 <= chunked["tokens"]["conversations"] <= 2


def test_conversations_with_the_tokenizers_chat_template(tmp_path):
    from transformers import PreTrainedTokenizerFast

    _, raw = _word_tokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", model_max_length=9)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    profile = build_profile(CHATS, tmp_path, tokenizer=tokenizer, token_sample=None, languages=False)
    info = profile["conversations"]["tokens"]
    assert info["template"]["name"] == "chat_template" and len(info["template"]["sha256"]) == 64
    # only line 4 has no system turn: "user:" name a colour / "assistant:" red / ... = 4 + 2 + 2 + 2
    assert (info["render_errors"], info["conversations"], info["rendered"]["max"]) == (4, 1, 10)
    assert "no system turns" in info["render_error"] and not info["sampled"]
    assert (info["context"], info["over_context"], info["over_context_rate"]) == (9, 1, 1.0)
    assert profile["conversations"]["lengths"]["tokens"]["assistant"]["count"] == 7  # every row counted
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "the tokenizer's chat template (sha256 " + info["template"]["sha256"][:12] in html
    assert "The chat template refused 4 conversations" in html


def test_system_prompts_past_the_counted_cap_are_estimated(tmp_path, monkeypatch):
    import airloom.data.eda as eda

    monkeypatch.setattr(eda, "_SYSTEM_CAP", 4)
    records = [
        _chat(i + 1, [("system", "Be kind."), ("user", f"hi {i}"), ("assistant", "hello")]) for i in range(6)
    ]
    records += [
        _chat(i + 7, [("system", f"Prompt number {i}"), ("user", "hi"), ("assistant", "hello")])
        for i in range(15)
    ]
    prompts = build_profile(records, tmp_path, languages=False, near_duplicate_threshold=None)[
        "conversations"
    ]["system_prompts"]
    assert prompts["distinct_exact"] is False and abs(prompts["distinct"] - 16) <= 1  # HyperLogLog
    assert prompts["top"][0] == {
        "conversations": 6,
        "share": round(6 / 21, 4),
        "line": 1,
        "preview": "Be kind.",
    }


def test_instruction_data_has_no_conversations_section(tmp_path):
    profile = build_profile(RECORDS, tmp_path, languages=False)
    assert "conversations" not in profile
    assert "<h2>Conversations</h2>" not in (tmp_path / "report.html").read_text(encoding="utf-8")
