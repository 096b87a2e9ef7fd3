"""DAG parse-time benchmark: each dags/*.py against an empty TaskFlow DAG, each in a fresh interpreter.

The DAG processor re-parses every file every few seconds, so a DAG file that imports torch or pandas at
module level costs every parse. This bench catches that: for each file it starts a new Python (so no
import cache flatters a file parsed second), imports ``airflow.sdk``, then imports the DAG file the way
Airflow's importer does (``--loader module``, the default) or through a one-file ``DagBag``
(``--loader dagbag``). The median over ``--runs`` is compared with the same for an empty TaskFlow DAG.
Target: every ratio <= 1.3.

    .venv/bin/python bench/dag_parse.py [--runs 5] [--dags dags] [--loader module|dagbag] [--clock cpu|wall]
                                        [--check]

Times are the child's CPU time by default: on a shared machine, wall time mostly measures the neighbours.

The last line is machine-readable ``key=value`` pairs, e.g.
``max_ratio=1.12 worst=llm_finetune.py empty_ms=1234 files=5 runs=5 target=1.3 ok=true``.
Exit status: 0, or 1 when a file fails to parse (or, with ``--check``, a ratio is over the target).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.3
# Libraries whose import at DAG-file top level is the usual reason for a slow parse.
HEAVY = (
    "torch",
    "transformers",
    "peft",
    "deepspeed",
    "accelerate",
    "datasets",
    "great_expectations",
    "pandas",
    "pyarrow",
    "numpy",
    "scipy",
    "matplotlib",
    "boto3",
    "botocore",
    "sacrebleu",
    "rouge_score",
    "evaluate",
)

EMPTY_DAG = '''\
"""Baseline for bench/dag_parse.py: the cheapest TaskFlow DAG."""
from datetime import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def airloom_bench_empty():
    @task
    def noop() -> None:
        return None

    noop()


airloom_bench_empty()
'''

# Runs in the fresh interpreter. Prints one JSON line.
CHILD = r"""
import json, sys, time
clock = time.process_time if sys.argv[3] == "cpu" else time.perf_counter
t0 = clock()
import airflow.sdk
t1 = clock()
path, loader = sys.argv[1], sys.argv[2]
before = set(sys.modules)
out = {}
try:
    if loader == "dagbag":
        from airflow.dag_processing.dagbag import DagBag
        from pathlib import Path
        bag = DagBag(dag_folder=path, bundle_path=Path(path).parent, safe_mode=False)
        if bag.import_errors:
            raise RuntimeError("; ".join(str(v).strip().splitlines()[-1] for v in bag.import_errors.values()))
        dag_ids = sorted(bag.dags)
    else:
        import importlib.util
        from airflow.sdk import DAG
        from airflow.sdk.definitions._internal.contextmanager import DagContext
        name = "airloom_bench_dag"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        DagContext.current_autoregister_module_name = name
        spec.loader.exec_module(mod)
        found = {o for o in vars(mod).values() if isinstance(o, DAG)}
        found |= {d for d, _ in DagContext.autoregistered_dags}
        dag_ids = sorted(d.dag_id for d in found)
    t2 = clock()
    out = {"sdk_s": t1 - t0, "exec_s": t2 - t1, "total_s": t2 - t0, "dag_ids": dag_ids}
except BaseException as e:  # report, never hang the bench
    out = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
