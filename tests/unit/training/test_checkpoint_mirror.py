"""Checkpoint mirroring (a folder or S3 through moto's server): complete copies only, newest wins, pruned."""

from __future__ import annotations

import json
from pathlib import Path

from airloom.training.recipe import (
    CHECKPOINT_MARKER,
    fetch_checkpoint,
    newest_checkpoint,
    remote_checkpoints,
    upload_checkpoint,
)


def _checkpoint(root: Path, step: int, complete: bool = True) -> str:
    tag = f"step-{step:08d}"
    (root / tag / "global_step").mkdir(parents=True)
    (root / tag / "global_step" / "mp_rank_00_model_states.pt").write_bytes(b"weights %d" % step)
    (root / tag / "zero_pp_rank_0_optim_states.pt").write_bytes(b"optimizer %d" % step)
    if complete:
        (root / tag / CHECKPOINT_MARKER).write_text(json.dumps({"step": step}))
    return tag


def test_upload_keeps_the_newest_complete_checkpoints(store, tmp_path):
    local = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        upload_checkpoint(store, local, _checkpoint(local, step), keep=2)
    assert sorted(remote_checkpoints(store)) == ["step-00000020", "step-00000030"]
    assert not store.list("step-00000010/")


def test_fetch_restores_the_newest_complete_checkpoint_on_a_fresh_machine(store, tmp_path):
    first = tmp_path / "machine-a" / "checkpoints"
    upload_checkpoint(store, first, _checkpoint(first, 10), keep=2)
    upload_checkpoint(store, first, _checkpoint(first, 20), keep=2)
    # An upload cut short (killed before its marker): present in the store, never chosen.
    store.put_bytes("step-00000030/global_step/mp_rank_00_model_states.pt", b"half")

    fresh = tmp_path / "machine-b" / "checkpoints"
    assert fetch_checkpoint(store, fresh) == "step-00000020"
    assert newest_checkpoint(fresh) == ("step-00000020", 20)
    assert (
        fresh / "step-00000020" / "global_step" / "mp_rank_00_model_states.pt"
    ).read_bytes() == b"weights 20"
    assert not (fresh / "step-00000030").exists()


def test_nothing_to_fetch_from_an_empty_mirror(store, tmp_path):
    assert fetch_checkpoint(store, tmp_path / "checkpoints") is None


def test_local_resume_ignores_a_checkpoint_without_its_marker(tmp_path):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20, complete=False)
    assert newest_checkpoint(tmp_path) == ("step-00000010", 10)
    (tmp_path / "step-00000010" / CHECKPOINT_MARKER).write_text('{"st')  # a marker cut short
    assert newest_checkpoint(tmp_path) is None


def test_delete_prefix_removes_only_that_prefix(store):
    for key in ("step-1/a", "step-1/b/c", "step-2/a", "other/x"):
        store.put_bytes(key, b"x")
    assert store.delete_prefix("step-1/") == 2
    assert store.list() == ["other/x", "step-2/a"]
