"""Prompt templates shared by preparation, training and evaluation.

Training and evaluation must render prompts identically, so the template lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    with_input: str
    without_input: str

    def render(self, instruction: str, input: str | None = None) -> str:
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)


TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        name="alpaca",
        with_input="### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n",
        without_input="### Instruction:\n{instruction}\n### Response:\n",
    ),
}
DEFAULT_TEMPLATE = "alpaca"


def render_prompt(instruction: str, input: str | None = None, template: str = DEFAULT_TEMPLATE) -> str:
    try:
        tpl = TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown prompt template {template!r}; known: {sorted(TEMPLATES)}") from None
    return tpl.render(instruction, input)
