"""The ``airloom`` command: every pipeline stage without a scheduler.

Exit codes: 0 ok; 1 the data or model failed a check (validation, gate, sign-off rejected,
corrupt version); 2 bad usage or unreadable input. Errors are one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from airloom.exceptions import AirloomError, CheckFailed, UsageError


def _emit(args, data: Any, text: str | None = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    elif text is not None:
        print(text)
    else:
        print(json.dumps(data, indent=2, default=str))


def _registry(args):
    from airloom.registry.registry import ModelRegistry
    from airloom.settings import registry_uri

    return ModelRegistry.from_uri(args.registry or registry_uri())


def _split_ref(ref: str) -> tuple[str, int]:
    name, sep, version = ref.partition("/")
    if not sep or not version.isdigit():
        raise UsageError(f"expected NAME/VERSION (e.g. airloom-demo/3), got {ref!r}")
    return name, int(version)


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    # s3:// sources and globs are checked where they are read (a missing key is a usage error there too).
    if not path.startswith("s3://") and not p.exists() and not any(ch in path for ch in "*?["):
        raise UsageError(f"{what} {path}: no such file or folder")
    return p


# -- data -----------------------------------------------------------------------------------------


def cmd_validate(args) -> int:
    from airloom.data.load import fingerprint, iter_chunks, parse_field_map
    from airloom.data.validate import ValidationConfig, validate_stream

    _existing(args.source, "input")
    field_map = parse_field_map(args.field_map)
    config = ValidationConfig.from_yaml(args.suite) if args.suite else ValidationConfig()
    if args.on_bad_rows:
        config.on_bad_rows = args.on_bad_rows
    if args.tokenizer:
        config.tokenizer = args.tokenizer
    result = validate_stream(
        lambda: iter_chunks(args.source, field_map),
        Path(args.out),
        config,
        source=args.source,
        scan_source=fingerprint(args.source),
    )
    _emit(args, json.loads(result.report_path.read_text()) if args.json else None, result.summary())
    return 0 if result.success else 1


def cmd_eda(args) -> int:
    from airloom.data.eda import profile_source
    from airloom.data.load import parse_field_map

    _existing(args.input, "input")
    previous = json.loads(Path(args.previous).read_text()) if args.previous else None
    profile = profile_source(
        args.input,
        Path(args.out),
        scan_dir=args.scan,
        previous_profile=previous,
        tokenizer=args.tokenizer or None,
        field_map=parse_field_map(args.field_map),
    )
    _emit(args, profile, f"EDA report: {Path(args.out) / 'report.html'} ({profile.get('rows')} rows)")
    return 0


def _threshold_or_off(text: str) -> float | None:
    if text.strip().lower() in ("off", "none", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a Jaccard threshold such as 0.8, or off; got {text!r}"
        ) from None


def cmd_prepare(args) -> int:
    from airloom.data.load import iter_chunks, parse_field_map
    from airloom.data.prepare import prepare

    _existing(args.input, "input")
    field_map = parse_field_map(args.field_map)
    records = (rec for chunk in iter_chunks(args.input, field_map) for rec in chunk.records)
    if args.name:  # the next version of a named dataset, as llm_data_quality publishes them
        from airloom.data import catalog

        out = catalog.staging_dir(catalog.check_name(args.name, "--name"))
    else:
        out = Path(args.out)
    manifest = prepare(
        records,
        out,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        template=args.template,
        pii_policy=args.pii_policy,
        max_seq_len=args.max_seq_len,
        tokenizer=args.tokenizer.strip() or None,
        markup=args.markup,
        near_dedup=args.near_dedup,
    )
    where = args.out
    if args.name:
        import getpass

        published = catalog.publish(
            out, args.name, origin={"cli": "airloom prepare", "user": getpass.getuser()}
        )
        manifest, where = published.manifest, f"{published.ref} ({published.path})"
    counts = manifest["counts"]
    dropped = ", ".join(
        f"{k} {counts[k]}" for k in ("pii_dropped", "deduped", "too_long", "near_deduped") if counts[k]
    )
    splits = {k: v["rows"] for k, v in manifest["splits"].items()}
    dropped = f" (dropped: {dropped})" if dropped else ""
    _emit(
        args,
        manifest,
        f"prepared {where}: {splits} of {counts['input']} rows{dropped} (hash {manifest['dataset_hash'][:12]})",
    )
    return 0


def cmd_datasets(args) -> int:
    from airloom.data import catalog

    if args.ref:
        found = catalog.resolve(args.ref)
        _emit(args, found.summary(), json.dumps(found.summary(), indent=2))
        return 0
    listed = catalog.list_datasets()
    if args.name:
        listed = [d for d in listed if d.name == args.name]
    text = "\n".join(catalog.describe(listed).values()) or f"no prepared datasets in {catalog.where()}"
    _emit(args, [d.summary() for d in listed], text)
    return 0


def cmd_synth(args) -> int:
    from airloom.demo import write_demo_data

    info = write_demo_data(
        Path(args.out), rows=args.rows, history_days=args.history_days, history_rows=args.history_rows
    )
    _emit(args, info, f"wrote {info['raw']} and {len(info['history'])} history partitions")
    return 0


# -- training -------------------------------------------------------------------------------------


def cmd_base(args) -> int:
    from airloom.demo import build_and_register_base

    info = build_and_register_base(
        _registry(args), args.name, Path(args.out) if args.out else None, force=args.force
    )
    _emit(args, info, f"base model {info['ref']} ({info['path']})")
    return 0


def cmd_train(args) -> int:
    from airloom.registry.resolve import resolve_model
    from airloom.training.config import TrainConfig
    from airloom.training.launcher import LaunchSpec, TrainingProcess, build_command, child_env
    from airloom.training.presets import preset_path

    config_file = preset_path(args.config)  # a shipped preset's name, or the user's YAML
    overrides = {
        "base_model": args.base_model,
        "train_file": args.train_file,
        "output_dir": args.output_dir,
        "validation_file": args.validation_file,
        "launcher": args.launcher,
        "nproc_per_node": args.nproc_per_node,
        "max_steps": args.max_steps,
    }
    cfg = TrainConfig.from_file(config_file, **overrides)
    for field in ("base_model", "train_file", "output_dir"):
        if not getattr(cfg, field):
            raise UsageError(
                f"{field} is not set: give it in {config_file} or as --{field.replace('_', '-')}"
            )
    _existing(cfg.train_file, "train file")
    from airloom.training.recipe import preflight

    preflight(cfg)
    cfg.base_model = resolve_model(cfg.base_model, registry=_registry(args))["path"]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = LaunchSpec(
        config_path=cfg.save(out / "train_config.json"),
        launcher=cfg.launcher,
        nproc_per_node=cfg.nproc_per_node,
    )
    TrainingProcess(build_command(spec), child_env()).run(log=lambda line: print(line, flush=True))
    metrics = json.loads((out / "train_metrics.json").read_text())
    metrics.pop("history", None)
    _emit(
        args,
        metrics,
        f"trained {out / 'model'}: {metrics['steps']} steps, final loss {metrics['final_loss']}",
    )
    return 0


# -- evaluation -----------------------------------------------------------------------------------


def cmd_evaluate_run(args) -> int:
    from airloom.data.splits import read_split
    from airloom.evaluation.gates import check_gates, parse_gates
    from airloom.evaluation.harness import evaluate_model
    from airloom.registry.resolve import resolve_model

    _existing(args.data, "dataset")
    model = resolve_model(args.model, registry=_registry(args))
    metrics = evaluate_model(
        model["path"],
        read_split(args.data),
        Path(args.out),
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        dataset_file=args.data,  # conversations are rendered with the template the dataset was prepared with
    )
    results = check_gates(metrics, parse_gates(args.gates)) if args.gates else []
    text = "\n".join(
        [f"{k}: {v:.4f}" for k, v in metrics["aggregate"].items()]
        + [("PASS " if r["passed"] else "FAIL ") + r["message"] for r in results]
    )
    _emit(args, {**metrics, "gates": results}, text)
    return 1 if any(not r["passed"] for r in results) else 0


def cmd_evaluate_score(args) -> int:
    from airloom.data.splits import read_jsonl
    from airloom.evaluation.metrics import score_predictions

    preds = {r["id"]: r["prediction"] for r in read_jsonl(_existing(args.predictions, "predictions"))}
    refs, tasks = {}, {}
    for r in read_jsonl(_existing(args.references, "references")):
        refs[r["id"]] = r["references"] if "references" in r else [r["reference"]]
        tasks[r["id"]] = r.get("task")  # "math" scores the final numeric answer too (gsm8k-style)
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise UsageError(f"{args.predictions}: no prediction for id(s) {missing[:5]}")
    ids = sorted(refs)
    scores = score_predictions([preds[i] for i in ids], [refs[i] for i in ids], task=[tasks[i] for i in ids])
    for i, row in zip(ids, scores["per_example"], strict=True):
        row["id"] = i
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(
        json.dumps({**scores["aggregate"], "per_example": scores["per_example"]}, indent=2)
    )
    _emit(args, scores["aggregate"], "\n".join(f"{k}: {v:.4f}" for k, v in scores["aggregate"].items()))
    return 0


# -- registry and sign-off ------------------------------------------------------------------------


def cmd_registry(args) -> int:
    import getpass

    reg = _registry(args)
    actor = args.user or getpass.getuser()
    if args.registry_cmd == "register":
        mv = reg.register(args.name, _existing(args.folder, "model folder"), metadata={}, actor=actor)
        _emit(args, mv.to_dict(), f"registered {mv.ref}")
    elif args.registry_cmd == "list":
        versions = reg.list_versions(args.name)
        aliases = reg.list_aliases(args.name)
        rows = [
            {
                "version": v.version,
                "created_at": v.created_at,
                "created_by": v.created_by,
                "aliases": [a for a, n in aliases.items() if n == v.version],
            }
            for v in versions
        ]
        _emit(
            args,
            rows,
            "\n".join(
                f"{r['version']:>4}  {r['created_at']}  {r['created_by']:<12} {','.join(r['aliases'])}"
                for r in rows
            )
            or f"{args.name}: no versions",
        )
    elif args.registry_cmd == "show":
        mv = reg.resolve(args.ref)
        _emit(args, mv.to_dict())
    elif args.registry_cmd == "verify" and args.ref is None:
        return _verify_records(args, reg)
    elif args.registry_cmd == "verify":
        if args.model:
            raise UsageError(
                "registry verify: give NAME/VERSION (the files) or --model NAME (the records), not both"
            )
        name, version = _split_ref(args.ref)
        reg.verify(name, version)
        _emit(args, {"ref": args.ref, "ok": True}, f"{args.ref}: every file matches its sha256")
    elif args.registry_cmd == "promote":
        from airloom.governance.promotion import promote

        name, version = _split_ref(args.ref)
        cas = {} if args.expect is None else {"expected_version": _expected_version(args.expect)}
        record = promote(
            reg,
            name,
            version,
            args.alias,
            actor=actor,
            reason=args.reason or "promoted by CLI",
            policy=_signoff_policy(),
            executed_by=f"cli:{getpass.getuser()}",
            **cas,
        )
        _emit(args, record, f"{name}@{args.alias} -> {version} (was {record['from']})")
    elif args.registry_cmd == "history" and args.at:
        return _alias_at(args, reg)
    elif args.registry_cmd == "history":
        records = reg.history(args.name)
        if args.alias:
            records = [r for r in records if r.get("action") == "alias" and r.get("alias") == args.alias]
        _emit(
            args,
            records,
            "\n".join(
                f"{r.get('at')}  {r.get('action'):<16} {r.get('actor', ''):<12} "
                + " ".join(
                    f"{k}={r[k]}"
                    for k in ("version", "alias", "from", "to", "approved_by", "executed_by", "reason")
                    if r.get(k) not in (None, "")
                )
                for r in records
            ),
        )
    return 0


def _verify_records(args, reg) -> int:
    """``registry verify [--model NAME]``: the hash chains of sign-off, alias and audit records."""
    report = reg.verify_records(args.model)
    lines = [str(f) for f in report.findings]
    if report.ok:
        chained = sum(s.chained for s in report.streams)
        legacy = sum(s.legacy for s in report.streams)
        lines = [
            f"OK: {len(report.streams)} stream(s), {chained} chained record(s)"
            + (f", {legacy} unchained (legacy)" if legacy else "")
        ] + [
            f"  {s.uri}: {s.chained} record(s)" + (f", {s.legacy} unchained (legacy)" if s.legacy else "")
            for s in report.streams
        ]
    _emit(args, report.to_dict(), "\n".join(lines))
    if not report.ok:
        print(
            f"airloom: check failed: {len(report.findings)} tampered record finding(s) in {report.registry}",
            file=sys.stderr,
        )
        return 1
    return 0


def _expected_version(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if not text.isdigit():
        raise UsageError(
            f"--expect {text!r}: give the version the alias must point to now, or 'none' if unset"
        )
    return int(text)


def _alias_at(args, reg) -> int:
    """``history NAME --at TIME``: which version the alias pointed to then (the MLflow gap, mlflow#2169)."""
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(args.at)
    except ValueError:
        raise UsageError(
            f"--at {args.at!r} is not an ISO 8601 time; write e.g. 2026-11-20T12:00:00 (UTC) "
            "or 2026-11-20T12:00:00+01:00"
        ) from None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    alias = args.alias or "production"
    if not reg.store.list(reg.model_prefix(args.name)):  # a typo must not read as "not set yet"
        raise UsageError(
            f"model {args.name!r} has no history in {reg.store.uri()}; "
            f"models there: {reg.list_models() or 'none'}"
        )
    rec = reg.alias_record_at(args.name, alias, when)
    data = {
        "name": args.name,
        "alias": alias,
        "at": when.isoformat(),
        "version": None if rec is None else rec["to"],
        "set_at": None if rec is None else rec["at"],
        "set_by": None if rec is None else rec.get("actor"),
        "reason": None if rec is None else rec.get("reason"),
    }
    text = (
        f"{args.name}@{alias} at {data['at']}: not set yet"
        if rec is None
        else f"{args.name}@{alias} at {data['at']}: version {data['version']} "
        f"(set {data['set_at']} by {data['set_by']}" + (f": {data['reason']})" if data["reason"] else ")")
    )
    _emit(args, data, text)
    return 0


def _signoff_policy():
    """The deployment's sign-off policy as the CLI can know it: the environment form of the Airflow Variables
    (``AIRFLOW_VAR_AIRLOOM_SIGNOFF_APPROVERS`` / ``…_MIN_APPROVALS``) and ``AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY``."""
    from airloom.governance.signoff import SignOffPolicy

    return SignOffPolicy.from_environment()


def _signoff_ref(args) -> tuple[str, int]:
    """``NAME/VERSION`` or ``NAME VERSION``."""
    if args.version is None:
        return _split_ref(args.ref)
    if "/" in args.ref or not args.version.isdigit():
        raise UsageError(
            f"expected NAME VERSION or NAME/VERSION (e.g. airloom-demo 3), got {args.ref} {args.version}"
        )
    return args.ref, int(args.version)


LOCAL_SIGNOFF_REFUSED = (
    "this deployment counts only authenticated sign-off decisions (AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY is on), "
    "and the local CLI records whatever name it is given; decide through Airflow instead: "
    "'airloom signoff {cmd} {name} {version} --api-url URL --username YOU --password-stdin' or the sign-off page"
)


def cmd_signoff(args) -> int:
    import getpass
    import os

    from airloom.governance.signoff import record_decision, request_signoff, signoff_status

    name, version = _signoff_ref(args)
    api_url = getattr(args, "api_url", None) or os.environ.get("AIRLOOM_API_URL")
    if args.signoff_cmd in ("approve", "reject") and api_url:
        return _signoff_via_api(args, api_url, name, version)
    policy = _signoff_policy()
    reg = _registry(args)
    user = args.user or getpass.getuser()
    if args.signoff_cmd == "status":
        status = signoff_status(reg, name, version, policy)
        _emit(
            args,
            status,
            f"{name}/{version}: {status['state']} (requested by {status['requested_by']}; "
            f"approvals {[a['user'] for a in status['approvals']]} of {status['required_approvals']} needed)",
        )
        return 1 if status["state"] == "rejected" else 0
    if policy.authenticated_only:
        # Usage, not a failed check (exit 2): the path is wrong for this deployment, whatever the model.
        raise UsageError(LOCAL_SIGNOFF_REFUSED.format(cmd=args.signoff_cmd, name=name, version=version))
    if args.signoff_cmd == "request":
        record = request_signoff(reg, name, version, requested_by=user, evidence={}, via="local-cli")
        _emit(args, record, f"sign-off requested for {name}/{version} by {user}")
        return 0
    decision = "approve" if args.signoff_cmd == "approve" else "reject"
    record_decision(
        reg,
        name,
        version,
        user=user,
        decision=decision,
        comment=args.comment or "",
        policy=policy,
        via="local-cli",
    )
    status = signoff_status(reg, name, version, policy)
    _emit(
        args,
        status,
        f"{name}/{version}: {decision}d by {user} (local CLI) — {len(status['approvals'])} of "
        f"{status['required_approvals']} approvals; state {status['state']}",
    )
    return 0


def _signoff_via_api(args, api_url: str, name: str, version: int) -> int:
    """approve/reject through the sign-off plugin's endpoint, as the user a token names: the same endpoint the
    page posts to, so Airflow's auth manager, not this command, says who decides."""
    import os

    from airloom.governance.signoff_client import SignOffClient

    if args.user:
        raise UsageError(
            "--user names the reviewer on the local path only; with --api-url the token says who you are"
        )
    api = SignOffClient(api_url)
    token = args.token or os.environ.get("AIRLOOM_API_TOKEN")
    if args.username:
        if not args.password_stdin:
            raise UsageError("--username needs --password-stdin (the password is read from standard input)")
        token = api.login(args.username, sys.stdin.readline().rstrip("\r\n"))
    elif not token:
        raise UsageError(
            "--api-url needs credentials: --token TOKEN (or AIRLOOM_API_TOKEN), or --username NAME --password-stdin"
        )
    decision = "approve" if args.signoff_cmd == "approve" else "reject"
    answer = api.decide(token, name, version, decision, args.comment or "")
    _emit(args, answer, answer.get("message") or f"{name}/{version}: {answer['status']['state']}")
    return 0


def cmd_demo(args) -> int:
    from airloom.demo import DemoConfig, run_demo

    summary = run_demo(
        DemoConfig(
            rows=args.rows,
            max_steps=args.steps,
            eval_limit=args.eval_limit,
            history_days=args.history_days,
            history_rows=args.history_rows,
            min_gain=args.min_gain,
            gates=args.gates,
            fresh=args.fresh,
        )
    )
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


def cmd_settings(args) -> int:
    import os

    from airloom.airflow.settings_file import apply_settings
    from airloom.settings import airflow_env

    os.environ.update(airflow_env())
    apply_settings(_existing(args.file, "settings file"))
    print(f"applied {args.file}")
    return 0


def cmd_airflow(args) -> int:
    """Run the ``airflow`` command against the embedded default (or whatever the environment sets)."""
    import os

    from airloom.settings import airflow_env, ensure_embedded_airflow_home

    env = airflow_env()
    ensure_embedded_airflow_home(env)
    airflow = Path(sys.executable).with_name("airflow")
    os.execve(str(airflow), [str(airflow), *args.airflow_args], env)
    return 0  # not reached


def cmd_serve(args) -> int:
    """Serve a registry version over OpenAI-compatible HTTP until interrupted: generating in process,
    or as a gateway in front of an upstream inference server (``--upstream-url``/``--upstream-command``)."""
    import logging
    import signal

    from airloom.serving.auth import check_exposure, load_api_keys
    from airloom.settings import home

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1-65535, got {args.port}")
    if args.max_body_bytes < 1 or args.max_request_tokens < 1:
        raise UsageError("--max-body-bytes and --max-request-tokens must be at least 1")
    from airloom.serving.logs import Batching

    try:
        args.log_batching = Batching(
            records=args.log_batch_records,
            seconds=args.log_batch_seconds,
            buffer_bytes=int(args.log_buffer_mb * (1 << 20)),
        )
    except UsageError:
        raise UsageError(
            "--log-batch-records must be at least 1, --log-batch-seconds and --log-buffer-mb above 0"
        ) from None
    upstream = args.upstream_url or args.upstream_command
    if (args.model is None) == (args.model_dir is None):
        raise UsageError("give --model NAME@ALIAS (or NAME/VERSION), or --model-dir DIR")
    if args.model_dir is not None and upstream:
        raise UsageError("--model-dir serves a folder in process; an upstream gateway takes --model")
    api_keys = load_api_keys(args.api_keys_file)  # before loading the model: a bad setup fails fast
    check_exposure(args.host, api_keys, insecure_no_auth=args.insecure_no_auth)
    cache_dir = args.cache_dir or home() / "cache" / "models"
    # With an upstream, SIGTERM exits through Python until uvicorn handles it (its own handler while
    # it runs), so an upstream process started so far is stopped, not orphaned.
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if upstream:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded request otherwise
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return _serve(args, api_keys, cache_dir, upstream)
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)


