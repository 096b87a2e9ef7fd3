"""Artifact store benchmark: ``Artifacts.publish`` / ``Artifacts.stage`` against plain boto3 transfers of the
same files, on moto's S3 server in this process.

What a hand-over between workers costs beyond moving the bytes. Two artifacts, written the way tasks
write them under a producer's ``AIRLOOM_HOME``:

- a model-sized folder, ``runs/bench/<run>/train/model``: one ``--model-mb`` file (default 64 MB) and
  ``--small-files`` files of ``--small-kb`` KB (configs, tokenizer files; default 20 x 16 KB);
- a prepared dataset, ``datasets/bench/1``: a ``--split-mb`` split (default 16 MB, ``train.jsonl``) and
  its ``manifest.json``, staged as operators stage a split (``beside=("manifest.json",)``).

Measured, each ``--repeat`` times (median reported, every run listed; warm: ``--repeat`` after each
cold stage, their range), after an untimed warm-up download, in rounds whose order flips
every other round so drift on a shared machine hits both sides alike:

- **upload**: boto3 ``upload_file`` of every file (the client's default TransferConfig: multipart over
  8 MB, 10 threads) vs. ``Artifacts.publish`` (sha256 of every file, the same ``upload_file`` calls,
  then the manifest), each to a fresh prefix;
- **download**: boto3 ``download_file`` of the same objects into an empty folder (staging without
  verification) vs. ``Artifacts.stage`` cold (manifest, download, size + sha256 check, one rename into
  an empty cache) from a second ``AIRLOOM_HOME``, and warm (the cache already holds it);
- sha256 of the same files on local disk: what verification costs on this CPU;
- one small GET (``get_object`` of a manifest): the unit a warm stage pays once per manifest it reads.

Same boto3 client for both sides. The server is moto's ``ThreadedMotoServer`` on 127.0.0.1 in this
process (it shares the GIL with the client): loopback, no S3 latency or bandwidth limit, so the ratios
show the client-side overhead (hashing, manifest round trips), not what S3 would take.

    .venv/bin/python bench/artifact_staging.py [--model-mb 64] [--small-files 20] [--small-kb 16]
                                               [--split-mb 16] [--repeat 3]

The last line is machine-readable ``key=value`` pairs (the model folder's, then ``split_*``), e.g.
``publish_vs_upload=1.02 stage_cold_vs_download=1.00 stage_warm_vs_download=0.008 stage_warm_ms=9.2
publish_MBps=55 upload_MBps=56 stage_cold_MBps=57 download_MBps=57 sha256_MBps=1154
split_publish_vs_upload=1.32 split_cold_vs_download=1.41 split_warm_ms=16.4 split_cold_MBps=90
request_ms=8.6 model_MB=64.3 split_MB=16.0 repeat=3``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUCKET = "airloom-bench"
MB = 1_000_000


def start_moto(workdir: Path) -> tuple[Any, str]:
    """moto's S3 server in a thread of this process, fake credentials in the env, one bucket."""
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            # No ~/.aws of the developer's (transfer settings, profiles) changes the numbers.
            "AWS_CONFIG_FILE": str(workdir / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "aws-credentials"),
        }
    )
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request, in this process's time
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    return server, endpoint


