"""Human sign-off of a model version before it may be promoted.

A request records who triggered training and fingerprints of the evidence (eval reports, data
validation results) so that reviewers approve exactly what was checked. Decisions are append-only
records in the registry next to the version, each mirrored in the model's audit trail. A new request
(e.g. after a rejection, with new evidence) starts a fresh round: only decisions on the latest request
count.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from airloom.exceptions import CheckFailed, UsageError
from airloom.registry.store import sha256_file

if TYPE_CHECKING:
    from airloom.registry.registry import ModelRegistry

DECISIONS = ("approve", "reject")


@dataclass
class SignOffPolicy:
    """Who must approve. ``allowed_users=None`` lets anyone decide; the requester may never approve
    their own request while ``separation_of_duties`` is on."""

    required_approvals: int = 1
    allowed_users: list[str] | None = None
    separation_of_duties: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.required_approvals, bool) or not isinstance(self.required_approvals, int):
            raise UsageError(
                f"SignOffPolicy.required_approvals must be an integer, got {self.required_approvals!r}"
            )
        if self.required_approvals < 1:
            raise UsageError(
                f"SignOffPolicy.required_approvals must be at least 1, got {self.required_approvals}"
            )
        if not isinstance(self.separation_of_duties, bool):
            raise UsageError(
                f"SignOffPolicy.separation_of_duties must be true or false, got {self.separation_of_duties!r}"
            )
        if self.allowed_users is not None:
            if isinstance(self.allowed_users, str) or not all(
                isinstance(u, str) and u.strip() for u in self.allowed_users
            ):
                raise UsageError(
                    f"SignOffPolicy.allowed_users must be a list of user names, got {self.allowed_users!r}"
                )
            self.allowed_users = list(self.allowed_users)
            if len(set(self.allowed_users)) < self.required_approvals:
                raise UsageError(
                    f"SignOffPolicy needs {self.required_approvals} approvals but allows only "
                    f"{len(set(self.allowed_users))} user(s) {sorted(set(self.allowed_users))}: "
                    "add approvers or lower required_approvals"
                )

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> SignOffPolicy:
        """Build from DAG params or an Airflow Variable, where values arrive as text:
        ``allowed_users`` may be ``"alice, bob"`` (empty = anyone), numbers may be strings."""
        params = dict(params or {})
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
        if isinstance(params.get("separation_of_duties"), str):
            params["separation_of_duties"] = params["separation_of_duties"].strip().lower() in (
                "true",
                "1",
                "yes",
            )
        unknown = sorted(set(params) - {"required_approvals", "allowed_users", "separation_of_duties"})
        if unknown:
            raise UsageError(f"unknown sign-off policy option(s) {unknown}")
        return cls(**params)

    def allows(self, user: str) -> bool:
        return self.allowed_users is None or user in self.allowed_users


def _prefix(registry: ModelRegistry, name: str, version: int) -> str:
    return f"{registry.model_prefix(name)}signoffs/{int(version)}/"


def _fingerprint(label: str, value: Any) -> dict[str, Any]:
    """sha256 of one evidence item: a local file or folder, or an s3:// object; other values verbatim."""
    if not isinstance(value, str | os.PathLike):
        return {"value": value}
    text = os.fspath(value)
    if text.startswith("s3://"):
        from airloom.registry.store import S3Store

        parsed = urlparse(text)
        data = S3Store(parsed.netloc).get_bytes(parsed.path.lstrip("/"))
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
    registry: ModelRegistry, name: str, version: int, *, requested_by: str, evidence: dict[str, Any]
) -> dict[str, Any]:
    """Open a sign-off round for ``name/version``; returns the stored request record.

    ``evidence`` maps a label to a file/folder path or s3:// URI (fingerprinted with sha256) or to any
    JSON value (recorded as is), e.g. ``{"eval_report": "runs/.../eval.json", "rouge_l": 0.41}``.
    """
    _check_user(requested_by, "requested_by")
    if not isinstance(evidence, dict):
        raise UsageError(
            f"sign-off evidence must be a dict of label → path/URI/value, got {type(evidence).__name__}"
        )
    mv = registry.get(name, version)
    fingerprints = {str(label): _fingerprint(str(label), value) for label, value in evidence.items()}
    record = registry.append_record(
        _prefix(registry, name, version),
        {
            "kind": "request",
            "name": name,
            "version": mv.version,
            "requested_by": requested_by,
            "evidence": fingerprints,
        },
    )
    registry.append_audit(
        name,
        {
            "action": "signoff_request",
            "version": mv.version,
            "actor": requested_by,
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
) -> dict[str, Any]:
    """Record ``user``'s approve/reject on the latest request; CheckFailed when the policy forbids it."""
    policy = policy or SignOffPolicy()
    _check_user(user, "user")
    if decision not in DECISIONS:
        raise UsageError(f"decision must be one of {DECISIONS}, got {decision!r}")
    if not registry.has_version(name, version):
        raise CheckFailed(
            f"cannot sign off {name}/{version}: no such committed version in {registry.store.uri()}"
        )
    request, _ = _round(registry, name, version)
    if request is None:
        raise CheckFailed(
            f"cannot sign off {name}/{version}: no sign-off was requested; call request_signoff first"
        )
    if not policy.allows(user):
        raise CheckFailed(
            f"{user!r} may not sign off {name}/{version}: the policy allows only {policy.allowed_users}"
        )
    if decision == "approve" and policy.separation_of_duties and user == request["requested_by"]:
        raise CheckFailed(
            f"{user!r} requested the sign-off of {name}/{version} and may not approve it "
            "(separation of duties): ask another reviewer"
        )
    record = registry.append_record(
        _prefix(registry, name, version),
        {
            "kind": "decision",
            "name": name,
            "version": int(version),
            "request_id": request["id"],
            "user": user,
            "decision": decision,
            "comment": comment,
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
            "request_id": request["id"],
        },
    )
    return record


def signoff_status(
    registry: ModelRegistry, name: str, version: int, policy: SignOffPolicy | None = None
) -> dict[str, Any]:
    """State of the latest sign-off round under ``policy``.

    Any rejection makes it ``rejected``. Approvals count once per user, and only from users the
    policy accepts (so a stricter policy than the one at decision time is honoured). No request yet
    reads as ``pending`` with ``requested_by`` None.
    """
    policy = policy or SignOffPolicy()
    request, decisions = _round(registry, name, version)
    approvals: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    approvers: set[str] = set()
    requester = None if request is None else request["requested_by"]  # decisions imply a request
    for d in decisions:
        entry = {"user": d["user"], "at": d["at"], "comment": d.get("comment", "")}
        if d["decision"] == "reject":
            rejections.append(entry)
        elif (
            d["user"] not in approvers
            and policy.allows(d["user"])
            and not (policy.separation_of_duties and d["user"] == requester)
        ):
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
        "required_approvals": policy.required_approvals,
        "requested_by": None if request is None else request["requested_by"],
        "requested_at": None if request is None else request["at"],
        "request_id": None if request is None else request["id"],
        "evidence": None if request is None else request.get("evidence"),
    }


def is_approved(
    registry: ModelRegistry, name: str, version: int, policy: SignOffPolicy | None = None
) -> bool:
    return signoff_status(registry, name, version, policy)["state"] == "approved"
