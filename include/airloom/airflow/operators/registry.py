"""Registry operators: register a candidate, deploy (promote) an approved version, roll back, canary."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.links import CanaryAnswersLink
from airloom.airflow.operators._base import AirloomBaseOperator, number, push_outputs, triggering_user


@contextmanager
def _refusal_fails_the_task() -> Iterator[None]:
    """A refused alias move (CheckFailed) fails the task without retries: a retry gets the same verdict."""
    from airloom.exceptions import CheckFailed

    try:
        yield
    except CheckFailed as e:
        raise AirflowFailException(str(e)) from e


class RegisterModelOperator(AirloomBaseOperator):
    """Register ``model_dir`` as a new immutable version, point ``alias`` at it and open a sign-off.

    :param metadata: metrics, gate results, lineage; the run's dag_id/run_id and the triggering
        user are added here so lineage cannot be forgotten.
    :param evidence: label → path/URI shown to reviewers (model card, eval report); hashed into the request.
    :param attachments: path in the version → file stored with it (the eval report and metrics).
    """

    template_fields: Sequence[str] = (
        "model_name",
        "model_dir",
        "metadata",
        "evidence",
        "attachments",
        "alias",
    )

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
            self.model_name,
            self.model_dir,
            metadata={**self.metadata, "lineage": lineage},
            actor=user,
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


class DeployModelOperator(AirloomBaseOperator):
    """Deploy = verify every file's sha256, check the sign-off, then compare-and-swap ``alias`` to the version.

    The alias only moves if it still points where it pointed when this task read it, so two
    deploys racing cannot both win; the previous version is recorded in the audit trail.

    :param policy: the sign-off policy the sign-off sensor applied (same keys), so a version
        approved only by someone the policy does not allow is not deployed.
    :param require_approval: demand an approved sign-off for any alias; ``production`` always demands
        one (:func:`airloom.governance.promotion.promote` is the rule).
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
        from airloom.governance.promotion import promote
        from airloom.governance.signoff import SignOffPolicy

        version = int(self.version)
        with _refusal_fails_the_task():
            record = promote(
                self.hook.registry,
                self.model_name,
                version,
                self.alias,
                actor=triggering_user(context),
                reason=f"deploy by {context['ti'].dag_id}/{context['run_id']}",
                policy=SignOffPolicy.from_params(self.policy),
                require_approval=self.require_approval,
            )
        self.log.info("%s@%s: %s -> %d", self.model_name, self.alias, record["from"], version)
        return push_outputs(
            context,
            {"name": self.model_name, "alias": self.alias, "version": version, "previous": record["from"]},
        )


class RollbackModelOperator(AirloomBaseOperator):
    """Move ``alias`` back to ``to_version`` (default: the approved version it pointed to before).

    :param policy: the sign-off policy deploys apply (same keys): the version rolled back to must be
        approved under it, so an approval by someone who is not an approver does not count.
    """

    template_fields: Sequence[str] = ("model_name", "to_version", "alias", "reason", "policy")

    def __init__(
        self,
        *,
        model_name: str,
        to_version: int | None = None,
        alias: str = "production",
        reason: str | None = None,
        policy: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.to_version = to_version
        self.alias = alias
        self.reason = reason
        self.policy = policy or {}

    def execute(self, context) -> dict[str, Any]:
        from airloom.governance.promotion import rollback
        from airloom.governance.signoff import SignOffPolicy

        to_version = number(self.to_version, "to_version", optional=True) or None  # 0: the previous one
        with _refusal_fails_the_task():
            record = rollback(
                self.hook.registry,
                self.model_name,
                self.alias,
                actor=triggering_user(context),
                reason=str(self.reason or f"rollback by {context['run_id']}"),  # native rendering: "42" is 42
                policy=SignOffPolicy.from_params(self.policy),
                to_version=to_version,
            )
        previous, version = record["from"], record["to"]
        self.log.info("rolled back %s@%s: %s -> %d", self.model_name, self.alias, previous, version)
        return push_outputs(
            context, {"name": self.model_name, "alias": self.alias, "version": version, "previous": previous}
        )


class CanaryOperator(AirloomBaseOperator):
    """Load the version behind ``alias`` with transformers and generate on a few prompts.

    Fails if the model cannot be loaded or produces empty output for every prompt: the cheapest
    check that the deployed artifact really serves. The answers land in the task's folder as
    ``canary.json`` and ``canary.html`` (the "Canary answers" link), written before the verdict so a
    failed canary shows what the model said.

    :param prompts: conversations (lists of ``{"role", "content"}`` turns, or ``{"messages": [...]}``),
        rendered as ``/v1/chat/completions`` renders them: with the model's chat template, else as an
        alpaca prompt of the last user turn (a blank line parts instruction from input), so a chat model
        and an instruction model are each asked in the format they trained on. A string is sent as it is.
    """

    # Not the prompts: Jinja drops a string's trailing newline, and an alpaca prompt without its last
    # "\n" is a prompt the model never saw (it answered with nothing, and the canary failed a good model).
    template_fields: Sequence[str] = ("model_name", "alias", "output_dir")
    operator_extra_links = (CanaryAnswersLink(),)

    def __init__(
        self,
        *,
        model_name: str,
        prompts: list[str | list[dict] | dict],
        alias: str = "production",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.prompts = prompts
        self.alias = alias

    def execute(self, context) -> dict[str, Any]:
        from airloom.evaluation.chat import chat_prompt, model_template, turn_end
        from airloom.evaluation.generation import generate, load_model
        from airloom.registry.resolve import resolve_model
        from airloom.reports import render

        resolved = resolve_model(f"registry:{self.model_name}@{self.alias}", registry=self.hook.registry)
        model, tokenizer = load_model(resolved["path"])
        template = model_template(tokenizer)
        prompts = [
            p
            if isinstance(p, str)
            else chat_prompt(p["messages"] if isinstance(p, dict) else p, tokenizer, template)
            for p in self.prompts
        ]
        end = turn_end(template)  # a chat model ends its answer there (see airloom.evaluation.chat)
        outputs = generate(model, tokenizer, prompts, max_new_tokens=32, stop_strings=[end] if end else None)
        for p, o in zip(prompts, outputs, strict=True):
            self.log.info("canary %s\n  prompt: %r\n  output: %r", resolved["ref"], p, o)
        out = self.output_folder(context)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": p, "output": o} for p, o in zip(prompts, outputs, strict=True)]
        passed = any(o.strip() for o in outputs)
        (out / "canary.json").write_text(json.dumps({"model": resolved["ref"], "outputs": rows}, indent=2))
        page = out / "canary.html"
        page.write_text(render("canary.html.j2", model=resolved["ref"], rows=rows, passed=passed), "utf-8")
        push_outputs(context, {"canary_report": str(page)})
        if not passed:
            raise AirflowFailException(f"canary: {resolved['ref']} produced empty output for every prompt")
        return push_outputs(context, {"model": resolved["ref"], "outputs": rows})
