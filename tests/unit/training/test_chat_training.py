"""Conversations in training: loss on every assistant turn (content + end-of-turn) and nothing else, turns
with weight 0 masked, the truncation policy, and the template a prepared dataset names."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from airloom.exceptions import UsageError
from airloom.prompts import load_template
from airloom.training.chat import chat_example, exchanges, resolve_chat_renderer
from airloom.training.config import TrainConfig
from airloom.training.packing import collate_packed, pack_examples
from airloom.training.recipe import chat_renderer, tokenize_examples

# The tokenizer's own template: no space after a role marker, so every segment edge below is also a
# pre-tokenizer boundary and tokenizing the segments one by one gives the ids of the whole text.
OWN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}]\n{{ m.content }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]\n{% endif %}"
)
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, I think.", "weight": 0},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The project's tiny byte-level BPE (trained here), without and with a chat template of its own."""
    from transformers import AutoTokenizer

    from airloom.training.base import train_tokenizer

    text = [" ".join(t["content"] for t in TURNS) + " system user assistant"] * 20
    folder = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(text, vocab_size=300)
    tok.save_pretrained(folder / "bare")
    tok.chat_template = OWN_TEMPLATE
    tok.save_pretrained(folder / "own")
    return {name: AutoTokenizer.from_pretrained(folder / name) for name in ("bare", "own")}


def _segments(template: str, eos: str) -> list[tuple[str, bool]]:
    """The conversation's text in pieces, each marked trained or not, written out by hand."""
    if template == "chatml":
        head = lambda role: f"<|im_start|>{role}\n"  # noqa: E731
        end, gap = "<|im_end|>", "\n"
        return [
            (head("system") + "Be brief." + end + gap + head("user") + "What is two plus two?" + end, False),
            (gap + head("assistant"), False),
            ("Four." + end, True),
            (gap + head("user") + "And three plus three?" + end + gap + head("assistant"), False),
            ("Six, I think." + end, False),  # weight 0
            (gap + head("user") + "Name a colour." + end + gap + head("assistant"), False),
            ("Red." + end, True),
            (eos, True),  # ChatML does not end a turn with EOS: appended after the last one
        ]
    return [
        ("<|bos|>[system]\nBe brief.<|eos|>[user]\nWhat is two plus two?<|eos|>[assistant]\n", False),
        ("Four.<|eos|>", True),
        ("[user]\nAnd three plus three?<|eos|>[assistant]\n", False),
        ("Six, I think.<|eos|>", False),
        ("[user]\nName a colour.<|eos|>[assistant]\n", False),
        ("Red.<|eos|>", True),  # the template's own EOS ends the turn: nothing appended
    ]


@pytest.mark.parametrize(("template", "tok_name"), [("chatml", "bare"), ("chat_template", "own")])
def test_labels_are_exactly_the_assistant_turns_and_their_end_of_turn(tokenizers, template, tok_name):
    tok = tokenizers[tok_name]
    renderer = load_template(template, tokenizer=tok)
    assert renderer.kind == ("builtin" if template == "chatml" else "tokenizer")
    (ids, labels), outcome = chat_example(TURNS, renderer, tok, max_length=1024)
    assert outcome == "kept"

    segments = _segments(template, tok.eos_token)
    pieces = [(tok(text, add_special_tokens=False)["input_ids"], trained) for text, trained in segments]
    assert ids == [t for piece, _ in pieces for t in piece]
    assert labels == [t if trained else -100 for piece, trained in pieces for t in piece]
    trained_text = tok.decode([t for t in labels if t != -100])
    assert trained_text == "".join(text for text, trained in segments if trained)
    assert "Six" not in trained_text and "Be brief" not in trained_text and "colour" not in trained_text
    assert sum(x != -100 for x in labels) < len(labels) / 3  # most tokens are context

    # A tokenizer without offsets (a "slow" one) tokenizes the pieces between span edges: same result here,
    # where every edge is a pre-tokenizer boundary.
    class Slow:
        is_fast = False
        eos_token = tok.eos_token

        def __call__(self, text, **kwargs):
            assert "return_offsets_mapping" not in kwargs
            return tok(text, **kwargs)

    assert chat_example(TURNS, renderer, Slow(), max_length=1024) == ((ids, labels), "kept")


