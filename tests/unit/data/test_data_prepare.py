"""prepare: deterministic Parquet splits and manifest, PII policies, templates, chat records, the
token-length filter, atomic output, and the readers of old (JSONL) and new (Parquet) datasets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from airloom.data.prepare import content_sha256, prepare
from airloom.data.splits import read_split
from airloom.exceptions import UsageError
from airloom.prompts import render_prompt

TASKS = ["reverse", "upper", "sort", "add"]
SPLITS = ("train", "validation", "test")
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _records(n: int = 400) -> list[dict]:
    rows = []
    for i in range(n):
        task = TASKS[i % 4]
        rows.append(
            {
                "instruction": f"Apply {task} to item {i}",
                "input": "" if i % 3 else f"value {i}",
                "response": f"result {i}",
                "task": task,
                "_line": i + 1,
            }
        )
    return rows


def _read(folder: Path, split: str) -> list[dict]:
    return read_split(folder / f"{split}.parquet")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real byte-level BPE tokenizer trained here (no download), with a chat template."""
    from airloom.training.base import train_tokenizer

    tok = train_tokenizer([f"Apply reverse upper sort add to item {i} value result" for i in range(60)], 300)
    tok.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def token_len(tokenizer_dir):
    """Tokens of prompt + response + EOS, counted independently of prepare (as the recipe trains on them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda prompt, response: (
        len(tok(prompt, add_special_tokens=False)["input_ids"])
        + len(tok(response + tok.eos_token, add_special_tokens=False)["input_ids"])
    )


def test_same_seed_gives_identical_files_and_hash(tmp_path):
    a = prepare(_records(), tmp_path / "a", seed=3)
    b = prepare(_records(), tmp_path / "b", seed=3)
    assert a == b
    for name in ("train.parquet", "validation.parquet", "test.parquet", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "manifest.json",
        "test.parquet",
        "train.parquet",
        "validation.parquet",
    ]
    for split, info in a["splits"].items():
        assert info["file"] == f"{split}.parquet"
        assert info["sha256"] == hashlib.sha256((tmp_path / "a" / info["file"]).read_bytes()).hexdigest()
        rows = _read(tmp_path / "a", split)
        # The content hash is over the rows: the bytes the same split would have as JSON lines.
        jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        assert info["content_sha256"] == content_sha256(rows) == hashlib.sha256(jsonl).hexdigest()
    combined = "".join(f"{s}:{a['splits'][s]['content_sha256']}\n" for s in SPLITS).encode()
    assert a["dataset_hash"] == hashlib.sha256(combined).hexdigest()
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == a
    assert a["format"] == "airloom.prepared/2" and a["seed"] == 3
    assert a["template"]["name"] == "alpaca" and len(a["template"]["sha256"]) == 64
    assert a["tokenizer"] is None and a["max_seq_len"] is None  # alpaca and no length filter: none loaded

    import pyarrow.parquet as pq

    meta = pq.read_metadata(tmp_path / "a" / "train.parquet")
    assert set(meta.metadata) == {b"ARROW:schema"}  # nothing run-specific (no timestamps) in the file

    other = prepare(_records(), tmp_path / "c", seed=4)
    assert other["dataset_hash"] != a["dataset_hash"]
    ids = lambda d, s: {r["id"] for r in _read(tmp_path / d, s)}  # noqa: E731
    assert ids("a", "test") != ids("c", "test")
    assert set().union(*(ids("a", s) for s in SPLITS)) == set().union(*(ids("c", s) for s in SPLITS))


def test_splits_are_disjoint_stratified_and_rendered(tmp_path):
    manifest = prepare(_records(), tmp_path / "out", val_fraction=0.1, test_fraction=0.2)
    splits = {s: _read(tmp_path / "out", s) for s in SPLITS}
    ids = {s: {r["id"] for r in rows} for s, rows in splits.items()}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert sum(len(v) for v in ids.values()) == 400
    # each task has 100 rows: exactly 20 in test and 10 in validation
    for task in TASKS:
        assert manifest["splits"]["test"]["tasks"][task] == 20
        assert manifest["splits"]["validation"]["tasks"][task] == 10
    assert {s: manifest["splits"][s]["rows"] for s in splits} == {"train": 280, "validation": 40, "test": 80}
    assert {s: manifest["counts"][s] for s in splits} == {"train": 280, "validation": 40, "test": 80}

    row = next(r for r in splits["test"] if r["input"])
    assert list(row) == ["id", "prompt", "response", "task", "instruction", "input"]
    assert row["prompt"] == render_prompt(row["instruction"], row["input"], template="alpaca")
    row = next(r for r in splits["train"] if not r["input"])
    assert row["prompt"] == f"### Instruction:\n{row['instruction']}\n### Response:\n"


PII_ROWS = [
    {"id": "a", "instruction": "Name a colour", "input": "", "response": "Red"},
    {"id": "b", "instruction": "Name  a colour ", "input": "", "response": "Red\r\n"},  # same, whitespace
    {"id": "c", "instruction": "Email me", "input": "", "response": "Write to ann@corp.example.com"},
    {
        "id": "d",
        "instruction": "Call",
        "input": "+1 (555) 123-4567",
        "response": "Ask 10.1.2.3 twice: 10.1.2.3",
    },
    {"id": "e", "instruction": "Cafe\u0301 menu", "input": "", "response": "Coffee  \n  indented\n"},
    {"id": "f", "instruction": "Email me", "input": "", "response": "Write to bob@corp.example.com"},
]


def test_pii_mask_replaces_with_placeholders_and_dedups_after_masking(tmp_path):
    manifest = prepare(PII_ROWS, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    # f equals c once both addresses are masked, so it goes as a duplicate.
    assert manifest["counts"] == {
        "input": 6,
        "normalized": 2,
        "markup_stripped": 0,
        "pii_masked": 2,
        "pii_dropped": 0,
        "deduped": 2,
        "too_long": 0,
        "near_deduped": 0,
        "output": 4,
        "train": 4,
        "validation": 0,
        "test": 0,
        "trailing_turns_ignored": 0,
    }
    assert manifest["pii"] == {"rows": 2, "email": 1, "phone": 1, "ip": 2, "card": 0}
    assert manifest["pii_policy"] == "mask"
    train = {r["id"]: r for r in _read(tmp_path / "out", "train")}
    assert sorted(train) == ["a", "c", "d", "e"]
    assert train["c"]["response"] == "Write to <EMAIL>"
    assert (train["d"]["input"], train["d"]["response"]) == ("<PHONE>", "Ask <IP> twice: <IP>")
    assert train["e"]["instruction"] == "Caf\u00e9 menu"  # NFC
    assert train["e"]["response"] == "Coffee\n  indented"  # trailing spaces gone, indentation kept


def test_pii_drop_removes_the_rows_and_lists_them(tmp_path):
    manifest = prepare(PII_ROWS, tmp_path / "out", pii_policy="drop", val_fraction=0.0, test_fraction=0.0)
    counts = manifest["counts"]
    assert (counts["pii_dropped"], counts["pii_masked"], counts["deduped"], counts["output"]) == (3, 0, 1, 2)
    assert manifest["pii"] == {"rows": 3, "email": 2, "phone": 1, "ip": 2, "card": 0}
    assert manifest["dropped_ids"]["pii"] == ["c", "d", "f"]
    assert sorted(r["id"] for r in _read(tmp_path / "out", "train")) == ["a", "e"]
    assert counts["input"] == sum(counts[k] for k in ("pii_dropped", "deduped", "too_long", "output"))


def test_pii_keep_leaves_the_text_but_still_counts_it(tmp_path):
    manifest = prepare(
        PII_ROWS, tmp_path / "out", pii_policy="keep", dedup=False, val_fraction=0.0, test_fraction=0.0
    )
    counts = manifest["counts"]
    assert (counts["pii_dropped"], counts["pii_masked"], counts["deduped"], counts["output"]) == (0, 0, 0, 6)
    assert manifest["pii"] == {"rows": 3, "email": 2, "phone": 1, "ip": 2, "card": 0}
    train = {r["id"]: r for r in _read(tmp_path / "out", "train")}
    assert train["c"]["response"] == "Write to ann@corp.example.com"
    assert train["d"]["input"] == "+1 (555) 123-4567"

    with pytest.raises(UsageError, match=r"unknown pii_policy 'scrub'; use one of mask, drop, keep"):
        prepare(PII_ROWS, tmp_path / "bad", pii_policy="scrub")


def test_chat_records_take_the_last_assistant_turn_as_the_response(tmp_path):
    chat = [
        {
            "id": "c1",
            "task": "chat",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"},
            ],
        },
        {
            "id": "c2",
            "messages": [
                {"role": "user", "content": "Mail me at ann@corp.example.com  "},
                {"role": "assistant", "content": "Sure"},
                {
                    "role": "user",
                    "content": "thanks",
                },  # after the last assistant turn: not part of the example
            ],
        },
        {"id": "plain", "instruction": "Say hi", "input": "", "response": "hi"},
    ]
    manifest = prepare(chat, tmp_path / "out", template="chatml", val_fraction=0.0, test_fraction=0.0)
    assert manifest["counts"]["trailing_turns_ignored"] == 1
    assert manifest["counts"]["pii_masked"] == 1 and manifest["counts"]["normalized"] == 1
    rows = {r["id"]: r for r in _read(tmp_path / "out", "train")}
    c1 = rows["c1"]
    assert (c1["response"], c1["task"], c1["instruction"]) == ("Paris", "chat", "Capital of France?")
    assert c1["input"] == "system: Be brief.\nuser: Hi\nassistant: Hello."
    assert c1["prompt"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rows["c2"]["prompt"] == "<|im_start|>user\nMail me at <EMAIL><|im_end|>\n<|im_start|>assistant\n"
    assert rows["c2"]["response"] == "Sure"
    assert rows["plain"]["prompt"] == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"

    # alpaca, a single-turn format, still sees the whole conversation through instruction + input
    prepare(chat, tmp_path / "alpaca", template="alpaca", val_fraction=0.0, test_fraction=0.0)
    c1 = next(r for r in _read(tmp_path / "alpaca", "train") if r["id"] == "c1")
    history = "system: Be brief.\nuser: Hi\nassistant: Hello."
    assert c1["prompt"] == render_prompt("Capital of France?", history)

    # the default, auto: a chat template for data that holds conversations (ChatML without a tokenizer),
    # alpaca for instruction rows alone
    auto = prepare(chat, tmp_path / "auto", val_fraction=0.0, test_fraction=0.0)
    assert auto["template"] == {**manifest["template"], "requested": "auto"}
    plain = prepare(chat[-1:], tmp_path / "plain", val_fraction=0.0, test_fraction=0.0)
    assert (plain["template"]["name"], plain["template"]["requested"]) == ("alpaca", "auto")

    no_answer = [{"messages": [{"role": "user", "content": "Hi"}], "_line": 4}]
    with pytest.raises(UsageError, match=r"record 1 \(line 4\): messages need a non-empty assistant turn"):
        prepare(no_answer, tmp_path / "bad")
    no_question = [{"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(UsageError, match=r"record 1: messages need a non-empty user turn"):
        prepare(no_question, tmp_path / "bad")
    with pytest.raises(UsageError, match=r"record 1: messages\[2\]\.content must be text, got int"):
        prepare(
            [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}],
            tmp_path / "bad",
        )


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Apply reverse to item 1"},
    {"role": "assistant", "content": "result 1"},
    {"role": "user", "content": "Apply upper to item 2  "},
    {"role": "assistant", "content": "result 2", "weight": 0},
    {"role": "user", "content": "Apply sort to item 3"},
    {"role": "assistant", "content": "result 3", "weight": 1},
]
CHATS = [
    {"id": "m1", "task": "chat", "messages": CONVERSATION},
    {"id": "m2", "messages": CONVERSATION[1:3] + [{"role": "user", "content": "thanks"}]},
    {"id": "plain", "instruction": "Apply add to item 4", "input": "", "response": "result 4"},
]


def test_a_chat_dataset_keeps_every_turn_and_reads_back_with_its_messages(tmp_path):
    import pyarrow.parquet as pq

    from airloom.data.prepare import CHAT_COLUMNS
    from airloom.prompts import chat_fields
    from airloom.training.base import train_tokenizer
    from airloom.training.chat import resolve_chat_renderer
    from airloom.training.recipe import read_examples, tokenize_examples

    manifest = prepare(CHATS, tmp_path / "out", template="chatml", val_fraction=0.0, test_fraction=0.0)
    path = tmp_path / "out" / "train.parquet"
    table = pq.read_table(path)
    assert tuple(table.column_names) == CHAT_COLUMNS
    cleaned = [dict(t, content=t["content"].strip()) for t in CONVERSATION]  # whitespace normalised
    stored = dict(zip(table.column("id").to_pylist(), table.column("messages").to_pylist(), strict=True))
    assert stored["m1"] == json.dumps(cleaned, ensure_ascii=False) and stored["plain"] is None

    rows = read_split(path)
    by_id = {r["id"]: r for r in rows}
    assert by_id["m1"]["messages"] == cleaned  # weights kept: 0 masks that turn in training
    assert by_id["m2"]["messages"] == CONVERSATION[1:3]  # the turn after the last answer is dropped
    assert by_id["plain"]["messages"] is None
    assert {k: by_id["m1"][k] for k in ("instruction", "input", "response")} == chat_fields(cleaned)
    assert by_id["m1"]["prompt"].endswith("Apply sort to item 3<|im_end|>\n<|im_start|>assistant\n")
    assert manifest["counts"]["trailing_turns_ignored"] == 1
    # The content hash is over the rows as stored; the rows read back give it too.
    assert content_sha256(rows) == manifest["splits"]["train"]["content_sha256"]

    # Training reads the split and the template from the manifest beside it: every trained answer has loss.
    tok = train_tokenizer([f"Apply reverse upper sort add to item {i} result" for i in range(40)], 300)
    renderer = resolve_chat_renderer(path, tok)
    assert renderer.sha256 == manifest["template"]["sha256"]
    examples = tokenize_examples(read_examples(path), tok, 1024, renderer)
    trained = {
        r["id"]: tok.decode([t for t in lab if t != -100]) for r, (_, lab) in zip(rows, examples, strict=True)
    }
    assert trained["m1"] == "result 1<|im_end|>result 3<|im_end|><|eos|>"
    assert trained["m2"] == "result 1<|im_end|><|eos|>"
    assert trained["plain"] == "result 4<|eos|>"

    bad = [
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}
    ]
    with pytest.raises(UsageError, match=r"record 1: messages\[2\]\.weight must be 0 or 1, got 2"):
        prepare(bad, tmp_path / "bad")
    empty_answer = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}]
    with pytest.raises(UsageError, match=r"record 1: messages need a non-empty assistant turn"):
        prepare(empty_answer, tmp_path / "bad")


def test_chat_template_falls_back_to_chatml_and_the_length_filter_counts_whole_conversations(
    tmp_path, tokenizer_dir
):
    from transformers import AutoTokenizer

    from airloom.prompts import load_template, render_conversation

    bare = tmp_path / "bare"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    tok.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    manifest = prepare(
        CHATS,
        tmp_path / "out",
        template="chat_template",
        tokenizer=str(bare),
        val_fraction=0,
        test_fraction=0,
    )
    chatml = load_template("chatml")
    assert manifest["template"] == {
        "name": "chatml",
        "kind": "builtin",
        "sha256": hashlib.sha256(chatml.source.encode()).hexdigest(),
        "requested": "chat_template",
    }
    assert _read(tmp_path / "out", "train")[0]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")

    # max_seq_len counts a conversation as training sees it: all its turns, rendered, plus EOS.
    own = AutoTokenizer.from_pretrained(tokenizer_dir)
    cleaned = [dict(t, content=t["content"].strip()) for t in CONVERSATION]  # as prepare normalises them
    text = render_conversation(load_template("chat_template", tokenizer=own), cleaned, own.eos_token).text
    # The template ends each turn with EOS itself, so none is appended.
    assert text.endswith("result 3<|eos|>") and text.count("<|eos|>") == len(cleaned)
    whole = len(own(text, add_special_tokens=False)["input_ids"])
    plain = own(render_prompt("Apply add to item 4", None), add_special_tokens=False)["input_ids"]
    assert whole > len(plain) + 3
    for limit, kept in ((whole, {"m1", "m2", "plain"}), (whole - 1, {"m2", "plain"})):
        manifest = prepare(
            CHATS,
            tmp_path / f"len{limit}",
            template="chat_template",
            tokenizer=str(tokenizer_dir),
            max_seq_len=limit,
            val_fraction=0,
            test_fraction=0,
        )
        assert {r["id"] for r in _read(tmp_path / f"len{limit}", "train")} == kept
        assert manifest["dropped_ids"]["too_long"] == sorted({"m1", "m2", "plain"} - kept)


def test_a_user_template_error_names_the_template_and_the_line(tmp_path):
    good = tmp_path / "mine.j2"
    good.write_text("Q: {{ instruction }}{% if input %} ({{ input }}){% endif %}\nA:", encoding="utf-8")
    manifest = prepare(_records(8), tmp_path / "out", template=str(good), val_fraction=0.0, test_fraction=0.0)
    assert manifest["template"] == {
        "name": str(good),
        "kind": "file",
        "sha256": hashlib.sha256(good.read_bytes()).hexdigest(),
    }
    assert _read(tmp_path / "out", "train")[0]["prompt"] == "Q: Apply reverse to item 0 (value 0)\nA:"

    bad = tmp_path / "bad.j2"
    bad.write_text(
        "{{ instruction }}{% if task == 'upper' %}{{ response_hint }}{% endif %}", encoding="utf-8"
    )
    with pytest.raises(UsageError, match=r"bad\.j2' on record 2 \(line 2\): 'response_hint' is undefined"):
        prepare(_records(8), tmp_path / "out2", template=str(bad))
    evil = tmp_path / "evil.j2"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}", encoding="utf-8")
    with pytest.raises(UsageError, match=r"evil\.j2' on record 1 \(line 1\): blocked by the sandbox"):
        prepare(_records(8), tmp_path / "out2", template=str(evil))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.j2", "evil.j2", "mine.j2", "out"]


def test_length_filter_drops_and_lists_rows_over_max_seq_len(tmp_path, tokenizer_dir, token_len):
    records = _records(40)
    for i in range(0, 40, 5):  # every fifth row gets a long response
        records[i]["response"] = " ".join(f"word{j}" for j in range(60))
    lengths = [token_len(render_prompt(r["instruction"], r["input"] or None), r["response"]) for r in records]
    limit = max(n for i, n in enumerate(lengths) if i % 5)  # the longest short row stays: bound inclusive
    assert [i for i, n in enumerate(lengths) if n > limit] == list(range(0, 40, 5))

    manifest = prepare(
        records, tmp_path / "out", max_seq_len=limit, tokenizer=str(tokenizer_dir), id_list_cap=5
    )
    counts = manifest["counts"]
    assert counts["too_long"] == 8 and counts["output"] == 32
    assert counts["input"] == sum(counts[k] for k in ("pii_dropped", "deduped", "too_long", "output"))
    assert len(manifest["dropped_ids"]["too_long"]) == 5 and manifest["dropped_ids"]["cap"] == 5
    kept = [r for s in SPLITS for r in _read(tmp_path / "out", s)]
    assert all(token_len(r["prompt"], r["response"]) <= limit for r in kept)
    assert not {r["id"] for r in kept} & set(manifest["dropped_ids"]["too_long"])
    assert manifest["max_seq_len"] == limit
    assert manifest["tokenizer"]["ref"] == manifest["tokenizer"]["requested"] == str(tokenizer_dir)
    assert len(manifest["tokenizer"]["sha256"]) == 64

    with pytest.raises(UsageError, match=r"max_seq_len=40 needs a tokenizer"):  # checked before loading
        prepare(records, tmp_path / "x", max_seq_len=40)
    with pytest.raises(UsageError, match=r"max_seq_len must be a positive number"):
        prepare(records, tmp_path / "x", max_seq_len=0, tokenizer=str(tokenizer_dir))
    with pytest.raises(UsageError, match=r"tokenizer '.*nowhere': no such folder"):
        prepare(records, tmp_path / "x", max_seq_len=40, tokenizer=str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match=r"no rows left to prepare out of 40: .*too_long=40"):
        prepare(records, tmp_path / "x", max_seq_len=2, tokenizer=str(tokenizer_dir))


def test_chat_template_from_a_registry_tokenizer(tmp_path, tokenizer_dir, monkeypatch):
    from airloom.registry.registry import ModelRegistry

    monkeypatch.setenv("AIRLOOM_REGISTRY", str(tmp_path / "registry"))
    ModelRegistry.from_uri(tmp_path / "registry").register("tok", tokenizer_dir, metadata={}, actor="test")
    manifest = prepare(
        _records(8),
        tmp_path / "out",
        template="chat_template",
        tokenizer="registry:tok",
        val_fraction=0.0,
        test_fraction=0.0,
    )
    row = _read(tmp_path / "out", "train")[0]
    assert row["prompt"] == "<user>Apply reverse to item 0\n\nvalue 0<|eos|><assistant>"
    tokenizer = manifest["tokenizer"]
    assert (tokenizer["ref"], tokenizer["requested"]) == ("registry:tok/1", "registry:tok")
    assert manifest["template"]["kind"] == "tokenizer"
    assert manifest["template"]["sha256"] == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()

    with pytest.raises(UsageError, match=r"template 'chat_template' needs a tokenizer"):
        prepare(_records(8), tmp_path / "x", template="chat_template")


def test_ids_fall_back_to_a_content_hash(tmp_path):
    rows = [
        {"instruction": "Name a colour", "input": "", "response": "Red"},
        {"id": 1, "instruction": "Name a fruit", "input": "", "response": "Apple"},
        {"id": 1, "instruction": "Name a planet", "input": "", "response": "Mars"},
    ]
    prepare(rows, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    ids = [r["id"] for r in _read(tmp_path / "out", "train")]
    assert ids[1] == "1" and len(set(ids)) == 3 and len(ids[0]) == len(ids[2]) == 16


def test_a_failed_run_leaves_the_previous_output_untouched(tmp_path):
    out = tmp_path / "out"
    first = prepare(_records(40), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    bad = _records(40) + [{"instruction": "Name a colour", "input": "", "response": None, "_line": 41}]
    with pytest.raises(
        UsageError, match=r"record 41 \(line 41\): instruction and response must not be empty"
    ):
        prepare(bad, out)
    with pytest.raises(UsageError, match=r"unknown prompt template 'chatlm': not a built-in"):
        prepare(_records(40), out, template="chatlm")
    with pytest.raises(UsageError, match=r"leaves no training rows"):
        prepare(_records(40), out, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UsageError, match=r"no records to prepare"):
        prepare([], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left

    second = prepare(_records(40), out, seed=1)  # a rerun replaces the output as a whole
    assert second["seed"] == 1 and second["dataset_hash"] != first["dataset_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_crash_while_writing_leaves_no_half_written_output(tmp_path, monkeypatch):
    import airloom.data.prepare as prepare_module

    real = prepare_module.SplitWriter.close

    def fail_on_test_split(self):
        if self.path.name == "test.parquet":  # train and validation are already written
            raise OSError("disk full")
        return real(self)

    monkeypatch.setattr(prepare_module.SplitWriter, "close", fail_on_test_split)
    with pytest.raises(OSError, match="disk full"):
        prepare(_records(40), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="disk full"):  # parent folders it had to create go too
        prepare(_records(40), tmp_path / "new" / "deeper" / "out")
    assert list(tmp_path.iterdir()) == []


def test_readers_accept_parquet_and_older_jsonl_datasets(tmp_path):
    from airloom.training.recipe import read_examples

    prepare(_records(20), tmp_path / "new")
    rows = read_split(tmp_path / "new" / "train.parquet")
    old = tmp_path / "old"
    old.mkdir()
    (old / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for path in (tmp_path / "new" / "train.parquet", old / "train.jsonl"):
        assert read_split(path) == rows
        assert read_examples(path) == rows
    assert rows[0]["task"] == "reverse" and rows[0]["input"] == "value 0"

    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(UsageError, match=r"broken\.parquet: not a readable Parquet file"):
        read_split(tmp_path / "broken.parquet")
    with pytest.raises(UsageError, match=r"cannot read .*missing\.parquet"):
        read_split(tmp_path / "missing.parquet")


def test_cli_prepare_takes_template_policy_and_length_options(tmp_path, tokenizer_dir, capsys):
    from airloom.cli import main

    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in PII_ROWS), encoding="utf-8")
    rc = main(
        [
            "prepare",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--template",
            "chatml",
            "--pii-policy",
            "drop",
            "--max-seq-len",
            "500",
            "--tokenizer",
            str(tokenizer_dir),
            "--val-fraction",
            "0",
            "--test-fraction",
            "0",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    manifest = json.loads(out)
    chosen = (manifest["template"]["name"], manifest["pii_policy"], manifest["max_seq_len"])
    assert chosen == ("chatml", "drop", 500)
    assert manifest["counts"]["pii_dropped"] == 3
    assert manifest["tokenizer"]["ref"] == str(tokenizer_dir)

    rc = main(
        ["prepare", str(src), "--out", str(tmp_path / "out2"), "--max-seq-len", "64", "--tokenizer", ""]
    )
    assert rc == 2
    assert "max_seq_len=64 needs a tokenizer" in capsys.readouterr().err


# --- streaming: records read once, a chunk at a time, with the same output as one pass over a list ----------


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_generator_gives_the_same_output_as_a_list(tmp_path):
    records = _records(300) + PII_ROWS
    listed = prepare(records, tmp_path / "list", val_fraction=0.2, test_fraction=0.1)
    reads = []

    def stream():
        for rec in records:
            reads.append(1)
            yield dict(rec)

    streamed = prepare(stream(), tmp_path / "gen", val_fraction=0.2, test_fraction=0.1)
    assert len(reads) == len(records)  # read once
    assert streamed == listed
    assert _outputs(tmp_path / "gen") == _outputs(tmp_path / "list")

    with pytest.raises(UsageError, match=r"no records to prepare"):
        prepare(iter([]), tmp_path / "empty")
    with pytest.raises(UsageError, match=r"no rows left to prepare out of 3: pii_dropped=3"):
        prepare((r for r in PII_ROWS if r["id"] in "cdf"), tmp_path / "a" / "b" / "none", pii_policy="drop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "list"]  # no temporary folders left


def _repeats(n: int) -> list[dict]:
    """Rows that repeat (also with other whitespace) and ids that repeat, far apart and close by."""
    rows = []
    for i in range(n):
        k = i % 23 if i % 5 else i  # most rows repeat one of 23 contents
        text = f"Name  thing {k}" if i % 2 else f"Name thing {k} "
        rows.append(
            {
                "id": f"id{i // 2 % 31}" if i % 3 else None,
                "instruction": text,
                "input": "",
                "response": f"Thing {k}",
                "task": TASKS[k % 2],
                "_line": i + 1,
            }
        )
    return rows


@pytest.mark.parametrize("dedup", [True, False])
def test_chunks_do_not_change_dedup_ids_or_splits(tmp_path, monkeypatch, dedup):
    import airloom.data.prepare as prepare_module

    records = _repeats(200)
    whole = prepare(records, tmp_path / "whole", dedup=dedup, val_fraction=0.2, test_fraction=0.2)
    monkeypatch.setattr(prepare_module, "CHUNK_ROWS", 7)  # duplicates and id clashes across chunk bounds
    monkeypatch.setattr(prepare_module, "SPOOL_BATCH_ROWS", 5)
    chunked = prepare(iter(records), tmp_path / "chunked", dedup=dedup, val_fraction=0.2, test_fraction=0.2)
    assert chunked == whole
    assert _outputs(tmp_path / "chunked") == _outputs(tmp_path / "whole")
    counts = whole["counts"]
    distinct = len({(" ".join(r["instruction"].split()), r["response"]) for r in records})
    assert counts["output"] == (distinct if dedup else 200) and counts["deduped"] == 200 - counts["output"]
    ids = [r["id"] for s in SPLITS for r in _read(tmp_path / "whole", s)]
    assert len(set(ids)) == len(ids)
    if not dedup:  # the same content without a usable id: content hash, then -2, -3, ...
        assert any(i.endswith("-2") for i in ids) and any(i.endswith("-3") for i in ids)


def test_split_files_keep_their_bytes_across_row_groups(tmp_path, monkeypatch):
    """A split written a chunk at a time has the bytes of one pq.write_table over all its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import airloom.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "ROW_GROUP_SIZE", 40)
    rows = [
        {
            "id": str(i),
            "prompt": f"p{i}" * (i % 9),
            "response": "r",
            "task": None if i % 4 else "t",
            "instruction": f"i{i}",
            "input": "",
        }
        for i in range(157)
    ]
    schema = pa.schema([(c, pa.string()) for c in prepare_module.COLUMNS])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, tmp_path / "expected.parquet", row_group_size=40, compression="zstd")
    for sizes in ([157], [1, 39, 1, 40, 76], [13] * 12 + [1]):
        writer = prepare_module.SplitWriter(tmp_path / "split.parquet")
        start = 0
        for size in sizes:
            writer.write(table.slice(start, size))
            start += size
        writer.close()
        assert writer.rows == 157
        assert (tmp_path / "split.parquet").read_bytes() == (tmp_path / "expected.parquet").read_bytes()
    prepare_module.write_split(rows, tmp_path / "split.parquet")
    assert (tmp_path / "split.parquet").read_bytes() == (tmp_path / "expected.parquet").read_bytes()
    empty = tmp_path / "empty.parquet"
    pq.write_table(
        schema.empty_table(), tmp_path / "expected_empty.parquet", row_group_size=40, compression="zstd"
    )
    prepare_module.SplitWriter(empty).close()
    assert empty.read_bytes() == (tmp_path / "expected_empty.parquet").read_bytes()


