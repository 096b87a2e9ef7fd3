"""Human sign-off of a model version before it may be promoted.

A request records who is responsible for the version (the requester: the person who started the run
that trained it, or a ``system:<dag_id>`` identity for a scheduled or asset-triggered run nobody can be
named for) and fingerprints of the evidence (eval reports, data validation results), so that reviewers
approve exactly what was checked. Decisions are append-only records in the registry next to the version,
each mirrored in the model's audit trail and naming the path it came through (``via``: the UI plugin's
page, the Airflow API, or the local CLI). A new request (e.g. after a rejection, with new evidence)
starts a fresh round: only decisions on the latest request count.

:class:`SignOffPolicy` is the one rule of who counts, applied alike where a decision is recorded
(:func:`record_decision`, the plugin, the CLI) and where it is read (:func:`signoff_status`: the sign-off
sensor, deploy, rollback, ``airloom registry promote``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from airloom.exceptions import CheckFailed, UsageError
from airloom.registry.store import sha256_file

if TYPE_CHECKING:
    from airloom.registry.registry import ModelRegistry

DECISIONS = ("approve", "reject")
SYSTEM_PREFIX = "system:"
"""Identities of runs no person started (a schedule, an asset event): they never sign off anything."""
VIAS = ("plugin", "api", "local-cli")
"""How a decision reached the registry: the sign-off page (browser session), the Airflow API with a
user's token (``airloom signoff approve --api-url``), or the local CLI, which takes any claimed name."""
AUTHENTICATED_VIAS = frozenset({"plugin", "api"})
"""Paths on which Airflow's auth manager, not the caller, says who decided."""
REQUEST_VIAS = ("task", "local-cli")
AUTHENTICATED_ONLY_ENV = "AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY"
"""Set to 1 in production (docker compose sets it): only authenticated decisions count."""
APPROVERS_ENV = "AIRFLOW_VAR_AIRLOOM_SIGNOFF_APPROVERS"
MIN_APPROVALS_ENV = "AIRFLOW_VAR_AIRLOOM_SIGNOFF_MIN_APPROVALS"
"""Airflow's environment form of the Variables the DAGs and the plugin read (``airloom_signoff_approvers``,
``airloom_signoff_min_approvals``): set this way, one setting reaches Airflow and the CLI alike."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def is_system_identity(user: Any) -> bool:
    """True for ``system:<source>``: a run nobody can be named for (schedule, asset event)."""
    return isinstance(user, str) and user.startswith(SYSTEM_PREFIX)


def _flag(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f"{what} must be true or false (1/0, yes/no), got {value!r}")


def authenticated_only_default() -> bool:
    """The deployment's setting (env ``AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY``); off in the embedded default."""
    value = os.environ.get(AUTHENTICATED_ONLY_ENV, "").strip()
    return _flag(value, AUTHENTICATED_ONLY_ENV) if value else False


