"""validate: a Great Expectations suite over loaded records; bad rows are quarantined and counted.

Each ``validate`` call builds a GX context (about a second), so the GX tests are few and check much.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airloom.data.load import load_records
from airloom.data.text import find_pii, has_markup, scrub_pii
from airloom.data.validate import ValidationConfig
from airloom.exceptions import UsageError
from tests.unit.data.helpers import validate_load

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink"]


def _clean_rows(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Write the word {COLOURS[i % 10]} {i} times, separated by commas.",
            "input": "" if i % 2 else f"case {i}",
            "response": ", ".join([COLOURS[i % 10]] * (i % 5 + 1)) + f" (row {i})",
        }
        for i in range(n)
    ]


def _write(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_clean_data_passes_and_writes_every_output(tmp_path):
    load = load_records(_write(tmp_path / "clean.jsonl", _clean_rows(40)))
    result = validate_load(load, tmp_path / "out")

    assert result.success, result.summary()
    assert (result.rows_read, result.accepted, result.quarantined) == (40, 40, 0)
    assert result.failed_expectations == [] and result.reasons == []
    assert result.data_docs_path == tmp_path / "out" / "data_docs" / "index.html"
    assert result.data_docs_path.is_file()
    assert "<html" in result.data_docs_path.read_text(encoding="utf-8").lower()

    report = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert (report["success"], report["rows_read"], report["accepted"], report["quarantined"]) == (
        True,
        40,
        40,
        0,
    )
    assert report["data_docs"] == str(result.data_docs_path)
    types = {(e["type"], e["column"]) for e in report["expectations"]}
    assert {
        ("expect_table_row_count_to_be_between", None),
        ("expect_column_values_to_be_between", "instruction_chars"),
        ("expect_column_values_to_be_in_set", "response_blank"),
        ("expect_column_values_to_be_in_set", "input_control"),
        ("expect_column_mean_to_be_between", "is_duplicate"),
        ("expect_column_mean_to_be_between", "has_pii"),
        ("expect_column_mean_to_be_between", "has_markup"),
    } <= types
    assert all(e["success"] for e in report["expectations"])
    lengths = next(
        e
        for e in report["expectations"]
        if e["type"] == "expect_column_values_to_be_between" and e["column"] == "response_chars"
    )
    assert (lengths["details"]["min_value"], lengths["details"]["max_value"]) == (1, 8000)

    # accepted.jsonl holds canonical fields only, so it loads back with no findings
    again = load_records(result.accepted_path)
    assert len(again.records) == 40 and again.findings == []
    assert result.quarantine_path.read_text() == ""
    assert result.summary().startswith("validation PASSED: 40 rows read, 40 accepted, 0 quarantined")


def test_duplicates_pii_and_bad_rows_fail_the_suite_and_reconcile(tmp_path):
    rows: list = _clean_rows(40)
    rows += [dict(rows[i]) for i in range(10)]  # 10 exact repeats: 20% of 50 rows
    rows[13]["response"] = "Mail bob.smith@example.org or call 555-123-4567."
    rows[15]["instruction"] = "Ask 10.20.30.40 for the list of colours."
    rows.append({"instruction": "Hi", "input": "", "response": "x" * 9000})  # too short and too long
    rows.append({"instruction": "Name a colour", "input": "", "response": "<html><body>Red</body></html>"})
    rows.append({"instruction": "Name a colour", "input": "", "response": "Red\x00\x1b[0m"})
    rows.append('{"instruction": "Name a colour", "input": ""')  # unreadable: quarantined by load
    load = load_records(_write(tmp_path / "dirty.jsonl", rows))
    result = validate_load(load, tmp_path / "out")

    assert not result.success
    failed = {(e["type"], e["column"]) for e in result.failed_expectations}
    assert failed == {
        ("expect_column_mean_to_be_between", "is_duplicate"),
        ("expect_column_mean_to_be_between", "has_pii"),
    }  # line 51's mean word length fails its rule, but one row is within the quarantine budget
    assert (result.rows_read, result.accepted, result.quarantined) == (54, 40, 14)
    assert result.rows_read == result.accepted + result.quarantined
    assert any("max_quarantine_rate" in r for r in result.reasons)

    by_line: dict[int, set[tuple]] = {}
    for f in result.findings:
        by_line.setdefault(f.line, set()).add((f.field, f.check, f.severity))
    assert by_line[14] == {("response", "pii", "warning")}  # PII is kept, prepare scrubs it
    assert by_line[16] == {("instruction", "pii", "warning")}
    assert by_line[41] == {(None, "duplicate", "error")}
    assert by_line[51] == {
        ("instruction", "too_short", "error"),
        ("response", "too_long", "error"),
        (None, "mean_word_length", "error"),
    }
    assert by_line[52] == {("response", "markup", "error")}
    assert by_line[53] == {("response", "control_chars", "error")}
    assert by_line[54] == {(None, "invalid_json", "error")}
    assert "repeats the row at line 1" in next(f.message for f in result.findings if f.line == 41)

    quarantine = [json.loads(line) for line in result.quarantine_path.read_text().splitlines()]
    assert [q["line"] for q in quarantine] == [*range(41, 55)]
    assert quarantine[-1]["raw"].startswith('{"instruction"')
    assert quarantine[10]["record"]["instruction"] == "Hi"
    assert len(result.accepted_path.read_text().splitlines()) == 40

    summary = result.summary()
    assert "validation FAILED: 54 rows read, 40 accepted, 14 quarantined" in summary
    assert (
        "failed expect_column_mean_to_be_between(is_duplicate): observed 18.87% of rows (10 rows)" in summary
    )
    assert "line 41: repeats the row at line 1" in summary
    report = json.loads(result.report_path.read_text())
    assert report["quarantined"] == 14 and report["success"] is False
    assert {(f["line"], f["check"]) for f in report["findings"]} >= {(51, "too_long"), (54, "invalid_json")}


def test_on_bad_rows_fail_fails_on_a_single_bad_row(tmp_path):
    rows = _clean_rows(40) + [{"instruction": "Name a colour", "input": "", "response": "   "}]
    load = load_records(_write(tmp_path / "one_bad.jsonl", rows))
    lenient = ValidationConfig(max_quarantine_rate=0.1)
    strict = ValidationConfig(on_bad_rows="fail", max_quarantine_rate=0.1)
    assert validate_load(load, tmp_path / "lenient", lenient).success
    result = validate_load(load, tmp_path / "strict", strict)
    assert not result.success and result.failed_expectations == []
    assert result.reasons == ["on_bad_rows is 'fail' and 1 rows are bad"]
    assert [(f.line, f.check) for f in result.findings] == [(41, "blank_text")]


def test_config_from_dict_and_yaml(tmp_path):
    cfg = ValidationConfig.from_dict({"max_chars": {"response": 100}, "max_pii_rate": 0})
    assert cfg.max_chars == {**ValidationConfig().max_chars, "response": 100}
    assert cfg.min_chars == {"instruction": 3, "response": 1}
    assert cfg.max_pii_rate == 0.0

    with pytest.raises(UsageError, match=r"unknown key 'max_dup_rate'; known keys: .*max_duplicate_rate"):
        ValidationConfig.from_dict({"max_dup_rate": 0.1})
    path = tmp_path / "validation.yaml"
    path.write_text("max_duplicate_rate: 0.1\nmin_chars:\n  answer: 3\n")
    with pytest.raises(UsageError, match=r"validation\.yaml: min_chars\.answer: unknown field"):
        ValidationConfig.from_yaml(path)
    path.write_text("max_duplicate_rate: 0.1\non_bad_rows: skip\n")
    with pytest.raises(UsageError, match=r"validation\.yaml: on_bad_rows must be 'quarantine' or 'fail'"):
        ValidationConfig.from_yaml(path)
    path.write_text("max_quarantine_rate: 0.2\nmax_chars: {instruction: 50}\n")
    assert ValidationConfig.from_yaml(path).max_chars["instruction"] == 50
    with pytest.raises(UsageError, match=r"min_chars\.response \(10\) is above max_chars\.response \(5\)"):
        ValidationConfig(min_chars={"response": 10}, max_chars={"response": 5})
    with pytest.raises(UsageError, match=r"max_pii_rate must be a share between 0 and 1, got 5"):
        ValidationConfig(max_pii_rate=5)
    with pytest.raises(UsageError, match=r"nope\.yaml: cannot read"):
        ValidationConfig.from_yaml(tmp_path / "nope.yaml")


def test_text_checks():
    assert find_pii("write to ann.lee@mail.example.org") == {"email": ["ann.lee@mail.example.org"]}
    assert find_pii("call (555) 123-4567 or +44 20 7946 0958")["phone"] == [
        "(555) 123-4567",
        "+44 20 7946 0958",
    ]
    assert find_pii("server 10.1.2.3, localhost 127.0.0.1") == {"ip": ["10.1.2.3"]}
    assert find_pii("card 4111 1111 1111 1111") == {"card": ["4111 1111 1111 1111"]}
    # numbers in code and prose are not personal data
    for text in ["nums = {3, 17, 10, 8, 11}", "version 1.2.3", "on 2023-01-15 at 12:30", "x = 1234567890123"]:
        assert find_pii(text) == {}, text
    assert scrub_pii("a@b.io, 555-123-4567, 8.8.8.8") == (
        "<EMAIL>, <PHONE>, <IP>",
        {"email": 1, "phone": 1, "ip": 1},
    )

    assert has_markup("Write a C function", "", "<html><body><pre>int x;</pre></body></html>")
    assert not has_markup("Write an HTML page with a title", "", "<html><head><title>T</title></head></html>")
    assert not has_markup("Add a click handler", '<button id="b">Go</button>', "document.getElementById('b')")
    assert not has_markup("Print a vector", "", "#include <iostream>\nstd::vector<int> v; // <b> is fine")


def test_near_duplicates_are_quarantined_naming_the_row_they_repeat(tmp_path):
    rows: list = _clean_rows(40)
    text = "Explain in two sentences why the sky looks blue on a clear day and red at sunset"
    answer = "Air scatters short blue wavelengths more than red ones. At sunset light crosses more air."
    rows[5] = {"instruction": text, "input": "", "response": answer}
    rows[20] = {
        "instruction": text + "?",
        "input": "",
        "response": answer + " Simple.",
    }  # 1 new shingle of 32
    rows[30] = {"instruction": text.upper(), "input": "", "response": answer.replace(".", "!")}  # Jaccard 1
    load = load_records(_write(tmp_path / "near.jsonl", rows))
    result = validate_load(load, tmp_path / "out", ValidationConfig(max_quarantine_rate=0.1))

    near = [f for f in result.findings if f.check == "near_duplicate"]
    assert [(f.line, f.field, f.severity) for f in near] == [(21, None, "error"), (31, None, "error")]
    assert "nearly repeats the row at line 6 (Jaccard 0.97 of word 5-shingles" in near[0].message
    assert "nearly repeats the row at line 6 (Jaccard 1.00" in near[1].message
    assert "the first copy is kept" in near[0].message
    assert (result.rows_read, result.accepted, result.quarantined) == (40, 38, 2)
    assert result.success, result.summary()  # 2 of 40 is within max_near_duplicate_rate (5%)
    report = json.loads(result.report_path.read_text())
    assert report["near_duplicates"] == 2 and report["duplicates"] == 0
    quarantine = [json.loads(line) for line in result.quarantine_path.read_text().splitlines()]
    assert [q["line"] for q in quarantine] == [21, 31] and quarantine[0]["reasons"][0][
        "check"
    ] == "near_duplicate"

    strict = validate_load(
        load, tmp_path / "strict", ValidationConfig(max_near_duplicate_rate=0.01, max_quarantine_rate=0.1)
    )
    assert [(e["type"], e["column"]) for e in strict.failed_expectations] == [
        ("expect_column_mean_to_be_between", "is_near_duplicate")
    ]
    off = validate_load(load, tmp_path / "off", ValidationConfig(near_duplicate_threshold=None))
    assert off.success and off.accepted == 40


def test_a_broken_first_copy_does_not_cost_the_clean_copy(tmp_path):
    rows: list = _clean_rows(40)
    clean = {
        "instruction": "Name the largest planet",
        "input": "",
        "response": "Jupiter is the largest planet.",
    }
    rows[3] = dict(clean, response=clean["response"] + "\x07")  # control character: quarantined anyway
    rows[10] = clean  # same row once the control character is gone
    rows[12] = dict(clean)  # a true repeat of line 11
    load = load_records(_write(tmp_path / "first.jsonl", rows))
    result = validate_load(
        load, tmp_path / "out", ValidationConfig(max_quarantine_rate=0.1, max_duplicate_rate=0.1)
    )
    assert {(f.line, f.check) for f in result.findings if f.severity == "error"} == {
        (4, "control_chars"),
        (13, "duplicate"),
    }
    accepted = [json.loads(line) for line in result.accepted_path.read_text().splitlines()]
    assert clean in accepted and len(accepted) == 38


def test_near_duplicate_settings_are_checked():
    cfg = ValidationConfig.from_dict({"near_duplicate_threshold": 0.9, "near_duplicate_shingle_size": 3})
    assert (cfg.near_duplicate_threshold, cfg.near_duplicate_shingle_size, cfg.near_duplicate_num_perm) == (
        0.9,
        3,
        128,
    )
    assert ValidationConfig.from_dict({"near_duplicate_threshold": None}).near_duplicate_threshold is None
    with pytest.raises(
        UsageError, match=r"near_duplicate_threshold must be a Jaccard similarity in \(0, 1\]"
    ):
        ValidationConfig(near_duplicate_threshold=1.5)
    with pytest.raises(
        UsageError, match="near_duplicate_num_perm must be a whole number from 16 to 256, got 8"
    ):
        ValidationConfig(near_duplicate_num_perm=8)
    with pytest.raises(UsageError, match="max_near_duplicate_rate must be a share between 0 and 1"):
        ValidationConfig(max_near_duplicate_rate=-0.1)


def test_an_address_with_a_non_ascii_digit_is_text_not_an_ip():
    # \d also matches e.g. ARABIC-INDIC DIGIT THREE, which ipaddress rejects: it used to raise here
    assert scrub_pii("ping 127.0.0.\u0663 or 10.1.2.3") == ("ping 127.0.0.\u0663 or <IP>", {"ip": 1})
    assert "ip" not in find_pii("192.168.1.\u0663")


def test_a_stream_of_small_chunks_over_two_files_gives_what_one_read_gives(tmp_path):
    """Chunk boundaries, files and the scratch copy change nothing: outputs equal a whole read's, in
    (file, line) order, and the EDA task renders validation's profile of the same files."""
    from airloom.data.eda import profile_source
    from airloom.data.load import fingerprint, iter_chunks
    from airloom.data.validate import validate_stream

    rows: list = _clean_rows(30)
    rows += [dict(rows[i]) for i in (2, 3)]  # repeats of rows in the other file
    rows[5]["response"] = "Mail bob.smith@example.org"
    rows.insert(20, '{"instruction": "cut off"')  # unreadable, in the second file
    rows.append({"instruction": "Name a colour", "input": "", "response": "Red\x00"})
    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder / "b.jsonl", rows[16:])  # read second: files go by name
    _write(folder / "a.jsonl", rows[:16])
    config = ValidationConfig(max_duplicate_rate=0.5, max_pii_rate=0.5, max_quarantine_rate=0.5)

    whole = validate_load(load_records(folder), tmp_path / "whole", config)
    streamed = validate_stream(
        lambda: iter_chunks(folder, chunk_rows=7),
        tmp_path / "streamed",
        config,
        source=str(folder),
        scan_source=fingerprint(folder),
    )

    assert (streamed.rows_read, streamed.accepted, streamed.quarantined) == (34, 30, 4)
    assert (whole.rows_read, whole.accepted, whole.quarantined) == (34, 30, 4)
    for name in ("accepted.jsonl", "quarantine.jsonl"):
        assert (tmp_path / "streamed" / name).read_text() == (tmp_path / "whole" / name).read_text()
    got, want = (json.loads((tmp_path / d / "validation.json").read_text()) for d in ("streamed", "whole"))
    assert got["findings"] == want["findings"]
    assert [(f["file"].rsplit("/", 1)[1], f["line"]) for f in got["findings"]] == sorted(
        (f["file"].rsplit("/", 1)[1], f["line"]) for f in got["findings"]
    )
    assert "repeats the row at line 3 of" in next(
        f.message for f in streamed.findings if f.check == "duplicate"
    )
    assert not [p for p in (tmp_path / "streamed").iterdir() if p.name.startswith(".")]  # no scratch left

    rendered = profile_source(folder, tmp_path / "eda", scan_dir=tmp_path / "streamed" / "scan")
    assert rendered["rows"] == 33 and rendered["pii"]["rows"] == 1 and rendered["duplicates"]["count"] == 2
    assert (tmp_path / "eda" / "report.html").stat().st_size > 10_000
    _write(folder / "a.jsonl", [*rows[:16], _clean_rows(31)[30]])  # changed since: read again
    again = profile_source(folder, tmp_path / "eda2", scan_dir=tmp_path / "streamed" / "scan")
    assert again["rows"] == 34


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> Path:
    """A word-level tokenizer folder (tokenizer.json + a context of 12 tokens), made here: one token a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["write", "the", "word", "times", *COLOURS])}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path_factory.mktemp("tokenizer")
    raw.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 12}))
    return folder


def _words(text: str) -> int:
    return len(text.split())


def test_token_bounds_quarantine_rows_over_them_with_their_counts(tmp_path, word_tokenizer):
    rows = _clean_rows(30)
    rows[4]["response"] = " ".join(["red"] * 40)  # 40 tokens, and the row's total far over 30
    config = ValidationConfig.from_dict(
        {
            "tokenizer": str(word_tokenizer),
            "max_tokens": {"total": 30, "response": 35},
            "max_quarantine_rate": 0.5,
        }
    )
    result = validate_load(load_records(_write(tmp_path / "rows.jsonl", rows)), tmp_path / "out", config)
    totals = [sum(_words(r[f]) for f in ("instruction", "input", "response")) for r in rows]
    over = {i + 1 for i, t in enumerate(totals) if t > 30}
    assert 5 in over and result.quarantined == len(over)
    findings = [f for f in result.findings if f.check == "too_many_tokens"]
    assert {f.line for f in findings} == over
    row5 = {f.field: f.message for f in findings if f.line == 5}
    assert row5["response"] == "response has 40 tokens; at most 35 allowed (max_tokens.response)"
    assert (
        row5[None]
        == f"instruction + input + response have {totals[4]} tokens; at most 30 allowed (max_tokens.total)"
    )
    report = json.loads(result.report_path.read_text())
    checked = {e["column"]: e for e in report["expectations"]}
    assert checked["total_tokens"]["details"]["unexpected_count"] == len(over)  # GX counted them too
    assert checked["response_tokens"]["details"]["unexpected_count"] == 1


def test_a_tokenizer_alone_profiles_token_lengths_and_the_share_over_the_context(tmp_path, word_tokenizer):
    from airloom.data.eda import load_scan

    rows = _clean_rows(20)
    config = ValidationConfig(tokenizer=str(word_tokenizer))
    source = _write(tmp_path / "rows.jsonl", rows)
    from airloom.data.load import fingerprint, iter_chunks
    from airloom.data.validate import validate_stream

    result = validate_stream(
        lambda: iter_chunks(source),
        tmp_path / "out",
        config,
        source=str(source),
        scan_source=fingerprint(source),
    )
    assert result.success and result.accepted == 20  # no bounds: nothing quarantined for tokens
    profile, _ = load_scan(tmp_path / "out" / "scan", fingerprint(source))
    totals = [sum(_words(r[f]) for f in ("instruction", "input", "response")) for r in rows]
    assert profile["fields"]["total_tokens"]["max"] == max(totals)
    assert profile["tokens"] == {
        "tokenizer": str(word_tokenizer),
        "rows": 20,
        "sampled": False,
        "context": 12,
        "over_context": sum(t > 12 for t in totals),
        "over_context_rate": round(sum(t > 12 for t in totals) / 20, 4),
    }


def test_token_settings_are_checked(tmp_path, word_tokenizer):
    with pytest.raises(UsageError, match="need a tokenizer"):
        ValidationConfig.from_dict({"max_tokens": {"total": 10}})
    with pytest.raises(UsageError, match="max_tokens.prompt: unknown field"):
        ValidationConfig.from_dict({"tokenizer": str(word_tokenizer), "max_tokens": {"prompt": 10}})
    load = load_records(_write(tmp_path / "rows.jsonl", _clean_rows(3)))
    bounded = ValidationConfig(tokenizer="/no/such/tokenizer", max_tokens={"total": 100})
    with pytest.raises(UsageError, match="cannot load tokenizer '/no/such/tokenizer'"):
        validate_load(load, tmp_path / "out", bounded)  # the suite checks tokens: no tokenizer, no run


def test_the_example_suite_is_the_default_suite():
    import yaml

    example = Path(__file__).resolve().parents[3] / "docs" / "validation_suite.example.yaml"
    assert ValidationConfig.from_yaml(example) == ValidationConfig()
    # every setting written out (from_dict would fill in a missing one, or a missing field's bound)
    written = yaml.safe_load(example.read_text())
    commented = {"tokenizer", "min_tokens", "max_tokens"}  # shown as comments: they need a tokenizer
    assert set(written) | commented == set(ValidationConfig().to_dict())
    assert written["max_chars"] == ValidationConfig().max_chars


def test_a_tokenizer_that_cannot_load_costs_the_token_lengths_not_the_run(tmp_path):
    from airloom.data.eda import load_scan
    from airloom.data.load import fingerprint, iter_chunks
    from airloom.data.validate import validate_stream

    source = _write(tmp_path / "rows.jsonl", _clean_rows(5))
    config = ValidationConfig(tokenizer="registry:no-such-model")  # no bounds: the profile wanted tokens
    result = validate_stream(
        lambda: iter_chunks(source),
        tmp_path / "out",
        config,
        source=str(source),
        scan_source=fingerprint(source),
    )
    assert result.success and result.accepted == 5
    profile, _ = load_scan(tmp_path / "out" / "scan", fingerprint(source))
    assert "no-such-model" in profile["tokens"]["error"] and "tokens" not in profile["fields"]["instruction"]


def test_word_length_is_not_judged_on_text_written_without_spaces(tmp_path):
    """A Chinese or Japanese answer has no spaces between words: its whitespace "words" are whole phrases,
    so the mean word length bound (meant for spaced scripts) would quarantine every long row. Such rows are
    not judged by it; their other measures still are, and a long run of Latin letters still fails it."""
    from airloom.data.text import unspaced

    zh = "机器学习是人工智能的一个分支它使计算机能够从数据中学习而无需明确编程"
    ja = "機械学習はデータから学ぶことでコンピュータが明示的にプログラムされずに動作を改善する技術です"
    assert unspaced(zh * 3) and unspaced(ja) and unspaced("การเรียนรู้ของเครื่อง")
    assert not unspaced("machine learning " + zh[:3]) and not unspaced("обучение") and not unspaced("123")
    rows: list = _clean_rows(20)
    rows += [
        {"instruction": f"请解释第{i}段", "input": "", "response": (zh * 40)[i : i + 1200]} for i in range(3)
    ]
    rows.append({"instruction": "説明してください", "input": "", "response": ja * 30})
    rows.append({"instruction": "Spell it", "input": "", "response": "x" * 1200})
    config = ValidationConfig(max_quarantine_rate=1.0)
    result = validate_load(load_records(_write(tmp_path / "mixed.jsonl", rows)), tmp_path / "out", config)

    word_length = {f.line for f in result.findings if f.check == "mean_word_length"}
    assert word_length == {25}  # the Latin run only
    assert result.quarantined == 1 and result.accepted == 24
