"""Apply an Astro-CLI style ``airflow_settings.yaml`` to any Airflow, through Airflow's own CLI.

The Astro CLI reads ``airflow_settings.yaml`` only for its local environments. Docker Compose, CI and
bare installs need the same connections, pools and variables, so this module turns the file into the
JSON files that ``airflow pools|variables|connections import`` accept and runs those commands. Going
through the CLI (not the ORM) keeps us on Airflow's supported interface and works against any
metadata database the CLI is configured for.

Usage::

    python -m airloom.airflow.settings_file airflow_settings.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from airloom.configfile import load_yaml_mapping
from airloom.exceptions import AirloomError, UsageError

SECTIONS = ("connections", "pools", "variables")
_CONN_KEYS = {
    "conn_id",
    "conn_type",
    "conn_host",
    "conn_schema",
    "conn_login",
    "conn_password",
    "conn_port",
    "conn_uri",
    "conn_extra",
}
_POOL_KEYS = {"pool_name", "pool_slot", "pool_description"}
_VAR_KEYS = {"variable_name", "variable_value"}
# Astro key -> Airflow Connection field, for the connections import file.
_CONN_FIELDS = {
    "conn_type": "conn_type",
    "conn_host": "host",
    "conn_schema": "schema",
    "conn_login": "login",
    "conn_password": "password",
    "conn_port": "port",
}


class _LineMap(dict):
    """A YAML mapping that remembers its 1-based line, so errors can point at the entry."""

    line: int = 0


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineMap:
    mapping = _LineMap(loader.construct_mapping(node, deep=True))
    mapping.line = node.start_mark.line + 1
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_settings(path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """Read and validate an ``airflow_settings.yaml``.

    Args:
        path: The YAML file (Astro CLI format: ``airflow: {connections, pools, variables}``).

    Returns:
        ``{"connections": [...], "pools": [...], "variables": [...]}``; entries keep the Astro keys,
        with ``conn_extra`` as a dict, ``pool_description`` filled in and ``variable_value`` as text
        (non-string YAML values become JSON, which ``Variable.get(deserialize_json=True)`` reads back).

    Raises:
        UsageError: The file is missing or malformed; the message names the file, line and entry.
    """
    path = Path(path)
    doc = load_yaml_mapping(path, "settings file", loader=_Loader) or {"airflow": None}
    if set(doc) != {"airflow"}:
        raise UsageError(
            f"{path}:1: the top level must be a mapping with the single key 'airflow'; found {sorted(doc)}"
        )
    airflow = doc["airflow"] or {}
    if not isinstance(airflow, dict):
        raise UsageError(f"{path}: 'airflow' must be a mapping of {', '.join(SECTIONS)}")
    unknown = sorted(set(airflow) - set(SECTIONS))
    if unknown:
        raise UsageError(
            f"{_where(path, airflow)}: unknown section(s) under 'airflow': {', '.join(map(str, unknown))}; "
            f"allowed: {', '.join(SECTIONS)}"
        )

    result: dict[str, list[dict[str, Any]]] = {}
    for section, parse in (("connections", _connection), ("pools", _pool), ("variables", _variable)):
        entries = airflow.get(section) or []
        if not isinstance(entries, list):
            raise UsageError(
                f"{path}: airflow.{section} must be a list of entries, not {type(entries).__name__}"
            )
        parsed = [parse(path, f"airflow.{section}[{i}]", entry) for i, entry in enumerate(entries)]
        name_key = {"connections": "conn_id", "pools": "pool_name", "variables": "variable_name"}[section]
        seen: set[str] = set()
        for i, entry in enumerate(parsed):
            if entry[name_key] in seen:
                raise UsageError(
                    f"{_where(path, entries[i])}: airflow.{section}[{i}]: duplicate {name_key} "
                    f"{entry[name_key]!r}; each must appear once"
                )
            seen.add(entry[name_key])
        result[section] = parsed
    return result


def _where(path: Path, entry: Any) -> str:
    return f"{path}:{getattr(entry, 'line', '?')}"


def _check_entry(
    path: Path, label: str, entry: Any, allowed: set[str], name_key: str
) -> tuple[str, str, str]:
    """Common checks: a mapping, known keys, a non-empty string name. Returns the name, and the place
    (file:line) and label (with the name) that every message about the entry starts with."""
    if not isinstance(entry, dict):
        raise UsageError(f"{path}: {label} must be a mapping, not {type(entry).__name__} ({entry!r})")
    where = _where(path, entry)
    name = entry.get(name_key)
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{where}: {label}: '{name_key}' is required and must be a non-empty string")
    label = f"{label} ({name})"
    unknown = sorted(str(k) for k in set(entry) - allowed)
    if unknown:
        raise UsageError(
            f"{where}: {label}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return name, where, label


def _connection(path: Path, label: str, entry: Any) -> dict[str, Any]:
    conn_id, where, label = _check_entry(path, label, entry, _CONN_KEYS, "conn_id")
    out: dict[str, Any] = {"conn_id": conn_id}
    for key in ("conn_type", "conn_host", "conn_schema", "conn_login", "conn_password", "conn_uri"):
        value = entry.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise UsageError(f"{where}: {label}: '{key}' must be a string, not {type(value).__name__}")
        out[key] = str(value)
    port = entry.get("conn_port")
    if port not in (None, ""):
        if isinstance(port, bool) or not isinstance(port, int | str) or not str(port).isdigit():
            raise UsageError(f"{where}: {label}: 'conn_port' must be a port number, not {port!r}")
        out["conn_port"] = int(port)

    extra = entry.get("conn_extra")
    if isinstance(extra, str) and extra.strip():
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: {label}: 'conn_extra' is a string but not JSON ({e})") from e
    if extra in (None, ""):
        extra = {}
    if not isinstance(extra, dict):
        raise UsageError(f"{where}: {label}: 'conn_extra' must be a mapping (or a JSON object string)")
    out["conn_extra"] = json.loads(json.dumps(extra))  # plain dicts, not _LineMap

    if "conn_uri" in out:
        mixed = sorted(k for k in out if k not in ("conn_id", "conn_uri", "conn_extra")) + (
            ["conn_extra"] if out["conn_extra"] else []
        )
        if mixed:
            raise UsageError(
                f"{where}: {label}: 'conn_uri' cannot be combined with {', '.join(mixed)}; "
                "put everything in the URI or drop conn_uri"
            )
    elif "conn_type" not in out:
        raise UsageError(
            f"{where}: {label}: 'conn_type' is required (e.g. aws, postgres) unless conn_uri is given"
        )
    return out


def _pool(path: Path, label: str, entry: Any) -> dict[str, Any]:
    name, where, label = _check_entry(path, label, entry, _POOL_KEYS, "pool_name")
    slots = entry.get("pool_slot")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < -1:
        raise UsageError(
            f"{where}: {label}: 'pool_slot' must be an integer >= 0 (or -1 for unlimited), not {slots!r}"
        )
    description = entry.get("pool_description")
    if description is not None and not isinstance(description, str):
        raise UsageError(f"{where}: {label}: 'pool_description' must be a string")
    return {"pool_name": name, "pool_slot": slots, "pool_description": description or ""}


def _variable(path: Path, label: str, entry: Any) -> dict[str, Any]:
    name, _, _ = _check_entry(path, label, entry, _VAR_KEYS, "variable_name")
    value = entry.get("variable_value")
    if value is None:
        value = ""
    elif not isinstance(value, str):
        value = json.dumps(value)
    return {"variable_name": name, "variable_value": value}


def to_import_files(
    settings: dict[str, list[dict[str, Any]]], out_dir: str | os.PathLike[str]
) -> dict[str, Path]:
    """Write the JSON files Airflow's ``pools``/``variables``/``connections import`` commands read.

    Args:
        settings: What :func:`load_settings` returned.
        out_dir: Folder to write ``pools.json``, ``variables.json`` and ``connections.json`` into.

    Returns:
        Section name -> file written. Empty sections get no file (nothing to import).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payloads: dict[str, dict[str, Any]] = {}
    if settings.get("pools"):
        payloads["pools"] = {
            p["pool_name"]: {
                "slots": p["pool_slot"],
                "description": p["pool_description"],
                "include_deferred": False,
            }
            for p in settings["pools"]
        }
    if settings.get("variables"):
        payloads["variables"] = {v["variable_name"]: v["variable_value"] for v in settings["variables"]}
    if settings.get("connections"):
        payloads["connections"] = {c["conn_id"]: _connection_json(c) for c in settings["connections"]}

    files: dict[str, Path] = {}
    for section, payload in payloads.items():
        target = out / f"{section}.json"
        # Connections may carry passwords: create the file private from the start.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")
        files[section] = target
    return files