def test_truncation_keeps_the_system_turn_and_the_latest_whole_exchanges(tokenizers):
    tok = tokenizers["bare"]
    chatml = load_template("chatml")
    system, groups = exchanges(TURNS)
    assert system == TURNS[:1] and [len(g) for g in groups] == [2, 2, 2]
    (full_ids, _), _ = chat_example(TURNS, chatml, tok, max_length=1024)
    last_two = system + groups[1] + groups[2]
    (two_ids, two_labels), _ = chat_example(last_two, chatml, tok, max_length=1024)
    (one_ids, one_labels), _ = chat_example(system + groups[2], chatml, tok, max_length=1024)
    assert len(one_ids) < len(two_ids) < len(full_ids)

    # Room for the last two exchanges but not all three: the first one goes, the system turn stays.
    example, outcome = chat_example(TURNS, chatml, tok, max_length=len(two_ids))
    assert outcome == "truncated" and example == (two_ids, two_labels)
    assert tok.decode(example[0]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnd")
    example, outcome = chat_example(TURNS, chatml, tok, max_length=len(two_ids) - 1)
    assert outcome == "truncated" and example == (one_ids, one_labels)
    assert chat_example(TURNS, chatml, tok, max_length=len(one_ids) - 1) == (None, "too_long")
    # The whole conversation fits exactly: kept as it is (the bound is inclusive).
    assert chat_example(TURNS, chatml, tok, max_length=len(full_ids))[1] == "kept"

    assert chat_example(TURNS, chatml, tok, max_length=len(two_ids), truncation="drop") == (None, "too_long")
    assert chat_example(TURNS, chatml, tok, max_length=len(full_ids), truncation="drop")[1] == "kept"
    # Only the weight-0 exchange would fit: nothing left to learn.
    weightless = system + groups[1]
    assert chat_example(weightless, chatml, tok, max_length=1024) == (None, "no_labels")

    with pytest.raises(UsageError, match=r"chat_truncation 'cut' is not one of keep_last_turns, drop"):
        chat_example(TURNS, chatml, tok, max_length=64, truncation="cut")
    assert TrainConfig().chat_truncation == "keep_last_turns"
    assert TrainConfig.from_dict({"chat_truncation": "drop"}).chat_truncation == "drop"
    with pytest.raises(UsageError, match=r"chat_truncation 'last' is not one of"):
        TrainConfig.from_dict({"chat_truncation": "last"})


def test_instruction_rows_train_as_before_beside_conversations(tokenizers):
    tok = tokenizers["bare"]
    instruction = {"prompt": "### Instruction:\nName a colour.\n### Response:\n", "response": "Red."}
    chat = {"prompt": "ignored for training", "response": "Red.", "messages": TURNS}
    chatml = load_template("chatml")
    before = tokenize_examples([instruction], tok, 64)
    stats: Counter = Counter()
    mixed = tokenize_examples([chat, instruction, chat], tok, 1024, chatml, stats=stats)
    (conversation, _), _ = chat_example(TURNS, chatml, tok, max_length=1024)
    assert mixed == [(conversation, mixed[0][1]), before[0], mixed[0]]
    assert stats == {"kept": 2}
    # A single-turn template (alpaca) trains a conversation on its prompt and last answer.
    alpaca = load_template("alpaca")
    assert tokenize_examples([chat], tok, 1024, alpaca) == tokenize_examples([chat], tok, 1024)
    ids, labels = tokenize_examples([chat], tok, 1024)[0]
    assert tok.decode([t for t in labels if t != -100]) == "Red." + tok.eos_token

    # Packed rows keep every conversation's labels (bar the first token, which is template anyway).
    rows = pack_examples(mixed, capacity=1024)
    input_ids, _, packed_labels = collate_packed(rows, pad_id=tok.pad_token_id)
    flat = [(ids, lab) for row in rows for ids, lab in row]
    at = 0
    for ids, lab in flat:
        assert input_ids[0, at : at + len(ids)].tolist() == ids
        assert packed_labels[0, at : at + len(ids)].tolist() == [-100] + lab[1:]
        at += len(ids)


def _manifest(folder, template):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"template": template}))
    return folder / "train.parquet"


def test_training_uses_the_template_the_dataset_was_prepared_with(tokenizers, tmp_path):
    bare, own = tokenizers["bare"], tokenizers["own"]
    chatml = load_template("chatml")
    own_renderer = load_template("chat_template", tokenizer=own)

    # No manifest beside the file: the tokenizer's chat template, else ChatML.
    assert resolve_chat_renderer(tmp_path / "loose.parquet", own).sha256 == own_renderer.sha256
    assert resolve_chat_renderer(tmp_path / "loose.parquet", bare).sha256 == chatml.sha256
    built = _manifest(tmp_path / "chatml", chatml.as_manifest())
    assert resolve_chat_renderer(built, own).name == "chatml"  # the dataset's, not the tokenizer's
    same = _manifest(tmp_path / "own", own_renderer.as_manifest())
    assert resolve_chat_renderer(same, own).kind == "tokenizer"
    with pytest.raises(
        UsageError, match=r"prepared with a tokenizer's chat template .* has no chat template"
    ):
        resolve_chat_renderer(same, bare)
    other = _manifest(tmp_path / "other", {**own_renderer.as_manifest(), "sha256": "0" * 64})
    with pytest.raises(UsageError, match=r"has another chat template: prepare the data with this model"):
        resolve_chat_renderer(other, own)
    gone = _manifest(tmp_path / "gone", {"name": str(tmp_path / "nowhere.j2"), "kind": "file", "sha256": "x"})
    with pytest.raises(UsageError, match=r"template file .*nowhere\.j2, which is not on this machine"):
        resolve_chat_renderer(gone, own)
    mine = tmp_path / "mine.j2"
    mine.write_text(chatml.source)
    changed = _manifest(tmp_path / "changed", {"name": str(mine), "kind": "file", "sha256": "0" * 64})
    with pytest.raises(UsageError, match=r"mine\.j2 changed since"):
        resolve_chat_renderer(changed, own)

    # The recipe installs ChatML into a tokenizer without a template, so the saved model carries it.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bare.name_or_path)
    cfg = TrainConfig(train_file=str(built))
    assert chat_renderer(cfg, tok, [{"prompt": "p", "response": "r"}]) is None and not tok.chat_template
    renderer = chat_renderer(cfg, tok, [{"prompt": "p", "response": "r", "messages": TURNS}])
    assert renderer.name == "chatml" and tok.chat_template == chatml.source
    prompt = TURNS[:-1]
    assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == chatml.render_turns(
        prompt, add_generation_prompt=True
    )
