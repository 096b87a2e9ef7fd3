"""build_profile: exact numbers on a small known set, a self-contained HTML report, changes over time."""

from __future__ import annotations

import json
import re

from airloom.data.eda import build_profile

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


def test_profile_numbers_on_a_known_set(tmp_path):
    profile = build_profile(RECORDS, tmp_path)
    assert json.loads((tmp_path / "profile.json").read_text()) == profile

    assert profile["rows"] == 6
    inp = profile["fields"]["input"]
    assert (inp["present"], inp["empty"], inp["completeness"]) == (2, 4, 0.3333)
    assert profile["fields"]["task"]["completeness"] == 1.0
    assert profile["fields"]["id"]["present"] == 0
    chars = profile["fields"]["response"]["chars"]
    assert (chars["min"], chars["max"]) == (1, 29)
    assert profile["fields"]["instruction"]["words"] == {
        "min": 3,
        "mean": 3.667,
        "p50": 4.0,
        "p90": 4.0,
        "p99": 4.0,
        "max": 4,
    }
    assert (
        sum(profile["fields"]["response"]["chars_histogram"]["counts"])
        + profile["fields"]["response"]["chars_histogram"]["above"]
        == 6
    )

    dup = profile["duplicates"]
    assert (dup["count"], dup["rate"]) == (1, 0.1667)  # line 3 repeats line 1 once spaces are collapsed
    assert dup["examples"] == [{"copies": 2, "lines": [1, 3], "instruction": "Reverse the word cat"}]
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
    assert vocab["size"] == 27
    assert vocab["top_words"][:2] == [["reverse", 3], ["word", 3]]
    assert vocab["top_bigrams"][0] == ["reverse word", 3]
    assert "changes" not in profile


def test_report_is_self_contained_html_with_embedded_plots(tmp_path):
    build_profile(RECORDS, tmp_path)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert '<img src="data:image/png;base64,' in html
    assert (
        len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', html)) == 3
    )  # chars, words, tasks
    assert "<style>" in html and "<link" not in html and "<script" not in html
    # data text is escaped, never injected as markup
    assert "<body>abc" not in html and "<td>&lt;html&gt;</td>" in html


def test_token_lengths_and_changes_since_previous(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "reverse": 1, "the": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")

    previous = build_profile(RECORDS[:3], tmp_path / "before")
    profile = build_profile(RECORDS, tmp_path / "after", tokenizer=tokenizer, previous_profile=previous)
    assert profile["fields"]["instruction"]["tokens"]["max"] == 4
    assert profile["fields"]["input"]["tokens"] == {
        "min": 0,
        "mean": 0.5,
        "p50": 0.0,
        "p90": 1.5,
        "p99": 1.95,
        "max": 2,
    }
    changes = {c["metric"]: c for c in profile["changes"]}
    assert changes["rows"] == {"metric": "rows", "previous": 3, "current": 6, "change": 3, "relative": 1.0}
    assert (
        changes["task share: reverse"]["previous"] == 1.0 and changes["task share: reverse"]["current"] == 0.5
    )
    assert changes["task share: add"]["previous"] is None
    html = (tmp_path / "after" / "report.html").read_text(encoding="utf-8")
    assert "Changes since previous profile" in html and "<h3>tokens</h3>" in html


def test_empty_input_still_writes_a_profile(tmp_path):
    profile = build_profile([], tmp_path)
    assert profile["rows"] == 0 and profile["duplicates"]["count"] == 0
    assert (tmp_path / "report.html").is_file()
