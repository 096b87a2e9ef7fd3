"""Prompt templates: alpaca byte-identical to render_prompt, chatml, the tokenizer's chat template,
user files in a Jinja2 sandbox with strict variables, and errors that name the template and place."""

from __future__ import annotations

import hashlib
import re

import pytest

from airloom.exceptions import UsageError
from airloom.prompts import load_template, prompt_context, render_prompt, sandbox

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A real (tiny, trained here) Hugging Face tokenizer with a chat template, and one without."""
    from transformers import AutoTokenizer

    from airloom.training.base import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer([f"hello world number {i} and some words" for i in range(40)], vocab_size=300)
    tok.save_pretrained(folder / "bare")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder / "chat")
    return {
        "tokenizer": AutoTokenizer.from_pretrained(folder / "chat"),
        "bare": AutoTokenizer.from_pretrained(folder / "bare"),
    }


# Text that would trip a naive implementation: format braces, Jinja syntax (data is never re-parsed),
# percent signs, blank and whitespace-only input, line ends, non-ASCII.
CASES = [
    ("Name a colour", None),
    ("Name a colour", ""),
    ("Reverse the string.", "abc"),
    ("Fill in {x} and {{ y }}", "{% if true %}oops{% endif %} 100%"),
    ("Two\nlines\n", "trailing\n\n"),
    ("Caf\u00e9 \u2603 \u4e2d\u6587", "  "),
    ("", "only input"),
]


@pytest.mark.parametrize(("instruction", "input"), CASES)
def test_builtin_alpaca_renders_exactly_like_render_prompt(instruction, input, tmp_path):
    alpaca = load_template("alpaca")
    context = prompt_context(instruction, input or "")
    expected = render_prompt(instruction, input)
    assert alpaca.render(context) == expected
    # The Jinja source the manifest pins renders the same bytes in the sandbox, as a user file too.
    assert sandbox().from_string(alpaca.source).render(**context) == expected
    copy = tmp_path / "alpaca.j2"
    copy.write_text(alpaca.source, encoding="utf-8")
    assert load_template(str(copy)).render(context) == expected
    assert alpaca.sha256 == hashlib.sha256(alpaca.source.encode()).hexdigest()
    assert alpaca.as_manifest() == {"name": "alpaca", "kind": "builtin", "sha256": alpaca.sha256}


def test_chatml_renders_instruction_and_chat_records():
    chatml = load_template("chatml")
    assert chatml.render(prompt_context("Add the numbers.", "2 3")) == (
        "<|im_start|>user\nAdd the numbers.\n\n2 3<|im_end|>\n<|im_start|>assistant\n"
    )
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    context = prompt_context("Capital of France?", "", turns)
    assert context["system"] == "Be brief."
    assert chatml.render(context) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt("Add the numbers.", "2 3", template="chatml") == chatml.render(
        prompt_context("Add the numbers.", "2 3")
    )
    with pytest.raises(ValueError, match=r"unknown prompt template 'nope'"):
        render_prompt("x", template="nope")


def test_chat_template_uses_the_tokenizers_own_template(tiny_tokenizer):
    tok = tiny_tokenizer["tokenizer"]
    renderer = load_template("chat_template", tokenizer=tok)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = renderer.render(prompt_context("Hi there", "", messages))
    assert text == "<|bos|>[system] Be brief.<|eos|>[user] Hi there<|eos|>[assistant] "
    assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert renderer.as_manifest() == {
        "name": "chat_template",
        "kind": "tokenizer",
        "sha256": hashlib.sha256(tok.chat_template.encode()).hexdigest(),
    }

    with pytest.raises(UsageError, match=r"give a tokenizer"):
        load_template("chat_template")
    # A tokenizer without a chat template gets ChatML, and the manifest says so.
    fallback = load_template("chat_template", tokenizer=tiny_tokenizer["bare"])
    chatml = load_template("chatml")
    assert fallback.render(prompt_context("Hi there", "", messages)) == chatml.render(
        prompt_context("Hi there", "", messages)
    )
    assert fallback.as_manifest() == {
        "name": "chatml",
        "kind": "builtin",
        "sha256": hashlib.sha256(chatml.source.encode()).hexdigest(),
        "requested": "chat_template",
    }
    assert fallback.multi_turn and renderer.multi_turn and not load_template("alpaca").multi_turn


def test_a_user_template_file_renders_the_record(tmp_path):
    path = tmp_path / "mine.j2"
    path.write_text(
        "{% if system %}<<SYS>>{{ system }}<</SYS>>\n{% endif %}"
        "[{{ task or 'general' }}] {{ instruction | upper }}{% if input %} :: {{ input }}{% endif %}\n"
        "turns={{ messages | length }}\n",
        encoding="utf-8",
    )
    renderer = load_template(str(path))
    assert (renderer.name, renderer.kind) == (str(path), "file")
    assert renderer.render(prompt_context("sort", "b a", task="sort")) == "[sort] SORT :: b a\nturns=1\n"
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert renderer.render(prompt_context("q", "", turns)) == "<<SYS>>S<</SYS>>\n[general] Q\nturns=2\n"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ instruction.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",  # the sandbox is immutable
        "{% set x = messages.pop() %}{{ x }}",
    ],
)
def test_the_sandbox_blocks_escapes_with_a_clear_error(tmp_path, source):
    path = tmp_path / "evil.j2"
    path.write_text(source, encoding="utf-8")
    renderer = load_template(str(path))
    expected = rf"template '{re.escape(str(path))}' on record 7 \(line 9\): blocked by the sandbox"
    with pytest.raises(UsageError, match=expected):
        renderer.render(prompt_context("x", ""), where="record 7 (line 9)")


def test_undefined_variables_fail_instead_of_rendering_empty(tmp_path):
    path = tmp_path / "typo.j2"
    path.write_text("### Instruction:\n{{ instrucion }}\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"typo\.j2' on record 3 \(line 5\): 'instrucion' is undefined"):
        load_template(str(path)).render(prompt_context("x", ""), where="record 3 (line 5)")


def test_bad_template_specs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match=r"'alpaka': not a built-in \(alpaca, chatml, chat_template\)"):
        load_template("alpaka")
    with pytest.raises(UsageError, match=r"empty prompt template"):
        load_template("")
    broken = tmp_path / "broken.j2"
    broken.write_text("line one\n{% if instruction %}\nno endif\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"broken\.j2', line \d+: syntax error: .*endif"):
        load_template(str(broken))
    latin = tmp_path / "latin.j2"
    latin.write_bytes(b"caf\xe9 {{ instruction }}")
    with pytest.raises(UsageError, match=r"cannot read prompt template .*latin\.j2"):
        load_template(str(latin))


TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris", "weight": 1},
]


def test_chatml_renders_as_a_hugging_face_chat_template_would(tiny_tokenizer):
    """The built-in ChatML is also a valid chat_template: a model trained on it can carry it, and
    apply_chat_template (trim_blocks, lstrip_blocks) renders the same text as the sandbox."""
    from transformers import AutoTokenizer

    chatml = load_template("chatml")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer["bare"].name_or_path)
    tok.chat_template = chatml.source
    for turns, generation in ((TURNS[:4], True), (TURNS[:2], True), (TURNS, False), (TURNS[:3], False)):
        ours = chatml.render_turns(turns, add_generation_prompt=generation)
        assert ours == tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)
    assert chatml.render_turns(TURNS, add_generation_prompt=False).endswith("Paris<|im_end|>\n")


def test_render_conversation_finds_each_assistant_turn(tiny_tokenizer, tmp_path):
    from airloom.prompts import render_conversation

    chatml = load_template("chatml")
    weighted = [*TURNS[:2], dict(TURNS[2], weight=0), *TURNS[3:]]
    conversation = render_conversation(chatml, weighted, eos_token="<|eos|>")
    assert conversation.text.endswith("<|im_start|>assistant\nParis<|im_end|><|eos|>")
    assert [conversation.text[a:b] for a, b in conversation.spans] == ["Paris<|im_end|><|eos|>"]
    both = render_conversation(chatml, TURNS)  # no EOS token: nothing appended
    assert [both.text[a:b] for a, b in both.spans] == ["Hello.<|im_end|>", "Paris<|im_end|>"]
    assert render_conversation(chatml, TURNS, spans=False) == type(both)(both.text, [])

    # A user template that reads add_generation_prompt renders conversations like the built-ins.
    mine = tmp_path / "mine.j2"
    mine.write_text(
        "{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}",
        encoding="utf-8",
    )
    spans = render_conversation(load_template(str(mine)), TURNS)
    assert [spans.text[a:b] for a, b in spans.spans] == [" Hello.", " Paris"]

    # One that adds its generation prompt whatever is asked cannot place the turns: said plainly.
    always = tmp_path / "always.j2"
    always.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    with pytest.raises(UsageError, match=r"always\.j2' on row 3: turn 2 is not rendered after the turns"):
        render_conversation(load_template(str(always)), TURNS, where="row 3")
    with pytest.raises(UsageError, match=r"template 'alpaca' renders single prompts, not conversations"):
        render_conversation(load_template("alpaca"), TURNS)
    with pytest.raises(UsageError, match=r"must end with an assistant turn"):
        render_conversation(chatml, TURNS[:4])


def test_chat_fields_reads_the_last_exchange_whatever_the_roles():
    """The instruction view against its definition, on random role sequences (odd roles included):
    response the last assistant turn, instruction the last user turn before it, input the rest in order."""
    import random

    from airloom.prompts import chat_fields

    def by_definition(turns, labels):
        last = max((n for n, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))
        user = max((n for n, t in enumerate(turns[:last]) if t["role"] == "user"), default=None)
        rest = [t for n, t in enumerate(turns[:last]) if n != user]
        return {
            "instruction": turns[user]["content"] if user is not None else "",
            "input": "\n".join(f"{t['role']}: {t['content']}" if labels else t["content"] for t in rest),
            "response": turns[last]["content"] if last < len(turns) else "",
        }

    rng = random.Random(0)
    for _ in range(3000):
        roles = ["system", "user", "assistant", "tool", None]
        turns = [{"role": rng.choice(roles), "content": f"t{n}"} for n in range(rng.randint(0, 6))]
        for labels in (True, False):
            assert chat_fields(turns, labels) == by_definition(turns, labels), turns