def _tricky_texts() -> list[str]:
    import random

    rnd = random.Random(7)
    alphabet = [
        "a",
        "Z",
        "0",
        "7",
        " ",
        "  ",
        "\t",
        "\n",
        "\r",
        "\r\n",
        "\x0b",
        "\x0c",
        "\x1c",
        "\x1f",
        "\x85",
        "\u00a0",
        "\u2028",
        "\u3000",
        "e\u0301",
        "\u00e9",
        "\ufb01",
        "\u212b",
        "@",
        ".",
        "-",
        "(",
        ")",
        "+",
        '"',
        "\\",
        "\x00",
        "\x7f",
        "\U0001f600",
        "x@y.example.org",
        "555-123-4567",
        "+44 20 7946 0958",
        "4111 1111 1111 1111",
        "10.1.2.3",
        "127.0.0.1",
    ]
    texts = ["", " ", "\n", "plain", "ends with space ", " starts", "line \nbreak", "a\n\nb", "\u00e9t\u00e9"]
    texts += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 12))) for _ in range(4000)]
    return texts


def test_fast_paths_match_validate_and_json():
    import airloom.data.prepare as prepare_module
    from airloom.data.text import _NUMBERISH_RE, normalize_text, numberish, scrub_pii

    texts = _tricky_texts()
    for text in texts:
        assert prepare_module._normalize(text) == normalize_text(text), repr(text)
        assert numberish(text) == (_NUMBERISH_RE.search(text) is not None), repr(text)  # its ASCII path
        scrubbed = scrub_pii(text)
        if not ("@" in text or numberish(text)):  # the call prepare skips
            assert scrubbed == (text, {}), repr(text)

    import pyarrow as pa

    rows = [
        {"id": a, "prompt": b, "response": c, "task": None if len(a) % 3 else a, "instruction": b, "input": c}
        for a, b, c in zip(texts, texts[1:], texts[2:], strict=False)
    ]
    turns = [
        {"role": a, "content": b} | ({"weight": len(c) % 2} if len(c) % 3 else {})
        for a, b, c in zip(texts, texts[1:], texts[2:], strict=False)
    ]
    assert prepare_module._turns_json(turns, prepare_module._json_value_encoder()) == json.dumps(
        turns, ensure_ascii=False
    )
    batch = pa.Table.from_pylist(rows)
    expected = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    assert prepare_module._json_lines(batch) == expected
    assert content_sha256(rows) == hashlib.sha256("".join(expected).encode()).hexdigest()