@dataclass
class SignOffPolicy:
    """Who must approve.

    ``required_approvals`` (also readable as ``min_approvals``) counts distinct people, never the
    requester while ``separation_of_duties`` is on, never a ``system:*`` identity. ``allowed_users=None``
    lets anyone approve. When the requester is a ``system:*`` identity (a scheduled or asset-triggered
    run), separation of duties means: any approver, never the system. ``authenticated_only`` (production)
    counts only decisions made through an authenticated path (the plugin, the Airflow API); its default is
    the deployment's ``AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY``.
    """

    required_approvals: int = 1
    allowed_users: list[str] | None = None
    separation_of_duties: bool = True
    authenticated_only: bool = field(default_factory=authenticated_only_default)

    def __post_init__(self) -> None:
        if isinstance(self.required_approvals, bool) or not isinstance(self.required_approvals, int):
            raise UsageError(
                f"SignOffPolicy.required_approvals must be an integer, got {self.required_approvals!r}"
            )
        if self.required_approvals < 1:
            raise UsageError(
                f"SignOffPolicy.required_approvals must be at least 1, got {self.required_approvals}"
            )
        for name in ("separation_of_duties", "authenticated_only"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"SignOffPolicy.{name} must be true or false, got {getattr(self, name)!r}")
        if self.allowed_users is not None:
            if isinstance(self.allowed_users, str) or not all(
                isinstance(u, str) and u.strip() for u in self.allowed_users
            ):
                raise UsageError(
                    f"SignOffPolicy.allowed_users must be a list of user names, got {self.allowed_users!r}"
                )
            self.allowed_users = list(self.allowed_users)
            system = [u for u in self.allowed_users if is_system_identity(u)]
            if system:
                raise UsageError(
                    f"SignOffPolicy.allowed_users names system identities {system}: only people approve"
                )
            if len(set(self.allowed_users)) < self.required_approvals:
                raise UsageError(
                    f"SignOffPolicy needs {self.required_approvals} approvals but allows only "
                    f"{len(set(self.allowed_users))} user(s) {sorted(set(self.allowed_users))}: "
                    "add approvers or lower required_approvals"
                )

    @property
    def min_approvals(self) -> int:
        """The two-person rule's number: distinct approvers needed (``required_approvals``)."""
        return self.required_approvals

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> SignOffPolicy:
        """Build from DAG params or Airflow Variables, where values arrive as text.

        ``allowed_users`` may be ``"alice, bob"`` (empty = anyone), numbers and flags may be strings,
        ``min_approvals`` is another name for ``required_approvals``; an empty value (a Variable that is
        not set) keeps the default.
        """
        params = {k: v for k, v in dict(params or {}).items() if v is not None and v != ""}
        unknown = sorted(set(params) - _PARAMS)
        if unknown:
            raise UsageError(f"unknown sign-off policy option(s) {unknown}; known: {sorted(_PARAMS)}")
        if "min_approvals" in params:
            value = params.pop("min_approvals")
            if params.setdefault("required_approvals", value) != value:
                raise UsageError(
                    f"min_approvals {value!r} and required_approvals {params['required_approvals']!r} "
                    "disagree: give one of them"
                )
        users = params.get("allowed_users")
        if isinstance(users, int | float) and not isinstance(users, bool):
            users = str(users)  # Airflow's native rendering turns a Variable of "1001" into a number
        if isinstance(users, str):
            users = users.split(",")
        if isinstance(users, list | tuple):
            names = [str(u).strip() for u in users if str(u).strip()]
            params["allowed_users"] = names or None
        if isinstance(params.get("required_approvals"), str):
            try:
                params["required_approvals"] = int(params["required_approvals"])
            except ValueError:
                raise UsageError(
                    f"required_approvals must be an integer, got {params['required_approvals']!r}"
                ) from None
        for name in ("separation_of_duties", "authenticated_only"):
            if name in params:
                params[name] = _flag(params[name], name)
        return cls(**params)

    @classmethod
    def from_environment(cls, **overrides: Any) -> SignOffPolicy:
        """The deployment's policy where Airflow's Variables cannot be read (the CLI): the Variables'
        environment form (``AIRFLOW_VAR_AIRLOOM_SIGNOFF_APPROVERS`` / ``…_MIN_APPROVALS``) and
        ``AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY``; ``overrides`` win."""
        params: dict[str, Any] = {
            "allowed_users": os.environ.get(APPROVERS_ENV, ""),
            "required_approvals": os.environ.get(MIN_APPROVALS_ENV, "").strip(),
        }
        return cls.from_params({**params, **overrides})

    def to_params(self) -> dict[str, Any]:
        """Plain values (for a trigger's ``serialize()``); :meth:`from_params` reads them back."""
        return {
            "required_approvals": self.required_approvals,
            "allowed_users": None if self.allowed_users is None else list(self.allowed_users),
            "separation_of_duties": self.separation_of_duties,
            "authenticated_only": self.authenticated_only,
        }

    def allows(self, user: str) -> bool:
        """``user`` may decide at all: a person (not ``system:*``) on the approver list, if there is one."""
        if is_system_identity(user):
            return False
        return self.allowed_users is None or user in self.allowed_users

    def counts_path(self, via: str | None) -> bool:
        """A decision made through ``via`` counts (records from before ``via`` existed are unauthenticated)."""
        return not self.authenticated_only or via in AUTHENTICATED_VIAS


