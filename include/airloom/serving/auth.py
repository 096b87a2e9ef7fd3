"""API keys for ``airloom serve``: where they come from, and how a presented bearer token is checked.

Sources, all read once at start-up and merged (any listed key is valid):

- ``--api-keys-file PATH`` or ``AIRLOOM_API_KEYS_FILE``: one key per line; blank lines and lines
  starting with ``#`` are skipped.
- ``AIRLOOM_API_KEYS``: keys separated by commas.
- The Airflow connection ``airloom_serving`` as Airflow itself reads it from the environment,
  ``AIRFLOW_CONN_AIRLOOM_SERVING`` (JSON or URI): its password, and/or its extra ``api_keys`` (a
  list or a comma-separated string). The library does not import Airflow (the server runs with no
  scheduler), so a connection kept only in Airflow's metadata database or a secrets backend is not
  seen: deployments pass it as this variable, as compose and Kubernetes secrets usually do.

Only sha256 digests are kept; a token is checked against every digest with ``hmac.compare_digest``.
Keys are never logged: :meth:`ApiKeys.describe` names the sources and counts.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from airloom.exceptions import UsageError

KEYS_FILE_ENV = "AIRLOOM_API_KEYS_FILE"
KEYS_ENV = "AIRLOOM_API_KEYS"
CONN_ID = "airloom_serving"
CONN_ENV = "AIRFLOW_CONN_" + CONN_ID.upper()

log = logging.getLogger("airloom.serving")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """A set of sha256 key digests; ``check`` takes the raw ``Authorization`` header value."""

    def __init__(self, keys: list[str], sources: list[str]) -> None:
        self._digests = list(dict.fromkeys(_digest(k) for k in keys))
        self.sources = sources

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        presented = _digest(token.strip())
        ok = False
        for d in self._digests:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(presented, d)
        return ok

    def describe(self) -> str:
        return f"{len(self)} API key(s) from {', '.join(self.sources)}"


def _split(text: str, sep: str | None = None) -> list[str]:
    parts = text.splitlines() if sep is None else text.split(sep)
    return [p.strip() for p in parts if p.strip() and not p.strip().startswith("#")]


def _connection_keys(value: str) -> list[str]:
    """Keys in an Airflow connection given as JSON or URI (the formats of ``AIRFLOW_CONN_*``)."""
    password, extra = None, None
    if value.lstrip().startswith("{"):
        try:
            conn = json.loads(value)
        except ValueError as exc:
            raise UsageError(f"{CONN_ENV}: not valid JSON ({exc})") from exc
        password, extra = conn.get("password"), conn.get("extra")
        if isinstance(extra, str) and extra.strip():
            try:
                extra = json.loads(extra)
            except ValueError as exc:
                raise UsageError(f"{CONN_ENV}: field extra is not valid JSON ({exc})") from exc
    else:
        parts = urlsplit(value)
        password = unquote(parts.password) if parts.password else None
        query = parse_qs(parts.query)
        if "__extra__" in query:
            try:
                extra = json.loads(query["__extra__"][0])
            except ValueError as exc:
                raise UsageError(f"{CONN_ENV}: __extra__ is not valid JSON ({exc})") from exc
        else:
            extra = {k: v[0] for k, v in query.items()}
    keys = [password] if password else []
    found = extra.get("api_keys") if isinstance(extra, Mapping) else None
    if isinstance(found, str):
        keys += _split(found, ",")
    elif isinstance(found, list):
        keys += [str(k).strip() for k in found if str(k).strip()]
    elif found is not None:
        raise UsageError(f"{CONN_ENV}: extra field api_keys must be a list or a comma-separated string")
    return keys


def load_api_keys(
    keys_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> ApiKeys | None:
    """The configured keys, or None when no source is configured (the server then runs open).

    A source that is configured but holds no key is an error: it is a mistake, not a wish to run open.
    """
    env = os.environ if environ is None else environ
    keys: list[str] = []
    sources: list[str] = []
    path = keys_file or env.get(KEYS_FILE_ENV)
    if path:
        try:
            found = _split(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"{path}: cannot read the API keys file ({exc.strerror})") from exc
        if not found:
            raise UsageError(f"{path}: the API keys file has no key (one per line)")
        keys += found
        sources.append(str(path))
    if env.get(KEYS_ENV) is not None:
        found = _split(env[KEYS_ENV], ",")
        if not found:
            raise UsageError(f"{KEYS_ENV} is set but holds no key (comma-separated)")
        keys += found
        sources.append(KEYS_ENV)
    if env.get(CONN_ENV):
        found = _connection_keys(env[CONN_ENV])
        if not found:
            raise UsageError(f"{CONN_ENV}: the connection has neither a password nor extra api_keys")
        keys += found
        sources.append(f"connection {CONN_ID}")
    return ApiKeys(keys, sources) if keys else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, keys: ApiKeys | None, *, insecure_no_auth: bool = False) -> None:
    """Refuse to serve a non-loopback host without keys unless ``insecure_no_auth``; warn when open."""
    if keys is not None:
        if insecure_no_auth:
            raise UsageError(f"--insecure-no-auth contradicts the configured {keys.describe()}; drop one")
        log.info("requests need one of %s", keys.describe())
        return
    if is_loopback(host):
        log.warning("no API key configured: anyone on this machine can use the server (host %s)", host)
        return
    if not insecure_no_auth:
        raise UsageError(
            f"--host {host} is reachable from other machines and no API key is configured: give "
            f"--api-keys-file, {KEYS_FILE_ENV}, {KEYS_ENV} or the connection {CONN_ID} ({CONN_ENV}), "
            "or pass --insecure-no-auth if a proxy in front authenticates"
        )
    log.warning("--insecure-no-auth: serving %s without authentication", host)
