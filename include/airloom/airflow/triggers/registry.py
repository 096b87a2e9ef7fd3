"""SignOffTrigger: waits in the triggerer until a version is approved, rejected or the wait expires."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class SignOffTrigger(BaseTrigger):
    """Poll the registry's sign-off records for ``model_name/version``.

    Serializes plain values only (URIs, names, numbers), so it survives a triggerer restart.
    Registry reads are blocking I/O, so they run in a thread and never stall the event loop.
    """

    def __init__(
        self,
        *,
        registry_uri: str | None,
        aws_conn_id: str,
        model_name: str,
        version: int,
        policy: dict[str, Any],
        poll_interval: float,
        deadline: float,
    ) -> None:
        super().__init__()
        self.registry_uri = registry_uri
        self.aws_conn_id = aws_conn_id
        self.model_name = model_name
        self.version = int(version)
        self.policy = dict(policy)
        self.poll_interval = float(poll_interval)
        self.deadline = float(deadline)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airloom.airflow.triggers.registry.SignOffTrigger",
            {
                "registry_uri": self.registry_uri,
                "aws_conn_id": self.aws_conn_id,
                "model_name": self.model_name,
                "version": self.version,
                "policy": self.policy,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
            },
        )

    def _status(self) -> dict[str, Any]:
        from airloom.airflow.hooks.registry import RegistryHook
        from airloom.governance.signoff import SignOffPolicy, signoff_status

        registry = RegistryHook(registry_uri=self.registry_uri, aws_conn_id=self.aws_conn_id).registry
        # A version this registry lacks (wrong version, or a triggerer whose AIRLOOM_REGISTRY differs from
        # the worker's) can never be approved: fail now instead of waiting out the deadline.
        registry.get(self.model_name, self.version)
        return signoff_status(registry, self.model_name, self.version, SignOffPolicy.from_params(self.policy))

    async def run(self):
        try:
            while True:
                status = await asyncio.to_thread(self._status)
                if status["state"] in ("approved", "rejected"):
                    yield TriggerEvent({"status": status["state"], "signoff": status})
                    return
                if time.time() >= self.deadline:
                    yield TriggerEvent({"status": "expired", "signoff": status})
                    return
                await asyncio.sleep(self.poll_interval)
        except Exception as e:  # turned into an event so the task fails with the reason, not silently
            yield TriggerEvent({"status": "error", "message": f"{type(e).__name__}: {e}"})
