"""Concurrent writers in separate processes on one LocalStore: no version is lost or shared."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

from airloom.registry.registry import ModelRegistry

WORKERS = 8


def _register(args: tuple[str, str, int, float]) -> int:
    root, model_dir, worker, start_at = args
    time.sleep(max(0.0, start_at - time.time()))  # line the workers up so their claims collide
    reg = ModelRegistry.from_uri(root)
    return reg.register("bot", model_dir, metadata={"worker": worker}, actor=f"worker-{worker}").version


def _move_alias(args: tuple[str, int, float]) -> int:
    root, worker, start_at = args
    time.sleep(max(0.0, start_at - time.time()))
    reg = ModelRegistry.from_uri(root)
    for _ in range(5):
        reg.set_alias("bot", "production", 1 + worker % 2, actor=f"worker-{worker}")
    return worker


def test_concurrent_registrations_get_distinct_complete_versions(tmp_path):
    root = str(tmp_path / "reg")
    models = []
    for i in range(WORKERS):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"worker": i}))
        (folder / "weights.bin").write_bytes(bytes([i]) * 50_000)
        models.append(str(folder))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(WORKERS) as pool:
        start_at = time.time() + 2.0
        versions = pool.map(_register, [(root, models[i], i, start_at) for i in range(WORKERS)])
        assert sorted(versions) == list(range(1, WORKERS + 1))

        reg = ModelRegistry.from_uri(root)
        listed = reg.list_versions("bot")
        assert [v.version for v in listed] == list(range(1, WORKERS + 1))
        for v in listed:
            reg.verify("bot", v.version)
            worker = v.metadata["worker"]
            assert v.created_by == f"worker-{worker}"
            # Each version holds exactly the files of the worker that claimed it, never a mix.
            assert (
                reg.store.get_bytes(f"models/bot/versions/{v.version}/weights.bin")
                == bytes([worker]) * 50_000
            )
        registrations = [h for h in reg.history("bot") if h["action"] == "register"]
        assert sorted(h["version"] for h in registrations) == list(range(1, WORKERS + 1))

        # Unconditional alias moves racing from 4 processes: every move lands and is audited once.
        start_at = time.time() + 1.0
        pool.map(_move_alias, [(root, w, start_at) for w in range(4)])
    moves = [h for h in reg.history("bot") if h["action"] == "alias"]
    assert sorted(h["revision"] for h in moves) == list(range(1, 21))
    last = max(moves, key=lambda h: h["revision"])
    assert reg.get_alias("bot", "production") == last["to"]
    assert not list(Path(root).rglob(".airloom-tmp-*"))