_PARAMS = frozenset(
    {"required_approvals", "min_approvals", "allowed_users", "separation_of_duties", "authenticated_only"}
)


@dataclass(frozen=True)
class Refusal:
    """Why a user may not record a decision: ``reason`` is a sentence for people; ``conflict`` is True when
    the round's state (not who asks) is the obstacle (HTTP 409 rather than 403)."""

    reason: str
    conflict: bool = False


def why_not_decide(
    status: dict[str, Any],
    policy: SignOffPolicy,
    user: str,
    decision: str,
    *,
    via: str,
    approvers: str = "the policy",
) -> Refusal | None:
    """The one rule of who may record ``decision`` on the round ``status`` describes; None if allowed.

    Args:
        status: :func:`signoff_status` of the version under ``policy``.
        via: the path the decision comes through (one of :data:`VIAS`).
        approvers: how to name the source of the approver list in the sentence
            (the plugin says "the Variable airloom_signoff_approvers").
    """
    ref = f"{status['name']}/{status['version']}"
    if is_system_identity(user):
        return Refusal(
            f"{user!r} is a system identity (a scheduled or asset-triggered run), and a system identity "
            f"never signs off: a person must decide on {ref}"
        )
    if not policy.counts_path(via):
        return Refusal(
            f"{ref}: this deployment accepts sign-off decisions only through authenticated paths "
            f"(authenticated_only), not through the {via}: use the sign-off page, or "
            f"'airloom signoff {decision} {status['name']} {status['version']} --api-url URL', which signs "
            "you in to Airflow"
        )
    if not policy.allows(user):
        return Refusal(
            f"{user!r} may not sign off {ref}: {approvers} allows only {', '.join(policy.allowed_users or [])}"
        )
    if status["request_id"] is None:
        return Refusal(f"no sign-off was requested for {ref}", conflict=True)
    if decision != "approve":
        return None
    if status["state"] == "rejected":
        return Refusal(
            f"{ref} was rejected; its round is closed: a new request (with new evidence) opens another",
            conflict=True,
        )
    if status["state"] == "approved":
        return Refusal(f"{ref} is already approved; its round is closed", conflict=True)
    if policy.separation_of_duties and user == status["requested_by"]:
        return Refusal(
            f"{user!r} requested the sign-off of {ref} and may not approve it (separation of duties: "
            "their run trained it): another reviewer must approve"
        )
    if any(a["user"] == user for a in status["approvals"]):
        have, need = len(status["approvals"]), status["required_approvals"]
        return Refusal(
            f"{user!r} already approved {ref} ({have} of {need} approvals): the same person counts once, "
            f"so {need - have} more approver(s) must approve",
            conflict=True,
        )
    return None


def waiting_for(status: dict[str, Any], policy: SignOffPolicy) -> str | None:
    """A pending round's missing approvals and who may give them, as a sentence; None unless pending."""
    if status["state"] != "pending" or status["request_id"] is None:
        return None
    missing = status["required_approvals"] - len(status["approvals"])
    requester = status["requested_by"]
    excluded = {a["user"] for a in status["approvals"]}
    if policy.separation_of_duties and not is_system_identity(requester):
        excluded.add(requester)
    if policy.allowed_users is None:
        who = "anyone" + (f" but {', '.join(sorted(excluded))}" if excluded else "")
    else:
        names = sorted(set(policy.allowed_users) - excluded)
        who = f"one of {', '.join(names)}" if names else "nobody left on the approver list"
    if is_system_identity(requester):
        who += f" (the requester {requester} is a system identity and never approves)"
    path = " through the sign-off page or the Airflow API" if policy.authenticated_only else ""
    return f"waiting for {missing} more approval{'s' if missing != 1 else ''} from {who}{path}"


def _prefix(registry: ModelRegistry, name: str, version: int) -> str:
    return f"{registry.model_prefix(name)}signoffs/{int(version)}/"


