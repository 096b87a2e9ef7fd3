"""Data-stage operators: validate (Great Expectations), profile (EDA report), prepare (splits).

Each stores its arguments in ``__init__`` and calls the library in ``execute``; library imports
happen there too, so DAG files that import these operators stay cheap to parse.

When the artifact store is remote (``AIRLOOM_ARTIFACTS=s3://…``, workers that share no disk), every path
they hand over (XCom results, the ``prepared_dataset`` event's extra) is a URI of the store: each task
publishes what it wrote (:meth:`AirloomBaseOperator.hand_over`) and stages what another task wrote
(:meth:`AirloomBaseOperator.stage`); the dataset catalog lives on the store too (:mod:`airloom.data.catalog`).
The raw ``source`` is the user's data and is read where it lies (local or ``s3://``), never staged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import Param
from airflow.sdk.exceptions import AirflowFailException

from airloom.airflow.links import EdaReportLink, ValidationReportLink
from airloom.airflow.operators._base import AirloomBaseOperator, asset_event_extra, number, push_outputs


def _chunks(path: str, s3_client: Any, field_map: Any = None):
    """A function streaming the records of ``path`` chunk by chunk (see ``iter_chunks``)."""
    from airloom.data.load import iter_chunks, parse_field_map

    mapping = parse_field_map(field_map)
    return lambda: iter_chunks(path, mapping, s3_client=s3_client)


class ValidateDataOperator(AirloomBaseOperator):
    """Read raw instruction data or conversations and validate them; fail the task when the suite fails.

    :param source: a file, folder or glob (JSONL, JSON, CSV, Parquet), local or ``s3://``.
    :param suite: a YAML file of validation thresholds, or a dict of them; None = defaults.
    :param on_bad_rows: ``quarantine`` (keep going, fail above the quarantine threshold) or ``fail``.
    :param output_dir: where validation.json and .html, accepted/quarantined rows and Data Docs go.
    :param tokenizer: the model's tokenizer (folder, ``registry:NAME`` or hub id), overriding the suite's:
        token lengths in the profile, and per-row bounds when the suite sets ``max_tokens``; empty = the suite's.
    :param field_map: source key -> record field (a dict, JSON text or ``src=field,...``; chat layouts
        and ``KEY=expand``: see :func:`airloom.data.load.iter_chunks`); empty = the layout is recognised
        (ours, Alpaca, Dolly, prompt/completion, OpenAI messages, ShareGPT conversations).
    """

    template_fields: Sequence[str] = (
        "source",
        "suite",
        "on_bad_rows",
        "output_dir",
        "tokenizer",
        "field_map",
    )
    operator_extra_links = (ValidationReportLink(),)

    def __init__(
        self,
        *,
        source: str,
        suite: str | dict | None = None,
        on_bad_rows: str = "quarantine",
        tokenizer: str | None = None,
        field_map: dict | str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.suite = suite
        self.tokenizer = tokenizer
        self.field_map = field_map
        self.on_bad_rows = on_bad_rows

    def execute(self, context) -> dict[str, Any]:
        from airloom.data.load import fingerprint
        from airloom.data.validate import ValidationConfig, validate_stream

        out = self.output_folder(context)
        suite = self.suite or {}
        if isinstance(suite, str):
            suite = ValidationConfig.from_yaml(suite).to_dict()
        overrides = {
            "on_bad_rows": self.on_bad_rows,
            **({"tokenizer": self.tokenizer} if self.tokenizer else {}),
        }
        # Through from_dict, so the task's own arguments are checked as the suite's settings are.
        config = ValidationConfig.from_dict({**suite, **overrides}, source=f"task {self.task_id}")
        result = validate_stream(
            _chunks(self.source, self.s3_client(self.source), self.field_map),
            out,
            config,
            source=self.source,
            scan_source=fingerprint(self.source),
        )
        self.log.info("validation summary:\n%s", result.summary())
        reports = {
            "validation": str(result.report_path),
            "validation_report": str(out / "validation.html"),
            "data_docs": str(result.data_docs_path) if result.data_docs_path else None,
            "scan": str(out / "scan"),  # the profile of the rows read, for the EDA task
        }
        if not result.success:
            # a failed suite is when the report link matters most (and the EDA task still renders the scan)
            push_outputs(context, self.hand_over(context, reports))
            # No retry: the same data fails the same way.
            raise AirflowFailException(
                f"data validation failed for {self.source}; see {out / 'validation.json'}"
            )
        return push_outputs(
            context,
            self.hand_over(
                context,
                {
                    "accepted": str(result.accepted_path),
                    **reports,
                    "rows_read": result.rows_read,
                    "accepted_rows": result.accepted,
                    "quarantined_rows": result.quarantined,
                },
            ),
        )


class DataProfileOperator(AirloomBaseOperator):
    """Write the EDA report (``report.html`` + ``profile.json``) of a file, folder or glob of records
    (local or ``s3://``).

    :param scan_dir: the ``scan`` folder validation wrote while reading the same source (a path, or its URI
        in the artifact store, staged here): its profile is rendered instead of reading the data again (read
        again when absent, not published, or the files changed).
    :param tokenizer: for token lengths when the data is read here (validation's scan has its own).
    :param field_map: as :class:`ValidateDataOperator`'s, when the data is read here.
    """

    template_fields: Sequence[str] = ("input_path", "scan_dir", "output_dir", "tokenizer", "field_map")
    operator_extra_links = (EdaReportLink(),)

    def __init__(
        self,
        *,
        input_path: str,
        scan_dir: str | None = None,
        tokenizer: str | None = None,
        field_map: dict | str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.input_path = input_path
        self.scan_dir = scan_dir
        self.tokenizer = tokenizer
        self.field_map = field_map

    def execute(self, context) -> dict[str, Any]:
        from airloom.artifacts import ArtifactIncomplete
        from airloom.data.eda import profile_source
        from airloom.data.load import parse_field_map

        out = self.output_folder(context)
        scan_dir = self.scan_dir or None
        try:
            scan_dir = self.stage(scan_dir)
        except ArtifactIncomplete as exc:  # validation stopped before publishing it: read the data here
            self.log.warning("no scan to render, reading %s again: %s", self.input_path, exc)
            scan_dir = None
        profile = profile_source(
            self.input_path,
            out,
            scan_dir=scan_dir,
            s3_client=self.s3_client(self.input_path),
            tokenizer=self.tokenizer or None,
            field_map=parse_field_map(self.field_map),
        )
        self.log.info("EDA report: %s (%d rows)", out / "report.html", profile.get("rows", 0))
        return push_outputs(
            context,
            self.hand_over(
                context,
                {
                    "report": str(out / "report.html"),
                    "profile": str(out / "profile.json"),
                    "rows": profile.get("rows", 0),
                },
            ),
        )


class PrepareDatasetOperator(AirloomBaseOperator):
    """Clean, screen PII, dedup, render, length-filter and split accepted records into the next version of a
    named dataset (``datasets/<name>/<version>/`` under ``$AIRLOOM_HOME``, or on the remote artifact store;
    see :mod:`airloom.data.catalog`); emit the asset event naming it.

    The event's extra is ``{name, version, ref, path, dataset_hash, requested_by}`` (``path``: the version's
    URI when the store is remote): ``llm_finetune`` trains on exactly that version, and holds
    ``requested_by`` (this run's requester) to separation of duties. Content equal to the newest version's
    (a retry) reuses that version.

    :param input_path: the accepted records (validation's ``accepted``: a path or its URI in the artifact
        store, staged here), or any file, folder or glob of records, local or ``s3://``.

    :param dataset_name: the dataset's name (``^[a-z0-9][a-z0-9._-]*$``); empty = derived from ``source``.
    :param source: the raw data the accepted records came from: names the dataset when ``dataset_name`` is
        empty, and is recorded in the manifest's ``origin``.
    :param output_dir: a local catalog folder; empty = the catalog of the artifact store
        (``$AIRLOOM_HOME/datasets``, or ``datasets/`` on a remote store).
    :param template: ``auto`` (``chat_template`` for conversations, else ``alpaca``), ``alpaca``,
        ``chatml``, ``chat_template`` (the tokenizer's; ChatML if none) or a Jinja2 file path.
    :param pii_policy: ``mask``, ``drop`` or ``keep``.
    :param max_seq_len: drop rows longer than this many tokens; None = no filter.
    :param tokenizer: model folder or ``registry:NAME[/N|@ALIAS]``; loaded only when the template or
        the length filter needs it; empty = none.
    :param markup: ``strip`` (HTML tags out of rows that do not ask for HTML) or ``keep``.
    :param near_dedup: Jaccard threshold for dropping near-duplicates; None = off (as after validation,
        which quarantined them already).
    """

    template_fields: Sequence[str] = (
        "input_path",
        "dataset_name",
        "source",
        "output_dir",
        "seed",
        "val_fraction",
        "test_fraction",
        "template",
        "pii_policy",
        "max_seq_len",
        "tokenizer",
        "markup",
        "near_dedup",
    )

    def __init__(
        self,
        *,
        input_path: str,
        dataset_name: str | None = None,
        source: str | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        template: str = "auto",
        pii_policy: str = "mask",
        max_seq_len: int | None = None,
        tokenizer: str | None = None,
        markup: str = "strip",
        near_dedup: float | None = 0.8,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.input_path = input_path
        self.dataset_name = dataset_name
        self.source = source
        self.markup = markup
        self.near_dedup = near_dedup
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.template = template
        self.pii_policy = pii_policy
        self.max_seq_len = max_seq_len
        self.tokenizer = tokenizer

    def execute(self, context) -> dict[str, Any]:
        from airloom.data import catalog
        from airloom.data.prepare import prepare
        from airloom.exceptions import UsageError

        try:
            name = catalog.check_name(
                self.dataset_name or catalog.name_from_source(self.source or self.input_path), "dataset_name"
            )
            staged = catalog.staging_dir(name, self.output_dir)
            input_path = self.stage(self.input_path) or self.input_path  # another task's output: staged
            chunks = _chunks(input_path, self.s3_client(input_path))
            records = (rec for chunk in chunks() for rec in chunk.records)
            manifest = prepare(
                records,
                staged,
                seed=number(self.seed, "seed"),
                val_fraction=number(self.val_fraction, "val_fraction", float),
                test_fraction=number(self.test_fraction, "test_fraction", float),
                template=self.template,
                pii_policy=self.pii_policy,
                max_seq_len=number(self.max_seq_len, "max_seq_len", optional=True),
                tokenizer=self.tokenizer or None,
                markup=self.markup,
                near_dedup=number(self.near_dedup, "near_dedup", float, optional=True),
            )
        except UsageError as exc:
            # Bad name, template, tokenizer or policy: the same arguments fail the same way, so no retry.
            raise AirflowFailException(str(exc)) from exc
        self.log.info("prepare counts: %s", json.dumps(manifest["counts"]))
        for reason, ids in manifest["dropped_ids"].items():
            if reason != "cap" and ids:
                self.log.info("dropped (%s), first ids: %s", reason, ", ".join(ids[:20]))
        origin = {
            "dag_id": context["ti"].dag_id,
            "run_id": context["run_id"],
            **({"source": self.source} if self.source else {}),
        }
        dataset = catalog.publish(staged, name, origin=origin, root=self.output_dir, artifacts=self.artifacts)
        info = dataset.summary()
        reused = dataset.manifest.get("origin", {}).get("run_id") != context["run_id"]
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = asset_event_extra(
                context, {k: info[k] for k in ("name", "version", "ref", "path", "dataset_hash")}
            )
        self.log.info(
            "prepared dataset %s at %s: %s%s",
            dataset.ref,
            dataset.path,
            json.dumps(info["splits"]),
            " (same content as that version: reused it)" if reused else "",
        )
        # The catalog published the version itself; this task wrote nothing else to hand over.
        return push_outputs(context, self.artifacts.handover(info))


def dataset_file(dataset_dir: str, split: str) -> str:
    """``<split>.parquet`` of a prepared dataset, else ``<split>.jsonl`` (prepared before Parquet)."""
    for suffix in (".parquet", ".jsonl"):
        path = Path(dataset_dir) / f"{split}{suffix}"
        if path.is_file():
            return str(path)
    raise AirflowFailException(
        f"{Path(dataset_dir) / split}.parquet: split {split!r} missing from prepared dataset {dataset_dir} "
        "(no .parquet or .jsonl)"
    )


def _event_choice(context) -> tuple[str | None, dict[str, Any], list[str]]:
    """The dataset the triggering asset events name: (reference, that event's extra, the others ignored).

    A ``prepared_dataset`` event names a version (``ref``; ``path`` from before names existed); a
    ``retraining_request`` names ``dataset`` (e.g. ``demo@latest``). With several queued, the newest wins.
    """
    named = []
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            extra = dict(getattr(event, "extra", None) or {})
            ref = extra.get("ref") or extra.get("dataset") or extra.get("path")
            if ref:
                named.append((str(getattr(event, "timestamp", "") or ""), str(ref), extra))
    if not named:
        return None, {}, []
    named.sort(key=lambda item: item[0])
    _, ref, extra = named[-1]
    return ref, extra, [r for _, r, _ in named[:-1] if r != ref]


def dataset_param(limit: int = 30, **kwargs: Any) -> Param:
    """The ``dataset`` param of a DAG that trains on a prepared dataset, for its trigger form.

    The form proposes the newest ``limit`` prepared versions (``name@version`` with rows and date; read
    from ``$AIRLOOM_HOME/datasets`` when the DAG file is parsed: a directory listing and a small JSON file
    per version, so the list is as fresh as the last parse) and still takes any reference or folder.
    With the catalog on a remote artifact store it proposes none (parsing must not call the network): the
    reference is typed (``airloom datasets`` lists them).
    ``kwargs`` go to the Param as they are (e.g. ``section``).
    """
    from airloom.data.catalog import choices

    listed = choices(limit)
    return Param(
        None,
        type=["null", "string"],
        title="Prepared dataset",
        description="name@version (e.g. demo@3), name@latest, or a prepared folder. Empty: the dataset the "
        "triggering prepared_dataset (or retraining_request) event names; a manual run must name one "
        "(left empty, it fails and lists them; `airloom datasets` lists them too)",
        **({"examples": list(listed), "values_display": listed} if listed else {}),
        **kwargs,
    )


class ResolveDatasetOperator(AirloomBaseOperator):
    """Find the prepared dataset a fine-tuning run uses and return its split files.

    The ``dataset`` argument (a DAG param: ``name@version``, ``name@latest``/``name`` or a folder) when
    given; else the dataset the triggering asset event names. A run with neither (a manual run with the
    param left empty) fails without retry and lists the prepared datasets: which data a model learns from
    is chosen, never guessed.

    Returns (and pushes) ``path``, ``ref`` (``name@version``; None for a folder outside the catalog),
    ``name``, ``version``, ``dataset_hash``, ``source`` (how it was chosen), ``data_quality_run`` (the
    run that prepared it, when known) and the three split files. With a remote artifact store (the catalog
    there) these are URIs: the task that reads a split stages it.
    """

    template_fields: Sequence[str] = ("dataset",)

    def __init__(self, *, dataset: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dataset = dataset

    def execute(self, context) -> dict[str, Any]:
        from airloom.data import catalog
        from airloom.exceptions import UsageError

        ref = str(self.dataset).strip() if self.dataset else ""
        source, extra = "param", {}
        if not ref:
            ref, extra, ignored = _event_choice(context)
            source = "asset event"
            if ignored:
                self.log.warning(
                    "several asset events name datasets: using the newest, %s; not %s", ref, ignored
                )
        if not ref:
            raise AirflowFailException(catalog.no_choice_message(artifacts=self.artifacts))
        try:
            dataset = catalog.resolve(ref, artifacts=self.artifacts)
        except UsageError as exc:
            raise AirflowFailException(str(exc)) from exc
        expected = extra.get("dataset_hash")
        if expected and expected != dataset.dataset_hash:
            # Versions never change; a folder from before names did, or someone rewrote the files.
            raise AirflowFailException(
                f"{ref}: dataset_hash {dataset.dataset_hash[:12]} differs from the asset event's "
                f"{expected[:12]}: the files changed after they were prepared; name the dataset to use"
            )
        origin = dataset.manifest.get("origin") or {}
        dq_run = None
        if origin.get("dag_id") and origin.get("run_id"):
            from airloom.settings import run_dir

            dq_run = str(run_dir(origin["dag_id"], origin["run_id"]))
        self.log.info(
            "dataset %s (%s, chosen by %s: %r), hash %s, rows %s",
            dataset.ref or dataset.path,
            dataset.path,
            source,
            ref,
            dataset.dataset_hash,
            json.dumps(dataset.rows),
        )
        path = str(dataset.path)
        if path.startswith("s3://"):
            files = self._remote_files(path)
            splits = {
                split: _remote_dataset_file(path, files, split) for split in ("train", "validation", "test")
            }
        else:
            splits = {split: dataset_file(path, split) for split in ("train", "validation", "test")}
        return push_outputs(
            context,
            self.hand_over(
                context,
                {
                    "path": path,
                    "ref": dataset.ref,
                    "name": dataset.name,
                    "version": dataset.version,
                    "dataset_hash": dataset.dataset_hash,
                    "source": source,
                    "data_quality_run": dq_run,
                    **splits,
                },
            ),
        )

    def _remote_files(self, uri: str) -> set[str]:
        """The files of a published dataset version, from its artifact manifest."""
        from airloom.artifacts import ArtifactIncomplete

        try:
            return {entry.rel for entry in self.artifacts.entries(uri)}
        except ArtifactIncomplete as exc:
            raise AirflowFailException(str(exc)) from exc


def _remote_dataset_file(uri: str, files: set[str], split: str) -> str:
    """As :func:`dataset_file`, for a version on the artifact store (``files``: its manifest's)."""
    for suffix in (".parquet", ".jsonl"):
        if f"{split}{suffix}" in files:
            return f"{uri.rstrip('/')}/{split}{suffix}"
    raise AirflowFailException(
        f"{uri}/{split}.parquet: split {split!r} missing from prepared dataset {uri} (no .parquet or .jsonl)"
    )
