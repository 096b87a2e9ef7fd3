"""The shipped training configs (presets): each is valid, says how to launch it, and is found by name."""

from pathlib import Path

import pytest

from airloom.exceptions import UsageError
from airloom.training.config import TrainConfig
from airloom.training.presets import DEFAULT_PRESET, load_preset, preset_names, preset_path

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "include/airloom/training/configs").rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 3
    assert len(preset_names()) == len(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_is_valid_and_documented(path):
    cfg = TrainConfig.from_file(path, base_model="b", train_file="t", output_dir="o")
    assert isinstance(cfg.learning_rate, float)
    header = path.read_text().split("\n\n")[0]
    name = f"{path.parent.name}/{path.stem}"
    assert f"airloom train --config {name} " in header  # launched by its preset name
    # <family>/<size>_<method>_<topology>.yaml, as torchtune names its configs
    size, method, *topology = path.stem.split("_")
    assert method == cfg.method and topology
    # a retry resumes: every preset checkpoints
    assert cfg.checkpoint_every > 0


def test_presets_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in preset_names():
        assert preset_path(name).is_file() and preset_path(name) == preset_path(f"{name}.yaml")
    assert load_preset(DEFAULT_PRESET)["max_steps"] == 1500  # what llm_finetune trained before presets


def test_the_real_model_lora_preset():
    cfg = TrainConfig.from_dict(load_preset("llama_1b/1.1b_lora_1gpu_zero2_packed"))
    assert (cfg.method, cfg.nproc_per_node, cfg.precision, cfg.max_length, cfg.packing) == (
        "lora",
        1,
        "bf16",
        2048,
        True,
    )
    assert cfg.peft_target_modules() == "all-linear" and cfg.checkpoint_every > 0


def test_a_users_yaml_path_and_overrides(tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text("method: lora\nlora_r: 8\n")
    assert load_preset(own, {"lora_r": 4, "max_length": None}) == {"method": "lora", "lora_r": 4}


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(
        UsageError,
        match=r"'tiny_llama/nope' is neither a shipped preset nor a YAML file; presets: .*tiny_llama/0.5m_full_1proc",
    ):
        preset_path("tiny_llama/nope")
    with pytest.raises(UsageError, match="neither a shipped preset"):
        preset_path("../configs/tiny_llama/0.5m_full_1proc")  # names stay inside the package


def test_a_bad_override_is_named_with_the_preset():
    with pytest.raises(
        UsageError,
        match=r"offload_params needs zero_stage 3 .* \(training config .*0.5m_full_1proc.yaml with offload_params set\)",
    ):
        load_preset(DEFAULT_PRESET, {"offload_params": True})