SCRAPED = {
    "instruction": "Summarize the product description.",
    "input": "",
    "response": '<div class="desc"><p>A sturdy oak desk &amp; chair.</p><br>Ships in <b>two</b> days.'
    "<script>track('x')</script></div>",
}
ABOUT_HTML = {
    "instruction": "Write an HTML snippet with a bold word.",
    "input": "",
    "response": "<p>Hello <b>world</b></p>",
}


def test_markup_is_stripped_from_rows_that_do_not_ask_for_it(tmp_path):
    manifest = prepare([SCRAPED, ABOUT_HTML], tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    rows = {r["instruction"]: r["response"] for r in _read(tmp_path / "out", "train")}
    assert rows[SCRAPED["instruction"]] == "A sturdy oak desk & chair.\n\nShips in two days."
    assert rows[ABOUT_HTML["instruction"]] == ABOUT_HTML["response"]  # HTML is what it asks for
    assert manifest["counts"]["markup_stripped"] == 1 and manifest["markup"] == "strip"

    kept = prepare([SCRAPED], tmp_path / "keep", markup="keep", val_fraction=0.0, test_fraction=0.0)
    assert _read(tmp_path / "keep", "train")[0]["response"] == SCRAPED["response"]
    assert kept["counts"]["markup_stripped"] == 0
    with pytest.raises(UsageError, match="markup policy"):
        prepare([SCRAPED], tmp_path / "bad", markup="drop")


def _near_rows() -> list[dict]:
    """Ten distinct long rows, then a copy of row 3 with one word changed (Jaccard ~0.9) and one with half
    of it rewritten (well under 0.8)."""
    rows = [
        {
            "instruction": f"Explain topic {i}: " + " ".join(f"w{i}_{k}" for k in range(40)),
            "input": "",
            "response": " ".join(f"r{i}_{k}" for k in range(60)),
            "id": f"row{i}",
        }
        for i in range(10)
    ]
    near = dict(rows[3], id="near3", response=rows[3]["response"].replace("r3_59", "changed"))
    far = dict(rows[4], id="far4", response=" ".join(f"other{k}" for k in range(60)))
    return [*rows, near, far]


def test_near_duplicates_are_dropped_and_listed(tmp_path):
    from tests.unit.data.neardup_helpers import find_near_duplicates

    rows = _near_rows()
    texts = [f"{r['instruction']}\n{r['input']}\n{r['response']}" for r in rows]
    assert set(find_near_duplicates(texts).of) == {10}  # the search itself, for reference

    manifest = prepare(rows, tmp_path / "out", val_fraction=0.2, test_fraction=0.2)
    counts = manifest["counts"]
    assert counts["near_deduped"] == 1 and manifest["dropped_ids"]["near_duplicate"] == ["near3"]
    assert counts["output"] == 11 == counts["train"] + counts["validation"] + counts["test"]
    assert (
        counts["input"]
        == counts["pii_dropped"]
        + counts["deduped"]
        + counts["too_long"]
        + counts["near_deduped"]
        + counts["output"]
    )
    ids = {r["id"] for split in SPLITS for r in _read(tmp_path / "out", split)}
    assert "near3" not in ids and {"row3", "far4"} <= ids
    assert manifest["near_dedup"]["threshold"] == 0.8

    off = prepare(rows, tmp_path / "off", near_dedup=None, val_fraction=0.2, test_fraction=0.2)
    assert off["counts"]["near_deduped"] == 0 and off["counts"]["output"] == 12 and off["near_dedup"] is None
    with pytest.raises(UsageError, match="near_dedup"):
        prepare(rows, tmp_path / "bad", near_dedup=1.5)


def test_cli_near_dedup_off_and_a_bad_threshold(tmp_path, capsys):
    from airloom.cli import main

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _near_rows()))
    assert main(["prepare", str(source), "--out", str(tmp_path / "on")]) == 0
    assert "near_deduped 1" in capsys.readouterr().out
    assert main(["prepare", str(source), "--out", str(tmp_path / "off"), "--near-dedup", "off"]) == 0
    assert json.loads((tmp_path / "off" / "manifest.json").read_text())["counts"]["near_deduped"] == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(source), "--out", str(tmp_path / "bad"), "--near-dedup", "most"])
    assert exit_info.value.code == 2
