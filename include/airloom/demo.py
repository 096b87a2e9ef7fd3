"""``airloom demo``: the whole pipeline through real Airflow on the embedded default.

1. synthetic instruction data (with a few faulty rows) and dated history partitions;
2. the tiny base model, built here and registered;
3. ``airflow dags test llm_data_quality`` → ``llm_finetune`` (DeepSpeed launcher); while the
   sign-off sensor waits, a second user approves through the CLI, as a reviewer would;
4. ``llm_eval_backfill`` for each history day; then a summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from airloom.data.synth import generate_records, write_history, write_jsonl
from airloom.exceptions import CheckFailed
from airloom.registry.registry import ModelRegistry
from airloom.settings import airflow_env, home, project_dir, registry_uri, run_dir

MODEL_NAME = "airloom-demo"
BASE_NAME = "airloom-tiny-base"
REVIEWER = "reviewer"

# Faults a real export has; validation must quarantine them with line numbers, and lose nothing else.
FAULTY_LINES = [
    "",
    '{"instruction": "Write the number in words.", "input": "12", "response": ',
    '["not", "an", "object"]',
    '{"instruction": "How many words are there?", "input": "apple river", "response": 2}',
    '{"instruction": "", "input": "river", "response": "river"}',
    '{"instruction": "Which month comes next?", "input": "May"}',
]


@dataclass
class DemoConfig:
    rows: int = 5000
    max_steps: int = 800
    eval_limit: int = 300
    history_days: int = 3
    history_rows: int = 100
    min_gain: float = 0.3
    gates: str | None = None  # None: the DAG's default gates
    fresh: bool = False


def write_demo_data(
    root: Path, rows: int = 5000, history_days: int = 3, history_rows: int = 100, today: date | None = None
) -> dict:
    raw = root / "raw" / "instructions.jsonl"
    write_jsonl(generate_records(rows, seed=0), raw)
    with raw.open("a", encoding="utf-8") as f:
        for line in FAULTY_LINES:
            f.write(line + "\n")
    today = today or date.today()
    days = [today - timedelta(days=k) for k in range(history_days, 0, -1)]
    history = write_history(root / "history", days, history_rows)
    return {
        "raw": str(raw),
        "rows": rows,
        "faulty_lines": len(FAULTY_LINES),
        "history": [str(p) for p in history],
        "days": [d.isoformat() for d in days],
    }


def build_and_register_base(
    registry: ModelRegistry, name: str = BASE_NAME, out: Path | None = None, force: bool = False, log=print
) -> dict:
    """Reuse the newest registered base unless ``force``; else build one and register it."""
    import getpass
    import tempfile

    from airloom.training.base import build_base_model

    if not force and registry.list_versions(name):
        mv = registry.latest(name)
        log(f"reusing base model {mv.ref}")
        return {"ref": f"registry:{mv.ref}", "path": None, "reused": True}
    with tempfile.TemporaryDirectory() as tmp:
        folder = out or Path(tmp) / "base"
        info = build_base_model(folder, log=log)
        mv = registry.register(
            name,
            folder,
            actor=getpass.getuser(),
            metadata={
                "summary": "Tiny Llama-architecture base model built by Airloom (no download).",
                "training": info,
                "intended_use": "Airloom's demo and tests only.",
            },
        )
    log(f"registered base model {mv.ref}")
    return {"ref": f"registry:{mv.ref}", "path": str(out) if out else None, "reused": False, **info}


class Step:
    """Run a command, its output to a log file; one line per step on the console."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir, self.env = log_dir, env
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        path = self.log_dir / (name.split(" (")[0].replace(" ", "_") + ".log")
        f = path.open("w")
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, cwd=project_dir(), start_new_session=True
        )
        f.close()
        return proc, path

    def finish(self, name: str, proc: subprocess.Popen, path: Path, started: float) -> None:
        rc = proc.wait()
        print(f"  {name:<34} {time.monotonic() - started:6.1f}s  log: {path}", flush=True)
        if rc != 0:
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-40:])
            raise CheckFailed(f"step {name} failed (exit {rc}); last lines of {path}:\n{tail}")

    def run(self, name: str, cmd: list[str]) -> None:
        started = time.monotonic()
        proc, path = self.start(name, cmd)
        self.finish(name, proc, path, started)


