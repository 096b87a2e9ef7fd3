"""Conversations through the loader and the validation suite (issue #15): OpenAI ``messages`` and
ShareGPT ``conversations`` in every file format, every broken-conversation finding at its line and
turn, field maps for other layouts, grouped examples, and the default bounds and text-quality checks
that judge any file without a suite of its own."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from airloom.data.load import iter_chunks, load_records, parse_field_map
from airloom.data.synth import generate_records
from airloom.data.validate import ValidationConfig, validate_stream
from airloom.exceptions import UsageError

SYSTEM = "You are a careful assistant. Answer briefly."


def _conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Multi-turn conversations made of the project's own instruction records: 1 to 3 user/assistant
    pairs each, every third one with the shared system prompt."""
    records = list(generate_records(n * 3, seed=seed))
    out = []
    for i in range(n):
        turns = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
        for rec in records[i * 3 : i * 3 + 1 + i % 3]:
            prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
            turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["response"]}]
        out.append(turns)
    return out


_SHAREGPT = {"user": "human", "assistant": "gpt", "system": "system"}


def _sharegpt(turns: list[dict]) -> list[dict]:
    return [{"from": _SHAREGPT[t["role"]], "value": t["content"]} for t in turns]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _validate(path: Path, out: Path, config: ValidationConfig | None = None, field_map=None):
    return validate_stream(lambda: iter_chunks(path, field_map), out, config, source=str(path))


@pytest.mark.parametrize("layout", ["openai", "sharegpt"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_chat_layouts_are_recognised_in_every_format(tmp_path, layout, suffix):
    convs = _conversations(6)
    key = "messages" if layout == "openai" else "conversations"
    rows = [
        {key: turns if layout == "openai" else _sharegpt(turns), "id": f"c{i}"}
        for i, turns in enumerate(convs)
    ]
    path = tmp_path / f"chats{suffix}"
    if suffix == ".jsonl":
        _write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif suffix == ".csv":  # the turns as a JSON column
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", key])
            writer.writerows([r["id"], json.dumps(r[key])] for r in rows)
    else:  # a list-of-structs column, as Hugging Face chat datasets are stored
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    result = load_records(path)

    assert result.findings == [] and result.rejected == []
    assert [r["messages"] for r in result.records] == [[dict(t) for t in turns] for turns in convs]
    first = result.records[1]  # user, assistant, user, assistant: the instruction view is the last pair
    assert first["response"] == convs[1][-1]["content"] and first["instruction"] == convs[1][-2]["content"]
    assert first["input"] == f"user: {convs[1][0]['content']}\nassistant: {convs[1][1]['content']}"
    assert [r["id"] for r in result.records] == [f"c{i}" for i in range(6)]


BROKEN = {  # line -> (turns, {(field, check)})
    2: ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Yes"}],
        {("messages[1].role", "roles_not_alternating")}),
    3: ([{"role": "assistant", "content": "Hello"}], {("messages[0].role", "roles_not_alternating")}),
    4: ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "And?"}],
        {("messages[2].role", "no_final_assistant")}),
    5: ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "   "}], {("messages[1].content", "empty_turn")}),
    6: ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yes"}], {("messages[1].role", "unknown_role")}),
    7: ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}, {"role": "system", "content": "Late"},
         {"role": "user", "content": "More"}, {"role": "assistant", "content": "Again"}], {("messages[2].role", "roles_not_alternating")}),
    8: ([{"role": "user", "content": 42}, {"role": "assistant", "content": "Yes"}], {("messages[0].content", "wrong_type")}),
    9: ([{"content": "Hi"}, {"role": "assistant", "content": "Yes"}], {("messages[0].role", "missing_field")}),
    10: ("not a list", {("messages", "wrong_type")}),
    11: ([], {("messages", "empty_conversation")}),
    12: ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes", "weight": 2}],
         {("messages[1].weight", "wrong_type")}),
}  # fmt: skip