def write_file(path: Path, size: int) -> None:
    """``size`` random bytes (hashing and transfer cost the same for any content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        left = size
        while left:
            chunk = min(left, 8 * MB)
            fh.write(os.urandom(chunk))
            left -= chunk


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-mb", type=float, default=64, help="the model folder's large file (MB)")
    parser.add_argument("--small-files", type=int, default=20, help="small files beside it (%(default)s)")
    parser.add_argument("--small-kb", type=float, default=16, help="size of each small file (KB)")
    parser.add_argument("--split-mb", type=float, default=16, help="the dataset split's size (MB)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each measurement (median; %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.model_mb <= 0 or args.split_mb <= 0 or args.small_files < 0 or args.small_kb <= 0:
        parser.error("sizes must be positive")

    with tempfile.TemporaryDirectory(prefix="airloom-artifact-bench-") as tmp_name:
        tmp = Path(tmp_name).resolve()
        server, endpoint = start_moto(tmp)
        try:
            return run(args, tmp, endpoint)
        finally:
            server.stop()


def run(args: argparse.Namespace, tmp: Path, endpoint: str) -> int:
    import boto3

    from airloom.artifacts import MANIFEST, Artifacts
    from airloom.registry.store import sha256_file

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)

    home_a, home_b = tmp / "worker-a", tmp / "worker-b"
    model = home_a / "runs" / "bench" / "run1" / "train" / "model"
    write_file(model / "model.safetensors", int(args.model_mb * MB))
    for i in range(args.small_files):
        write_file(model / f"small_{i:02d}.json", int(args.small_kb * 1000))
    dataset = home_a / "datasets" / "bench" / "1"
    write_file(dataset / "train.jsonl", int(args.split_mb * MB))
    (dataset / "manifest.json").write_text('{"chat_template": "chatml", "splits": ["train"]}\n')

    def delete_root(root: str) -> None:
        Artifacts(f"s3://{BUCKET}/{root}", client=client).store.delete_prefix("")

    # The artifacts the download side reads: published once, untimed, by worker A.
    os.environ["AIRLOOM_HOME"] = str(home_a)
    source = Artifacts(f"s3://{BUCKET}/store", client=client)
    model_uri = source.publish(model)
    split_uri = source.publish(dataset) + "/train.jsonl"

    subjects: dict[str, dict[str, Any]] = {
        "model": {"folder": model, "uri": model_uri, "beside": ()},
        "split": {"folder": dataset, "uri": split_uri, "beside": ("manifest.json",)},
    }
    for s in subjects.values():
        # What the stage of this URI brings: the folder's files, or the split and its manifest.json.
        got = Artifacts(f"s3://{BUCKET}/store", client=client).entries(s["uri"], s["beside"])
        s["download_keys"] = [(e.key, e.rel) for e in got]
        s["download_bytes"] = sum(e.size for e in got)
        s["upload_files"] = [p for p in files_under(s["folder"]) if p.name != MANIFEST]
        s["upload_bytes"] = sum(p.stat().st_size for p in s["upload_files"])
        s["times"] = {k: [] for k in ("upload", "publish", "download", "cold", "warm", "sha256")}
    # One small GET (the model's manifest, as boto3 reads it): the unit a warm stage pays once per
    # manifest it looks for (a folder: 1; a file: 2, its own name's then its folder's).
    request_times: list[float] = []
    manifest_key = f"store/{model.relative_to(home_a).as_posix()}/{MANIFEST}"

    def one_request() -> float:
        return timed(lambda: client.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())

    def plain_upload(s: dict[str, Any], root: str) -> float:
        folder: Path = s["folder"]
        key = folder.relative_to(home_a).as_posix()

        def go() -> None:
            for path in s["upload_files"]:
                client.upload_file(str(path), BUCKET, f"{root}/{key}/{path.relative_to(folder).as_posix()}")

        return timed(go)

    def publish(s: dict[str, Any], root: str) -> float:
        os.environ["AIRLOOM_HOME"] = str(home_a)
        artifacts = Artifacts(f"s3://{BUCKET}/{root}", client=client)
        return timed(lambda: artifacts.publish(s["folder"]))

    def plain_download(s: dict[str, Any]) -> float:
        dest = tmp / f"plain-{uuid.uuid4().hex}"

        def go() -> None:
            for key, rel in s["download_keys"]:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(BUCKET, f"store/{key}", str(target))

        try:
            return timed(go)
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def stage(s: dict[str, Any]) -> tuple[float, list[float]]:
        """Cold into an empty cache of worker B, then warm ``--repeat`` times; the cache is removed after."""
        os.environ["AIRLOOM_HOME"] = str(home_b)
        cache = home_b / "cache" / f"artifacts-{uuid.uuid4().hex}"
        artifacts = Artifacts(f"s3://{BUCKET}/store", client=client, cache_dir=cache)
        try:
            local: list[Path] = []
            cold = timed(lambda: local.append(artifacts.stage(s["uri"], s["beside"])))
            staged = sorted(
                p for p in (local[0] if local[0].is_dir() else local[0].parent).rglob("*") if p.is_file()
            )
            if sum(p.stat().st_size for p in staged) != s["download_bytes"]:
                raise SystemExit(f"staged {local[0]} holds {len(staged)} files, not what the manifest names")
            warm = []
            for _ in range(args.repeat):
                again: list[Path] = []
                warm.append(timed(lambda: again.append(artifacts.stage(s["uri"], s["beside"]))))  # noqa: B023
                if again[0] != local[0]:
                    raise SystemExit(f"warm stage returned {again[0]}, cold {local[0]}")
            return cold, warm
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def sha256_all(s: dict[str, Any]) -> float:
        return timed(lambda: [sha256_file(p) for p in s["upload_files"]])

    for s in subjects.values():  # untimed warm-up: connection pool, first multipart download, page cache
        plain_download(s)
    for r in range(args.repeat):
        for name, s in subjects.items():
            t = s["times"]
            up_root, pub_root = f"plain-{r}-{name}", f"pub-{r}-{name}"
            # Flip the order every other round: drift and warm-up hit both sides alike.
            pairs: list[tuple[str, Callable[[], Any]]] = [
                ("upload", lambda: plain_upload(s, up_root)),  # noqa: B023
                ("publish", lambda: publish(s, pub_root)),  # noqa: B023
            ]
            for what, fn in pairs if r % 2 == 0 else pairs[::-1]:
                t[what].append(fn())
            delete_root(up_root)
            delete_root(pub_root)
            if r % 2 == 0:
                t["download"].append(plain_download(s))
                cold, warm = stage(s)
            else:
                cold, warm = stage(s)
                t["download"].append(plain_download(s))
            t["cold"].append(cold)
            t["warm"].extend(warm)
            t["sha256"].append(sha256_all(s))
        request_times.extend(one_request() for _ in range(10))
        print(f"round {r + 1}/{args.repeat} done", file=sys.stderr, flush=True)

    med = {name: {k: statistics.median(v) for k, v in s["times"].items()} for name, s in subjects.items()}

    def mbps(nbytes: int, seconds: float) -> float:
        return nbytes / MB / seconds if seconds > 0 else float("nan")

    print(
        f"moto {endpoint} (in process, loopback) repeat={args.repeat} python={sys.executable} "
        f"cpus={os.cpu_count()}"
    )
    header = f"{'artifact':<8} {'operation':<34} {'median':>10} {'MB/s':>8} {'vs plain':>9}  runs"
    print(header)
    print("-" * len(header))

    def row(name: str, label: str, key: str, base: str | None, *, ms: bool = False) -> None:
        s, m = subjects[name], med[name]
        value = m[key]
        nbytes = s["upload_bytes"] if key in ("upload", "publish", "sha256") else s["download_bytes"]
        shown = f"{value * 1000:.2f} ms" if ms else f"{value:.3f} s"
        rate = "" if ms else f"{mbps(nbytes, value):.0f}"
        ratio = f"{value / m[base]:.2f}" if base else ""
        got = s["times"][key]
        if ms:  # --repeat warm stages after each cold one: the range, not every run
            runs = f"{len(got)} runs, {min(got) * 1000:.1f}-{max(got) * 1000:.1f} ms"
        else:
            runs = ", ".join(f"{v:.3f}" for v in got)
        print(f"{'':<8} {label:<34} {shown:>10} {rate:>8} {ratio:>9}  {runs}")

    for name, s in subjects.items():
        up_mb, down_mb = s["upload_bytes"] / MB, s["download_bytes"] / MB
        print(
            f"{name:<8} {len(s['upload_files'])} files, {up_mb:.1f} MB published; "
            f"{len(s['download_keys'])} files, {down_mb:.1f} MB staged ({s['uri']})"
        )
        row(name, "boto3 upload_file (plain)", "upload", None)
        row(name, "Artifacts.publish", "publish", "upload")
        row(name, "boto3 download_file (plain)", "download", None)
        row(name, "Artifacts.stage cold", "cold", "download")
        row(name, "Artifacts.stage warm (cache hit)", "warm", "download", ms=True)
        row(name, "sha256 of the files (local disk)", "sha256", None)

    request_s = statistics.median(request_times)
    print(
        f"one GET of a small object (boto3 get_object, {len(request_times)} runs): median "
        f"{request_s * 1000:.2f} ms, min {min(request_times) * 1000:.2f} ms"
    )

    mo, sp = med["model"], med["split"]
    model_s, split_s = subjects["model"], subjects["split"]
    print(
        f"publish_vs_upload={mo['publish'] / mo['upload']:.2f} "
        f"stage_cold_vs_download={mo['cold'] / mo['download']:.2f} "
        f"stage_warm_vs_download={mo['warm'] / mo['download']:.3f} "
        f"stage_warm_ms={mo['warm'] * 1000:.1f} "
        f"publish_MBps={mbps(model_s['upload_bytes'], mo['publish']):.0f} "
        f"upload_MBps={mbps(model_s['upload_bytes'], mo['upload']):.0f} "
        f"stage_cold_MBps={mbps(model_s['download_bytes'], mo['cold']):.0f} "
        f"download_MBps={mbps(model_s['download_bytes'], mo['download']):.0f} "
        f"sha256_MBps={mbps(model_s['upload_bytes'], mo['sha256']):.0f} "
        f"split_publish_vs_upload={sp['publish'] / sp['upload']:.2f} "
        f"split_cold_vs_download={sp['cold'] / sp['download']:.2f} "
        f"split_warm_ms={sp['warm'] * 1000:.1f} "
        f"split_cold_MBps={mbps(split_s['download_bytes'], sp['cold']):.0f} "
        f"request_ms={request_s * 1000:.1f} "
        f"model_MB={model_s['upload_bytes'] / MB:.1f} split_MB={split_s['download_bytes'] / MB:.1f} "
        f"repeat={args.repeat}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
