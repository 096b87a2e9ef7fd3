"""Turn a model reference into a folder ``from_pretrained`` can load.

References: a local folder; ``registry:NAME[/N|@ALIAS]`` (a registry version, downloaded and
verified into a cache); anything else is passed through as a Hugging Face hub id (works for
users online; this project never needs it).
"""

from __future__ import annotations

from pathlib import Path

from airloom.registry.registry import ModelRegistry
from airloom.settings import home

REGISTRY_PREFIX = "registry:"


def resolve_model(ref: str, registry: ModelRegistry | None = None, cache_dir: Path | None = None) -> dict:
    """Return ``{"path", "ref", "name", "version"}``; name/version are set for registry refs."""
    if not ref:
        raise ValueError("empty model reference")
    if ref.startswith(REGISTRY_PREFIX):
        if registry is None:
            from airloom.settings import registry_uri

            registry = ModelRegistry.from_uri(registry_uri())
        mv = registry.resolve(ref[len(REGISTRY_PREFIX) :])
        dest = (cache_dir or home() / "cache" / "models") / mv.name / str(mv.version)
        path = registry.download(mv.name, mv.version, dest)
        return {"path": str(path), "ref": f"{REGISTRY_PREFIX}{mv.name}/{mv.version}", "name": mv.name,
                "version": mv.version}
    if Path(ref).exists():
        return {"path": str(Path(ref).resolve()), "ref": ref, "name": None, "version": None}
    return {"path": ref, "ref": ref, "name": None, "version": None}