def test_every_broken_conversation_is_reported_at_its_line_and_turn(tmp_path):
    good = _conversations(30)
    rows: list = [{"messages": good[0]}]
    rows += [{"messages": turns} for _, (turns, _) in sorted(BROKEN.items())]
    rows += [{"messages": turns} for turns in good[1:]]
    path = _write_jsonl(tmp_path / "broken.jsonl", rows)
    result = _validate(path, tmp_path / "out", ValidationConfig(max_quarantine_rate=0.5))

    found: dict[int, set] = {}
    for f in result.findings:
        found.setdefault(f.line, set()).add((f.field, f.check))
    assert found == {line: checks for line, (_, checks) in BROKEN.items()}
    assert (result.rows_read, result.accepted, result.quarantined) == (41, 30, 11)
    assert str(next(f for f in result.findings if f.line == 5)).endswith(
        "broken.jsonl:5 [messages[1].content]: empty_turn: the assistant turn is empty"
    )
    assert "map it with field_map (e.g. bot=assistant)" in next(
        f.message for f in result.findings if f.line == 6
    )
    # accepted conversations are written as conversations (no instruction view), and load back as such
    accepted = [json.loads(line) for line in result.accepted_path.read_text().splitlines()]
    assert accepted[0] == {"messages": good[0]} and all(set(a) == {"messages"} for a in accepted)
    assert [r["messages"] for r in load_records(result.accepted_path).records] == good
    quarantined = [json.loads(line) for line in result.quarantine_path.read_text().splitlines()]
    assert [q["line"] for q in quarantined] == sorted(BROKEN)


def test_sharegpt_findings_name_the_keys_the_file_uses(tmp_path):
    convs = [_sharegpt(t) for t in _conversations(20)]
    convs[3][1]["value"] = ""
    convs[5][-1]["from"] = "narrator"
    path = _write_jsonl(tmp_path / "sg.jsonl", [{"conversations": c} for c in convs])
    found = {(f.line, f.field, f.check) for f in load_records(path).findings}
    last = len(convs[5]) - 1
    assert found == {
        (4, "conversations[1].value", "empty_turn"),
        (6, f"conversations[{last}].from", "unknown_role"),
    }


def test_a_field_map_reads_another_chat_layout(tmp_path):
    rows = [
        {"dialog": [{"speaker": "person", "text": t["content"]} if t["role"] == "user"
                    else {"speaker": "bot", "text": t["content"]} for t in turns if t["role"] != "system"]}
        for turns in _conversations(5)
    ]  # fmt: skip
    path = _write_jsonl(tmp_path / "custom.jsonl", rows)
    field_map = parse_field_map("dialog=messages,speaker=role,text=content,person=user,bot=assistant")
    result = load_records(path, field_map)
    assert result.findings == [] and len(result.records) == 5
    assert [t["role"] for t in result.records[2]["messages"]] == ["user", "assistant"] * 3
    # without the map every row lacks instruction/response, and the message says what to pass
    unmapped = load_records(path)
    assert {f.check for f in unmapped.findings if f.severity == "error"} == {"missing_field"}
    with pytest.raises(UsageError, match="names no list of turns"):
        parse_field_map("speaker=role")
    with pytest.raises(UsageError, match="not a record field"):
        parse_field_map("dialog=turns")


def test_grouped_examples_are_refused_with_the_option_or_expanded(tmp_path):
    rows = [
        {"instruction": "Add the two numbers.", "instances": [{"input": "1 2", "output": "3"}, {"input": "2 5", "output": "7"}]},
        {"instruction": "Name the colour of the sky.", "instances": [{"input": "", "output": "Blue."}]},
    ]  # fmt: skip
    path = _write_jsonl(tmp_path / "self_instruct.jsonl", rows)
    refused = load_records(path)
    assert refused.records == []
    message = next(f.message for f in refused.findings if f.check == "missing_field")
    assert "holds 2 examples under 'instances'" in message and "field_map instances=expand" in message

    expanded = load_records(path, parse_field_map("instances=expand"))
    assert expanded.findings == [] and expanded.rows_read == 3
    assert [(r["_line"], r["instruction"][:4], r["input"], r["response"]) for r in expanded.records] == [
        (1, "Add ", "1 2", "3"),
        (1, "Add ", "2 5", "7"),
        (2, "Name", "", "Blue."),
    ]


