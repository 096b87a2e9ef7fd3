"""Model sign-off inside the Airflow UI: a FastAPI app the ``plugins/airloom_signoff.py`` plugin mounts.

Reviewers see the versions awaiting sign-off with their model card, eval report, validation report,
GX Data Docs and EDA report, and approve or reject with a comment. Identity and role come from
Airflow's own auth manager (Bearer token or the UI's ``_token`` cookie); the registry stays the
system of record: every decision goes through :func:`airloom.governance.signoff.record_decision`.

Who may do what:

- view (page, pending list): Airflow read access to the DAG that registered the version
  (``llm_finetune`` when unknown); the reports behind the tasks' extra links (``/files``, and
  ``/evaluation-day`` for a backfill day): read access to ``llm_finetune`` — any role from Viewer up
  under SimpleAuthManager. Those routes serve ``runs/`` and ``evaluations/`` (and a local registry) by
  their key, which is the path under ``$AIRLOOM_HOME`` and the key in the artifact store alike: from the
  folder when the store is local, from the store (:func:`open_artifacts`) when it is ``s3://`` — the API
  server has no worker's disk;
- decide: the access Airflow asks to answer that DAG's human-in-the-loop tasks (edit on its
  ``HITL_DETAIL``: User and up), then the sign-off policy the DAG's sensor and deploy apply
  (:func:`current_policy`; the rule is :func:`airloom.governance.signoff.why_not_decide`): the
  ``airloom_signoff_approvers`` and ``airloom_signoff_min_approvals`` Variables, separation of duties
  (the requester cannot approve), never a ``system:*`` identity, a person's approval counted once.

A decision made here is recorded with ``via`` ``plugin`` (the page's session cookie) or ``api`` (a
Bearer token: ``airloom signoff approve … --api-url``); a deployment with
``AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY`` counts only these. The card compares the candidate with
production on the same examples (:func:`comparison`) and the page confirms each decision afterwards.

Plugin routes are not authenticated by Airflow: every route here depends on ``get_user`` itself.
The plugin builds the app on the first request, so importing this module costs only the API server.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import quote, urlparse

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import FastAPI, HTTPException, Query, Request, status
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from markupsafe import Markup
from pydantic import BaseModel, ConfigDict, Field, model_validator

from airloom.airflow.defaults import SIGNOFF_APPROVERS_VARIABLE
from airloom.airflow.links import served_key
from airloom.reports import render, rounded

if TYPE_CHECKING:
    from airloom.artifacts import Artifacts

log = logging.getLogger(__name__)

URL_PREFIX = "/airloom"
"""Where ``plugins/airloom_signoff.py`` mounts the app."""
DEFAULT_DAG_ID = "llm_finetune"
"""Whose permissions guard a version that records no ``lineage.dag_id`` (registered from the CLI)."""
REGISTRY_VARIABLE = "airloom_registry"
APPROVERS_VARIABLE = SIGNOFF_APPROVERS_VARIABLE
COMPARISON_FILE = "evaluation/comparison.json"
"""Where ``llm_finetune`` stores the quality gates' candidate-vs-production comparison in a version."""
SERVED_PREFIXES = ("runs", "evaluations")
"""The report folders the file routes serve: under ``$AIRLOOM_HOME``, and as keys of the artifact store."""

# ---------------------------------------------------------------------------------------------
# Settings read per request, so a changed Variable applies without restarting the API server.


def _variable(key: str) -> str:
    from airflow.models.variable import Variable

    try:
        value = Variable.get(key, default_var="")
    except Exception:  # a missing metadata DB must not take the page down; the default applies
        log.exception("could not read the Airflow Variable %s; using the default", key)
        value = ""
    return (value or "").strip()


def registry_uri() -> str:
    """The ``airloom_registry`` Variable when set, else ``AIRLOOM_REGISTRY`` / ``$AIRLOOM_HOME/registry``."""
    from airloom.settings import registry_uri as default_uri

    return _variable(REGISTRY_VARIABLE) or default_uri()


_S3_CLIENTS: dict[tuple[Any, ...], Any] = {}


def server_s3_client(aws_conn_id: str = "aws_default"):
    """A boto3 S3 client with the credentials of the ``aws_conn_id`` connection (as the operators get them:
    ``S3Hook(aws_conn_id).get_conn()``; its extra ``endpoint_url`` points at MinIO or moto); boto3's default
    chain (environment, instance profile, ``AWS_ENDPOINT_URL``) when no such connection exists.

    The Task SDK's hooks look up connections in the metastore only in processes Airflow marks as
    servers, and in 3.3 the API server is not marked: an S3Hook here would silently fall back to
    boto3's defaults. So the connection is read through the core model, which includes the metastore
    and the secrets backends. It is read on every call, so a changed connection applies at once; the client
    (a few hundred ms to build; a report page's assets are as many requests) is reused while the connection
    and the ``AWS_*`` environment stay the same.
    """
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    try:
        conn = Connection.get_connection_from_secrets(aws_conn_id)
    except AirflowNotFoundException:
        conn = None
    fingerprint = (
        aws_conn_id,
        conn.get_uri() if conn is not None else None,
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))),
    )
    client = _S3_CLIENTS.get(fingerprint)
    if client is None:

        class _ServerS3Hook(S3Hook):
            @classmethod
            def get_connection(cls, conn_id: str):
                if conn is None:  # the hook then uses boto3's defaults
                    raise AirflowNotFoundException(f"no connection {conn_id!r}")
                return conn

        client = _ServerS3Hook(aws_conn_id=aws_conn_id).get_conn()
        if len(_S3_CLIENTS) >= 8:  # old connections' clients
            _S3_CLIENTS.clear()
        _S3_CLIENTS[fingerprint] = client
    return client


