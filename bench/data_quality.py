"""Data stage throughput and memory: our validate + EDA + prepare vs. ydata-profiling's default report.

The corpus: the GPTeacher codegen set (``../shared/data/instruct/gpteacher_codegen-instruct.json``,
4,535 real rows) repeated ``--copies`` times (default 30: 136,050 rows), every row made distinct by
appending `` [row N]`` (N = the row's global number) to its instruction and response, and to its
input when that is not empty. So no two rows and no two instructions or responses are equal, and a
profiler that works on distinct values saves nothing. The ``copies`` of one source row are still
near-duplicates of each other (they differ in one token), which our stage detects: that is work
our stage does and ydata's report does not.

Our stage runs as the DAG runs it, one child process per task (``airloom validate``, ``airloom
eda``, ``airloom prepare``): validation, then EDA and prepare side by side (the DAG's ``validate >>
[eda_report, prepare]``); the three one after the other are printed too (``ours_serial_s``). As in
the DAG, validation computes the EDA profile of the rows it reads in the same pass and EDA renders it
(``--scan``); prepare reads validation's accepted rows (``accepted.jsonl``: ~90% of the rows here;
the near-copies are gone, so prepare's own near-duplicate search is off, ``--near-dedup off``, as the
DAG sets it); validation gets the tokenizer the DAG passes by default (the project's tiny base, built
first, untimed), so the profile has token lengths, counted on an even sample of 4,000 rows (the suite
sets no token bounds). The validation suite is the default one with the duplicate, near-duplicate and
quarantine limits raised to 1.0, so the ×30 copies do not fail the run. ydata-profiling 4.18.4 runs its
default ``ProfileReport(df).to_file(html)`` on the same rows (as a pandas frame of
instruction/input/response) in its own virtualenv under ``.cache/bench-ydata`` (created on first use:
it pins older pandas/numpy than the project). Wall time and peak RSS of every child come from
``os.wait4``; since validation runs helpers in worker processes, a child's peak is the larger of that
RSS and the PSS of its whole process tree sampled every 100 ms; the stage's peak is the larger of
validation's and the sum of EDA's and prepare's (they run together). ydata's time is its whole child
(read + report) with the report alone also shown.

Then ours runs again on ``--scale`` (default 10) times the rows, for the ratio of peak memory.

    .venv/bin/python bench/data_quality.py [--copies 30] [--scale 10] [--skip-ydata] [--skip-scale]
                                           [--repeat N] [--workdir DIR] [--profile]
                                           [--variant codegen|cyrillic|chat]

``--variant cyrillic`` (every row non-ASCII) and ``--variant chat`` (OpenAI conversations; no ydata run)
measure the same rows through the stage's other paths (see :func:`make_corpus`).

``--profile`` also runs each of our stages once under cProfile on the 1× corpus and prints the top
functions by cumulative time (slower; not part of the timed figures).

Goals (issue #3): our whole stage faster than ydata's report alone, at <= 1/3 of its peak memory;
peak memory at 10× rows within 1.2× of that at 1×. The last line is ``key=value`` pairs, e.g.
``ours_s=… ydata_s=… speed_ratio=… ours_peak_mib=… ydata_peak_mib=… mem_ratio=… peak_10x_over_1x=…``.
Exit status 0 (figures are reported, not enforced).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "instruct" / "gpteacher_codegen-instruct.json"
YDATA_VENV = REPO / ".cache" / "bench-ydata"
YDATA_PINS = ["ydata-profiling==4.18.4", "setuptools<81"]  # pkg_resources, which ydata still imports
BENCH_SUITE = {"max_duplicate_rate": 1.0, "max_near_duplicate_rate": 1.0, "max_quarantine_rate": 1.0}

YDATA_SCRIPT = textwrap.dedent("""
    import json, sys, time, warnings
    warnings.filterwarnings("ignore")
    import pandas as pd
    t0 = time.perf_counter()
    df = pd.read_json(sys.argv[1], lines=True, dtype=False)[["instruction", "input", "response"]]
    t1 = time.perf_counter()
    from ydata_profiling import ProfileReport
    ProfileReport(df, title="codegen x30", progress_bar=False).to_file(sys.argv[2])
    t2 = time.perf_counter()
    print("YDATA " + json.dumps({"read_s": t1 - t0, "report_s": t2 - t1, "rows": len(df)}))
