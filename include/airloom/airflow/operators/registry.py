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


def _executed_by(context) -> dict[str, str]:
    """The task that moves an alias, recorded apart from who triggered the run and who approved."""
    return {"dag_id": context["ti"].dag_id, "run_id": context["run_id"], "task_id": context["ti"].task_id}


class RegisterModelOperator(AirloomBaseOperator):
    """Register ``model_dir`` as a new immutable version, point ``alias`` at it and open a sign-off.

    :param metadata: metrics, gate results, lineage; the run's dag_id/run_id and the requester
        (:func:`~airloom.airflow.operators._base.triggering_user`: the person who started this run or the
        upstream one, else ``system:<dag_id>``) are added here so lineage cannot be forgotten.
    :param evidence: label → path/URI shown to reviewers (model card, eval report); hashed into the request.
    :param attachments: path in the version → file stored with it (the eval report and metrics).

    ``model_dir`` and the attachments may be URIs of the artifact store (workers that share no disk):
    they are staged onto this worker (verified against their manifests) and registered from there; the
    registry's copy is then what every later task reads. Evidence is recorded as given (a URI stays a URI
    reviewers can open), with its sha256.
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
            self.stage(self.model_dir),
            metadata={**self.metadata, "lineage": lineage},
            actor=user,
            attachments={k: self.stage(v) for k, v in self.attachments.items() if v},
        )
        self.log.info("registered %s (%d files) at %s", version.ref, len(version.files), version.uri)
        if self.alias:
            registry.set_alias(
                self.model_name,
                self.alias,
                version.version,
                actor=user,
                reason=f"registered by {context['ti'].dag_id}/{context['run_id']}",
                executed_by=_executed_by(context),
            )
        if self.request_signoff:
            evidence = {k: v for k, v in self.evidence.items() if v}
            request_signoff(
                registry,
                self.model_name,
                version.version,
                requested_by=user,
                evidence=evidence,
                via="task",
                # evidence handed over as store URIs is read through this task's connection
                s3_client=next(
                    (self.s3_client(v) for v in evidence.values() if str(v).startswith("s3://")), None
                ),
            )
            self.log.info(
                "sign-off of %s requested by %s: a reviewer approves on the sign-off page (Browse → Model "
                "sign-off) or with: airloom signoff approve %s %d --api-url AIRFLOW_URL --username REVIEWER "
                "--password-stdin",
                version.ref,
                user,
                self.model_name,
                version.version,
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
                executed_by=_executed_by(context),
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
                executed_by=_executed_by(context),
            )
        previous, version = record["from"], record["to"]
        self.log.info("rolled back %s@%s: %s -> %d", self.model_name, self.alias, previous, version)
        return push_outputs(
            context, {"name": self.model_name, "alias": self.alias, "version": version, "previous": previous}
        )


class CanaryOperator(AirloomBaseOperator):
    """Ask the version behind ``alias`` a few prompts through the serving gateway; fail if it does not answer.

    The version is loaded and asked as ``airloom serve`` would serve it
    (:func:`airloom.serving.canary.ask_through_gateway`): conversations through ``/v1/chat/completions``
    (its chat template, else an alpaca prompt of the last user turn), strings through ``/v1/completions``.
    It fails when the version cannot be served, or fewer prompts than ``min_answered`` asks for got a
    non-empty answer; the message names the prompts that failed. The answers land in the task's folder
    as ``canary.json`` and ``canary.html`` (the "Canary answers" link), written before the verdict so a
    failed canary shows what the model said.

    :param prompts: conversations (lists of ``{"role", "content"}`` turns, or ``{"messages": [...]}``) or
        strings; used when ``dataset_file`` is not given.
    :param dataset_file: a prepared split (the test split the candidate was evaluated on): its own
        prompts are asked, up to ``limit``, one task at a time (:func:`airloom.serving.canary.dataset_prompts`).
    :param alias: the alias whose version is checked (``canary`` before promotion, ``production`` after a
        rollback).
    :param version: the version the alias must point at (the one this run deployed); another fails.
    :param min_answered: the share of prompts that must get a non-empty answer; None: at least one.
    """

    # Not the prompts: Jinja drops a string's trailing newline, and an alpaca prompt without its last
    # "\n" is a prompt the model never saw (it answered with nothing, and the canary failed a good model).
    template_fields: Sequence[str] = ("model_name", "alias", "version", "dataset_file", "output_dir")
    operator_extra_links = (CanaryAnswersLink(),)

    def __init__(
        self,
        *,
        model_name: str,
        prompts: list[str | list[dict] | dict] | None = None,
        dataset_file: Any = None,
        alias: str = "production",
        version: Any = None,
        limit: int = 8,
        min_answered: float | None = None,
        max_tokens: int = 32,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not prompts and dataset_file is None:
            raise ValueError(
                f"{kwargs.get('task_id')}: give the canary prompts or a dataset_file to take them from"
            )
        self.model_name = model_name
        self.prompts = prompts or []
        self.dataset_file = dataset_file
        self.alias = alias
        self.version = version
        self.limit = limit
        self.min_answered = min_answered
        self.max_tokens = max_tokens

    def execute(self, context) -> dict[str, Any]:
        from airloom.exceptions import AirloomError
        from airloom.reports import render
        from airloom.serving.canary import ask_through_gateway, dataset_prompts, required_answers, shown
        from airloom.settings import home

        registry = self.hook.registry
        target = registry.get_alias(self.model_name, self.alias)
        expected = number(self.version, "version", optional=True)
        if target is None:
            raise AirflowFailException(f"canary: {self.model_name}@{self.alias} is not set: nothing to check")
        if expected is not None and target != expected:
            raise AirflowFailException(
                f"canary: {self.model_name}@{self.alias} points to version {target}, not {expected} as this run "
                "deployed it: another run moved it; the version was not checked"
            )
        ref = f"{self.model_name}/{target}"
        if self.dataset_file is not None:
            from airloom.data.splits import read_split

            try:  # a split handed over by URI is staged onto this worker first
                asked: list = dataset_prompts(read_split(str(self.stage(str(self.dataset_file)))), self.limit)
            except AirloomError as e:
                raise AirflowFailException(f"canary: {self.dataset_file}: {e}") from e
        else:
            asked = list(self.prompts)
        out = self.output_folder(context)
        out.mkdir(parents=True, exist_ok=True)
        try:
            rows = ask_through_gateway(
                registry,
                self.model_name,
                target,
                asked,
                cache_dir=home() / "cache" / "models",
                log_dir=out / "gateway",
                max_tokens=self.max_tokens,
            )
        except AirloomError as e:  # the version does not load as the server would load it
            raise AirflowFailException(f"canary: {ref} cannot be served: {e}") from e
        for row in rows:
            self.log.info("canary %s\n  prompt: %r\n  output: %r", ref, row["prompt"], row["output"])
        failing = [
            (i, p, row)
            for i, (p, row) in enumerate(zip(asked, rows, strict=True), 1)
            if not row["output"].strip()
        ]
        need = required_answers(len(rows), self.min_answered)
        answered = len(rows) - len(failing)
        passed = answered >= need
        if passed:
            verdict = "answered"  # the table shows which prompts got nothing
        elif answered == 0 and not any(row["error"] for row in rows):
            verdict = "empty output for every prompt"
        else:
            verdict = f"answered {answered} of {len(rows)}, {need} needed"
        (out / "canary.json").write_text(
            json.dumps(
                {
                    "model": f"registry:{ref}",
                    "alias": self.alias,
                    "passed": passed,
                    "verdict": verdict,
                    "outputs": rows,
                },
                indent=2,
            )
        )
        page = out / "canary.html"
        page.write_text(
            render("canary.html.j2", model=f"registry:{ref}", rows=rows, passed=passed, verdict=verdict),
            "utf-8",
        )
        # published (with the gateway's log) before it is linked, so the answers can be read from any worker
        push_outputs(context, self.hand_over(context, {"canary_report": str(page)}))
        if not passed:
            why = "; ".join(
                f"{i}. {shown(p)!r}: "
                + (f"HTTP {row['status']}: {row['error']}" if row["error"] else "empty answer")
                for i, p, row in failing[:10]
            )
            more = f"; and {len(failing) - 10} more" if len(failing) > 10 else ""
            kept = ""
            if self.alias != "production":
                production = registry.get_alias(self.model_name, "production")
                where = "unset" if production is None else f"at version {production}"
                kept = f"; {self.model_name}@production was not moved (it stays {where})"
            raise AirflowFailException(
                f"canary: {ref} ({self.model_name}@{self.alias}) {verdict} through the serving path; "
                f"failing prompts: {why}{more}{kept}"
            )
        return push_outputs(context, {"model": f"registry:{ref}", "version": target, "outputs": rows})