def open_registry(aws_conn_id: str = "aws_default"):
    """The registry, with S3 credentials from ``aws_conn_id`` as the tasks get them (:func:`server_s3_client`)."""
    from airloom.registry.registry import ModelRegistry
    from airloom.registry.store import S3Store, open_store

    uri = registry_uri()
    if not uri.startswith("s3://"):
        return ModelRegistry(open_store(uri))
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return ModelRegistry(S3Store(bucket, prefix, client=server_s3_client(aws_conn_id)))


def open_artifacts(aws_conn_id: str = "aws_default") -> Artifacts:
    """The artifact store the tasks write to (``AIRLOOM_ARTIFACTS``, as in the workers' environment), with
    S3 credentials from ``aws_conn_id`` (:func:`server_s3_client`) when it is ``s3://``."""
    from airloom.artifacts import Artifacts, artifacts_uri, is_remote

    uri = artifacts_uri()
    return Artifacts(uri, client=server_s3_client(aws_conn_id) if is_remote(uri) else None)


def current_policy():
    """The policy ``llm_finetune``'s sensor and deploy apply: separation of duties, the approvers and
    minimum approvals Variables, and the deployment's ``AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY``."""
    from airloom.airflow.defaults import SIGNOFF_POLICY, SIGNOFF_POLICY_VARIABLES
    from airloom.governance.signoff import SignOffPolicy

    return SignOffPolicy.from_params(
        {**SIGNOFF_POLICY, **{key: _variable(var) for key, var in SIGNOFF_POLICY_VARIABLES.items()}}
    )


def served_roots(registry=None) -> list[Path]:
    """Folders the file route may serve from: run outputs, evaluations, a local registry in AIRLOOM_HOME.

    URLs are relative to ``$AIRLOOM_HOME`` (the form :func:`airloom.airflow.links.files_url` builds
    for the tasks' extra links), so only folders inside it can be served; a registry on S3 or
    elsewhere is read through the card API instead.
    """
    from airloom.registry.store import LocalStore
    from airloom.settings import home

    base = home()
    roots = [base / prefix for prefix in SERVED_PREFIXES]
    if registry is not None and isinstance(registry.store, LocalStore):
        roots.append(registry.store.root)
    return [r.resolve() for r in roots if r.resolve().is_relative_to(base)]


@dataclass(frozen=True)
class Served:
    """What the file routes serve: ``roots`` on this machine's disk, and, when the artifact store is remote
    (``store``), the keys under :data:`SERVED_PREFIXES` from the store instead of the disk."""

    roots: list[Path]
    store: Artifacts | None = None

    def from_store(self, key: str | None) -> bool:
        """Whether ``key`` (relative to ``$AIRLOOM_HOME`` / the store) is read from the remote store."""
        return self.store is not None and bool(key) and str(key).split("/", 1)[0] in SERVED_PREFIXES

    def allows(self, key: str | None) -> bool:
        """Whether the file route would serve ``key`` (it may still not exist)."""
        from airloom.settings import home

        if not key:
            return False
        if self.from_store(key):
            return True
        target = (home() / key).resolve()
        return any(target.is_relative_to(root) for root in self.roots)

    def describe(self) -> str:
        from airloom.settings import home

        names = [r.relative_to(home()).as_posix() + "/" for r in self.roots]
        if self.store is not None:
            names = [f"{p}/" for p in SERVED_PREFIXES] + [
                n for n in names if n.rstrip("/") not in SERVED_PREFIXES
            ]
        return ", ".join(names)


def served_files(registry=None) -> Served:
    """The served folders (:func:`served_roots`) and, when ``AIRLOOM_ARTIFACTS`` is ``s3://``, the store that
    holds ``runs/`` and ``evaluations/`` (a local registry is still read from its folder)."""
    from airloom.artifacts import artifacts_uri, is_remote

    roots = served_roots(registry)
    if not is_remote(artifacts_uri()):
        return Served(roots)
    from airloom.settings import home

    local = [r for r in roots if r.relative_to(home()).parts[:1] not in {(p,) for p in SERVED_PREFIXES}]
    return Served(local, open_artifacts())


def _refuse_outside(rel_path: str, served: Served) -> HTTPException:
    return HTTPException(
        status.HTTP_403_FORBIDDEN, f"{rel_path!r} resolves outside the served folders ({served.describe()})"
    )


def served_store_key(rel_path: str, served: Served) -> str | None:
    """The key ``rel_path`` names in the remote store, or None when it is read from the disk; 403 for a key
    with ``..``, ``.`` or empty segments (nothing is resolved on a store, so they are refused outright)."""
    if served.store is None or rel_path.split("/", 1)[0] not in SERVED_PREFIXES:
        return None
    key = rel_path.rstrip("/")  # a folder's URL with a trailing slash: its index.html
    if "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise _refuse_outside(rel_path, served)
    return key


