"""One corrupt file with one line of each fault kind: each is reported at its line and field, or quarantined
with its reason; every clean row survives; policy ``fail`` fails. (The kinds of ../shared's FAULTS.md.)"""

from __future__ import annotations

import json

import pytest

from airloom.data.load import load_records
from airloom.data.validate import ValidationConfig
from tests.unit.data.helpers import validate_load

ANIMALS = ["cat", "dog", "owl", "fox", "eel", "yak", "emu", "ant", "bee", "cod", "elk", "gnu"]
VERBS = ["Describe", "Draw", "Name", "Count", "Spell", "Rhyme"]


def _clean(i: int) -> dict:
    animal, verb = ANIMALS[i % 12], VERBS[i % 6]
    return {
        "instruction": f"{verb} the {animal} number {i} in {i % 7 + 2} words.",
        "input": "" if i % 3 else f"case {i}",
        "response": f"The {animal} {i} is {'small' if i % 2 else 'quick'} and {i * 7 % 13} years old.",
    }


LONG = "a" * 300_000
# line number -> (the line's bytes, the (field, check, severity) findings it must get)
FAULTS: dict[int, tuple[bytes, set[tuple]]] = {
    3: (
        b'{"instruction": "Say hello in French", "input": "", "response": "\xe0\xe7 bient\xc3\x28t"}',
        {("response", "non_utf8", "error")},
    ),
    6: (
        b'{"instruction": "Count to three", "input": "", "response": "1, 2',
        {(None, "invalid_json", "error")},
    ),
    9: (b'["Name a fruit", "apple"]', {(None, "not_object", "error")}),
    12: (b'{"instruction": 42, "input": "", "response": "ok"}', {("instruction", "wrong_type", "error")}),
    15: (b"", {(None, "blank_line", "error")}),
    18: (b'{"instruction": "Name a planet", "input": ""}', {("response", "missing_field", "error")}),
    21: (
        b'{"instruction": "Say bye", "input": null, "response": "Bye"}',
        {("input", "null_field", "error")},
    ),
    24: (
        b'{"instruction": "   \\t  ", "input": "", "response": "Nothing was asked."}',
        {("instruction", "blank_text", "error")},
    ),
    27: (
        b'{"instruction": "Name a colour", "input": "", "response": ""}',
        {("response", "blank_text", "error"), ("response", "too_short", "error")},
    ),
    30: (
        b'{"prompt": "Name a river", "input": "", "response": "The Nile."}',
        {("instruction", "missing_field", "error"), ("prompt", "unknown_field", "warning")},
    ),
    33: (
        json.dumps(
            {
                "instruction": "Sum the numbers 2 and 3",
                "input": "",
                "response": "<html><head><title>Ads</title></head><body><iframe src='https://ads.example'>"
                "</iframe><p>5</p></body></html>",
            }
        ).encode(),
        {("response", "markup", "error")},
    ),
    36: (
        b'{"instruction": "Mail the summary to jane.doe@example.org", "input": "", "response": "Done."}',
        {("instruction", "pii", "warning")},
    ),
    39: (
        b'{"instruction": "Who answers the help line?", "input": "", "response": "Call (555) 201-3344."}',
        {("response", "pii", "warning")},
    ),
    42: (
        json.dumps({"instruction": "Print many a", "input": "", "response": LONG}).encode(),
        # one 300,000-letter "word": also far from any text's mean word length (the whole row's size
        # bound is not repeated where a field's own bound already reports it)
        {("response", "too_long", "error"), (None, "mean_word_length", "error")},
    ),
    45: (
        json.dumps(
            {"instruction": "Print the bell", "input": "", "response": "ding\x00\x1b[0m\x07"}
        ).encode(),
        {("response", "control_chars", "error")},
    ),
    48: (json.dumps(_clean(0)).encode(), {(None, "duplicate", "error")}),  # line 1
    51: (
        json.dumps(dict(_clean(1), response=_clean(1)["response"] + " Really.")).encode(),  # line 2
        {(None, "near_duplicate", "error")},
    ),
}
TRUNCATED_LAST = b'{"instruction": "Name a mountain", "input": "", "response": "Mount Ev'
LAST = 54
KEPT_WITH_WARNING = {36, 39}  # PII is reported and kept: prepare scrubs it


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> tuple:
    path = tmp_path_factory.mktemp("corrupt") / "instruct_corrupt.jsonl"
    lines, clean_rows, k = [], {}, 0
    for line in range(1, LAST):
        if line in FAULTS:
            lines.append(FAULTS[line][0])
        else:
            clean_rows[line] = _clean(k)
            lines.append(json.dumps(clean_rows[line]).encode())
            k += 1
    path.write_bytes(b"\n".join(lines) + b"\n" + TRUNCATED_LAST)  # the last line has no newline
    return path, clean_rows


