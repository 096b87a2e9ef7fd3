"""Evaluation operators: score a model on a dataset; compare with a baseline and apply gates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.links import EvalReportLink, EvaluationDayLink, TrendChartLink
from airloom.airflow.operators._base import AirloomBaseOperator, number, push_outputs, skip_task


class EvaluateModelOperator(AirloomBaseOperator):
    """Generate with ``model`` on ``dataset_file`` and score the outputs (metrics.json, predictions.jsonl).

    :param model: a folder, ``registry:NAME[/N|@ALIAS]`` or a hub id.
    :param fallback_model: used when ``model`` is a registry alias that does not exist yet (the
        first candidate has no production model to beat, so it is compared with its base).
    :param dataset_file: Parquet or JSONL with ``id``, ``prompt``, ``response`` (and optional ``task``), or
        chat rows with ``messages``; the conversations of a prepared split are rendered with its
        manifest's template, as training rendered them.
    :param limit: evaluate only the first N records.
    :param max_new_tokens: the longest answer generated (templated).
    :param batch_size: prompts generated together (left-padded; templated).
    :param bias_probes: also run the project's counterfactual bias probes (bias.json).
    :param precision: the weights' dtype while evaluating: ``fp32`` (None), ``bf16``, ``fp16`` or ``auto``
        (the dtype the model was saved in; templated).
    """

    template_fields: Sequence[str] = (
        "model",
        "fallback_model",
        "dataset_file",
        "output_dir",
        "limit",
        "max_new_tokens",
        "batch_size",
        "precision",
    )

    def __init__(
        self,
        *,
        model: str,
        dataset_file: str,
        fallback_model: str | None = None,
        limit: int | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 64,
        bias_probes: bool = False,
        precision: str | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("pool", "eval")  # each task holds a model in memory: bound how many at once
        super().__init__(**kwargs)
        self.bias_probes = bias_probes
        self.precision = precision
        self.model = model
        self.fallback_model = fallback_model
        self.dataset_file = dataset_file
        self.limit = limit
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def execute(self, context) -> dict[str, Any]:
        from airloom.data.splits import read_split
        from airloom.evaluation.harness import evaluate_model
        from airloom.exceptions import RegistryError
        from airloom.registry.resolve import resolve_model

        registry = self.hook.registry
        try:
            resolved = resolve_model(self.model, registry=registry)
        except RegistryError as e:
            if not self.fallback_model:
                raise
            self.log.info("%s (%s); evaluating the fallback %s instead", self.model, e, self.fallback_model)
            resolved = resolve_model(self.fallback_model, registry=registry)
        out = self.output_folder(context)
        limit = number(self.limit, "limit", optional=True) or None  # 0: every record
        metrics = evaluate_model(
            resolved["path"],
            read_split(self.dataset_file),
            out,
            limit=limit,
            max_new_tokens=number(self.max_new_tokens, "max_new_tokens"),
            batch_size=number(self.batch_size, "batch_size"),
            dataset_file=self.dataset_file,
            precision=self.precision or "fp32",
        )
        self.log.info(
            "%s on %s: %s",
            resolved["ref"],
            self.dataset_file,
            json.dumps({k: round(v, 4) for k, v in metrics["aggregate"].items()}),
        )
        bias_path = self._run_bias_probes(resolved["path"], out) if self.bias_probes else None
        return push_outputs(
            context,
            {
                "model": resolved["ref"],
                "model_path": resolved["path"],
                "metrics_path": str(out / "metrics.json"),
                "predictions": str(out / "predictions.jsonl"),
                "aggregate": metrics["aggregate"],
                "by_task": metrics.get("by_task", {}),
                "n": metrics.get("n"),
                "bias": bias_path,
            },
        )

    def _run_bias_probes(self, model_path: str, out: Path) -> str:
        from airloom.evaluation.bias import run_bias_probes
        from airloom.evaluation.generation import load_model

        model, tokenizer = load_model(model_path, self.precision or "fp32")
        # Probes asked as the model is served: its chat template, else alpaca.
        report = run_bias_probes(
            model,
            tokenizer,
            max_new_tokens=number(self.max_new_tokens, "max_new_tokens"),
            prompt_template="model",
        )
        path = out / "bias.json"
        path.write_text(json.dumps(report, indent=2))
        self.log.info("bias probes: %s", json.dumps(report["overall"]))
        return str(path)


class QualityGateOperator(AirloomBaseOperator):
    """Compare candidate with baseline, write the HTML report, and fail the run on a failed gate.

    :param candidate: the candidate's EvaluateModelOperator result (XCom).
    :param baseline: the baseline's result, or None.
    :param gates: ``"exact_match>=0.3,f1>=baseline-0.02"`` or a list of gate dicts.
    """

    template_fields: Sequence[str] = ("candidate", "baseline", "gates", "output_dir")
    operator_extra_links = (EvalReportLink(),)

    def __init__(
        self,
        *,
        candidate: Any,
        baseline: Any = None,
        gates: str | list | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.candidate = candidate
        self.baseline = baseline
        self.gates = gates

    def execute(self, context) -> dict[str, Any]:
        from airloom.evaluation.gates import check_gates, parse_gates
        from airloom.evaluation.report import write_report

        out = self.output_folder(context)
        candidate = json.loads(Path(self.candidate["metrics_path"]).read_text())
        baseline = json.loads(Path(self.baseline["metrics_path"]).read_text()) if self.baseline else None
        from airloom.data.splits import read_jsonl

        # Per-example scores of both models on the same examples feed the paired bootstrap
        # (confidence intervals in the report, `metric:ci_low` gates).
        candidate_examples = read_jsonl(self.candidate["predictions"])
        baseline_examples = read_jsonl(self.baseline["predictions"]) if self.baseline else None
        bias_path = self.candidate.get("bias")
        bias = json.loads(Path(bias_path).read_text()) if bias_path else None
        results = check_gates(
            candidate,
            parse_gates(self.gates),
            baseline=baseline,
            candidate_examples=candidate_examples,
            baseline_examples=baseline_examples,
        )
        report = write_report(
            out,
            candidate,
            baseline=baseline,
            gates=results,
            predictions_path=Path(self.candidate["predictions"]),
            baseline_predictions_path=Path(self.baseline["predictions"]) if self.baseline else None,
            bias=bias,
        )
        for r in results:
            self.log.info("gate %s: %s", "PASS" if r["passed"] else "FAIL", r["message"])
        self.log.info("evaluation report: %s", report)
        failed = [r for r in results if not r["passed"]]
        if failed:
            push_outputs(
                context, {"report": str(report)}
            )  # the report says why: link it from the failed task
            raise AirflowFailException("quality gate failed: " + "; ".join(r["message"] for r in failed))
        return push_outputs(
            context, {"report": str(report), "gates": results, "comparison": str(out / "comparison.json")}
        )


class PartitionEvaluationOperator(AirloomBaseOperator):
    """Evaluate a version of ``model_name`` on the partition ``ds=<ds>``, into ``ds=<ds>/v<N>/``.

    :param model_version: ``of_the_day``: the version at ``alias`` when the day ended, from the
        registry's alias history (a rerun scores the day with the same model whenever it runs; a day
        before the alias was first set is skipped); ``current``: the version at ``alias`` now.
    :param version: pin a version instead.

    A day that has not ended (UTC) or has no partition is skipped, with the reason in the log.
    """

    template_fields: Sequence[str] = (
        "model_name",
        "version",
        "alias",
        "history_uri",
        "output_uri",
        "ds",
        "limit",
        "model_version",
    )
    operator_extra_links = (EvaluationDayLink(),)

    def __init__(
        self,
        *,
        model_name: str,
        ds: str,
        history_uri: str,
        output_uri: str,
        version: int | None = None,
        alias: str = "production",
        limit: int | None = None,
        model_version: str = "of_the_day",
        **kwargs,
    ) -> None:
        kwargs.setdefault("pool", "eval")  # each task holds a model in memory: bound how many at once
        super().__init__(**kwargs)
        self.model_name = model_name
        self.model_version = model_version
        self.ds = ds
        self.history_uri = history_uri
        self.output_uri = output_uri
        self.version = version
        self.alias = alias
        self.limit = limit

    def execute(self, context) -> dict[str, Any]:
        from airloom.evaluation.backfill import (
            day_end,
            evaluate_partition,
            read_partition,
            version_dir,
            version_of_the_day,
        )
        from airloom.registry.resolve import resolve_model

        if self.model_version not in ("of_the_day", "current"):
            raise AirflowFailException(
                f"model_version must be 'of_the_day' or 'current', got {self.model_version!r}"
            )
        version = number(self.version, "version", optional=True)
        if day_end(self.ds) > datetime.now(UTC):
            raise skip_task(self.log, f"ds={self.ds} has not ended yet (UTC): its partition is incomplete")
        records = read_partition(self.history_uri, self.ds)
        if records is None:
            raise skip_task(self.log, f"no partition {self.history_uri}/ds={self.ds}: nothing to evaluate")
        registry = self.hook.registry
        live = version_of_the_day(registry, self.model_name, self.ds, self.alias)
        if version:
            ref = f"registry:{self.model_name}/{version}"
        elif self.model_version == "current":
            ref = f"registry:{self.model_name}@{self.alias}"
        elif live is None:
            raise skip_task(
                self.log,
                f"no version of {self.model_name} was at {self.alias} when ds={self.ds} ended: nothing to "
                "evaluate (model_version=current scores the day with today's version)",
            )
        else:
            ref = f"registry:{self.model_name}/{live}"
        resolved = resolve_model(ref, registry=registry)
        limit = number(self.limit, "limit", optional=True) or None  # 0: every record
        metrics = evaluate_partition(
            resolved["path"],
            resolved["ref"],
            records,
            self.output_uri,
            self.model_name,
            self.ds,
            version=resolved["version"],
            live_version=live,
            limit=limit,
        )
        folder = version_dir(self.output_uri, self.model_name, self.ds, resolved["version"])
        self.log.info(
            "%s on ds=%s (%d records): %s",
            resolved["ref"],
            self.ds,
            metrics["n"],
            json.dumps({k: round(v, 4) for k, v in metrics["aggregate"].items()}),
        )
        return push_outputs(
            context,
            {
                "model": resolved["ref"],
                "ds": self.ds,
                "n": metrics["n"],
                "aggregate": metrics["aggregate"],
                "version": resolved["version"],
                "live_version": live,
                "metrics_path": str(folder / "metrics.json"),
            },
        )


class EvaluationTrendOperator(BaseOperator):
    """Chart every evaluated date of ``model_name`` (trend.json + trend.png)."""

    template_fields: Sequence[str] = ("model_name", "output_uri")
    operator_extra_links = (TrendChartLink(),)

    def __init__(self, *, model_name: str, output_uri: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.output_uri = output_uri

    def execute(self, context) -> dict[str, Any]:
        from airloom.evaluation.backfill import build_trend

        trend = build_trend(Path(self.output_uri) / self.model_name)
        self.log.info(
            "trend over %d dates, versions %s, production changes %s: %s",
            trend["dates"],
            trend["versions"],
            [f"{c['ds']}: v{c['from']} -> v{c['to']}" for c in trend["changes"]],
            trend.get("plot"),
        )
        return {"dates": trend["dates"], "plot": trend.get("plot"), "changes": trend["changes"]}