def resolve_served_file(rel_path: str, served: Served) -> Path:
    """The file at ``$AIRLOOM_HOME/rel_path``; 403 unless it resolves inside one of ``served.roots``.

    ``resolve()`` follows symlinks and ``..`` first, so neither a symlink nor an encoded ``%2e%2e``
    reaches a file outside the served folders.
    """
    from airloom.settings import home

    if not rel_path or "\x00" in rel_path or Path(rel_path).is_absolute():
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{rel_path!r} is not a path relative to AIRLOOM_HOME")
    target = (home() / rel_path).resolve()
    if not any(target.is_relative_to(root) for root in served.roots):
        raise _refuse_outside(rel_path, served)
    if target.is_dir() and (target / "index.html").is_file():
        target = target / "index.html"
    if not target.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{rel_path} does not exist under AIRLOOM_HOME")
    return target


def _read_key(store: Artifacts, key: str) -> bytes | None:
    """A small object of the store (a report, metrics, a chart), None when it does not exist; 502 when the
    store cannot be read."""
    from botocore.exceptions import BotoCoreError

    from airloom.exceptions import RegistryError, UsageError

    try:
        got = store.store.get_with_etag(key)
    except UsageError:  # a reserved name (.airloom-…): never an artifact
        return None
    except (RegistryError, BotoCoreError) as exc:
        log.exception("reading %s", store.uri(key))
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"could not read {store.uri(key)}: {exc}") from exc
    return None if got is None else got[0]


def _stream_key(store: Artifacts, rel_path: str, key: str) -> Response:
    """The object at ``key`` (or ``key/index.html`` for a folder), streamed: a run folder also holds large
    files (predictions, a model), which the API server should not read into memory."""
    from botocore.exceptions import BotoCoreError, ClientError

    from airloom.exceptions import UsageError
    from airloom.registry.store import S3Store

    s3 = store.store
    assert isinstance(s3, S3Store)
    denied = None
    for candidate in (key, f"{key}/index.html"):
        try:
            obj = s3.client.get_object(Bucket=s3.bucket, Key=s3._key(candidate))
        except UsageError as exc:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from exc
        except ClientError as exc:
            code = S3Store._code(exc)
            if code in ("NoSuchKey", "404"):
                continue
            if code in ("AccessDenied", "403"):  # S3's answer for a missing key without s3:ListBucket
                denied = exc
                continue
            log.exception("reading %s", s3.uri(candidate))
            raise HTTPException(
                status.HTTP_502_BAD_GATEWAY, f"could not read {s3.uri(candidate)}: {exc}"
            ) from exc
        except BotoCoreError as exc:  # no route to the endpoint, no credentials
            log.exception("reading %s", s3.uri(candidate))
            raise HTTPException(
                status.HTTP_502_BAD_GATEWAY, f"could not read {s3.uri(candidate)}: {exc}"
            ) from exc
        body = obj["Body"]

        def chunks(body=body) -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(1 << 20)
            finally:
                body.close()

        media_type = mimetypes.guess_type(candidate)[0] or "text/plain"  # FileResponse's rule
        headers = {**REPORT_HEADERS, "Content-Length": str(obj["ContentLength"])}
        return StreamingResponse(chunks(), media_type=media_type, headers=headers)
    if denied is not None:
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY,
            f"the API server may not read {s3.uri(key)} (missing, or its credentials lack s3:GetObject and "
            f"s3:ListBucket on the artifact store): {denied}",
        )
    raise HTTPException(
        status.HTTP_404_NOT_FOUND, f"{rel_path} does not exist in the artifact store {store.root}"
    )


def file_href(base: str, path: str | os.PathLike[str] | None, served: Served) -> str | None:
    """URL of a report through the file route (a local path under a served folder, or a URI of the artifact
    store under ``runs/`` or ``evaluations/``), or None when the route would not serve it."""
    key = served_key(path)
    if not served.allows(key):
        return None
    return f"{base}/files/{quote(str(key))}"


# ---------------------------------------------------------------------------------------------
# Authorization through Airflow's auth manager. AuthManagerDep fails inside a mounted sub-app
# (the auth manager lives on the parent app's state), so get_auth_manager() is called instead.


def _dag_details(dag_id: str) -> DagDetails:
    from airflow.configuration import conf

    team = None
    if conf.getboolean("core", "multi_team", fallback=False):
        from airflow.models.dag import DagModel

        team = DagModel.get_team_name(dag_id)
    return DagDetails(id=dag_id, team_name=team)


def can_view(user, dag_id: str) -> bool:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.HITL_DETAIL, details=_dag_details(dag_id), user=user
    )


def can_respond(user, dag_id: str) -> bool:
    """What Airflow itself requires to answer a human-in-the-loop task of ``dag_id``."""
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().is_authorized_dag(
        method="PUT", access_entity=DagAccessEntity.HITL_DETAIL, details=_dag_details(dag_id), user=user
    )


