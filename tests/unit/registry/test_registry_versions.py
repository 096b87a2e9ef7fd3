"""Register / list / resolve / verify / download, on the local and the S3 backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from airloom.exceptions import CheckFailed, RegistryError, UsageError
from airloom.registry.registry import ModelRegistry


def make_model(folder, seed: int = 0):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "seed": seed}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40 + bytes([seed]))
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text('{"vocab": {}}')
    return folder


METADATA = {
    "base_model": "sshleifer/tiny-gpt2",
    "datasets": ["support-tickets-v3"],
    "metrics": {"rouge_l": 0.41, "exact_match": 0.12},
    "lineage": {"dag_run": "train__2026-11-28", "data_sha256": "ab" * 32},
}


@pytest.fixture
def registry(store):
    return ModelRegistry(store)


def test_register_list_resolve_round_trip(registry, tmp_path):
    v1 = registry.register("support-bot", make_model(tmp_path / "m1", 1), metadata=METADATA, actor="alice")
    v2 = registry.register("support-bot", make_model(tmp_path / "m2", 2), metadata={}, actor="bob")
    assert (v1.version, v2.version) == (1, 2)
    assert v1.created_by == "alice" and v1.metadata["metrics"]["rouge_l"] == 0.41
    paths = [f["path"] for f in v1.files]
    assert paths == sorted(
        ["README.md", "config.json", "metadata.json", "model.safetensors", "tokenizer/tokenizer.json"]
    )
    assert {f["path"]: f["size"] for f in v1.files}["model.safetensors"] == 256 * 40 + 1

    assert [v.version for v in registry.list_versions("support-bot")] == [1, 2]
    assert registry.resolve("support-bot").version == 2
    assert registry.resolve("support-bot/1").to_dict() == v1.to_dict()
    assert registry.list_models() == ["support-bot"]
    registry.verify("support-bot", 1)

    card = registry.store.get_bytes("models/support-bot/versions/1/README.md").decode()
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == "sshleifer/tiny-gpt2" and header["library_name"] == "transformers"

    history = registry.history("support-bot")
    assert [(h["action"], h["version"], h["actor"]) for h in history] == [
        ("register", 1, "alice"),
        ("register", 2, "bob"),
    ]


def test_given_card_replaces_generated_one(registry, tmp_path):
    folder = make_model(tmp_path / "m")
    (folder / "README.md").write_text("trainer's stub card")
    registry.register("bot", folder, metadata={}, actor="ci", card="# Custom card\n")
    assert registry.store.get_bytes("models/bot/versions/1/README.md") == b"# Custom card\n"


def test_download_is_verified_and_cached(registry, tmp_path):
    registry.register("bot", make_model(tmp_path / "m"), metadata=METADATA, actor="ci")
    dest = registry.download("bot", 1, tmp_path / "dl")
    assert (dest / "tokenizer" / "tokenizer.json").read_text() == '{"vocab": {}}'
    assert (dest / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()
    assert json.loads((dest / "MANIFEST.json").read_text())["version"] == 1

    # A complete copy is reused: corrupting the stored object now must not affect a second download.
    registry.store.put_bytes("models/bot/versions/1/config.json", b"{}")
    registry.download("bot", 1, tmp_path / "dl")
    with pytest.raises(CheckFailed, match=r"bot/1: file config\.json downloaded from .* does not match"):
        registry.download("bot", 1, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "MANIFEST.json").exists()


def test_uncommitted_version_is_invisible(registry, tmp_path):
    registry.register("bot", make_model(tmp_path / "m"), metadata={}, actor="ci")
    # A writer that claimed version 2 and crashed mid-upload.
    registry.store.put_bytes("models/bot/versions/2/CLAIM", b"{}", if_none_match=True)
    registry.store.put_bytes("models/bot/versions/2/config.json", b"{}")
    assert [v.version for v in registry.list_versions("bot")] == [1]
    assert registry.resolve("bot").version == 1
    with pytest.raises(RegistryError, match=r"no committed version 2 .*committed versions: \[1\]"):
        registry.get("bot", 2)
    assert registry.register("bot", tmp_path / "m", metadata={}, actor="ci").version == 3


def test_verify_names_the_corrupt_or_missing_file(registry, store, tmp_path):
    registry.register("bot", make_model(tmp_path / "m"), metadata={}, actor="ci")
    store.put_bytes("models/bot/versions/1/tokenizer/tokenizer.json", b'{"vocab": {"x": 1}}')
    with pytest.raises(CheckFailed, match=r"bot/1: file tokenizer/tokenizer\.json is corrupt"):
        registry.verify("bot", 1)

    registry.register("bot", make_model(tmp_path / "m2"), metadata={}, actor="ci")
    if hasattr(store, "path"):
        store.path("models/bot/versions/2/model.safetensors").unlink()
    else:
        store.client.delete_object(
            Bucket=store.bucket, Key=f"{store.prefix}/models/bot/versions/2/model.safetensors"
        )
    with pytest.raises(
        CheckFailed, match=r"bot/2: file model\.safetensors listed in MANIFEST\.json is missing"
    ):
        registry.verify("bot", 2)


def test_resolve_errors_say_what_exists(registry, tmp_path):
    with pytest.raises(RegistryError, match=r"model 'ghost' has no committed versions"):
        registry.resolve("ghost")
    registry.register("bot", make_model(tmp_path / "m"), metadata={}, actor="ci")
    with pytest.raises(RegistryError, match=r"alias 'production' of model 'bot' is not set.*versions: \[1\]"):
        registry.resolve("bot@production")
    with pytest.raises(RegistryError, match=r"no committed version 7"):
        registry.resolve("bot/7")
    with pytest.raises(UsageError, match=r"version number like bot/3"):
        registry.resolve("bot/latest")


def test_register_validates_input(registry, tmp_path):
    folder = make_model(tmp_path / "m")
    with pytest.raises(UsageError, match=r"invalid model name 'Support Bot'"):
        registry.register("Support Bot", folder, metadata={}, actor="ci")
    with pytest.raises(UsageError, match="does not exist"):
        registry.register("bot", tmp_path / "nope", metadata={}, actor="ci")
    numpy_metrics = registry.register(
        "bot", folder, metadata={"metrics": {"loss": np.float32(0.25)}}, actor="ci"
    )
    assert registry.get("bot", numpy_metrics.version).metadata == {"metrics": {"loss": 0.25}}
    with pytest.raises(UsageError, match="JSON-serialisable"):
        registry.register("bot", folder, metadata={"when": object()}, actor="ci")
    with pytest.raises(UsageError, match="actor must be"):
        registry.register("bot", folder, metadata={}, actor="")
    (folder / "MANIFEST.json").write_text("{}")
    with pytest.raises(UsageError, match=r"MANIFEST\.json is written by the registry"):
        registry.register("bot", folder, metadata={}, actor="ci")
    assert registry._claimed_versions("bot") == [1]  # refused calls claim no version number


def test_from_uri(tmp_path):
    reg = ModelRegistry.from_uri(str(tmp_path / "reg"))
    reg.register("bot", make_model(tmp_path / "m"), metadata={}, actor="ci")
    assert ModelRegistry.from_uri(str(tmp_path / "reg")).resolve("bot").uri == str(
        tmp_path / "reg" / "models" / "bot" / "versions" / "1"
    )


def test_attachments_are_stored_and_verified_with_the_version(registry, tmp_path):
    report = tmp_path / "gates" / "report.html"
    report.parent.mkdir()
    report.write_text("<html>gates passed</html>")
    v = registry.register(
        "support-bot",
        make_model(tmp_path / "m"),
        metadata={},
        actor="alice",
        attachments={"evaluation/report.html": report},
    )
    assert "evaluation/report.html" in [f["path"] for f in v.files]
    assert (
        registry.store.get_bytes("models/support-bot/versions/1/evaluation/report.html")
        == report.read_bytes()
    )
    registry.verify("support-bot", 1)
    registry.store.put_bytes("models/support-bot/versions/1/evaluation/report.html", b"<html>edited</html>")
    with pytest.raises(CheckFailed, match="evaluation/report.html"):
        registry.verify("support-bot", 1)


@pytest.mark.parametrize("rel", ["config.json", "../escape.html", "README.md", "MANIFEST.json"])
def test_attachments_cannot_replace_model_files_or_escape(registry, tmp_path, rel):
    extra = tmp_path / "x.html"
    extra.write_text("x")
    with pytest.raises(UsageError):
        registry.register(
            "support-bot", make_model(tmp_path / "m"), metadata={}, actor="alice", attachments={rel: extra}
        )
    assert registry.list_versions("support-bot") == []