def test_role_bounds_name_the_turn_that_breaks_them(tmp_path):
    convs = _conversations(30)
    convs[4][1]["content"] = "y " * 6000  # the first assistant turn of a two-pair conversation
    path = _write_jsonl(tmp_path / "long_turn.jsonl", [{"messages": c} for c in convs])
    result = _validate(path, tmp_path / "out")
    errors = [(f.line, f.field, f.check) for f in result.findings if f.severity == "error"]
    assert (5, "messages[1].content", "too_long") in errors
    message = next(f.message for f in result.findings if f.check == "too_long")
    assert (
        message
        == "the longest assistant turn has 12000 characters; at most 8000 allowed (max_chars.assistant)"
    )


def test_the_default_suite_catches_huge_fields_and_repeated_text(tmp_path):
    rows: list = [
        {"instruction": r["instruction"], "input": r["input"], "response": r["response"]}
        for r in generate_records(60, seed=3)
    ]
    rows.insert(
        10, {**rows[0], "instruction": "Summarise the notes.", "notes": "lorem ipsum " * 10_000}
    )  # 120k
    rows.insert(
        20, {**rows[1], "instruction": "Write an advert.", "response": "buy cheap pills now! " * 3000}
    )
    rows.insert(30, {"messages": [{"role": "user", "content": "Tell me a story."},
                                  {"role": "assistant", "content": "The end.\n" * 2000}]})  # fmt: skip
    path = _write_jsonl(tmp_path / "no_suite.jsonl", rows)
    result = _validate(path, tmp_path / "out")  # the defaults: a file with no suite of its own

    by_line: dict[int, dict] = {}
    for f in result.findings:
        by_line.setdefault(f.line, {})[f.check] = f
    huge = by_line[11]["record_too_long"]
    assert huge.field == "notes" and "holds 120,0" in huge.message and "max_record_chars" in huge.message
    repeated = by_line[21]["repeated_ngrams"]
    assert repeated.severity == "error" and repeated.field == "response"
    assert repeated.message.startswith("100.0% of response's word 5-grams repeat an earlier one; at most 50%")
    lines = by_line[31]["repeated_lines"]  # a conversation: the turn is named
    assert (
        lines.field == "messages[1].content"
        and "of messages[1].content's characters are in lines" in lines.message
    )
    quarantined = {json.loads(q)["line"] for q in result.quarantine_path.read_text().splitlines()}
    assert {11, 21, 31} <= quarantined
    # the ordinary rows are long enough to be judged, and none of them is flagged
    assert not any(f.check in ("repeated_lines", "repeated_ngrams", "non_alpha_text", "mean_word_length")
                   for f in result.findings if f.line not in (11, 21, 31))  # fmt: skip


def test_token_bounds_count_a_conversation_as_the_template_renders_it(tmp_path):
    """max_tokens.total judges a conversation by its ChatML rendering (the tokenizer has no template),
    not by the instruction view's words: a one-word-per-token tokenizer makes the counts exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (folder := tmp_path / "tok").mkdir()
    tok.save(str(folder / "tokenizer.json"))
    rows = [
        {"messages": [{"role": "user", "content": f"x{i} y"}, {"role": "assistant", "content": f"z{i}"}]}
        for i in range(30)
    ]  # <|im_start|>user / x / y<|im_end|> / <|im_start|>assistant / z<|im_end|>: 5 tokens
    rows[7] = {"messages": [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e"}]}
    path = _write_jsonl(tmp_path / "chats.jsonl", rows)  # row 8: 7 tokens rendered, 5 in its fields
    config = ValidationConfig(tokenizer=str(folder), max_tokens={"total": 6})
    result = _validate(path, tmp_path / "out", config)
    errors = [f for f in result.findings if f.severity == "error"]
    assert [(f.line, f.check) for f in errors] == [(8, "too_many_tokens")]
    assert errors[0].message == (
        "the conversation, rendered with the chat template, has 7 tokens; at most 6 allowed (max_tokens.total)"
    )
