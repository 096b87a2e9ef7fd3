"""Evaluation operators: score a model on a dataset; compare with a baseline and apply gates.

Workers that share no disk (``AIRLOOM_ARTIFACTS=s3://…``): a model folder, split or metrics file handed
over by URI is staged onto this worker (verified, cached); what a task writes is published to the artifact
store (manifest last) and its result names it by URI. With the local default nothing moves.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.links import EvalReportLink, EvaluationDayLink, TrendChartLink
from airloom.airflow.operators._base import AirloomBaseOperator, number, push_outputs, skip_task


class EvaluateModelOperator(AirloomBaseOperator):
    """Generate with ``model`` on ``dataset_file`` and score the outputs (metrics.json, predictions.jsonl).

    :param model: a folder (or the URI of one another task published), ``registry:NAME[/N|@ALIAS]`` or a
        hub id.
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
        from airloom.artifacts import ArtifactIncomplete
        from airloom.data.splits import read_split
        from airloom.evaluation.harness import evaluate_model
        from airloom.exceptions import RegistryError

        registry = self.hook.registry
        try:
            resolved = self.resolve_model(self.model, registry)
        except RegistryError as e:
            # A handed-over model folder that is not (yet) complete is no reason to score another model.
            if not self.fallback_model or isinstance(e, ArtifactIncomplete):
                raise
            self.log.info("%s (%s); evaluating the fallback %s instead", self.model, e, self.fallback_model)
            resolved = self.resolve_model(self.fallback_model, registry)
        out = self.output_folder(context)
        limit = number(self.limit, "limit", optional=True) or None  # 0: every record
        dataset_file = self.stage_split(self.dataset_file) or self.dataset_file
        metrics = evaluate_model(
            resolved["path"],
            read_split(dataset_file),
            out,
            limit=limit,
            max_new_tokens=number(self.max_new_tokens, "max_new_tokens"),
            batch_size=number(self.batch_size, "batch_size"),
            dataset_file=dataset_file,
            precision=self.precision or "fp32",
        )
        model_path = resolved["path"]
        if self.artifacts.remote:
            # The report and the next tasks name the model as it was given (a URI, a pinned registry
            # ref), not by this worker's cache.
            model_path = resolved["ref"]
            metrics["model"] = model_path
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        self.log.info(
            "%s on %s: %s",
            resolved["ref"],
            self.dataset_file,
            json.dumps({k: round(v, 4) for k, v in metrics["aggregate"].items()}),
        )
        bias_path = self._run_bias_probes(resolved["path"], out) if self.bias_probes else None
        result = {
            "model": resolved["ref"],
            "model_path": model_path,
            "metrics_path": str(out / "metrics.json"),
            "predictions": str(out / "predictions.jsonl"),
            "aggregate": metrics["aggregate"],
            "by_task": metrics.get("by_task", {}),
            "n": metrics.get("n"),
            "bias": bias_path,
        }
        return push_outputs(context, self.hand_over(context, result))

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
        from airloom.data.splits import read_jsonl
        from airloom.evaluation.gates import check_gates, parse_gates
        from airloom.evaluation.report import write_report

        out = self.output_folder(context)
        # Each evaluation's files, staged onto this worker when another handed them over by URI.
        candidate_files = self._staged(self.candidate)
        baseline_files = self._staged(self.baseline) if self.baseline else None
        candidate = json.loads(Path(candidate_files["metrics_path"]).read_text())
        baseline = json.loads(Path(baseline_files["metrics_path"]).read_text()) if baseline_files else None
        # Per-example scores of both models on the same examples feed the paired bootstrap
        # (confidence intervals in the report, `metric:ci_low` gates).
        candidate_examples = read_jsonl(candidate_files["predictions"])
        baseline_examples = read_jsonl(baseline_files["predictions"]) if baseline_files else None
        bias_path = candidate_files.get("bias")
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
            predictions_path=Path(candidate_files["predictions"]),
            baseline_predictions_path=Path(baseline_files["predictions"]) if baseline_files else None,
            bias=bias,
        )
        for r in results:
            self.log.info("gate %s: %s", "PASS" if r["passed"] else "FAIL", r["message"])
        self.log.info("evaluation report: %s", report)
        failed = [r for r in results if not r["passed"]]
        if failed:
            # the report says why: link it from the failed task (published first, when the store is remote)
            push_outputs(context, self.hand_over(context, {"report": str(report)}))
            raise AirflowFailException("quality gate failed: " + "; ".join(r["message"] for r in failed))
        result = {"report": str(report), "gates": results, "comparison": str(out / "comparison.json")}
        return push_outputs(context, self.hand_over(context, result))

    def _staged(self, evaluation: dict[str, Any]) -> dict[str, Any]:
        """An EvaluateModelOperator result with its files (metrics, predictions, bias) on this worker."""
        return {
            **evaluation,
            **{key: self.stage(evaluation.get(key)) for key in ("metrics_path", "predictions", "bias")},
        }


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
        records = read_partition(
            self.history_uri, self.ds, self.artifacts, s3_client=self.s3_client(self.history_uri)
        )
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
        out_root = local_root(self, self.output_uri)
        metrics = evaluate_partition(
            resolved["path"],
            resolved["ref"],
            records,
            out_root,
            self.model_name,
            self.ds,
            version=resolved["version"],
            live_version=live,
            limit=limit,
        )
        folder = version_dir(out_root, self.model_name, self.ds, resolved["version"])
        self.log.info(
            "%s on ds=%s (%d records): %s",
            resolved["ref"],
            self.ds,
            metrics["n"],
            json.dumps({k: round(v, 4) for k, v in metrics["aggregate"].items()}),
        )
        result = {
            "model": resolved["ref"],
            "ds": self.ds,
            "n": metrics["n"],
            "aggregate": metrics["aggregate"],
            "version": resolved["version"],
            "live_version": live,
            "metrics_path": str(folder / "metrics.json"),
        }
        # The day's folder is published (manifest last, replacing a rerun's) for the trend, on any worker.
        return push_outputs(context, self.hand_over(context, result, folder))