def _airflow(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("airflow")), *args]


def _airloom(*args: str) -> list[str]:
    return [sys.executable, "-m", "airloom.cli", *args]


def _await_signoff_request(
    registry: ModelRegistry, after_version: int, proc: subprocess.Popen, timeout: float = 1800
) -> int:
    from airloom.governance.signoff import signoff_status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        versions = [v.version for v in registry.list_versions(MODEL_NAME)] if registry.list_models() else []
        new = [v for v in versions if v > after_version]
        if new and signoff_status(registry, MODEL_NAME, new[-1])["requested_by"]:
            return new[-1]
        if proc.poll() is not None:
            raise CheckFailed("llm_finetune ended before asking for a sign-off (a gate or a task failed)")
        time.sleep(2)
    raise CheckFailed(f"no sign-off request within {timeout:.0f}s")


def run_demo(cfg: DemoConfig) -> dict:
    t0 = time.monotonic()
    env = airflow_env()
    os.environ.update({k: env[k] for k in ("AIRLOOM_HOME", "AIRFLOW_HOME", "TORCH_EXTENSIONS_DIR")})
    data_root = home() / "data"
    registry = ModelRegistry.from_uri(registry_uri())
    step = Step(home() / "demo-logs", env)
    print(f"Airloom demo — AIRLOOM_HOME={home()}  AIRFLOW_HOME={env['AIRFLOW_HOME']}", flush=True)

    started = time.monotonic()
    data = write_demo_data(data_root, cfg.rows, cfg.history_days, cfg.history_rows)
    print(f"  {'synthetic data':<34} {time.monotonic() - started:6.1f}s  {data['raw']}", flush=True)
    started = time.monotonic()
    base = build_and_register_base(registry, force=cfg.fresh, log=lambda m: None)
    print(f"  {'base model':<34} {time.monotonic() - started:6.1f}s  {base['ref']}", flush=True)

    step.run("airflow db migrate", _airflow("db", "migrate"))
    step.run(
        "apply airflow_settings.yaml", _airloom("settings", str(project_dir() / "airflow_settings.yaml"))
    )
    step.run(
        "dag llm_data_quality",
        _airflow(
            "dags", "test", "llm_data_quality", "-c", json.dumps({"source": str(Path(data["raw"]).parent)})
        ),
    )
    latest = json.loads((home() / "datasets" / "latest.json").read_text())

    before = (
        max((v.version for v in registry.list_versions(MODEL_NAME)), default=0)
        if MODEL_NAME in registry.list_models()
        else 0
    )
    conf = {
        "max_steps": cfg.max_steps,
        "eval_limit": cfg.eval_limit,
        "base_model": base["ref"],
        "dataset": latest["ref"],  # name@version: the dataset this run prepared, named as a user would
        **({"gates": cfg.gates} if cfg.gates else {}),
    }
    started = time.monotonic()
    proc, log_path = step.start(
        "dag llm_finetune", _airflow("dags", "test", "llm_finetune", "-c", json.dumps(conf))
    )
    try:
        version = _await_signoff_request(registry, before, proc)
        print(
            f"  {'  ...waiting for sign-off':<34} {time.monotonic() - started:6.1f}s  {MODEL_NAME}/{version}",
            flush=True,
        )
        step.run(
            f"signoff approve (as {REVIEWER})",
            _airloom(
                "signoff",
                "approve",
                f"{MODEL_NAME}/{version}",
                "--user",
                REVIEWER,
                "--comment",
                "demo: metrics and report reviewed",
            ),
        )
        step.finish("dag llm_finetune", proc, log_path, started)
    finally:
        if proc.poll() is None:
            proc.kill()
    production = registry.get_alias(MODEL_NAME, "production")
    if production != version:
        raise CheckFailed(
            f"{MODEL_NAME}@production is {production}, expected {version}: deploy did not happen; "
            f"see {log_path}"
        )

    # The history days predate this deployment, so score them with today's production version (the
    # default, the version live on each day, would find none and skip them).
    current = json.dumps({"model_version": "current"})
    for ds in data["days"]:
        step.run(
            f"dag llm_eval_backfill {ds}", _airflow("dags", "test", "llm_eval_backfill", ds, "-c", current)
        )

    summary = summarize(registry, version, latest, data["days"], time.monotonic() - t0, cfg.min_gain)
    print_summary(summary)
    return summary


