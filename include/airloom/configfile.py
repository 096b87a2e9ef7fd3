"""The one way Airloom reads a YAML file that holds a mapping (validation, training, bias, settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airloom.exceptions import UsageError


def load_yaml_mapping(
    path: str | Path, what: str = "config", *, loader: type | None = None
) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; an empty file gives ``{}``.

    Args:
        path: The YAML file.
        what: What the file is, for messages ("training config", "bias templates").
        loader: A ``yaml.SafeLoader`` subclass (e.g. one that records line numbers); default SafeLoader.

    Raises:
        UsageError: The file cannot be read, is not YAML, or its top level is not a mapping;
            the message names the file.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read {what} ({getattr(exc, 'strerror', None) or exc})") from exc
    try:
        data = yaml.load(text, Loader=loader or yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: {what} must be a mapping, got {type(data).__name__}")
    return data
