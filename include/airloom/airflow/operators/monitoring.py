"""DriftMonitorOperator: compare a day of traffic and feedback with the training data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from airloom.airflow.operators._base import task_output_dir


class DriftMonitorOperator(BaseOperator):
    """Drift of ``ds``'s traffic vs. the training split, plus the day's feedback; may request retraining.

    Returns the decision; :class:`RequestRetrainingOperator` turns it into an asset event.

    :param traffic_uri: root of ``ds=YYYY-MM-DD/*.jsonl`` partitions of prompts served.
    :param feedback_uri: root of ``ds=YYYY-MM-DD/*.jsonl`` partitions of ``{"id", "rating": 1|-1}``.
    :param reference_file: the training split (JSONL with ``prompt``, ``task``).
    """

    template_fields: Sequence[str] = ("traffic_uri", "feedback_uri", "reference_file", "ds", "max_psi",
                                      "max_negative_rate", "max_failing_rate")

    def __init__(self, *, traffic_uri: str, feedback_uri: str, reference_file: str, ds: str,
                 max_psi: float = 0.25, max_negative_rate: float = 0.3, max_failing_rate: float = 0.2,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_failing_rate = max_failing_rate
        self.traffic_uri = traffic_uri
        self.feedback_uri = feedback_uri
        self.reference_file = reference_file
        self.ds = ds
        self.max_psi = max_psi
        self.max_negative_rate = max_negative_rate

    def execute(self, context) -> dict[str, Any]:
        from airloom.evaluation.backfill import read_partition
        from airloom.evaluation.harness import load_records_file
        from airloom.monitoring.drift import decide_retraining, drift_report, feedback_summary, write_report
        from airloom.monitoring.serving import (
            corrected_dataset,
            decide_serving,
            serving_summary,
            write_dashboard,
        )

        traffic = read_partition(self.traffic_uri, self.ds)
        if traffic is None:
            raise AirflowSkipException(f"no traffic partition {self.traffic_uri}/ds={self.ds}")
        reference = self.reference_file or self._latest_train_split()
        if not reference or not Path(reference).is_file():
            raise AirflowSkipException(f"no training reference ({reference or 'no prepared dataset'}): nothing to compare with")
        feedback = read_partition(self.feedback_uri, self.ds) or []
        report = drift_report(load_records_file(reference), traffic)
        report.update(feedback_summary(feedback))
        reasons = decide_retraining(report, max_psi=float(self.max_psi),
                                    max_negative_rate=float(self.max_negative_rate))
        # Served traffic (airloom serve): satisfaction, latency/token percentiles, failing outputs.
        report["serving"] = serving_summary(traffic, feedback)
        reasons += decide_serving(report["serving"], max_failing_rate=float(self.max_failing_rate))
        out_dir = task_output_dir(context)
        corrected, dropped = corrected_dataset(feedback)
        if corrected:
            # Raw instruction rows, the input format of llm_data_quality.
            target = out_dir / "corrected" / "instructions.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in corrected))
            report["corrected_dataset"] = {"path": str(target), "rows": len(corrected), "dropped": dropped}
        report.update({"ds": self.ds, "retrain": bool(reasons), "reasons": reasons})
        dashboard = write_dashboard(out_dir, self.traffic_uri, self.feedback_uri, self.ds,
                                    extra={"drift": {k: report.get(k) for k in ("psi_prompt_length", "psi_task_mix")},
                                           "reasons": reasons})
        path = write_report(out_dir, report)
        self.log.info("monitoring ds=%s: %s", self.ds, json.dumps({k: report.get(k) for k in (
            "psi_prompt_length", "psi_task_mix", "negative_rate", "retrain", "reasons")}))
        return {"report": str(path), "retrain": bool(reasons), "reasons": reasons,
                "dashboard": dashboard["dashboard"],
                "corrected_dataset": (report.get("corrected_dataset") or {}).get("path")}

    @staticmethod
    def _latest_train_split() -> str | None:
        from airloom.settings import home

        latest = home() / "datasets" / "latest.json"
        if not latest.is_file():
            return None
        folder = Path(json.loads(latest.read_text())["path"])
        # Parquet since the airloom.prepared/2 format; JSON lines before.
        return str(next((p for p in (folder / "train.parquet", folder / "train.jsonl") if p.is_file()),
                        folder / "train.parquet"))


class RequestRetrainingOperator(BaseOperator):
    """Emit the retraining asset event when ``decision["retrain"]`` is true; skip otherwise.

    A skipped task emits no asset event, so ``llm_finetune`` only starts when a threshold was crossed.
    """

    template_fields: Sequence[str] = ("decision",)

    def __init__(self, *, decision: Any, **kwargs) -> None:
        super().__init__(**kwargs)
        self.decision = decision

    def execute(self, context) -> dict[str, Any]:
        if not self.decision or not self.decision.get("retrain"):
            raise AirflowSkipException("no drift or feedback threshold crossed: no retraining requested")
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {"reasons": self.decision["reasons"],
                                                      "report": self.decision["report"]}
        self.log.info("retraining requested: %s", "; ".join(self.decision["reasons"]))
        return dict(self.decision)