def summarize(
    registry: ModelRegistry, version: int, latest: dict, days: list[str], seconds: float, min_gain: float
) -> dict:
    mv = registry.get(MODEL_NAME, version)
    dq_run = run_dir("llm_data_quality", latest["run_id"])
    validation = json.loads((dq_run / "validate" / "validation.json").read_text())
    ft_run = run_dir("llm_finetune", mv.metadata["lineage"]["run_id"])
    cand = mv.metadata["metrics"]
    base = mv.metadata["baseline"]["metrics"]
    gain = cand["exact_match"] - base["exact_match"]
    evals = home() / "evaluations" / MODEL_NAME
    backfill = {}
    for ds in days:
        f = evals / f"ds={ds}" / f"v{version}" / "metrics.json"
        backfill[ds] = json.loads(f.read_text())["aggregate"]["exact_match"] if f.is_file() else None
    return {
        "ok": gain >= min_gain and all(v is not None for v in backfill.values()),
        "seconds": round(seconds, 1),
        "data": {
            "rows_read": validation["rows_read"],
            "accepted": validation["accepted"],
            "quarantined": validation["quarantined"],
            "validation": str(dq_run / "validate" / "validation.json"),
            "eda_report": str(dq_run / "eda_report" / "report.html"),
            "prepared": latest["path"],
        },
        "eval": {
            "baseline_model": mv.metadata["baseline"]["model"],
            "baseline": base,
            "fine_tuned": cand,
            "exact_match_gain": round(gain, 4),
            "required_gain": min_gain,
            "by_task": mv.metadata.get("metrics_by_task"),
            "report": str(ft_run / "quality_gates" / "report.html"),
        },
        "registry": {
            "version": mv.ref,
            "uri": mv.uri,
            "production": registry.get_alias(MODEL_NAME, "production"),
            "training": {
                k: mv.metadata["training"].get(k)
                for k in ("steps", "train_seconds", "tokens_per_s", "final_loss", "zero_stage")
            },
        },
        "backfill_exact_match": backfill,
        "trend": str(evals / "trend.png"),
    }


def print_summary(s: dict) -> None:
    d, e, r = s["data"], s["eval"], s["registry"]
    keys = ("exact_match", "f1", "rougeL", "bleu", "perplexity")
    print("\n=== Airloom demo summary ===")
    print(f"data       {d['rows_read']} rows read: {d['accepted']} accepted, {d['quarantined']} quarantined")
    print(f"training   {r['training']}")
    print(f"{'metric':<12}{'base':>10}{'fine-tuned':>12}")
    for k in keys:
        if k in e["fine_tuned"]:
            print(f"{k:<12}{e['baseline'].get(k, float('nan')):>10.3f}{e['fine_tuned'][k]:>12.3f}")
    print(
        f"gain       exact match {e['exact_match_gain']:+.3f} (required {e['required_gain']:+.2f}) "
        f"vs {e['baseline_model']}"
    )
    print(f"registry   {r['version']} at {r['uri']}; production -> {r['production']}")
    print(f"backfill   exact match per day: {s['backfill_exact_match']}")
    print("reports    " + "\n           ".join([d["eda_report"], d["validation"], e["report"], s["trend"]]))
    print(f"result     {'OK' if s['ok'] else 'FAILED'} in {s['seconds']:.0f}s")