""")


_CYRILLIC = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "абцдефгхийклмнопярстуввхызАБЦДЕФГХИЙКЛМНОПЯРСТУВВХЫЗ",
)


def make_corpus(path: Path, copies: int, variant: str = "codegen") -> int:
    """Write ``copies`` × the codegen set as JSONL, each row distinct (see the module docstring).

    ``variant``: ``codegen`` as it is; ``cyrillic`` with every Latin letter mapped to a Cyrillic one (the
    same rows, sizes and near-copies, every row non-ASCII); ``chat`` as OpenAI ``messages`` rows (a system
    turn every third row, the instruction and input as the user turn, the response as the assistant's;
    every fifth row a second exchange).
    """
    rows = json.loads(SOURCE.read_text(encoding="utf-8"))
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(copies):
            for row in rows:
                n += 1
                tag = f" [row {n}]"
                out = {
                    "instruction": row["instruction"] + tag,
                    "input": row["input"] + tag if row.get("input") else "",
                    "response": row["response"] + tag,
                }
                if variant == "cyrillic":
                    out = {k: v.translate(_CYRILLIC) for k, v in out.items()}
                elif variant == "chat":
                    user = out["instruction"] + (f"\n\n{out['input']}" if out["input"] else "")
                    turns = [{"role": "system", "content": "You are a careful programming assistant."}] * (
                        n % 3 == 1
                    )
                    turns += [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": out["response"]},
                    ]
                    if n % 5 == 1:
                        turns += [
                            {"role": "user", "content": "Thanks! Can you explain it briefly?"},
                            {"role": "assistant", "content": "Sure: " + out["response"][:200]},
                        ]
                    out = {"messages": turns}
                fh.write(json.dumps(out, ensure_ascii=False) + "\n")
    return n


def _tree_pss_mib(pid: int) -> float:
    """Proportional set size of a process and its descendants (shared pages counted once overall)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo.extend(int(c) for c in fh.read().split())
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def run_child(argv: list[str], *, env: dict[str, str] | None = None, log: Path | None = None) -> dict:
    """Run one child: its wall time, its peak RSS (``os.wait4``: that process alone) and the peak PSS of
    its whole process tree (sampled every 100 ms), which counts worker processes it starts too."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    peak_tree = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        while not done.wait(0.1):
            peak_tree = max(peak_tree, _tree_pss_mib(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    # ru_maxrss is in KiB on Linux; the tree's PSS can read a little under it (shared library pages)
    peak = max(usage.ru_maxrss / 1024, peak_tree)
    return {
        "wall_s": wall,
        "peak_mib": peak,
        "rss_mib": usage.ru_maxrss / 1024,
        "tree_pss_mib": peak_tree,
        "rc": proc.returncode,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def build_tokenizer(work: Path) -> Path:
    """The project's tiny base model (its byte-level BPE tokenizer is what the DAG's default counts with),
    built once into ``work`` (not timed)."""
    base = work / "tiny-base"
    if not (base / "tokenizer.json").is_file():
        env = {**os.environ, "AIRLOOM_HOME": str(work / "airloom-home")}
        subprocess.run(
            [sys.executable, "-m", "airloom.cli", "base", "--out", str(base)],
            check=True,
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
    return base


def run_ours(corpus: Path, work: Path, label: str, tokenizer: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    suite = work / "bench_suite.json"
    suite.write_text(json.dumps(BENCH_SUITE))
    cli = [sys.executable, "-m", "airloom.cli"]
    stages = {
        "validate": [
            *cli,
            "validate",
            str(corpus),
            "--out",
            str(work / "validate"),
            "--suite",
            str(suite),
            "--tokenizer",
            str(tokenizer),
        ],
        "eda": [
            *cli,
            "eda",
            str(corpus),
            "--out",
            str(work / "eda"),
            "--scan",
            str(work / "validate" / "scan"),
        ],
        "prepare": [
            *cli,
            "prepare",
            str(work / "validate" / "accepted.jsonl"),
            "--out",
            str(work / "prepare"),
            "--near-dedup",
            "off",
            "--tokenizer",  # loaded only where rows are conversations (the chat template) or lengths bounded
            str(tokenizer),
        ],
    }
    result: dict = {"stages": {}}

    def run(name: str) -> None:
        res = run_child(stages[name], log=work / f"{name}.log")
        if res["rc"] not in (0, 1):  # 1 = a check failed, which still did all the work
            raise SystemExit(f"{label} {name} exited {res['rc']}; see {work / (name + '.log')}")
        result["stages"][name] = res

    def show(name: str) -> None:
        res = result["stages"][name]
        print(
            f"  {label} {name:<8} {res['wall_s']:7.1f} s  peak {res['peak_mib']:7.0f} MiB  "
            f"cpu {res['cpu_s']:6.1f} s  rc {res['rc']}",
            flush=True,
        )

    run("validate")
    show("validate")
    # then EDA and prepare side by side, as the DAG runs them (validate >> [eda_report, prepare])
    start = time.perf_counter()
    side = [threading.Thread(target=run, args=(name,)) for name in ("eda", "prepare")]
    for t in side:
        t.start()
    for t in side:
        t.join()
    after = time.perf_counter() - start
    if set(result["stages"]) != set(stages):
        raise SystemExit(f"{label}: eda or prepare failed; see the logs in {work}")
    show("eda")
    show("prepare")
    stages_s = result["stages"]
    result["wall_s"] = stages_s["validate"]["wall_s"] + after
    result["serial_s"] = sum(s["wall_s"] for s in stages_s.values())  # the three one after the other
    # peaks: validation alone, then EDA and prepare together (the sum of their peaks, an upper bound)
    result["peak_mib"] = max(
        stages_s["validate"]["peak_mib"], stages_s["eda"]["peak_mib"] + stages_s["prepare"]["peak_mib"]
    )
    validation = json.loads((work / "validate" / "validation.json").read_text())
    manifest = json.loads((work / "prepare" / "manifest.json").read_text())
    result["validation"] = {
        k: validation[k]
        for k in ("rows_read", "accepted", "quarantined", "duplicates", "near_duplicates", "success")
    }
    result["prepare_counts"] = manifest["counts"]
    return result


def ensure_ydata() -> Path:
    python = YDATA_VENV / "bin" / "python"
    if (
        not python.exists()
        or subprocess.run([str(python), "-c", "import ydata_profiling"], capture_output=True).returncode != 0
    ):
        print(f"creating {YDATA_VENV} ({' '.join(YDATA_PINS)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(YDATA_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *YDATA_PINS],
            check=True,
        )
    return python


def run_ydata(corpus: Path, work: Path) -> dict:
    python = ensure_ydata()
    script = work / "ydata_report.py"
    script.write_text(YDATA_SCRIPT)
    log = work / "ydata.log"
    res = run_child([str(python), str(script), str(corpus), str(work / "ydata.html")], log=log)
    lines = [line for line in log.read_text().splitlines() if line.startswith("YDATA ")]
    if res["rc"] != 0 or not lines:
        raise SystemExit(f"ydata-profiling failed (rc {res['rc']}); see {log}")
    res.update(json.loads(lines[-1].removeprefix("YDATA ")))
    print(
        f"  ydata    report {res['report_s']:7.1f} s (read {res['read_s']:.1f} s, child {res['wall_s']:.1f} s)  "
        f"peak {res['peak_mib']:7.0f} MiB  cpu {res['cpu_s']:6.1f} s",
        flush=True,
    )
    return res


def profile_ours(corpus: Path, work: Path) -> None:
    """cProfile each stage once (in its own child) and print the top of the cumulative-time table."""
    suite = work / "bench_suite.json"
    accepted = work / "prof_validate" / "accepted.jsonl"
    tokenizer = build_tokenizer(work.parent)
    for name, source, extra in (
        ("validate", corpus, ["--suite", str(suite), "--tokenizer", str(tokenizer)]),
        ("eda", corpus, ["--scan", str(work / "prof_validate" / "scan")]),
        ("prepare", accepted, ["--near-dedup", "off"]),
    ):
        stats = work / f"{name}.prof"
        argv = [
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            str(stats),
            "-m",
            "airloom.cli",
            name,
            str(source),
            "--out",
            str(work / f"prof_{name}"),
            *extra,
        ]
        subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        code = f"import pstats; pstats.Stats({str(stats)!r}).sort_stats('tottime').print_stats(12)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        print(f"--- cProfile {name}: top functions by own time ---")
        body = out.split("ncalls", 1)[-1]
        print("   ncalls" + body.rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=30, help="times the codegen set is repeated (1×)")
    parser.add_argument("--scale", type=int, default=10, help="the larger run has this many times the rows")
    parser.add_argument(
        "--variant",
        choices=("codegen", "cyrillic", "chat"),
        default="codegen",
        help="the corpus: as it is, its Latin letters as Cyrillic ones, or as OpenAI chat rows (no ydata run)",
    )
    parser.add_argument("--skip-ydata", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also cProfile our stages on the 1× corpus")
    parser.add_argument(
        "--workdir", type=Path, help="keep the corpora and outputs here (default: a temp folder)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run ours and ydata's report this many times, alternating, and keep each one's "
        "fastest run (the least disturbed on a shared machine)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="airloom-bench-data-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus_1x.jsonl"
        rows = make_corpus(corpus, args.copies, args.variant)
        args.skip_ydata = (
            args.skip_ydata or args.variant == "chat"
        )  # ydata's report reads the three text columns
        mib = corpus.stat().st_size / 2**20
        print(
            f"corpus 1x ({args.variant}): {rows:,} rows ({args.copies} x {SOURCE.name}, each row suffixed "
            "' [row N]'), "
            f"{mib:.0f} MiB JSONL",
            flush=True,
        )

        tokenizer = build_tokenizer(work)
        ours = ydata = None
        for _ in range(max(1, args.repeat)):
            run = run_ours(corpus, work / "ours_1x", "ours 1x ", tokenizer)
            print(
                f"  ours 1x  total    {run['wall_s']:7.1f} s  peak {run['peak_mib']:7.0f} MiB  "
                f"{rows / run['wall_s']:,.0f} rows/s  (one stage after the other: {run['serial_s']:.1f} s)",
                flush=True,
            )
            ours = run if ours is None or run["wall_s"] < ours["wall_s"] else ours
            if not args.skip_ydata:
                got = run_ydata(corpus, work)
                ydata = got if ydata is None or got["report_s"] < ydata["report_s"] else ydata
        print(f"  validation: {json.dumps(ours['validation'])}")
        print(f"  prepare counts: {json.dumps(ours['prepare_counts'])}")

        big = None
        if not args.skip_scale:
            big_corpus = work / f"corpus_{args.scale}x.jsonl"
            big_rows = make_corpus(big_corpus, args.copies * args.scale, args.variant)
            print(
                f"corpus {args.scale}x: {big_rows:,} rows, {big_corpus.stat().st_size / 2**20:.0f} MiB",
                flush=True,
            )
            big = run_ours(big_corpus, work / f"ours_{args.scale}x", f"ours {args.scale}x", tokenizer)
            big["rows"] = big_rows
            print(
                f"  ours {args.scale}x total    {big['wall_s']:7.1f} s  peak {big['peak_mib']:7.0f} MiB  "
                f"{big_rows / big['wall_s']:,.0f} rows/s",
                flush=True,
            )
            big_corpus.unlink()

        if args.profile:
            profile_ours(corpus, work / "ours_1x")

        figures = {
            "rows": rows,
            "ours_s": round(ours["wall_s"], 1),
            "ours_serial_s": round(ours["serial_s"], 1),
            "ours_rows_per_s": round(rows / ours["wall_s"]),
            "ours_peak_mib": round(ours["peak_mib"]),
            **{f"ours_{k}_s": round(v["wall_s"], 1) for k, v in ours["stages"].items()},
            **{f"ours_{k}_peak_mib": round(v["peak_mib"]) for k, v in ours["stages"].items()},
        }
        if ydata:
            figures.update(
                {
                    "ydata_s": round(ydata["report_s"], 1),
                    "ydata_child_s": round(ydata["wall_s"], 1),
                    "ydata_peak_mib": round(ydata["peak_mib"]),
                    "speed_ratio": round(ydata["report_s"] / ours["wall_s"], 2),  # > 1: ours is faster
                    "serial_speed_ratio": round(ydata["report_s"] / ours["serial_s"], 2),
                    "mem_ratio": round(ours["peak_mib"] / ydata["peak_mib"], 2),  # goal <= 0.33
                }
            )
        if big:
            figures.update(
                {
                    f"ours_{args.scale}x_s": round(big["wall_s"], 1),
                    f"ours_{args.scale}x_peak_mib": round(big["peak_mib"]),
                    f"peak_{args.scale}x_over_1x": round(
                        big["peak_mib"] / ours["peak_mib"], 2
                    ),  # goal <= 1.2
                }
            )
        print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
