"""ModelSignOffSensor: a deferrable wait for a person to approve a registered model version."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException


class ModelSignOffSensor(BaseSensorOperator):
    """Succeed when ``model_name/version`` is approved under ``policy``; fail without retry on rejection.

    Pokes once; while the decision is pending it defers to :class:`SignOffTrigger`, so no worker
    slot is held for the hours a review can take. A request that expires is recorded as such in
    the registry's audit trail.

    :param policy: :class:`airloom.governance.signoff.SignOffPolicy` fields (required_approvals or
        min_approvals, allowed_users, separation_of_duties, authenticated_only); the DAGs pass
        :data:`airloom.airflow.defaults.SIGNOFF_POLICY_TEMPLATED`, the policy deploy, rollback and the
        sign-off page apply too.
    :param poll_interval: seconds between registry reads in the triggerer.
    :param timeout: how long to wait for a decision (seconds or timedelta).
    """

    template_fields: Sequence[str] = ("model_name", "version", "policy")

    def __init__(
        self,
        *,
        model_name: str,
        version: Any,
        policy: dict[str, Any] | None = None,
        registry_uri: str | None = None,
        aws_conn_id: str = "aws_default",
        poll_interval: float = 10.0,
        timeout: float | timedelta = timedelta(days=7),
        deferrable: bool = True,
        **kwargs,
    ) -> None:
        timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        super().__init__(timeout=timeout_s, poke_interval=poll_interval, mode="reschedule", **kwargs)
        self.model_name = model_name
        self.version = version
        self.policy = policy or {}
        self.registry_uri = registry_uri
        self.aws_conn_id = aws_conn_id
        self.poll_interval = poll_interval
        self.deferrable = deferrable

    @cached_property
    def registry(self):
        from airloom.airflow.hooks.registry import RegistryHook

        return RegistryHook(registry_uri=self.registry_uri, aws_conn_id=self.aws_conn_id).registry

    @cached_property
    def signoff_policy(self):
        """The policy, resolved once here (deployment defaults such as ``authenticated_only`` included),
        so the trigger applies exactly what this task did, whatever the triggerer's environment."""
        from airloom.governance.signoff import SignOffPolicy

        return SignOffPolicy.from_params(self.policy)

    def _status(self) -> dict[str, Any]:
        from airloom.governance.signoff import signoff_status

        self.registry.get(self.model_name, int(self.version))  # a missing version could never be approved
        return signoff_status(self.registry, self.model_name, int(self.version), self.signoff_policy)

    def execute(self, context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        status = self._status()
        if status["state"] != "pending":
            return self._finish(status["state"], status)
        from airloom.airflow.triggers.registry import SignOffTrigger
        from airloom.governance.signoff import waiting_for

        self.log.info(
            "sign-off of %s/%s (requested by %s): %s; approve on the sign-off page (Browse → Model "
            "sign-off) or with: airloom signoff approve %s %s --api-url AIRFLOW_URL --username REVIEWER "
            "--password-stdin",
            self.model_name,
            self.version,
            status.get("requested_by"),
            waiting_for(status, self.signoff_policy),
            self.model_name,
            self.version,
        )
        self.defer(
            trigger=SignOffTrigger(
                registry_uri=self.registry_uri,
                aws_conn_id=self.aws_conn_id,
                model_name=self.model_name,
                version=int(self.version),
                policy=self.signoff_policy.to_params(),
                poll_interval=self.poll_interval,
                deadline=time.time() + self.timeout,
            ),
            method_name="execute_complete",
        )

    def poke(self, context) -> bool:
        status = self._status()
        if status["state"] == "rejected":
            self._finish("rejected", status)
        return status["state"] == "approved"

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") == "error":
            raise AirflowFailException(f"sign-off wait failed: {event.get('message')}")
        return self._finish(event["status"], event.get("signoff") or {})

    def _finish(self, state: str, status: dict[str, Any]) -> dict[str, Any]:
        ref = f"{self.model_name}/{self.version}"
        if state == "approved":
            who = ", ".join(a["user"] for a in status.get("approvals", []))
            self.log.info("%s approved by %s", ref, who)
            return status
        if state == "rejected":
            why = "; ".join(
                f"{r['user']}: {r.get('comment') or 'no comment'}" for r in status.get("rejections", [])
            )
            raise AirflowFailException(f"{ref} was rejected ({why})")
        if state == "expired":
            self.registry.append_audit(
                self.model_name,
                {
                    "action": "signoff_expired",
                    "version": int(self.version),
                    "actor": "airflow",
                    "timeout_s": self.timeout,
                },
            )
            raise AirflowFailException(
                f"{ref}: no sign-off decision within {self.timeout:.0f}s; request expired"
            )
        raise AirflowFailException(f"{ref}: unexpected sign-off state {state!r}")