def test_every_fault_is_reported_at_its_line_and_every_clean_row_survives(corrupt, tmp_path):
    path, clean_rows = corrupt
    load = load_records(path)
    config = ValidationConfig(max_quarantine_rate=0.5, max_pii_rate=0.1, max_markup_rate=0.1)
    result = validate_load(load, tmp_path / "out", config)

    found: dict[int, set[tuple]] = {}
    for f in result.findings:
        found.setdefault(f.line, set()).add((f.field, f.check, f.severity))
        assert f.file == str(path)
    expected = {line: checks for line, (_, checks) in FAULTS.items()}
    expected[LAST] = {(None, "invalid_json", "error")}
    assert found == expected  # each fault at its line and field, nothing reported on a clean line
    by_line = {f.line: f.message for f in result.findings if f.severity == "error"}
    assert "0xE0 0xE7 0xC3" in by_line[3]
    assert "truncated" in by_line[6] and "cut off" in by_line[LAST]
    assert "rename it to 'instruction'" in by_line[30]
    assert "300000 characters" in by_line[42]
    assert "U+0000, U+0007, U+001B" in by_line[45]
    assert "repeats the row at line 1 " in by_line[48] and "nearly repeats the row at line 2 " in by_line[51]

    errors = {line for line, checks in expected.items() if any(s == "error" for _, _, s in checks)}
    assert (result.rows_read, result.quarantined, result.accepted) == (LAST, len(errors), LAST - len(errors))
    assert result.success, result.summary()
    quarantine = [json.loads(q) for q in result.quarantine_path.read_text(encoding="utf-8").splitlines()]
    assert [q["line"] for q in quarantine] == sorted(errors)
    assert all(q["reasons"] for q in quarantine)
    accepted = [json.loads(a) for a in result.accepted_path.read_text(encoding="utf-8").splitlines()]
    assert [
        a
        for a in accepted
        if a["instruction"] not in ("Mail the summary to jane.doe@example.org", "Who answers the help line?")
    ] == list(clean_rows.values())
    assert len(accepted) == len(clean_rows) + len(KEPT_WITH_WARNING)


def test_policy_fail_fails_the_run(corrupt, tmp_path):
    path, _ = corrupt
    config = ValidationConfig(
        on_bad_rows="fail", max_quarantine_rate=0.5, max_pii_rate=0.1, max_markup_rate=0.1
    )
    result = validate_load(load_records(path), tmp_path / "out", config)
    assert not result.success
    assert result.reasons == [f"on_bad_rows is 'fail' and {result.quarantined} rows are bad"]
    report = json.loads(result.report_path.read_text())
    assert report["success"] is False and report["rows_read"] == report["accepted"] + report["quarantined"]
    # with the default thresholds the same file fails on its own: too much quarantined, too much PII
    default = validate_load(load_records(path), tmp_path / "default")
    assert not default.success and any("max_quarantine_rate" in r for r in default.reasons)
