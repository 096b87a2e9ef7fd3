"""Sign-off decisions through Airflow's API server: the CLI's authenticated path.

``airloom signoff approve NAME VERSION --api-url URL`` signs in (``POST /auth/token``, Airflow 3's token
endpoint of the simple auth manager; or a token the user already has) and posts to the endpoint the
sign-off page posts to, ``/airloom/api/decisions`` of the UI plugin. The server names the decider from the
token and applies the deployment's policy, so the command cannot claim anyone else's name; the decision
is recorded with ``via: "api"``. Plain ``urllib``: the library needs no HTTP client of its own, and no
Airflow.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from airloom.exceptions import AirloomError, CheckFailed, UsageError

PLUGIN_PREFIX = "/airloom"
"""Where the UI plugin mounts the sign-off app (= ``airloom.airflow.signoff_ui.URL_PREFIX``)."""
DECISIONS_PATH = f"{PLUGIN_PREFIX}/api/decisions"
TOKEN_PATH = "/auth/token"


class SignOffClient:
    """One Airflow API server, e.g. ``SignOffClient("http://localhost:8080")``.

    :param api_url: the API server's base URL (with its base path, if it has one).
    :param timeout: seconds per request.
    """

    def __init__(self, api_url: str, timeout: float = 30.0) -> None:
        if not api_url.startswith(("http://", "https://")):
            raise UsageError(
                f"--api-url must be an http(s) URL such as http://localhost:8080, got {api_url!r}"
            )
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout

    def login(self, username: str, password: str) -> str:
        """A token for ``username`` from ``POST /auth/token``; UsageError when the server refuses them."""
        if not password:
            raise UsageError(f"no password for {username!r} on standard input")
        status, body = self._post(TOKEN_PATH, {"username": username, "password": password})
        if status in (200, 201) and isinstance(body, dict) and body.get("access_token"):
            return str(body["access_token"])
        raise UsageError(
            f"{self.api_url}{TOKEN_PATH}: signing in as {username!r} failed (HTTP {status}: {_detail(body)})"
        )

    def decide(self, token: str, name: str, version: int, decision: str, comment: str = "") -> dict[str, Any]:
        """Record ``decision`` on ``name/version`` as the user ``token`` names; the server's answer
        (``record``, ``status``, ``message``).

        Raises:
            CheckFailed: the sign-off rule refused it (403: not an approver, the requester, a system
                identity; 409: the round is closed or the user already approved).
            UsageError: not signed in (401), no such version (404), a malformed decision (422).
        """
        body = {"model": name, "version": int(version), "decision": decision, "comment": comment}
        status, answer = self._post(DECISIONS_PATH, body, token=token)
        if status == 200 and isinstance(answer, dict):
            return answer
        detail = _detail(answer)
        where = f"{self.api_url}{DECISIONS_PATH}"
        if status in (403, 409):
            raise CheckFailed(f"{where} refused the {decision} of {name}/{version}: {detail}")
        if status == 401:
            raise UsageError(f"{where}: not signed in (HTTP 401: {detail}); the token is missing or expired")
        if status in (400, 404, 422):
            raise UsageError(f"{where}: HTTP {status}: {detail}")
        raise AirloomError(f"{where}: unexpected HTTP {status}: {detail}")

    def _post(self, path: str, payload: dict[str, Any], token: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            self.api_url + path, data=json.dumps(payload).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (http(s) only)
                return resp.status, _json(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, _json(e.read())
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UsageError(
                f"{self.api_url}{path}: cannot reach the Airflow API server ({reason})"
            ) from None


def _json(data: bytes) -> Any:
    try:
        return json.loads(data or b"null")
    except ValueError:
        return data.decode(errors="replace")[:500]


def _detail(body: Any) -> str:
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):  # FastAPI's validation errors
            return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
        return str(detail)
    return str(body)