def why_not_decide(
    user, dag_id: str, status_: dict[str, Any], policy, decision: str, via: str = "plugin"
) -> tuple[int, str] | None:
    """(HTTP status, reason) when ``user`` may not record ``decision`` on this round, else None.

    Airflow's permission first, then the library's one rule
    (:func:`airloom.governance.signoff.why_not_decide`: system identity, path, approver list, round state,
    separation of duties, already approved); a rejection also needs an open round here.
    """
    from airloom.governance.signoff import why_not_decide as policy_refusal

    name = user.get_name()
    ref = f"{status_['name']}/{status_['version']}"
    if not can_respond(user, dag_id):
        return (
            status.HTTP_403_FORBIDDEN,
            f"{name!r} may not sign off {ref}: Airflow grants them no edit access to the human-in-the-loop "
            f"actions of DAG {dag_id!r} (read-only role)",
        )
    refused = policy_refusal(
        status_, policy, name, decision, via=via, approvers=f"the Variable {APPROVERS_VARIABLE}"
    )
    if refused:
        return (status.HTTP_409_CONFLICT if refused.conflict else status.HTTP_403_FORBIDDEN), refused.reason
    if status_["state"] != "pending":
        return status.HTTP_409_CONFLICT, f"{ref} is already {status_['state']}; its round is closed"
    return None


# ---------------------------------------------------------------------------------------------
# What a reviewer sees for one version.


def version_dag(metadata: dict[str, Any]) -> tuple[str, str | None]:
    lineage = metadata.get("lineage") or {}
    return str(lineage.get("dag_id") or DEFAULT_DAG_ID), lineage.get("run_id")


def _evidence_entry(label: str, item: dict[str, Any], base: str, served: Served) -> dict[str, Any]:
    """One evidence item of the request, with whether the file still has the hash the request recorded
    (read from the artifact store when the store is remote and holds it, else from the disk)."""
    from airloom.artifacts import is_remote
    from airloom.registry.store import sha256_file

    entry = {
        "label": label,
        "uri": item.get("uri"),
        "sha256": item.get("sha256"),
        "href": None,
        "check": None,
    }
    if "value" in item:
        entry["value"] = item["value"]
        return entry
    uri = item.get("uri") or ""
    if not uri:
        return entry
    key = served_key(uri)
    entry["href"] = file_href(base, uri, served)
    if served.store is not None and served.from_store(key):
        if "files" in item:  # a folder's digest is over its files: not comparable with one object
            return entry
        try:
            data = _read_key(served.store, str(key))
        except HTTPException:  # logged; the page still lists the version
            entry["check"] = "not readable from the artifact store"
            return entry
        if data is None:
            entry["check"] = "missing"
        else:
            entry["check"] = (
                "unchanged"
                if hashlib.sha256(data).hexdigest() == item.get("sha256")
                else "changed since request"
            )
        return entry
    if is_remote(uri):  # an object of some other bucket: shown, not checked
        return entry
    path = Path(uri)
    if path.is_file():
        entry["check"] = (
            "unchanged" if sha256_file(path)[0] == item.get("sha256") else "changed since request"
        )
    elif not path.exists():
        entry["check"] = "missing"
    return entry


def _parent(location: str) -> str:
    return (
        location.rstrip("/").rsplit("/", 1)[0]
        if "://" in location
        else str(Path(location).expanduser().parent)
    )


def data_reports(metadata: dict[str, Any], base: str, served: Served) -> list[dict[str, Any]]:
    """Validation report, Data Docs and EDA report of the data-quality run that prepared the training dataset.

    ``lineage.dataset_run`` is the run folder ``…/runs/llm_data_quality/<run>`` (older versions: the
    parent of ``lineage.dataset``), a path or, handed over between workers, its URI in the artifact store;
    its task folders hold validation's ``validation.json``, ``validation.html`` and ``data_docs/``, and the
    EDA ``report.html``. A remote store is listed (the API server has no worker's disk), a local folder read.
    """

    out: list[dict[str, Any]] = []
    explicit = metadata.get("reports") or {}
    for label, path in explicit.items() if isinstance(explicit, dict) else []:
        out.append({"label": str(label), "uri": str(path), "href": file_href(base, str(path), served)})
    lineage = metadata.get("lineage") or {}
    dataset = lineage.get("dataset")
    if lineage.get("dataset_run"):  # a catalog dataset: the run that prepared it
        run = str(lineage["dataset_run"])
    elif dataset:  # a dataset folder of the run itself (prepared before the catalog)
        run = _parent(str(dataset))
    else:
        return out
    key = served_key(run)
    if served.store is not None and served.from_store(key) and str(key).startswith("runs/"):
        from botocore.exceptions import BotoCoreError

        from airloom.exceptions import AirloomError

        store = served.store
        prefix = f"{key}/"
        try:
            present = {k[len(prefix) :] for k in store.list(prefix)}
        except (AirloomError, BotoCoreError):  # the page still lists the version, without these reports
            log.exception("listing %s", store.uri(prefix))
            return out

        def exists(rel: str) -> bool:
            return rel in present

        def location(rel: str) -> str:
            return store.uri(prefix + rel)

        tasks = sorted({rel.split("/", 1)[0] for rel in present if "/" in rel})
    else:
        if "://" in run:
            return out
        run_folder = Path(run).expanduser()
        if not run_folder.is_dir():
            return out

        def exists(rel: str) -> bool:
            return (run_folder / rel).is_file()

        def location(rel: str) -> str:
            return str(run_folder / rel)

        tasks = sorted(p.name for p in run_folder.iterdir() if p.is_dir())

    def report(label: str, rel: str) -> dict[str, Any]:
        uri = location(rel)
        return {"label": label, "uri": uri, "href": file_href(base, uri, served)}

    for task in tasks:
        if exists(f"{task}/validation.json"):
            # validation.html reads offline; the GX Data Docs load their CSS and JS from CDNs
            page = f"{task}/validation.html"
            out.append(report("data validation", page if exists(page) else f"{task}/validation.json"))
            index = f"{task}/data_docs/index.html"  # where validate_stream builds them
            if exists(index):
                out.append(report("Data Docs", index))
        if exists(f"{task}/report.html") and exists(f"{task}/profile.json"):
            out.append(report("EDA report", f"{task}/report.html"))
    return out


