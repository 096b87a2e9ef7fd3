"""Model cards: Hugging Face front matter plus the human-readable sections."""

from __future__ import annotations

import numpy as np
import yaml

from airloom.registry.card import render_model_card


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    _, header, body = card.split("---\n", 2)
    return yaml.safe_load(header), body


def test_card_front_matter_and_sections():
    card = render_model_card(
        "support-bot",
        4,
        {
            "base_model": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            "datasets": "support-tickets-v3",
            "eval_dataset": "support-tickets-v3-test",
            "tags": ["lora", "airloom"],
            "license": "apache-2.0",
            "metrics": {
                "rouge_l": np.float32(0.5),
                "bleu": 12.5,
                "exact_match": 2 / 3,
                "notes": "n/a",
                "passed": True,
            },
            "lineage": {"dag_run": "train|2026-11-28", "data_sha256": "ab" * 32},
            "limitations": "English only.",
        },
    )
    header, body = _split(card)
    assert header["library_name"] == "transformers"
    assert header["base_model"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert header["datasets"] == ["support-tickets-v3"]
    assert header["tags"] == ["airloom", "lora"]
    result = header["model-index"][0]["results"][0]
    assert header["model-index"][0]["name"] == "support-bot-v4"
    assert result["dataset"] == {"name": "support-tickets-v3-test", "type": "support-tickets-v3-test"}
    # Only numbers go into model-index; booleans and text stay in the human table.
    assert [(m["type"], m["value"]) for m in result["metrics"]] == [
        ("rouge_l", 0.5),
        ("bleu", 12.5),
        ("exact_match", 2 / 3),  # exact for machines
    ]
    for section in [
        "# support-bot (version 4)",
        "## Summary",
        "## Training data and lineage",
        "## Evaluation",
        "## Intended use",
        "## Limitations",
        "## Sign-offs",
    ]:
        assert section in body
    # rounded for people: 3 decimals below 1, else 3 significant digits
    assert "| rouge_l | 0.500 |" in body and "| exact_match | 0.667 |" in body and "| bleu | 12.5 |" in body
    assert "| notes | n/a |" in body and "| passed | true |" in body
    assert "train\\|2026-11-28" in body  # pipes escaped so the table stays a table
    assert "English only." in body and "signoffs/4/" in body


def test_card_without_metadata():
    header, body = _split(render_model_card("bot", 1, {}))
    assert header == {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["airloom"]}
    assert "_No evaluation metrics were recorded._" in body
    assert "_No lineage was recorded at registration._" in body
