"""Turn a model reference into a folder ``from_pretrained`` can load.

References: a local folder; ``registry:NAME[/N|@ALIAS]`` (a registry version, downloaded and
verified into a cache); ``s3://bucket/prefix`` (an HF model folder, downloaded into a cache); anything else is passed through as a Hugging Face hub id (works for
users online; this project never needs it).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from airloom.registry.registry import ModelRegistry
from airloom.settings import home

REGISTRY_PREFIX = "registry:"


def resolve_model(
    ref: str, registry: ModelRegistry | None = None, cache_dir: Path | None = None, s3_client: Any = None
) -> dict:
    """Return ``{"path", "ref", "name", "version"}``; name/version are set for registry refs."""
    if not ref:
        raise ValueError("empty model reference")
    if ref.startswith("s3://"):
        path = _download_s3_folder(ref, (cache_dir or home() / "cache" / "models") / "s3", s3_client)
        return {"path": str(path), "ref": ref, "name": None, "version": None}
    if ref.startswith(REGISTRY_PREFIX):
        if registry is None:
            from airloom.settings import registry_uri

            registry = ModelRegistry.from_uri(registry_uri())
        mv = registry.resolve(ref[len(REGISTRY_PREFIX) :])
        dest = (cache_dir or home() / "cache" / "models") / mv.name / str(mv.version)
        path = registry.download(mv.name, mv.version, dest)
        return {
            "path": str(path),
            "ref": f"{REGISTRY_PREFIX}{mv.name}/{mv.version}",
            "name": mv.name,
            "version": mv.version,
        }
    if Path(ref).exists():
        return {"path": str(Path(ref).resolve()), "ref": ref, "name": None, "version": None}
    return {"path": ref, "ref": ref, "name": None, "version": None}


def _download_s3_folder(uri: str, cache: Path, client: Any) -> Path:
    """Copy an HF folder under ``uri`` into the cache once (complete or not at all)."""
    from airloom.exceptions import UsageError
    from airloom.registry.store import S3Store

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    store = S3Store(bucket, prefix.strip("/"), client=client)
    keys = [k for k in store.list("") if not k.endswith("/")]
    if "config.json" not in keys:
        raise UsageError(f"{uri}: not a model folder (no config.json among {len(keys)} objects)")
    dest = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / "config.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for key in keys:
        store.download_file(key, tmp / key)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
