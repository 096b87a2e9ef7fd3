"""Monitoring operators: compare a day of traffic and feedback with the training data, request
retraining, and announce corrected answers as a new raw dataset."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

from airloom.airflow.defaults import MODEL_NAME
from airloom.airflow.links import MonitoringDashboardLink
from airloom.airflow.operators._base import AirloomBaseOperator, asset_event_extra, skip_task


class DriftMonitorOperator(AirloomBaseOperator):
    """Drift of ``ds``'s traffic vs. the training data, plus the day's feedback; may request retraining.

    Returns the decision; :class:`RequestRetrainingOperator` turns it into an asset event and
    :class:`PublishFeedbackDatasetOperator` announces the corrected answers as a dataset.

    The reference is the data the model was trained on: ``reference_file``/``reference_profile`` if
    given; else the prepared dataset in the registry lineage (``dataset_ref``, else ``dataset``) of the
    model version that served the day's traffic (its records name it), else of ``model_name@production``;
    only when no lineage names one, the newest prepared dataset, with a warning. For a dataset, the input
    drift reference is the EDA ``profile.json`` that ``llm_data_quality``'s ``eda_report`` wrote in the run
    that prepared it, else a profile of its train split. The report's ``reference`` says which and why.
    Either way the reference holds the records in their own shape: conversations stay conversations
    (:func:`airloom.monitoring.drift.profile_records`), and so does the chat traffic compared with it.

    With the artifact store on S3 (``AIRLOOM_ARTIFACTS``, workers that share no disk) every input is read
    from the store: the day's partitions (the batch objects ``airloom serve`` wrote, listed and read), the
    reference files (staged, verified against the manifest of the artifact that holds them: the data DAG's
    published ``eda_report`` and prepared split); the task's folder and the day's corrections are
    published, and the result and the report name ``s3://`` URIs. A local store reads and writes folders.

    :param traffic_uri: root of ``ds=YYYY-MM-DD/*.jsonl`` partitions of prompts served: a folder or an
        ``s3://`` prefix (the artifact store's ``data/traffic``, or another one read through the connection).
    :param feedback_uri: root of ``ds=YYYY-MM-DD/*.jsonl`` partitions of ``{"id", "rating": 1|-1}``, as above.
    :param reference_file: the training split (a prepared split: ``prompt``, ``task``, and ``messages`` on
        conversations); empty = the served model's training dataset (above).
    :param model_name: the registered model whose ``production`` version's lineage names the training
        dataset when the traffic does not name the version that served it.
    :param reference_profile: an EDA ``profile.json`` of the training data; empty = found as above.
    :param corrections_uri: root of the ``ds=YYYY-MM-DD/instructions.jsonl`` corrected-answer datasets;
        empty = the task's own folder.
    :param max_psi: most population stability index of any drift measure (prompt length, task mix;
        instruction/input length, script and language mix vs. the training profile) before retraining.
    """

    template_fields: Sequence[str] = (
        "traffic_uri",
        "feedback_uri",
        "reference_file",
        "reference_profile",
        "model_name",
        "corrections_uri",
        "ds",
        "max_psi",
        "max_negative_rate",
        "max_failing_rate",
    )
    operator_extra_links = (MonitoringDashboardLink(),)

    def __init__(
        self,
        *,
        traffic_uri: str,
        feedback_uri: str,
        reference_file: str | None,
        ds: str,
        reference_profile: str | None = None,
        model_name: str | None = MODEL_NAME,
        corrections_uri: str | None = None,
        max_psi: float = 0.25,
        max_negative_rate: float = 0.3,
        max_failing_rate: float = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.traffic_uri = traffic_uri
        self.feedback_uri = feedback_uri
        self.reference_file = reference_file
        self.reference_profile = reference_profile
        self.model_name = model_name
        self.corrections_uri = corrections_uri
        self.ds = ds
        self.max_psi = max_psi
        self.max_negative_rate = max_negative_rate
        self.max_failing_rate = max_failing_rate

    def execute(self, context) -> dict[str, Any]:
        from airloom.data.splits import read_split
        from airloom.evaluation.backfill import day_end
        from airloom.monitoring.drift import (
            decide_input_drift,
            decide_retraining,
            drift_report,
            feedback_summary,
            input_drift,
            write_report,
        )
        from airloom.monitoring.serving import (
            corrected_dataset,
            decide_serving,
            serving_summary,
            write_dashboard,
        )

        if day_end(self.ds) > datetime.now(UTC):
            # A person asked for today on purpose (scheduled runs only see ended days): judge what is
            # there, and say that the figures cover part of the day.
            self.log.warning(
                "ds=%s has not ended yet (UTC): judging the traffic logged so far; the scheduled run "
                "after midnight judges the whole day",
                self.ds,
            )
        traffic_days, feedback_days = self._partitions(self.traffic_uri), self._partitions(self.feedback_uri)
        traffic = traffic_days.read(self.ds)
        if traffic is None:
            raise skip_task(self.log, f"no traffic partition {traffic_days.where(self.ds)}")
        out_dir = self.output_folder(context)
        split, profile, chosen = self._reference(traffic)
        if profile is None and split is None:
            missing = self.reference_profile or self.reference_file or "no prepared dataset"
            raise skip_task(self.log, f"no training reference ({missing}): nothing to compare with")
        self.log.info("training reference: %s", json.dumps(chosen))
        feedback = feedback_days.read(self.ds) or []
        training = read_split(split) if split else None
        report: dict[str, Any] = drift_report(training, traffic) if training is not None else {}
        report.update(feedback_summary(feedback))
        reasons = decide_retraining(
            report, max_psi=float(self.max_psi), max_negative_rate=float(self.max_negative_rate)
        )
        if profile is not None:
            profile_path, local_profile = profile  # where it lives (a URI on S3), the local copy read
            reference = json.loads(Path(local_profile).read_text())
        else:  # no EDA profile of the training data: profile its split the same way, conversations as such
            from airloom.data.eda import build_profile
            from airloom.monitoring.drift import profile_records

            profile_path = str(out_dir / "reference_profile" / "profile.json")
            reference = build_profile(
                profile_records(training), out_dir / "reference_profile", near_duplicate_threshold=None
            )
        report["input_drift"] = {
            "reference_profile": profile_path,
            **input_drift(reference, traffic, out_dir / "traffic_profile"),
        }
        reasons += decide_input_drift(report["input_drift"], max_input_psi=float(self.max_psi))
        # Served traffic (airloom serve): satisfaction, latency/token percentiles, failing outputs.
        report["serving"] = serving_summary(traffic, feedback)
        reasons += decide_serving(report["serving"], max_failing_rate=float(self.max_failing_rate))
        corrected, dropped = corrected_dataset(feedback)
        report["corrected_dataset"], corrections = self._write_corrections(out_dir, corrected, dropped)
        report.update({"ds": self.ds, "retrain": bool(reasons), "reasons": reasons, "reference": chosen})
        dashboard = write_dashboard(
            out_dir,
            traffic_days,
            feedback_days,
            self.ds,
            input_drift=report["input_drift"],
            extra={
                "drift": {k: report.get(k) for k in ("psi_prompt_length", "psi_task_mix")},
                "reasons": reasons,
            },
        )
        # The report names what other machines can read: URIs once the store is on S3 (hand_over publishes).
        path = write_report(out_dir, self.artifacts.handover(report))
        self.log.info(
            "monitoring ds=%s: %s",
            self.ds,
            json.dumps(
                {
                    k: report.get(k)
                    for k in ("psi_prompt_length", "psi_task_mix", "negative_rate", "retrain", "reasons")
                }
            ),
        )
        result = {
            "report": str(path),
            "retrain": bool(reasons),
            "reasons": reasons,
            "dashboard": dashboard["dashboard"],
            # the path, as before; the whole entry (rows, sha256, ds) for PublishFeedbackDatasetOperator
            "corrected_dataset": report["corrected_dataset"]["path"],
            "feedback_dataset": report["corrected_dataset"],
            "reference": chosen,
        }
        # On S3: the task's folder and the day's corrections published (manifest last), URIs handed over.
        return self.hand_over(context, result, corrections)

    def _partitions(self, location: str):
        """The daily partitions at ``location``: the artifact store's (a URI, or a path under AIRLOOM_HOME
        when the store is on S3), another s3:// prefix (through the connection), or a folder."""
        from airloom.data.partitions import DailyPartitions

        return DailyPartitions.open(location, artifacts=self.artifacts, client=self.s3_client(location))

    def _fetch(self, location: str | None) -> str | None:
        """A local copy of the file ``location`` names, None when there is none. On an S3 store, a URI of
        the store or a path under AIRLOOM_HOME is read from the store (staged: verified against its
        artifact's manifest, so half an upload is never read); a local file otherwise."""
        if not location:
            return None
        from airloom.artifacts import ArtifactIncomplete, is_remote
        from airloom.exceptions import RegistryError

        store = self.artifacts
        if store.remote and store.key_of(location) is not None:
            uri = location if is_remote(location) else store.uri_of(location)
            try:
                staged = store.stage(uri)
            except (ArtifactIncomplete, RegistryError) as exc:
                self.log.info("%s: not in the artifact store (%s)", uri, exc)
            else:
                if staged.is_file():
                    return str(staged)
        if is_remote(location):
            return None
        return location if Path(location).is_file() else None

    def _reference(
        self, traffic: list[dict] | None = None
    ) -> tuple[str | None, tuple[str, str] | None, dict]:
        """(training split file, (EDA profile's location, its local copy), what was chosen and why); the
        files are local copies, either may be None."""
        split = self._fetch(self.reference_file)
        if self.reference_profile:  # named explicitly: missing means skip, not a silent fallback
            found = self._fetch(self.reference_profile)
            chosen = {"source": "reference_profile param", "profile": self.reference_profile}
            return (split, (self.reference_profile, found), chosen) if found else (None, None, chosen)
        if self.reference_file:
            return split, None, {"source": "reference_file param", "file": self.reference_file}
        dataset, chosen = self._training_dataset(traffic or [])
        if dataset is None:
            return None, None, chosen
        from airloom.settings import run_dir

        folder = str(dataset["path"]).rstrip("/")  # a folder, or its URI in the artifact store
        chosen["dataset"] = dataset.get("ref") or folder
        # Parquet since the airloom.prepared/2 format; JSON lines before.
        split = next(
            (got for name in ("train.parquet", "train.jsonl") if (got := self._fetch(f"{folder}/{name}"))),
            None,
        )
        if dataset.get("dag_id") and dataset.get("run_id"):
            # llm_data_quality's eda_report task profiled the data that run read (prepare split its accepted
            # rows); on S3 its published artifact, under the same key.
            where = str(run_dir(dataset["dag_id"], dataset["run_id"], "eda_report") / "profile.json")
            where = self.artifacts.uri_of(where)
        else:  # prepared inside its data-quality run's folder (before names)
            where = f"{folder.rsplit('/', 1)[0]}/eda_report/profile.json"
        found = self._fetch(where)
        return split, ((where, found) if found else None), chosen

    def _training_dataset(self, traffic: list[dict]) -> tuple[dict | None, dict]:
        """The prepared dataset the served model learnt from: (its summary, how it was found)."""
        from collections import Counter

        from airloom.data import catalog

        served = Counter(
            (r.get("model_name"), r.get("model_version"))
            for r in traffic
            if isinstance(r.get("model_name"), str) and isinstance(r.get("model_version"), int)
        )
        candidates = [(f"served model {n}/{v}", n, v) for (n, v), _ in served.most_common(1)]
        if self.model_name:
            candidates.append((f"{self.model_name}@production", self.model_name, None))
        tried = []
        for label, name, version in candidates:
            lineage, why = self._lineage(name, version)
            if lineage is None:
                tried.append(f"{label}: {why}")
                continue
            for key in ("dataset_ref", "dataset"):
                if lineage.get(key):
                    try:
                        found = catalog.resolve(str(lineage[key]))
                    except Exception as exc:  # noqa: BLE001 - a deleted dataset: say so, try the next
                        tried.append(f"{label}: lineage {key} {lineage[key]!r}: {exc}")
                        continue
                    return found.summary(), {"source": f"{label}'s lineage", "lineage_" + key: lineage[key]}
            if not (lineage.get("dataset_ref") or lineage.get("dataset")):
                tried.append(f"{label}: its lineage names no dataset")
        latest = catalog.read_latest()
        why = "; ".join(tried) or "no model to ask"
        if latest is None:
            return None, {"source": None, "why": why}
        self.log.warning(
            "no model lineage names the training dataset (%s): falling back to the newest prepared dataset, "
            "%s, as the drift reference; set reference_file to choose another",
            why,
            latest.get("ref") or latest.get("path"),
        )
        return latest, {"source": "newest prepared dataset (fallback)", "why": why}

    def _lineage(self, name: str, version: int | None) -> tuple[dict | None, str]:
        """The lineage of ``name``'s ``version`` (None: its production version); (None, why) if there is none."""
        from airloom.exceptions import AirloomError

        try:
            registry = self.hook.registry
            if version is None:
                version = registry.get_alias(name, "production")
                if version is None:
                    return None, "no production alias"
            return dict(registry.get(name, version).metadata.get("lineage") or {}), ""
        except (AirloomError, OSError) as exc:
            return None, str(exc)

    def _write_corrections(
        self, out_dir: Path, corrected: list[dict], dropped: dict
    ) -> tuple[dict, Path | None]:
        """Corrected answers as raw instruction rows (llm_data_quality's input), one version per ``ds``:
        (the entry for the report, the folder to publish with the task's, if any).

        The ``ds`` partition is replaced as a whole, so a rerun leaves exactly this run's rows there. A
        ``corrections_uri`` in the artifact store on S3 is written under the same key below AIRLOOM_HOME and
        published (the folder returned); another s3:// prefix gets the file in one PUT.
        """
        import hashlib

        from airloom.artifacts import is_remote
        from airloom.settings import home

        foreign = None  # (store, key): an s3:// prefix outside the artifact store
        root = Path(self.corrections_uri) if self.corrections_uri else out_dir / "corrected"
        if self.corrections_uri and is_remote(self.corrections_uri):
            key = self.artifacts.key_of(self.corrections_uri) if self.artifacts.remote else None
            if key is not None:
                root = home() / key  # the store's key, mirrored on this worker's disk
            else:
                from airloom.registry.store import open_store

                client = self.s3_client(self.corrections_uri)
                foreign = (open_store(self.corrections_uri, client), f"ds={self.ds}/instructions.jsonl")
        partition = root / f"ds={self.ds}" if self.corrections_uri else root
        target = partition / "instructions.jsonl"
        published = self.artifacts.remote and foreign is None and self.artifacts.key_of(partition.resolve())
        if not corrected:
            target.unlink(missing_ok=True)
            if foreign is not None:
                foreign[0].delete_prefix(foreign[1])
            elif published:  # this day's earlier version, gone from the store too
                self.artifacts.store.delete_prefix(f"{self.artifacts.key_of(partition.resolve())}/")
            return {"path": None, "rows": 0, "dropped": dropped, "ds": self.ds}, None
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in corrected).encode()
        entry = {
            "path": str(target),
            "rows": len(corrected),
            "dropped": dropped,
            "sha256": hashlib.sha256(data).hexdigest(),
            "ds": self.ds,
        }
        if foreign is not None:
            foreign[0].put_bytes(foreign[1], data)  # one PUT: there whole or not at all
            entry["path"] = foreign[0].uri(foreign[1])
            return entry, None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
        return entry, (partition if published else None)


def retrain_on(reference: dict | None) -> str | None:
    """What a retraining request asks ``llm_finetune`` to train on: the newest version of the dataset the
    served model learnt from (``name@latest``: corrections prepared under that name since are included);
    None when the reference did not come from a model's lineage or was not a named dataset (then the
    request names none, and ``llm_finetune`` refuses to guess)."""
    reference = reference or {}
    ref = reference.get("dataset")
    from_lineage = str(reference.get("source") or "").endswith("lineage")  # not the newest-dataset fallback
    if not from_lineage or not isinstance(ref, str) or "@" not in ref or "/" in ref:
        return None
    return ref.split("@", 1)[0] + "@latest"


class RequestRetrainingOperator(BaseOperator):
    """Emit the retraining asset event when ``decision["retrain"]`` is true; skip otherwise.

    A skipped task emits no asset event, so ``llm_finetune`` only starts when a threshold was crossed. The
    event's extra holds ``reasons``, ``report``, ``requested_by`` (this run's requester: ``system:…`` for a
    scheduled run) and, when the monitor's reference was a named dataset,
    ``dataset`` (``name@latest``, see :func:`retrain_on`), which ``llm_finetune``'s resolve_dataset uses.
    """

    template_fields: Sequence[str] = ("decision",)

    def __init__(self, *, decision: Any, **kwargs) -> None:
        super().__init__(**kwargs)
        self.decision = decision

    def execute(self, context) -> dict[str, Any]:
        if not self.decision or not self.decision.get("retrain"):
            raise skip_task(self.log, "no drift or feedback threshold crossed: no retraining requested")
        extra = {"reasons": self.decision["reasons"], "report": self.decision["report"]}
        dataset = retrain_on(self.decision.get("reference"))
        if dataset:
            extra["dataset"] = dataset
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = asset_event_extra(context, extra)
        self.log.info("retraining requested: %s", "; ".join(self.decision["reasons"]))
        return dict(self.decision)


class PublishFeedbackDatasetOperator(BaseOperator):
    """Emit the ``feedback_dataset`` asset event for the corrected answers the monitor wrote; skip when none.

    The event's extra (``path``, ``rows``, ``sha256``, ``ds``) is what ``llm_data_quality``'s ``source``
    param takes to turn them into a prepared dataset version.
    """

    template_fields: Sequence[str] = ("decision",)

    def __init__(self, *, decision: Any, **kwargs) -> None:
        super().__init__(**kwargs)
        self.decision = decision

    def execute(self, context) -> dict[str, Any]:
        corrected = (self.decision or {}).get("feedback_dataset") or {}
        if not corrected.get("path"):
            raise skip_task(self.log, "no corrected answers passed validation and dedup: no feedback dataset")
        extra = {k: corrected.get(k) for k in ("path", "rows", "sha256", "ds")}
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = asset_event_extra(context, extra)
        self.log.info(
            "feedback dataset %s (%d rows): trigger llm_data_quality with source=%s",
            extra["path"],
            extra["rows"],
            extra["path"],
        )
        return extra