def _serve(args, api_keys, cache_dir, upstream) -> int:
    from airloom.artifacts import artifacts_uri
    from airloom.serving.app import serve
    from airloom.serving.engine import Engine

    if upstream:
        from airloom.serving.upstream import UpstreamEngine

        engine = UpstreamEngine(
            _registry(args),
            args.model,
            cache_dir=cache_dir,
            upstream_url=args.upstream_url,
            upstream_command=args.upstream_command,
            poll_seconds=args.poll_seconds,
            max_inflight=args.upstream_concurrency,
            max_queue=args.max_queue,
            start_timeout=args.upstream_start_timeout,
        )
        via = f" through {engine.stats()['upstream']['url']}"
    else:
        engine = Engine(
            _registry(args) if args.model_dir is None else None,
            args.model,
            cache_dir=cache_dir,
            max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms,
            poll_seconds=args.poll_seconds,
            torch_threads=args.torch_threads,
            max_queue=args.max_queue,
            model_dir=args.model_dir,
        )
        via = ""
    print(
        f"serving {engine.current.ref} ({args.model or args.model_dir}){via} on http://{args.host}:{args.port}",
        flush=True,
    )
    # The artifact store's data/ (AIRLOOM_ARTIFACTS; unset: AIRLOOM_HOME), where llm_feedback_monitoring reads.
    store = artifacts_uri().rstrip("/")
    traffic_dir = args.traffic_dir or f"{store}/data/traffic"
    feedback_dir = args.feedback_dir or f"{store}/data/feedback"
    if any(str(d).startswith("s3://") for d in (traffic_dir, feedback_dir)):
        b = args.log_batching
        print(
            f"traffic to {traffic_dir}, feedback to {feedback_dir}: an object per {b.records} records or "
            f"{b.seconds:g} s (at most {b.buffer_bytes >> 20} MiB held while S3 is unreachable)",
            flush=True,
        )
    serve(
        engine,
        host=args.host,
        port=args.port,
        traffic_dir=traffic_dir,
        feedback_dir=feedback_dir,
        log_batching=args.log_batching,
        api_keys=api_keys,
        max_body_bytes=args.max_body_bytes,
        max_request_tokens=args.max_request_tokens,
        metrics_require_key=args.metrics_require_key,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="airloom", description="LLMOps on Apache Airflow: every stage from the shell."
    )
    p.add_argument("--registry", help="registry URI: a folder or s3://bucket/prefix (env AIRLOOM_REGISTRY)")
    sub = p.add_subparsers(dest="command", required=True)

    from airloom.prompts import TEMPLATE_HELP  # light: no Jinja2 until a template loads

    def add_field_map(sp):
        sp.add_argument(
            "--field-map",
            metavar="SRC=FIELD,...",
            help="source keys to record fields (instruction, input, response, id, task), e.g. "
            "question=instruction,answer=response; another chat layout: "
            "dialog=messages,speaker=role,text=content,bot=assistant; KEY=expand reads a list of "
            "examples under KEY as one row each; default: the layout is recognised (ours, Alpaca, "
            "Dolly, prompt/completion, OpenAI messages, ShareGPT)",
        )

    def add(name, func, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    sp = add("validate", cmd_validate, "validate raw instruction data with Great Expectations")
    sp.add_argument("source", help="file, folder, glob or s3:// URI (JSONL, JSON, CSV, Parquet)")
    sp.add_argument("--out", required=True, help="output folder (validation.json, Data Docs, accepted rows)")
    sp.add_argument("--suite", help="YAML validation thresholds")
    sp.add_argument("--on-bad-rows", choices=["quarantine", "fail"])
    add_field_map(sp)
    sp.add_argument(
        "--tokenizer",
        help="the model's tokenizer (folder, registry:NAME or hub id): token lengths "
        "in the profile; the suite's min_tokens/max_tokens check them per row",
    )

    sp = add("eda", cmd_eda, "write the EDA report (report.html + profile.json)")
    sp.add_argument("input")
    sp.add_argument("--out", required=True)
    sp.add_argument("--previous", help="profile.json of an earlier run, to show changes")
    add_field_map(sp)
    sp.add_argument(
        "--tokenizer",
        help="the model's tokenizer (folder, registry:NAME or hub id), for token "
        "lengths of an even sample of rows (when the data is read here)",
    )
    sp.add_argument(
        "--scan",
        help="the scan/ folder `airloom validate` wrote for the same input: render its "
        "profile instead of reading the data again (ignored if the files changed)",
    )

    sp = add("prepare", cmd_prepare, "clean, screen PII, dedup, render prompts and split into Parquet files")
    sp.add_argument("input")
    where = sp.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="write the splits to this folder")
    where.add_argument(
        "--name", help="publish as the next version of this dataset ($AIRLOOM_HOME/datasets/NAME/N, NAME@N)"
    )
    add_field_map(sp)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--val-fraction", type=float, default=0.1)
    sp.add_argument("--test-fraction", type=float, default=0.1)
    sp.add_argument(
        "--template",
        default="auto",
        help="; ".join(TEMPLATE_HELP.values()) + "; or the path of a Jinja2 template file (sandboxed)",
    )
    sp.add_argument(
        "--pii-policy",
        choices=["mask", "drop", "keep"],
        default="mask",
        help="mask: placeholders such as <EMAIL>; drop: remove the row; keep: leave it",
    )
    sp.add_argument(
        "--max-seq-len", type=int, help="drop rows whose prompt + response exceed this many tokens"
    )
    sp.add_argument(
        "--markup",
        choices=["strip", "keep"],
        default="strip",
        help="strip: remove HTML tags from rows that do not ask for HTML (scraped junk); keep: leave them",
    )
    sp.add_argument(
        "--near-dedup",
        type=_threshold_or_off,
        default=0.8,
        metavar="JACCARD|off",
        help="drop rows at least this similar (Jaccard of word 5-shingles) to an earlier kept row; "
        "off for rows validation already screened (default 0.8)",
    )
    sp.add_argument(
        "--tokenizer",
        default="registry:airloom-tiny-base",
        help="model folder or registry:NAME[/N|@ALIAS]; loaded only for chat_template or "
        "--max-seq-len ('' = none)",
    )

    sp = add("datasets", cmd_datasets, "list the prepared datasets (NAME@VERSION, rows, when), newest first")
    sp.add_argument("ref", nargs="?", help="show one: NAME@VERSION, NAME@latest, NAME or a folder")
    sp.add_argument("--name", help="only the versions of this dataset")

    sp = add("synth", cmd_synth, "write the synthetic demo dataset and dated history partitions")
    sp.add_argument("--out", required=True)
    sp.add_argument("--rows", type=int, default=5000)
    sp.add_argument("--history-days", type=int, default=3)
    sp.add_argument("--history-rows", type=int, default=100)

    sp = add("base", cmd_base, "build the tiny base model (no download) and register it")
    sp.add_argument("--name", default="airloom-tiny-base")
    sp.add_argument("--out", help="also keep the HF folder here")
    sp.add_argument("--force", action="store_true", help="build a new version even if one exists")

    sp = add("train", cmd_train, "fine-tune with the recipe through the deepspeed/torchrun launcher")
    sp.add_argument(
        "--config",
        required=True,
        help="a shipped preset (tiny_llama/0.5m_full_1proc, llama_1b/1.1b_lora_1gpu_zero2_packed, ...; "
        "see include/airloom/training/configs) or the path of a YAML training config",
    )
    sp.add_argument("--base-model")
    sp.add_argument("--train-file")
    sp.add_argument("--validation-file")
    sp.add_argument("--output-dir")
    sp.add_argument("--launcher", choices=["deepspeed", "torchrun", "python"])
    sp.add_argument("--nproc-per-node", type=int)
    sp.add_argument("--max-steps", type=int)

    ev = sub.add_parser("evaluate", help="evaluate a model or score existing predictions")
    evsub = ev.add_subparsers(dest="evaluate_cmd", required=True)
    sp = evsub.add_parser("run", help="generate with a model on a dataset and score it")
    sp.set_defaults(func=cmd_evaluate_run)
    sp.add_argument("--model", required=True, help="folder, registry:NAME[/N|@ALIAS] or hub id")
    sp.add_argument("--data", required=True, help="JSONL with id, prompt, response")
    sp.add_argument("--out", required=True)
    sp.add_argument("--limit", type=int)
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--gates", help="e.g. exact_match>=0.3,f1>=0.5 (exit 1 when one fails)")
    sp.add_argument("--json", action="store_true")
    sp = evsub.add_parser("score", help="score predictions against references")
    sp.set_defaults(func=cmd_evaluate_score)
    sp.add_argument("--predictions", required=True, help='JSONL {"id", "prediction"}')
    sp.add_argument("--references", required=True, help='JSONL {"id", "references": [...]} or "reference"')
    sp.add_argument("--out", required=True)
    sp.add_argument("--json", action="store_true")

    rg = sub.add_parser("registry", help="the model registry")
    rgsub = rg.add_subparsers(dest="registry_cmd", required=True)
    for name, args_ in [
        ("register", ["name", "folder"]),
        ("list", ["name"]),
        ("show", ["ref"]),
        ("verify", []),
        ("promote", ["ref", "alias"]),
        ("history", ["name"]),
    ]:
        sp = rgsub.add_parser(name)
        sp.set_defaults(func=cmd_registry)
        for a in args_:
            sp.add_argument(a)
        sp.add_argument("--user", help="who does this (default: the OS user)")
        sp.add_argument("--reason")
        sp.add_argument("--json", action="store_true")
        if name == "promote":
            sp.add_argument(
                "--expect",
                metavar="VERSION|none",
                help="move only if the alias points to this version now (default: what it "
                "points to when the command starts); 'production' needs an approved sign-off",
            )
        if name == "verify":
            sp.add_argument(
                "ref", nargs="?", help="NAME/VERSION: check every file's sha256 (default: the records)"
            )
            sp.add_argument(
                "--model", help="with no NAME/VERSION: check only this model's records (default: all)"
            )
        if name == "history":
            sp.add_argument(
                "--alias",
                help="only moves of this alias; with --at, the alias to look up (default production)",
            )
            sp.add_argument(
                "--at",
                metavar="TIME",
                help="ISO 8601 time (naive = UTC): which version the alias pointed to then",
            )

    so = sub.add_parser("signoff", help="sign-off of a registered version")
    sosub = so.add_subparsers(dest="signoff_cmd", required=True)
    for name in ("request", "approve", "reject", "status"):
        sp = sosub.add_parser(name)
        sp.set_defaults(func=cmd_signoff)
        sp.add_argument("ref", help="NAME/VERSION, or NAME followed by VERSION")
        sp.add_argument("version", nargs="?", help="VERSION, when REF is the name alone")
        sp.add_argument(
            "--user", help="local path only: the name to record (default: the OS user); nobody checks it"
        )
        sp.add_argument("--comment")
        sp.add_argument("--json", action="store_true")
        if name in ("approve", "reject"):
            sp.add_argument(
                "--api-url",
                help="decide through Airflow's API server (e.g. http://localhost:8080; default "
                "AIRLOOM_API_URL), as the user the token names: the production path",
            )
            sp.add_argument("--token", help="an Airflow API token (default AIRLOOM_API_TOKEN)")
            sp.add_argument("--username", help="sign in to Airflow as this user (POST /auth/token)")
            sp.add_argument(
                "--password-stdin", action="store_true", help="read --username's password from standard input"
            )

    sp = add("demo", cmd_demo, "run the whole pipeline through Airflow on the embedded default")
    sp.add_argument("--rows", type=int, default=5000)
    sp.add_argument("--steps", type=int, default=800)
    sp.add_argument("--eval-limit", type=int, default=300)
    sp.add_argument("--history-days", type=int, default=3)
    sp.add_argument("--history-rows", type=int, default=100)
    sp.add_argument(
        "--min-gain", type=float, default=0.3, help="required exact-match gain over the base model"
    )
    sp.add_argument("--gates", help="quality gates for this run (default: the DAG's)")
    sp.add_argument("--fresh", action="store_true", help="rebuild the base model too")

    sp = sub.add_parser(
        "airflow", help="run `airflow ...` with Airloom's embedded settings (AIRFLOW_HOME etc.)"
    )
    sp.set_defaults(func=cmd_airflow)
    sp.add_argument("airflow_args", nargs=argparse.REMAINDER, help="e.g. standalone, dags list")

    sp = add("settings", cmd_settings, "apply airflow_settings.yaml (connections, pools, variables)")
    sp.add_argument("file", nargs="?", default="airflow_settings.yaml")

    sp = sub.add_parser(
        "serve",
        help="serve a registry version over OpenAI-compatible HTTP",
        description="OpenAI-compatible /v1/completions and /v1/chat/completions, /v1/feedback,\n"
        "/healthz, /metrics; follows the alias when given NAME@ALIAS. Generates in process\n"
        "(transformers) by default; with --upstream-command or --upstream-url it is a gateway that\n"
        "keeps API keys, alias following, prompt rendering, the traffic log and feedback, and\n"
        "forwards generation to an OpenAI-compatible server (vLLM, TGI, SGLang, llama.cpp, airloom).",
        epilog="On a GPU host: vLLM on the version the alias points to; when the alias moves, a new\n"
        "server on a new port, switched to once healthy; the old one stops when its requests are done.\n"
        "  airloom serve --model NAME@production --upstream-command 'vllm serve {model_dir} --host "
        "127.0.0.1 --port {port} --served-model-name {served_name} --dtype bfloat16'\n"
        "Another airloom serve as the upstream (give it its own --traffic-dir: the gateway logs traffic):\n"
        "  --upstream-command '{python} -m airloom.cli serve --model-dir {model_dir} --port {port} "
        "--traffic-dir /tmp/upstream-traffic'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.set_defaults(func=cmd_serve)
    sp.add_argument("--model", help="NAME@ALIAS (reloads when the alias moves) or NAME/VERSION")
    sp.add_argument(
        "--model-dir",
        help="serve this downloaded version folder instead (its MANIFEST.json is checked and names the "
        "version; no registry, no alias): how a gateway's --upstream-command runs airloom serve",
    )
    # SUPPRESS: without it the subcommand's default would overwrite `airloom --registry X serve`.
    sp.add_argument(
        "--registry", default=argparse.SUPPRESS, help="registry URI (default: the global --registry)"
    )
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument(
        "--traffic-dir",
        help="traffic log root, a folder or s3://bucket/prefix (default: the artifact store's data/traffic: "
        "AIRLOOM_ARTIFACTS, else AIRLOOM_HOME)",
    )
    sp.add_argument(
        "--feedback-dir", help="feedback root, as --traffic-dir (default: the store's data/feedback)"
    )
    sp.add_argument(
        "--log-batch-records",
        type=int,
        default=1000,
        help="s3:// logs: write a batch object once it holds this many records (default 1000)",
    )
    sp.add_argument(
        "--log-batch-seconds",
        type=float,
        default=60.0,
        help="s3:// logs: ... or this many seconds after its first record, whichever comes first (default 60)",
    )
    sp.add_argument(
        "--log-buffer-mb",
        type=float,
        default=64.0,
        help="s3:// logs: most records held in memory while S3 is unreachable; more are dropped and "
        "counted (default 64)",
    )
    sp.add_argument("--cache-dir", help="downloaded versions (default AIRLOOM_HOME/cache/models)")
    sp.add_argument("--max-batch-size", type=int, default=16, help="rows per generate call; 1 = no batching")
    sp.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        help="how long a lone request waits for others to join its batch",
    )
    sp.add_argument("--poll-seconds", type=float, default=5.0, help="how often the alias is read")
    sp.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    sp.add_argument(
        "--api-keys-file",
        help="bearer keys, one per line (default AIRLOOM_API_KEYS_FILE; also AIRLOOM_API_KEYS and "
        "the connection airloom_serving as AIRFLOW_CONN_AIRLOOM_SERVING). None: open, loopback only",
    )
    sp.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host without API keys (only behind a proxy that authenticates)",
    )
    sp.add_argument(
        "--metrics-require-key", action="store_true", help="/metrics needs an API key too (default: open)"
    )
    sp.add_argument(
        "--max-queue", type=int, default=128, help="requests waiting for a batch; more get 429 (default 128)"
    )
    sp.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)"
    )
    sp.add_argument(
        "--max-request-tokens",
        type=int,
        default=8192,
        help="most tokens one request may ask to generate, prompts × n × max_tokens (default 8192)",
    )
    up = sp.add_mutually_exclusive_group()
    up.add_argument(
        "--upstream-command",
        metavar="CMD",
        help="run this OpenAI-compatible server on each version the alias points to and forward "
        "generation to it; {model_dir} {port} {served_name} {python} are filled in (must use "
        "{model_dir} and {port}). Send it a key with env AIRLOOM_UPSTREAM_API_KEY",
    )
    up.add_argument(
        "--upstream-url",
        metavar="URL",
        help="forward generation to this running OpenAI-compatible server (it is not restarted when "
        "the alias moves: /healthz says so)",
    )
    sp.add_argument(
        "--upstream-start-timeout",
        type=float,
        default=900.0,
        help="seconds an upstream has to answer GET /health (or /v1/models) with 200 (default 900)",
    )
    sp.add_argument(
        "--upstream-concurrency",
        type=int,
        default=64,
        help="most requests forwarded to the upstream at once; more wait in the --max-queue (default 64)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CheckFailed as e:
        print(f"airloom: check failed: {e}", file=sys.stderr)
        return 1
    except AirloomError as e:
        print(f"airloom: {e}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"airloom: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"airloom: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