def comparison(registry, mv) -> dict[str, Any] | None:
    """Candidate vs. production on the same examples, from the ``evaluation/comparison.json`` the quality
    gates wrote (:func:`airloom.evaluation.report.write_report`: paired bootstrap per metric) and stored in
    the version; None for a version without one (registered from the CLI).

    Rows are rounded for reading: the delta with its bootstrap interval and the number of paired examples,
    and a verdict only where the interval excludes zero.
    """
    import json

    from airloom.exceptions import AirloomError

    key = f"{registry.model_prefix(mv.name)}versions/{mv.version}/{COMPARISON_FILE}"
    if not any(f.get("path") == COMPARISON_FILE for f in mv.files):
        return None
    try:
        data = json.loads(registry.store.get_bytes(key))
    except (AirloomError, ValueError):
        log.exception("unreadable %s in %s", COMPARISON_FILE, mv.ref)
        return None
    confidence = (data.get("bootstrap") or {}).get("confidence", 0.95)
    rows, sizes = [], set()
    for metric, m in (data.get("metrics") or {}).items():
        if not isinstance(m, dict):
            continue
        paired = m.get("paired") or {}
        if paired.get("n"):
            sizes.add(int(paired["n"]))
        verdict = None
        low, high = paired.get("low"), paired.get("high")
        if low is not None and high is not None and m.get("improved") is not None and (low > 0 or high < 0):
            verdict = "better" if m["improved"] else "worse"
        elif paired:
            verdict = "no clear difference"
        rows.append(
            {
                "metric": metric,
                "candidate": rounded(m.get("candidate")),
                "production": rounded(m.get("baseline")),
                "delta": rounded(paired.get("delta", m.get("delta")), signed=True),
                "interval": f"[{rounded(low, True)}, {rounded(high, True)}]" if paired else "–",
                "n": paired.get("n"),
                "verdict": verdict,
            }
        )
    return {
        "candidate_model": data.get("candidate_model"),
        "production_model": data.get("baseline_model"),
        "confidence": f"{confidence:.0%}",
        "n": next(iter(sizes)) if len(sizes) == 1 else None,  # one n for all metrics: say it once
        "paired": bool(sizes),
        "rows": rows,
    }


def describe(
    registry, mv, status_: dict[str, Any], user, policy, base: str, served: Served
) -> dict[str, Any]:
    from airloom.governance.signoff import waiting_for

    dag_id, run_id = version_dag(mv.metadata)
    evidence = [
        _evidence_entry(label, item, base, served) for label, item in (status_.get("evidence") or {}).items()
    ]
    blocked_approve = why_not_decide(user, dag_id, status_, policy, "approve")
    blocked_reject = why_not_decide(user, dag_id, status_, policy, "reject")
    return {
        "model": mv.name,
        "version": mv.version,
        "state": status_["state"],
        "requested_by": status_["requested_by"],
        "requested_at": status_["requested_at"],
        "request_id": status_["request_id"],
        "approvals": status_["approvals"],
        "rejections": status_["rejections"],
        "not_counted": status_.get("not_counted", []),
        "required_approvals": status_["required_approvals"],
        "waiting_for": waiting_for(status_, policy),
        "created_at": mv.created_at,
        "created_by": mv.created_by,
        "dag_id": dag_id,
        "run_id": run_id,
        "metrics": mv.metadata.get("metrics") or {},
        "comparison": comparison(registry, mv),
        "gates": mv.metadata.get("gates"),
        "base_model": mv.metadata.get("base_model"),
        "evidence": evidence,
        "reports": data_reports(mv.metadata, base, served),
        "card_url": f"{base}/api/models/{quote(mv.name)}/{mv.version}/card",
        "can_approve": blocked_approve is None,
        "can_reject": blocked_reject is None,
        "why_not": None if blocked_approve is None else blocked_approve[1],
    }


def list_versions(
    user,
    *,
    dag_id: str | None = None,
    run_id: str | None = None,
    include_decided: bool = False,
    base: str = "",
) -> list[dict[str, Any]]:
    """Versions with an open sign-off round the user may see (all rounds of one run when filtered by run)."""
    from airloom.governance.signoff import signoff_status

    registry = open_registry()
    policy = current_policy()
    served = served_files(registry)
    visible: dict[str, bool] = {}
    out = []
    for name in registry.list_models():
        for mv in registry.list_versions(name):
            v_dag, v_run = version_dag(mv.metadata)
            if dag_id and v_dag != dag_id or run_id and v_run != run_id:
                continue
            if v_dag not in visible:
                visible[v_dag] = can_view(user, v_dag)
            if not visible[v_dag]:
                continue
            st = signoff_status(registry, name, mv.version, policy)
            if st["request_id"] is None:
                continue
            if st["state"] != "pending" and not (include_decided or run_id):
                continue
            out.append(describe(registry, mv, st, user, policy, base, served))
    return sorted(out, key=lambda e: (e["state"] != "pending", e["requested_at"] or ""), reverse=False)


# ---------------------------------------------------------------------------------------------
# The HTML page: self-contained (inline CSS and JS, nothing from a CDN).


