"""Shipped training presets: the YAML files under ``airloom/training/configs``, named by their path there
without ``.yaml`` (``tiny_llama/0.5m_full_1proc``), as torchtune names its configs.

A preset is found through the installed package, so a name works from any working directory; anything
else is taken as the path of the user's own YAML file. Cheap to import (the DAG file lists the names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airloom.exceptions import UsageError

CONFIG_DIR = Path(__file__).resolve().with_name("configs")
# What ``llm_finetune`` trains with when its form is left alone: the demo's tiny full fine-tune.
DEFAULT_PRESET = "tiny_llama/0.5m_full_1proc"


def preset_names() -> list[str]:
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """The YAML file of a shipped preset name, else ``name_or_path`` itself when it is a file."""
    text = str(name_or_path).strip()
    shipped = CONFIG_DIR / f"{text.removesuffix('.yaml')}.yaml"
    if text and ".." not in Path(text).parts and shipped.is_file():
        return shipped
    path = Path(text).expanduser()
    if text and path.is_file():
        return path
    raise UsageError(
        f"training config {text!r} is neither a shipped preset nor a YAML file; presets: "
        + ", ".join(preset_names())
    )


def load_preset(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset's options with ``overrides`` on top (None = keep the preset's value), validated as a
    :class:`~airloom.training.config.TrainConfig`; paths (base model, files) are left to the caller."""
    from airloom.configfile import load_yaml_mapping
    from airloom.training.config import TrainConfig

    path = preset_path(name_or_path)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    options = {**load_yaml_mapping(path, "training config"), **given}
    try:
        TrainConfig.from_dict(options)
    except UsageError as e:  # say where the bad value may come from: the file or an override
        where = f"training config {path}" + (f" with {', '.join(sorted(given))} set" if given else "")
        raise UsageError(f"{e} ({where})") from None
    return options
