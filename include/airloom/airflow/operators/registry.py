"""Registry operators: register a candidate, deploy (promote) an approved version, roll back, canary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.operators._base import push_outputs, task_output_dir, triggering_user


class _RegistryOperator(BaseOperator):
    def __init__(
        self, *, registry_uri: str | None = None, aws_conn_id: str = "aws_default", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.registry_uri = registry_uri
        self.aws_conn_id = aws_conn_id

    @cached_property
    def hook(self):
        from airloom.airflow.hooks.registry import RegistryHook

        return RegistryHook(registry_uri=self.registry_uri, aws_conn_id=self.aws_conn_id)


class RegisterModelOperator(_RegistryOperator):
    """Register ``model_dir`` as a new immutable version, point ``alias`` at it and open a sign-off.

    :param metadata: metrics, gate results, lineage; the run's dag_id/run_id and the triggering
        user are added here so lineage cannot be forgotten.
    :param evidence: label → path/URI shown to reviewers (model card, eval report); hashed into the request.
    :param attachments: path in the version → file stored with it (the eval report and metrics).
    """

    template_fields: Sequence[str] = ("model_name", "model_dir", "metadata", "evidence", "attachments", "alias")

    def __init__(
        self,
        *,
        model_name: str,
        model_dir: str,
        metadata: dict | None = None,
        evidence: dict | None = None,
        attachments: dict | None = None,
        alias: str | None = "candidate",
        request_signoff: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.model_dir = model_dir
        self.metadata = metadata or {}
        self.evidence = evidence or {}
        self.attachments = attachments or {}
        self.alias = alias
        self.request_signoff = request_signoff

    def execute(self, context) -> dict[str, Any]:
        import airloom
        from airloom.governance.signoff import request_signoff

        registry = self.hook.registry
        user = triggering_user(context)
        lineage = {
            **self.metadata.get("lineage", {}),
            "dag_id": context["ti"].dag_id,
            "run_id": context["run_id"],
            "triggered_by": user,
            "code_version": airloom.__version__,
        }
        version = registry.register(
            self.model_name, self.model_dir, metadata={**self.metadata, "lineage": lineage}, actor=user,
            attachments={k: v for k, v in self.attachments.items() if v},
        )
        self.log.info("registered %s (%d files) at %s", version.ref, len(version.files), version.uri)
        if self.alias:
            registry.set_alias(
                self.model_name,
                self.alias,
                version.version,
                actor=user,
                reason=f"registered by {context['ti'].dag_id}/{context['run_id']}",
            )
        if self.request_signoff:
            evidence = {k: v for k, v in self.evidence.items() if v}
            request_signoff(registry, self.model_name, version.version, requested_by=user, evidence=evidence)
            self.log.info(
                "sign-off requested from a reviewer other than %s: "
                "airloom signoff approve %s --user REVIEWER",
                user,
                version.ref,
            )
        return push_outputs(
            context,
            {"name": self.model_name, "version": version.version, "ref": version.ref, "uri": version.uri},
        )


class DeployModelOperator(_RegistryOperator):
    """Deploy = verify every file's sha256, check the sign-off, then compare-and-swap ``alias`` to the version.

    The alias only moves if it still points where it pointed when this task read it, so two
    deploys racing cannot both win; the previous version is recorded in the audit trail.

    :param policy: the sign-off policy the sign-off sensor applied (same keys), so a version
        approved only by someone the policy does not allow is not deployed.
    """

    template_fields: Sequence[str] = ("model_name", "version", "alias", "policy")

    def __init__(
        self,
        *,
        model_name: str,
        version: Any,
        alias: str = "production",
        require_approval: bool = True,
        policy: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.version = version
        self.alias = alias
        self.require_approval = require_approval
        self.policy = policy or {}

    def execute(self, context) -> dict[str, Any]:
        from airloom.exceptions import CheckFailed
        from airloom.governance.signoff import SignOffPolicy, signoff_status

        registry = self.hook.registry
        version = int(self.version)
        try:
            registry.verify(self.model_name, version)
        except CheckFailed as e:
            raise AirflowFailException(f"refusing to deploy {self.model_name}/{version}: {e}") from e
        if self.require_approval:
            status = signoff_status(registry, self.model_name, version, SignOffPolicy.from_params(self.policy))
            if status["state"] != "approved":
                raise AirflowFailException(
                    f"refusing to deploy {self.model_name}/{version}: sign-off is {status['state']}"
                )
        previous = registry.get_alias(self.model_name, self.alias)
        registry.set_alias(
            self.model_name,
            self.alias,
            version,
            actor=triggering_user(context),
            reason=f"deploy by {context['ti'].dag_id}/{context['run_id']}",
            expected_version=previous,
        )
        self.log.info("%s@%s: %s -> %d", self.model_name, self.alias, previous, version)
        return push_outputs(
            context, {"name": self.model_name, "alias": self.alias, "version": version, "previous": previous}
        )


class RollbackModelOperator(_RegistryOperator):
    """Move ``alias`` back to ``to_version`` (default: the approved version it pointed to before)."""

    template_fields: Sequence[str] = ("model_name", "to_version", "alias", "reason")

    def __init__(
        self,
        *,
        model_name: str,
        to_version: Any = None,
        alias: str = "production",
        reason: str = "",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.to_version = to_version
        self.alias = alias
        self.reason = reason

    def execute(self, context) -> dict[str, Any]:
        from airloom.exceptions import CheckFailed
        from airloom.governance.signoff import is_approved

        registry = self.hook.registry
        current = registry.get_alias(self.model_name, self.alias)
        if self.to_version not in (None, "", 0, "0", "None"):
            target = int(self.to_version)
        else:
            moves = [
                h
                for h in registry.history(self.model_name)
                if h.get("action") == "alias" and h.get("alias") == self.alias
            ]
            earlier = [m["from"] for m in reversed(moves) if m.get("from") not in (None, current)]
            target = next((v for v in earlier if is_approved(registry, self.model_name, v)), None)
            if target is None:
                raise AirflowFailException(
                    f"{self.model_name}@{self.alias}: no earlier approved version to roll back to"
                )
        if target == current:
            raise AirflowFailException(f"{self.model_name}@{self.alias} already points to {target}")
        if not is_approved(registry, self.model_name, target):
            raise AirflowFailException(
                f"refusing to roll back to {self.model_name}/{target}: it was never approved"
            )
        try:
            registry.verify(self.model_name, target)
        except CheckFailed as e:
            raise AirflowFailException(f"refusing to roll back to {self.model_name}/{target}: {e}") from e
        registry.set_alias(
            self.model_name,
            self.alias,
            target,
            actor=triggering_user(context),
            reason=self.reason or f"rollback by {context['run_id']}",
            expected_version=current,
        )
        self.log.info("rolled back %s@%s: %s -> %d", self.model_name, self.alias, current, target)
        return push_outputs(
            context, {"name": self.model_name, "alias": self.alias, "version": target, "previous": current}
        )


class CanaryOperator(_RegistryOperator):
    """Load the version behind ``alias`` with transformers and generate on a few prompts.

    Fails if the model cannot be loaded or produces empty output for every prompt: the cheapest
    check that the deployed artifact really serves.
    """

    # Not the prompts: Jinja drops a template's trailing newline, and "### Response:\n" without it is
    # a prompt the model never saw (it answered with nothing, and the canary failed a good model).
    template_fields: Sequence[str] = ("model_name", "alias", "output_dir")

    def __init__(
        self,
        *,
        model_name: str,
        prompts: list[str],
        alias: str = "production",
        output_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.prompts = prompts
        self.alias = alias
        self.output_dir = output_dir

    def execute(self, context) -> dict[str, Any]:
        from airloom.evaluation.generation import generate, load_model
        from airloom.registry.resolve import resolve_model

        resolved = resolve_model(f"registry:{self.model_name}@{self.alias}", registry=self.hook.registry)
        model, tokenizer = load_model(resolved["path"])
        outputs = generate(model, tokenizer, list(self.prompts), max_new_tokens=32)
        for p, o in zip(self.prompts, outputs, strict=True):
            self.log.info("canary %s\n  prompt: %r\n  output: %r", resolved["ref"], p, o)
        if not any(o.strip() for o in outputs):
            raise AirflowFailException(f"canary: {resolved['ref']} produced empty output for every prompt")
        out = task_output_dir(context, self.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": p, "output": o} for p, o in zip(self.prompts, outputs, strict=True)]
        (out / "canary.json").write_text(json.dumps({"model": resolved["ref"], "outputs": rows}, indent=2))
        return push_outputs(context, {"model": resolved["ref"], "outputs": rows})
