"""The shipped training configs: each is valid and says how to launch it."""

from pathlib import Path

import pytest

from airloom.training.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "include/airloom/training/configs").rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_is_valid_and_documented(path):
    cfg = TrainConfig.from_file(path, base_model="b", train_file="t", output_dir="o")
    assert isinstance(cfg.learning_rate, float)
    header = path.read_text().split("\n\n")[0]
    assert "airloom train --config" in header and path.name in header
    # <family>/<size>_<method>_<topology>.yaml, as torchtune names its configs
    size, method, *topology = path.stem.split("_")
    assert method == cfg.method and topology