def _fingerprint(label: str, value: Any, s3_client: Any = None) -> dict[str, Any]:
    """sha256 of one evidence item: a local file or folder, or an s3:// object (read with ``s3_client``, else
    boto3's default chain); other values verbatim."""
    if not isinstance(value, str | os.PathLike):
        return {"value": value}
    text = os.fspath(value)
    if text.startswith("s3://"):
        from airloom.registry.store import S3Store

        parsed = urlparse(text)
        data = S3Store(parsed.netloc, client=s3_client).get_bytes(parsed.path.lstrip("/"))
        return {"uri": text, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    path = Path(text).expanduser()
    if path.is_file():
        digest, size = sha256_file(path)
        return {"uri": str(path.resolve()), "sha256": digest, "size": size}
    if path.is_dir():
        # A folder's digest covers every file's relative path and content, in a fixed order.
        combined = hashlib.sha256()
        size = count = 0
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest, n = sha256_file(file)
            combined.update(f"{file.relative_to(path).as_posix()}\0{digest}\n".encode())
            size += n
            count += 1
        return {"uri": str(path.resolve()), "sha256": combined.hexdigest(), "size": size, "files": count}
    raise UsageError(
        f"sign-off evidence {label!r}: {text} does not exist; pass an existing file, folder or s3:// URI"
    )


def _check_user(user: str, what: str) -> str:
    if not isinstance(user, str) or not user.strip():
        raise UsageError(f"{what} must be a non-empty user name, got {user!r}")
    return user


def request_signoff(
    registry: ModelRegistry,
    name: str,
    version: int,
    *,
    requested_by: str,
    evidence: dict[str, Any],
    via: str = "local-cli",
    s3_client: Any = None,
) -> dict[str, Any]:
    """Open a sign-off round for ``name/version``; returns the stored request record.

    ``evidence`` maps a label to a file/folder path or s3:// URI (fingerprinted with sha256) or to any
    JSON value (recorded as is), e.g. ``{"eval_report": "runs/.../eval.json", "rouge_l": 0.41}``.
    ``requested_by`` is the person responsible for the version (a ``system:*`` identity when none can be
    named); ``via`` says who opened the round: an Airflow ``task`` or the ``local-cli``; ``s3_client`` reads
    ``s3://`` evidence (a task's: its AWS connection's).
    """
    _check_user(requested_by, "requested_by")
    if via not in REQUEST_VIAS:
        raise UsageError(f"a sign-off request's via must be one of {REQUEST_VIAS}, got {via!r}")
    if not isinstance(evidence, dict):
        raise UsageError(
            f"sign-off evidence must be a dict of label → path/URI/value, got {type(evidence).__name__}"
        )
    mv = registry.get(name, version)
    fingerprints = {
        str(label): _fingerprint(str(label), value, s3_client) for label, value in evidence.items()
    }
    record = registry.append_record(
        _prefix(registry, name, version),
        {
            "kind": "request",
            "name": name,
            "version": mv.version,
            "requested_by": requested_by,
            "via": via,
            "evidence": fingerprints,
        },
    )
    registry.append_audit(
        name,
        {
            "action": "signoff_request",
            "version": mv.version,
            "actor": requested_by,
            "via": via,
            "request_id": record["id"],
            "evidence": fingerprints,
        },
    )
    return record


def _round(
    registry: ModelRegistry, name: str, version: int
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The latest request and the decisions made on it."""
    records = registry.read_records(_prefix(registry, name, version))
    requests = [r for r in records if r.get("kind") == "request"]
    if not requests:
        return None, []
    latest = requests[-1]
    return latest, [r for r in records if r.get("kind") == "decision" and r.get("request_id") == latest["id"]]


def record_decision(
    registry: ModelRegistry,
    name: str,
    version: int,
    *,
    user: str,
    decision: str,
    comment: str = "",
    policy: SignOffPolicy | None = None,
    via: str = "local-cli",
) -> dict[str, Any]:
    """Record ``user``'s approve/reject on the latest request; CheckFailed when :func:`why_not_decide`
    refuses it.

    ``via`` is the path the decision came through: ``plugin`` and ``api`` only where Airflow's auth
    manager named ``user``; anything else (a library call, the local CLI) is ``local-cli``, which a policy
    with ``authenticated_only`` refuses.
    """
    policy = policy or SignOffPolicy()
    _check_user(user, "user")
    if decision not in DECISIONS:
        raise UsageError(f"decision must be one of {DECISIONS}, got {decision!r}")
    if via not in VIAS:
        raise UsageError(f"via must be one of {VIAS}, got {via!r}")
    if not registry.has_version(name, version):
        raise CheckFailed(
            f"cannot sign off {name}/{version}: no such committed version in {registry.store.uri()}"
        )
    status = signoff_status(registry, name, version, policy)
    if status["request_id"] is None:
        raise CheckFailed(
            f"cannot sign off {name}/{version}: no sign-off was requested; call request_signoff first"
        )
    refused = why_not_decide(status, policy, user, decision, via=via)
    if refused:
        raise CheckFailed(refused.reason)
    record = registry.append_record(
        _prefix(registry, name, version),
        {
            "kind": "decision",
            "name": name,
            "version": int(version),
            "request_id": status["request_id"],
            "user": user,
            "decision": decision,
            "comment": comment,
            "via": via,
        },
    )
    registry.append_audit(
        name,
        {
            "action": "signoff_decision",
            "version": int(version),
            "actor": user,
            "decision": decision,
            "comment": comment,
            "via": via,
            "request_id": status["request_id"],
        },
    )
    return record


def _not_counted_because(d: dict[str, Any], policy: SignOffPolicy, requester: str | None) -> str | None:
    """Why the policy ignores decision ``d`` (None: it counts)."""
    user = d["user"]
    if is_system_identity(user):
        return "a system identity never signs off"
    if not policy.counts_path(d.get("via")):
        return f"made through the {d.get('via') or 'unrecorded'} path, not an authenticated one"
    if d["decision"] == "approve" and not policy.allows(user):
        return "not on the approver list"
    if d["decision"] == "approve" and policy.separation_of_duties and user == requester:
        return "the requester may not approve (separation of duties)"
    return None


def signoff_status(
    registry: ModelRegistry, name: str, version: int, policy: SignOffPolicy | None = None
) -> dict[str, Any]:
    """State of the latest sign-off round under ``policy``.

    Any counted rejection makes it ``rejected``. Approvals count once per person, and only those the
    policy accepts (so a stricter policy than the one at decision time is honoured): never the
    requester's under separation of duties, never a ``system:*`` identity's, and under
    ``authenticated_only`` only those made through the plugin or the API. Decisions that do not count are
    listed in ``not_counted`` with the reason. No request yet reads as ``pending`` with ``requested_by``
    None.
    """
    policy = policy or SignOffPolicy()
    request, decisions = _round(registry, name, version)
    approvals: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    not_counted: list[dict[str, Any]] = []
    approvers: set[str] = set()
    requester = None if request is None else request["requested_by"]  # decisions imply a request
    for d in decisions:
        entry = {"user": d["user"], "at": d["at"], "comment": d.get("comment", ""), "via": d.get("via")}
        reason = _not_counted_because(d, policy, requester)
        if reason is None and d["decision"] == "approve" and d["user"] in approvers:
            reason = "already counted: a person's approval counts once"
        if reason is not None:
            not_counted.append({**entry, "decision": d["decision"], "reason": reason})
        elif d["decision"] == "reject":
            rejections.append(entry)
        else:
            approvers.add(d["user"])
            approvals.append(entry)
    if rejections:
        state = "rejected"
    elif request is not None and len(approvals) >= policy.required_approvals:
        state = "approved"
    else:
        state = "pending"
    return {
        "name": name,
        "version": int(version),
        "state": state,
        "approvals": approvals,
        "rejections": rejections,
        "not_counted": not_counted,
        "required_approvals": policy.required_approvals,
        "requested_by": requester,
        "requested_at": None if request is None else request["at"],
        "requested_via": None if request is None else request.get("via"),
        "request_id": None if request is None else request["id"],
        "evidence": None if request is None else request.get("evidence"),
    }


def is_approved(
    registry: ModelRegistry, name: str, version: int, policy: SignOffPolicy | None = None
) -> bool:
    return signoff_status(registry, name, version, policy)["state"] == "approved"