def local_root(op: AirloomBaseOperator, root: str) -> Path:
    """Where a task writes what goes under ``root`` (``output_uri``): ``root`` itself with the local
    default; with a remote store, the place under this worker's ``AIRLOOM_HOME`` of the key ``root`` names
    (a URI of the store, or a folder under ``AIRLOOM_HOME`` as the DAG's defaults are), published from there."""
    if not op.artifacts.remote:
        return Path(root)
    from airloom.settings import home

    return home() / store_key(op, root)


def store_key(op: AirloomBaseOperator, root: str) -> str:
    """The key in the (remote) artifact store that ``root`` names; fails the task for anything else."""
    key = op.artifacts.key_of(root)
    if key is None:
        from airloom.settings import home

        raise AirflowFailException(
            f"output_uri {root} is neither in the artifact store {op.artifacts.root} nor under AIRLOOM_HOME "
            f"{home()}: workers share no disk, so results go to the store; give a URI of the store or a "
            "folder under AIRLOOM_HOME (its key in the store)"
        )
    return key


class EvaluationTrendOperator(AirloomBaseOperator):
    """Chart every evaluated date of ``model_name`` (trend.json + trend.png).

    With the local default the trend is written beside the dates (``<output_uri>/<model_name>/``). With a
    remote store the dates are read from the store, every published one whichever worker scored it; the
    trend goes to this task's folder, published with it (what the result and the link name: each run's
    own chart), and a copy of ``trend.json`` and ``trend.png`` is put beside the dates, one object each
    (a single PUT is atomic), as the model's latest trend, where the local layout has it.
    """

    template_fields: Sequence[str] = ("model_name", "output_uri")
    operator_extra_links = (TrendChartLink(),)

    def __init__(self, *, model_name: str, output_uri: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.output_uri = output_uri

    def execute(self, context) -> dict[str, Any]:
        from airloom.evaluation.backfill import build_trend, stored_metrics

        if self.artifacts.remote:
            key = f"{store_key(self, self.output_uri)}/{self.model_name}"
            found = stored_metrics(self.artifacts, key)
            out = self.output_folder(context)
            trend = build_trend(self.artifacts.uri(key), found=found, out_dir=out)
            for name in ("trend.json", "trend.png"):  # the model's latest trend, beside its days
                if (out / name).is_file():
                    self.artifacts.store.put_file(f"{key}/{name}", out / name)
        else:
            trend = build_trend(Path(self.output_uri) / self.model_name)
        self.log.info(
            "trend over %d dates, versions %s, production changes %s: %s",
            trend["dates"],
            trend["versions"],
            [f"{c['ds']}: v{c['from']} -> v{c['to']}" for c in trend["changes"]],
            trend.get("plot"),
        )
        return self.hand_over(
            context, {"dates": trend["dates"], "plot": trend.get("plot"), "changes": trend["changes"]}
        )