def render_card(markdown_text: str) -> Markup:
    """The model card as HTML: YAML front matter in a <pre>, the body through markdown-it (raw HTML off)."""
    header = ""
    body = markdown_text
    if markdown_text.startswith("---\n"):
        end = markdown_text.find("\n---\n", 4)
        if end != -1:
            header, body = markdown_text[4:end], markdown_text[end + 5 :]
    try:
        from markdown_it import MarkdownIt

        rendered = Markup(MarkdownIt("commonmark", {"html": False}).enable("table").render(body))
    except ImportError:  # markdown-it-py arrives with Airflow (via rich); plain text if it ever does not
        rendered = Markup("<pre>{}</pre>").format(body)
    return (Markup('<pre class="front">{}</pre>').format(header) if header else Markup()) + rendered


def decision_confirmation(registry, user, decided: str) -> str | None:
    """The confirmation of the decision ``MODEL/VERSION/RECORD_ID`` if ``user`` made it, else None (a link
    cannot make the page claim someone else's decision, or one that was never recorded)."""
    from airloom.exceptions import AirloomError
    from airloom.governance.signoff import signoff_status

    model, _, rest = decided.partition("/")
    version, _, record_id = rest.partition("/")
    if not (model and version.isdigit() and record_id):
        return None
    try:
        prefix = f"{registry.model_prefix(model)}signoffs/{int(version)}/"
        record = next(
            (
                r
                for r in registry.read_records(prefix)
                if r.get("id") == record_id and r.get("kind") == "decision"
            ),
            None,
        )
        if record is None or record.get("user") != user.get_name():
            return None
        policy = current_policy()
        return confirmation(record, signoff_status(registry, model, int(version), policy), policy)
    except AirloomError:
        return None


def render_page(
    user,
    entries: list[dict[str, Any]],
    cards: dict[tuple[str, int], str],
    base: str,
    title: str,
    flash: str | None = None,
) -> str:
    ui_root = base.removesuffix(URL_PREFIX)  # Airflow's own pages live beside the mount
    shown = []
    for e in entries:
        gates = e["gates"] if isinstance(e["gates"], list) else []  # as QualityGateOperator records them
        run_url = (
            f"{ui_root}/dags/{quote(e['dag_id'])}/runs/{quote(e['run_id'], safe='')}" if e["run_id"] else None
        )
        shown.append(
            {
                "waiting_for": None,  # entries built before these keys existed still render
                "comparison": None,
                "not_counted": [],
                **e,
                "gates": [g for g in gates if isinstance(g, dict)],
                "metrics_shown": {k: rounded(v) for k, v in (e["metrics"] or {}).items()},
                "run_url": run_url,
                "card": cards.get((e["model"], e["version"]), ""),
            }
        )
    return render("signoff.html.j2", user=user.get_name(), entries=shown, base=base, title=title, flash=flash)


# ---------------------------------------------------------------------------------------------
# The app.


class DecisionBody(BaseModel):
    """A decision. There is no user field: the decider is whoever the token or cookie says."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=1)
    decision: Literal["approve", "reject"]
    comment: str = Field(default="", max_length=2000)
    request_id: str | None = Field(
        default=None,
        description="The round the reviewer saw; a newer request makes the decision stale (409).",
    )

    @model_validator(mode="after")
    def _reject_needs_reason(self) -> DecisionBody:
        if self.decision == "reject" and not self.comment.strip():
            raise ValueError("a rejection needs a comment saying why (field 'comment')")
        return self


def _via(request: Request) -> str:
    """``api`` for a Bearer token (``airloom signoff approve --api-url``, scripts), ``plugin`` for the page's
    session cookie: both authenticated by Airflow, told apart in the record."""
    return "api" if request.headers.get("authorization", "").lower().startswith("bearer ") else "plugin"


def confirmation(record: dict[str, Any], status_: dict[str, Any], policy) -> str:
    """What the decider is told afterwards, e.g. "Approved demo-model v3 as reviewer — 1 of 2 approvals;
    waiting for 1 more approval from one of lead"."""
    from airloom.governance.signoff import waiting_for

    done = "Approved" if record["decision"] == "approve" else "Rejected"
    text = (
        f"{done} {record['name']} v{record['version']} as {record['user']} — "
        f"{len(status_['approvals'])} of {status_['required_approvals']} approvals"
    )
    if status_["state"] == "approved":
        return text + "; the version is approved and may be deployed"
    if status_["state"] == "rejected":
        return text + "; the version is rejected and will not be deployed"
    return f"{text}; {waiting_for(status_, policy)}"


def _csrf_check(request: Request) -> None:
    """Refuse cookie-authenticated writes that a browser sent from another origin.

    The ``_token`` cookie is SameSite=Lax, which already keeps it off cross-site POSTs; this also
    covers same-site origins (sibling subdomains). Requests with a Bearer header are not at risk
    (a browser never adds that header by itself), so API clients and the CLI need no Origin.
    """
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        return
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send the decision as application/json")
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cookie-authenticated decisions need an Origin header")
    allowed = {request.url.netloc}
    from airflow.configuration import conf

    if base_url := conf.get("api", "base_url", fallback=None):
        allowed.add(urlparse(base_url).netloc)
    if urlparse(origin).netloc not in allowed:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"cross-origin decision from {origin!r} refused")