def _connection_json(conn: dict[str, Any]) -> str | dict[str, Any]:
    if "conn_uri" in conn:
        return conn["conn_uri"]
    fields = {field: conn[key] for key, field in _CONN_FIELDS.items() if key in conn}
    if conn.get("conn_extra"):
        fields["extra"] = json.dumps(conn["conn_extra"], sort_keys=True)
    return fields


def _import_commands(files: dict[str, Path], airflow_bin: str) -> list[list[str]]:
    commands = []
    if "pools" in files:
        commands.append([airflow_bin, "pools", "import", str(files["pools"])])
    if "variables" in files:
        commands.append(
            [
                airflow_bin,
                "variables",
                "import",
                str(files["variables"]),
                "--action-on-existing-key",
                "overwrite",
            ]
        )
    if "connections" in files:
        commands.append([airflow_bin, "connections", "import", str(files["connections"]), "--overwrite"])
    return commands


# These commands report some per-entry failures on stdout and still exit 0.
_SOFT_FAILURES = ("failed to be updated", "Variable import failed", "Could not import connection")


def apply_settings(path: str | os.PathLike[str], airflow_bin: str = "airflow") -> None:
    """Import the file's pools, variables and connections into the Airflow the CLI points at.

    Existing entries with the same names are overwritten, so re-running after editing the file is
    the way to update them. Entries not in the file are left alone.

    Args:
        path: The ``airflow_settings.yaml``.
        airflow_bin: The ``airflow`` executable (its environment decides which metadata DB is used).

    Raises:
        UsageError: The file is invalid, or ``airflow_bin`` cannot be run.
        AirloomError: An import command failed; the message has the command and its output.
    """
    settings = load_settings(path)
    with tempfile.TemporaryDirectory(prefix="airloom-settings-") as tmp:
        for cmd in _import_commands(to_import_files(settings, tmp), airflow_bin):
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            except FileNotFoundError as e:
                raise UsageError(
                    f"cannot run {airflow_bin!r}: not found; install Airflow or pass --airflow-bin"
                ) from e
            except subprocess.CalledProcessError as e:
                raise AirloomError(
                    f"{path}: `{' '.join(cmd[:3])}` failed (exit {e.returncode}):\n"
                    f"{_tail(e.stderr) or _tail(e.stdout)}"
                ) from e
            soft = [line for line in proc.stdout.splitlines() if any(s in line for s in _SOFT_FAILURES)]
            if soft:
                raise AirloomError(
                    f"{path}: `{' '.join(cmd[:3])}` did not import everything:\n" + "\n".join(soft)
                )


def _tail(text: str | None, lines: int = 30) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m airloom.airflow.settings_file [FILE] [--airflow-bin BIN] [--out-dir DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m airloom.airflow.settings_file",
        description="Apply an Astro-style airflow_settings.yaml (connections, pools, variables) via the Airflow CLI.",
    )
    parser.add_argument("file", nargs="?", default="airflow_settings.yaml", help="default: %(default)s")
    parser.add_argument("--airflow-bin", default="airflow", help="airflow executable (default: %(default)s)")
    parser.add_argument(
        "--out-dir",
        help="only write the import JSON files into this folder and print their paths; apply nothing",
    )
    args = parser.parse_args(argv)
    try:
        if args.out_dir:
            for section, file in to_import_files(load_settings(args.file), args.out_dir).items():
                print(f"{section}: {file}")
        else:
            apply_settings(args.file, airflow_bin=args.airflow_bin)
            print(f"applied {args.file}")
    except AirloomError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
