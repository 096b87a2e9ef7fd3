"""Aliases: compare-and-swap moves, audit trail, and point-in-time lookup."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from airloom.exceptions import ConflictError, RegistryError, UsageError
from airloom.registry.registry import ModelRegistry


@pytest.fixture
def registry(store, tmp_path):
    reg = ModelRegistry(store)
    for i in range(3):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "config.json").write_text(f'{{"v": {i}}}')
        reg.register("bot", folder, metadata={}, actor="ci")
    return reg


def test_set_and_resolve_alias(registry):
    assert registry.get_alias("bot", "production") is None
    rec = registry.set_alias("bot", "production", 1, actor="alice", reason="first release")
    assert (rec["from"], rec["to"], rec["actor"], rec["reason"]) == (None, 1, "alice", "first release")
    registry.set_alias("bot", "production", 2, actor="bob")
    registry.set_alias("bot", "staging", 3, actor="bob")
    assert registry.resolve("bot@production").version == 2
    assert registry.list_aliases("bot") == {"production": 2, "staging": 3}
    moves = [(h["alias"], h["from"], h["to"]) for h in registry.history("bot") if h["action"] == "alias"]
    assert moves == [("production", None, 1), ("production", 1, 2), ("staging", None, 3)]


def test_alias_cas_conflict(registry):
    registry.set_alias("bot", "production", 1, actor="alice", expected_version=None)
    # Two promoters both read "production → 1"; the first wins, the second must not overwrite it.
    registry.set_alias("bot", "production", 2, actor="alice", expected_version=1)
    with pytest.raises(ConflictError, match=r"bot@production points to 2 \(expected 1\)"):
        registry.set_alias("bot", "production", 3, actor="bob", expected_version=1)
    with pytest.raises(ConflictError, match=r"points to 2 \(expected None\)"):
        registry.set_alias("bot", "production", 3, actor="bob", expected_version=None)
    assert registry.get_alias("bot", "production") == 2
    assert [h["actor"] for h in registry.history("bot") if h["action"] == "alias"] == ["alice", "alice"]


def test_alias_target_must_be_committed(registry):
    registry.store.put_bytes("models/bot/versions/4/CLAIM", b"{}", if_none_match=True)
    with pytest.raises(
        RegistryError, match=r"version 4: it is not a committed version; committed versions: \[1, 2, 3\]"
    ):
        registry.set_alias("bot", "production", 4, actor="alice")
    with pytest.raises(UsageError, match="invalid alias"):
        registry.set_alias("bot", "Prod!", 1, actor="alice")


def test_alias_at(registry):
    before = datetime.now(UTC)
    registry.set_alias("bot", "production", 1, actor="alice")
    after_first = datetime.now(UTC)
    registry.set_alias("bot", "production", 3, actor="alice")
    assert registry.alias_at("bot", "production", before - timedelta(seconds=1)) is None
    assert registry.alias_at("bot", "production", after_first) == 1
    assert registry.alias_at("bot", "production", datetime.now(UTC) + timedelta(days=1)) == 3
    naive_utc = datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=1)
    assert registry.alias_at("bot", "production", naive_utc) == 3
    assert registry.alias_at("bot", "staging", naive_utc) is None