REPORT_HEADERS = {
    # Reports embed dataset text: a sandboxed, opaque origin keeps any script in them away from the
    # Airflow session (no same-origin API calls with the cookie). So pages inline their images: an opaque
    # origin's own requests need not carry the session cookie.
    "Content-Security-Policy": "sandbox allow-scripts allow-popups",
    "X-Content-Type-Options": "nosniff",
}


def _check_report_access(user) -> None:
    """Reports and run outputs are readable by whoever may read the training DAG (every role from Viewer)."""
    if not can_view(user, DEFAULT_DAG_ID):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"no read access to DAG {DEFAULT_DAG_ID!r}")


def _base(request: Request) -> str:
    """The sub-app's URL prefix as the browser sees it (the Airflow root path plus the mount)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _http_error(exc: Exception) -> HTTPException:
    from airloom.exceptions import CheckFailed, ConflictError, RegistryError, UsageError

    if isinstance(exc, ConflictError):
        return HTTPException(status.HTTP_409_CONFLICT, str(exc))
    if isinstance(exc, RegistryError):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    if isinstance(exc, CheckFailed):
        return HTTPException(status.HTTP_409_CONFLICT, str(exc))
    if isinstance(exc, UsageError):
        return HTTPException(status.HTTP_400_BAD_REQUEST, str(exc))
    raise exc


def _load_version(registry, model: str, version: int):
    from airloom.exceptions import AirloomError

    try:
        return registry.get(model, version)
    except AirloomError as exc:
        raise _http_error(exc) from exc


def _evaluation_day_from_store(store: Artifacts, rel_path: str, key: str) -> str:
    """:func:`airloom.reports.evaluation_day.render_evaluation_day` for a day in the remote store.

    With workers that share no disk each trend task writes its chart in its own run folder, so there is no
    chart beside the days to read: the trend is built on request from every day published under the
    model's folder (:func:`airloom.evaluation.backfill.stored_metrics`, each verified against its manifest),
    this day included. Without published days (a layout of the local default copied to the store), the
    nearest ``trend.json``/``trend.png`` above the day is used, as on disk. Everything is read into a
    temporary folder of the same layout, the page rendered from there, and the folder removed.
    """
    import tempfile

    from botocore.exceptions import BotoCoreError

    from airloom.artifacts import Artifacts
    from airloom.evaluation.backfill import build_trend, stored_metrics
    from airloom.exceptions import AirloomError
    from airloom.reports.evaluation_day import render_evaluation_day

    if key.rsplit("/", 1)[-1] != "metrics.json":
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{rel_path} is not a backfill day's metrics.json")
    metrics = _read_key(store, key)
    if metrics is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"{rel_path} does not exist in the artifact store {store.root}"
        )
    parts = key.split("/")
    with tempfile.TemporaryDirectory(prefix="airloom-evaluation-day-") as tmp:
        local = Path(tmp) / "tree"
        (local / key).parent.mkdir(parents=True)
        (local / key).write_bytes(metrics)
        ds_at = next((i for i, p in enumerate(parts[:-1]) if p.startswith("ds=")), 0)
        found: list[tuple[str, dict]] = []
        if ds_at > 1:  # <served folder>/…/<model>/ds=<day>/…: the model's published days
            model_key = "/".join(parts[:ds_at])
            reader = Artifacts(store.root, client=store.store.client, cache_dir=Path(tmp) / "cache")
            try:
                found = stored_metrics(reader, model_key)
            except (AirloomError, BotoCoreError, ValueError):  # the day is still shown, without a trend
                log.exception("reading the days under %s", store.uri(model_key))
            if found:
                build_trend(store.uri(model_key), found=found, out_dir=local / model_key)
        if not found:
            for depth in range(len(parts) - 1, 0, -1):  # the day's folder up to the served folder itself
                folder = "/".join(parts[:depth])
                got = {name: _read_key(store, f"{folder}/{name}") for name in ("trend.json", "trend.png")}
                for name, data in got.items():
                    if data is not None:
                        (local / folder / name).write_bytes(data)
                if any(data is not None for data in got.values()):
                    break
        try:
            return render_evaluation_day(local / key, stop=local / parts[0])
        except ValueError as e:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(e).replace(str(local), store.root)) from e


def create_app() -> FastAPI:
    app = FastAPI(
        title="Airloom model sign-off",
        description="Versions awaiting sign-off; approve or reject with Airflow identities.",
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(HTTPException)
    async def _html_aware_errors(request: Request, exc: HTTPException):
        # A browser landing on the page without a session gets a way to log in, not bare JSON.
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            from airflow.api_fastapi.app import get_auth_manager

            login = get_auth_manager().get_url_login(next_url=str(request.url))
            return HTMLResponse(
                Markup(
                    '<!doctype html><p>Not signed in to Airflow. <a href="{}" target="_top">Log in</a></p>'
                ).format(login),
                status_code=401,
            )
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{_base(request)}/signoff")

    @app.get("/api/pending")
    def pending(
        request: Request,
        user: GetUserDep,
        dag_id: str | None = None,
        run_id: str | None = None,
        include_decided: bool = False,
    ) -> list[dict[str, Any]]:
        """Versions awaiting sign-off that the caller may see, with evidence links and what they may do."""
        return list_versions(
            user, dag_id=dag_id, run_id=run_id, include_decided=include_decided, base=_base(request)
        )

    @app.post("/api/decisions")
    def decide(body: DecisionBody, request: Request, user: GetUserDep) -> dict[str, Any]:
        """Approve or reject the latest sign-off request of ``model/version`` as the authenticated user."""
        from airloom.exceptions import AirloomError
        from airloom.governance.signoff import record_decision, signoff_status

        _csrf_check(request)
        registry = open_registry()
        mv = _load_version(registry, body.model, body.version)
        dag_id, _ = version_dag(mv.metadata)
        if not can_view(user, dag_id):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"no read access to DAG {dag_id!r}")
        policy = current_policy()
        current = signoff_status(registry, body.model, body.version, policy)
        via = _via(request)
        refused = why_not_decide(user, dag_id, current, policy, body.decision, via)
        if refused:
            raise HTTPException(*refused)
        if body.request_id and body.request_id != current["request_id"]:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"{mv.ref} has a newer sign-off request ({current['request_id']}) than the one shown "
                f"({body.request_id}): reload and review the new evidence",
            )
        name = user.get_name()
        try:
            record = record_decision(
                registry,
                body.model,
                body.version,
                user=name,
                decision=body.decision,
                comment=body.comment,
                policy=policy,
                via=via,
            )
        except AirloomError as exc:  # the round changed between the checks above and the write
            raise _http_error(exc) from exc
        log.info("sign-off %s of %s by %s via %s: %s", body.decision, mv.ref, name, via, body.comment)
        after = signoff_status(registry, body.model, body.version, policy)
        return {"record": record, "status": after, "message": confirmation(record, after, policy)}

    @app.get("/api/models/{model}/{version}/card", response_class=PlainTextResponse)
    def card(model: str, version: int, user: GetUserDep) -> PlainTextResponse:
        """The version's model card (README.md with YAML front matter) as stored in the registry."""
        from airloom.registry.registry import CARD

        registry = open_registry()
        mv = _load_version(registry, model, version)
        if not can_view(user, version_dag(mv.metadata)[0]):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"no read access to DAG {version_dag(mv.metadata)[0]!r}"
            )
        key = f"{registry.model_prefix(model)}versions/{mv.version}/{CARD}"
        return PlainTextResponse(
            registry.store.get_bytes(key).decode(), media_type="text/markdown; charset=utf-8"
        )

    @app.get("/files/{rel_path:path}")
    def serve_file(rel_path: str, user: GetUserDep) -> Response:
        """A report by its key: ``runs/…`` and ``evaluations/…`` from the artifact store when it is remote,
        else from ``$AIRLOOM_HOME`` (and a local registry's folder); nothing outside them.

        The content type follows the name (HTML, PNG, JSON…); a report's relative links (its plots, the
        Data Docs' assets) resolve to sibling keys through this same route."""
        _check_report_access(user)
        served = served_files(open_registry())
        key = served_store_key(rel_path, served)
        if key is not None and served.store is not None:
            return _stream_key(served.store, rel_path, key)
        target = resolve_served_file(rel_path, served)
        return FileResponse(target, headers=REPORT_HEADERS)

    @app.get("/evaluation-day/{rel_path:path}", response_class=HTMLResponse)
    def evaluation_day(rel_path: str, user: GetUserDep) -> HTMLResponse:
        """A backfill day's ``metrics.json`` (served folders only, as ``/files``) with the model's trend chart."""
        from airloom.reports.evaluation_day import render_evaluation_day

        _check_report_access(user)
        served = served_files(open_registry())
        key = served_store_key(rel_path, served)
        if key is not None and served.store is not None:
            page = _evaluation_day_from_store(served.store, rel_path, key)
            return HTMLResponse(page, headers=REPORT_HEADERS)
        target = resolve_served_file(rel_path, served)
        if target.name != "metrics.json":
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"{rel_path} is not a backfill day's metrics.json")
        root = next(r for r in served.roots if target.is_relative_to(r))
        try:
            page = render_evaluation_day(target, stop=root)
        except ValueError as e:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from e
        return HTMLResponse(page, headers=REPORT_HEADERS)

    @app.get("/signoff", response_class=HTMLResponse)
    def page(
        request: Request,
        user: GetUserDep,
        dag_id: Annotated[str | None, Query()] = None,
        run_id: Annotated[str | None, Query()] = None,
        include_decided: bool = False,
        decided: Annotated[str | None, Query(max_length=400)] = None,
    ) -> HTMLResponse:
        """The reviewer's page (in the nav, and on a DAG run filtered to that run's versions).

        ``decided=MODEL/VERSION/RECORD_ID`` (where the page sends the browser after a decision) shows the
        confirmation of that decision, read back from the registry and only to the user who made it.
        """
        from airloom.registry.registry import CARD

        base = _base(request)
        entries = list_versions(
            user, dag_id=dag_id, run_id=run_id, include_decided=include_decided, base=base
        )
        registry = open_registry()
        flash = decision_confirmation(registry, user, decided) if decided else None
        cards = {}
        for e in entries:
            key = f"{registry.model_prefix(e['model'])}versions/{e['version']}/{CARD}"
            try:
                cards[(e["model"], e["version"])] = render_card(registry.store.get_bytes(key).decode())
            except Exception:  # a card is shown, not required: a version without one still lists
                log.exception("no model card for %s/%s", e["model"], e["version"])
        title = "Model sign-off" + (f" — {dag_id} / {run_id}" if run_id else "")
        return HTMLResponse(render_page(user, entries, cards, base, title, flash=flash))

    return app