out["modules"] = sorted({m.split(".")[0] for m in set(sys.modules) - before if not m.startswith("_")})
print("AIRLOOM_BENCH " + json.dumps(out))
"""


def _run_once(path: Path, loader: str, clock: str, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), loader, clock],
        capture_output=True,
        text=True,
        env=env,
        cwd=path.parent,
        timeout=300,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("AIRLOOM_BENCH "):
            return json.loads(line.removeprefix("AIRLOOM_BENCH "))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:300]}", "modules": []}


def _env(airflow_home: Path, dags_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    extra = [str(REPO / "include"), str(dags_dir)]
    env["PYTHONPATH"] = os.pathsep.join(extra + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # A private AIRFLOW_HOME: no airflow.cfg of the developer's changes the numbers, none is written to ~.
    env["AIRFLOW_HOME"] = str(airflow_home)
    env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags_dir)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=5, help="fresh interpreters per file (default: %(default)s)"
    )
    parser.add_argument(
        "--dags", type=Path, default=REPO / "dags", help="folder of DAG files (default: dags/)"
    )
    parser.add_argument("--loader", choices=("module", "dagbag"), default="module")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the child's CPU time, steady on a shared machine (default); wall: elapsed time",
    )
    parser.add_argument(
        "--target", type=float, default=TARGET, help="max ratio to the empty DAG (%(default)s)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio is over --target")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    dag_files = sorted(p for p in args.dags.glob("*.py") if not p.name.startswith("_"))
    with tempfile.TemporaryDirectory(prefix="airloom-dag-parse-") as tmp:
        tmp_path = Path(tmp)
        empty = tmp_path / "empty_taskflow_dag.py"
        empty.write_text(EMPTY_DAG)
        env = _env(tmp_path / "airflow_home", args.dags.resolve())
        _run_once(empty, args.loader, args.clock, env)  # warm-up: writes airflow.cfg, fills the OS file cache

        subjects = [empty, *dag_files]
        results: dict[Path, list[dict]] = {p: [] for p in subjects}
        # Interleaved rounds, so load from other processes on the machine hits every file alike.
        for round_no in range(args.runs):
            for path in subjects:
                results[path].append(_run_once(path, args.loader, args.clock, env))
            print(f"round {round_no + 1}/{args.runs} done", file=sys.stderr)

    def summary(path: Path) -> dict:
        runs = results[path]
        errors = [r["error"] for r in runs if "error" in r]
        ok = [r for r in runs if "error" not in r]
        return {
            "error": errors[0] if errors else None,
            "total_ms": statistics.median(r["total_s"] for r in ok) * 1000 if ok else float("nan"),
            "sdk_ms": statistics.median(r["sdk_s"] for r in ok) * 1000 if ok else float("nan"),
            "exec_ms": statistics.median(r["exec_s"] for r in ok) * 1000 if ok else float("nan"),
            "dags": len(ok[0]["dag_ids"]) if ok else 0,
            "modules": set(runs[0]["modules"]),
        }

    base = summary(empty)
    if base["error"]:
        print(f"the empty baseline DAG does not parse: {base['error']}", file=sys.stderr)
        print(f"max_ratio=nan worst=none empty_ms=nan files={len(dag_files)} runs={args.runs} ok=false")
        return 1

    print(f"loader={args.loader} clock={args.clock} runs={args.runs} python={sys.executable}")
    header = f"{'dag file':<34} {'dags':>4} {'median_ms':>10} {'sdk_ms':>8} {'exec_ms':>8} {'ratio':>6}  heavy imports"
    print(header)
    print("-" * len(header))
    print(
        f"{'<empty TaskFlow DAG>':<34} {base['dags']:>4} {base['total_ms']:>10.0f} {base['sdk_ms']:>8.0f} "
        f"{base['exec_ms']:>8.0f} {1.0:>6.2f}"
    )
    worst, max_ratio, failed = "none", 0.0, []
    for path in dag_files:
        s = summary(path)
        if s["error"]:
            failed.append(path.name)
            print(f"{path.name:<34} ERROR {s['error']}")
            continue
        ratio = s["total_ms"] / base["total_ms"]
        heavy = sorted(m for m in s["modules"] - base["modules"] if m in HEAVY)
        flag = "  <-- over target" if ratio > args.target else ""
        print(
            f"{path.name:<34} {s['dags']:>4} {s['total_ms']:>10.0f} {s['sdk_ms']:>8.0f} {s['exec_ms']:>8.0f} "
            f"{ratio:>6.2f}  {','.join(heavy) or '-'}{flag}"
        )
        if s["dags"] == 0:
            print(f"{'':<34} (no DAG found in {path.name})")
        if ratio > max_ratio:
            worst, max_ratio = path.name, ratio

    within = max_ratio <= args.target
    if not dag_files:
        print(f"no DAG files in {args.dags}")
    print(
        f"max_ratio={max_ratio:.2f} worst={worst} empty_ms={base['total_ms']:.0f} files={len(dag_files)} "
        f"runs={args.runs} target={args.target} failed={','.join(failed) or 'none'} "
        f"ok={'true' if within and not failed else 'false'}"
    )
    if failed or (args.check and not within):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
