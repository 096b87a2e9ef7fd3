"""The one rule for moving an alias, applied alike by ``airloom registry promote``, deploy and rollback.

A move verifies every file of the version, checks its sign-off under the caller's policy (the DAGs pass
the approver list from the ``airloom_signoff_approvers`` Variable), then moves the alias by
compare-and-swap, which appends the audit record. A refusal is a CheckFailed whose message is the same
whichever path asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airloom.exceptions import CheckFailed
from airloom.governance.signoff import SignOffPolicy, is_approved, signoff_status

if TYPE_CHECKING:
    from airloom.registry.registry import ModelRegistry

APPROVAL_REQUIRED_ALIASES = frozenset({"production"})
"""Aliases that serve users: a version may only be pointed at by them once it is signed off."""

_READ_NOW: Any = object()


def promote(
    registry: ModelRegistry,
    name: str,
    version: int,
    alias: str,
    *,
    actor: str,
    reason: str,
    policy: SignOffPolicy | None = None,
    require_approval: bool = False,
    expected_version: int | None | Any = _READ_NOW,
    executed_by: str | dict[str, str] | None = None,
) -> dict[str, Any]:
    """Point ``alias`` at ``name/version`` if the rule allows it; returns the alias move's audit record.

    Args:
        registry: The model registry.
        name: The registered model.
        version: The version to point at.
        alias: The alias to move.
        actor: Who moves it (kept in the audit record).
        reason: Why (kept in the audit record).
        policy: The sign-off policy the approval is judged under (default: anyone but the requester).
        require_approval: Also demand an approved sign-off for an alias that is not gated
            (``production`` always demands one).
        expected_version: Move only if the alias points here now (None: not set). Default: where it
            points when this call starts, so a move by someone else during the checks makes the
            compare-and-swap refuse (ConflictError) instead of being overwritten.
        executed_by: What runs the move, kept apart from ``actor`` and from the approvers in the audit
            record: ``{"dag_id", "run_id", "task_id"}`` of a task, or ``"cli:<user>"``.

    Raises:
        CheckFailed: a file differs from the manifest, or the sign-off does not allow the move.
    """
    if expected_version is _READ_NOW:
        expected_version = registry.get_alias(name, alias)
    try:
        registry.verify(name, version)
    except CheckFailed as e:
        raise CheckFailed(f"{_refusing(name, version, alias)}: {e}") from e
    approved_by = None
    if require_approval or alias in APPROVAL_REQUIRED_ALIASES:
        approved_by = _require_approval(registry, name, version, alias, policy or SignOffPolicy())
    return registry.set_alias(
        name,
        alias,
        version,
        actor=actor,
        reason=reason,
        expected_version=expected_version,
        approved_by=approved_by,
        executed_by=executed_by,
    )


def rollback(
    registry: ModelRegistry,
    name: str,
    alias: str,
    *,
    actor: str,
    reason: str,
    policy: SignOffPolicy | None = None,
    to_version: int | None = None,
    executed_by: str | dict[str, str] | None = None,
) -> dict[str, Any]:
    """Move ``alias`` back to ``to_version``, by default the latest version it pointed to before that is
    approved under ``policy``; the move is a :func:`promote` that always demands an approved sign-off.

    Raises:
        CheckFailed: nothing to roll back to, the alias already points there, or :func:`promote` refuses.
    """
    policy = policy or SignOffPolicy()
    current = registry.get_alias(name, alias)
    target = to_version
    if target is None:
        moves = [h for h in registry.history(name) if h.get("action") == "alias" and h.get("alias") == alias]
        earlier = [m["from"] for m in reversed(moves) if m.get("from") not in (None, current)]
        target = next((v for v in earlier if is_approved(registry, name, v, policy)), None)
        if target is None:
            raise CheckFailed(f"{name}@{alias}: no earlier approved version to roll back to")
    if target == current:
        raise CheckFailed(f"{name}@{alias} already points to {target}")
    return promote(
        registry,
        name,
        target,
        alias,
        actor=actor,
        reason=reason,
        policy=policy,
        require_approval=True,
        expected_version=current,
        executed_by=executed_by,
    )


_HOW_TO_APPROVE = "on the sign-off page, Browse -> Model sign-off, or with 'airloom signoff approve {ref} --api-url AIRFLOW_URL'"


def _refusing(name: str, version: int, alias: str) -> str:
    return f"refusing to point {name}@{alias} at version {version}"


def _require_approval(
    registry: ModelRegistry, name: str, version: int, alias: str, policy: SignOffPolicy
) -> list[str]:
    """The approvers of ``name/version``'s latest sign-off round under ``policy``; CheckFailed unless it
    is approved, saying what is missing and who may supply it."""
    status = signoff_status(registry, name, version, policy)
    if status["state"] == "approved":
        return [a["user"] for a in status["approvals"]]
    ref = f"{name}/{int(version)}"
    refusing = _refusing(name, version, alias)
    if status["state"] == "rejected":
        who = ", ".join(
            f"{r['user']}" + (f" ({r['comment']!r})" if r.get("comment") else "")
            for r in status["rejections"]
        )
        raise CheckFailed(
            f"{refusing}: its sign-off was rejected by {who}; a rejected version is never deployed: register "
            f"a fixed model, or open a new round (airloom signoff request {ref}) with new evidence"
        )
    if status["requested_by"] is None:
        raise CheckFailed(
            f"{refusing}: no sign-off was requested; run 'airloom signoff request {ref}' and have a reviewer "
            "approve it"
        )
    requester = status["requested_by"]
    if policy.allowed_users is None:
        hint = f"a reviewer other than {requester} must approve it ({_HOW_TO_APPROVE.format(ref=ref)})"
        not_counted = ""
    else:
        approvers = sorted(
            set(policy.allowed_users) - ({requester} if policy.separation_of_duties else set())
        )
        hint = f"one of the approvers {approvers} must approve it ({_HOW_TO_APPROVE.format(ref=ref)})"
        # Approvals from users the policy does not list are kept in the record but do not count: say so,
        # or "pending" reads as if nobody had looked at it.
        anyone = SignOffPolicy(separation_of_duties=policy.separation_of_duties)
        counted = {a["user"] for a in status["approvals"]}
        others = sorted(
            {a["user"] for a in signoff_status(registry, name, version, anyone)["approvals"]} - counted
        )
        not_counted = f"; approved by {', '.join(others)}, not an approver under the policy" if others else ""
    raise CheckFailed(
        f"{refusing}: its sign-off is pending ({len(status['approvals'])} of {status['required_approvals']} "
        f"approvals, requested by {requester}){not_counted}; {hint}"
    )
