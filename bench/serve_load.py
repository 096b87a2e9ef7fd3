"""Load test of ``airloom serve``: the in-process engine alone vs. the same engine behind the gateway,
and batched vs. unbatched, in one run on the same model.

Every server is a real ``airloom serve`` process on 127.0.0.1, started with the same batching flags
and torch threads (``--torch-threads``, and ``OMP_NUM_THREADS``/``TOKENIZERS_PARALLELISM=false`` in
every server's environment):

- ``engine``: ``airloom serve --model NAME@production`` (transformers in process, batched);
- ``gateway``: ``airloom serve --model NAME@production --upstream-command '{python} -m airloom.cli
  serve --model-dir {model_dir} --port {port} …'``: the gateway process (keys, prompt checks, traffic
  log) forwards to an upstream ``airloom serve`` process that generates, as in production over vLLM;
- ``unbatched``: the engine with ``--max-batch-size 1`` (``--no-unbatched`` leaves it out).

The engine alone is a separate process too, so both sides pay the same HTTP and process costs except
what the gateway adds (its own process, a second HTTP hop, its log). Clients are closed-loop
coroutines in this process (aiohttp), each sending ``/v1/completions`` requests as the openai client
does, greedy, ``--max-tokens`` new tokens, API key on (the engine and the gateway check the same
key; the upstream listens on loopback without one). Every server first answers ``--warmup`` requests.
For each concurrency level the modes take turns (engine, gateway, unbatched, then the next level;
the order reverses every other round), so background load drifting on a shared machine hits them
alike; ``--rounds`` sweeps are pooled. Each (mode, level) runs two passes of ``--requests``
requests: not streamed (latency p50/p95, requests/s, tokens/s = completion tokens from ``usage`` /
wall) and streamed (``stream=True`` with ``include_usage``: time to the first content chunk
p50/p95). The CPU time each server process used per request (from /proc) shows what the gateway
costs apart from the noise of a shared machine.

By default it builds a tiny random-weight Llama (the demo's base architecture, no pre-training) into
a temporary registry; ``--registry``/``--model`` serve an existing version instead.

    .venv/bin/python bench/serve_load.py [--requests 64] [--rounds 3] [--max-tokens 16] [--torch-threads 1]

The last line is ``key=value`` pairs: ``engine_c1_p50_ms``, ``gateway_c1_p50_ms``,
``gateway_overhead_c1_p50`` (gateway p50 / engine p50), ``gateway_c8_ttft_p50_ms``,
``engine_c32_tok_s``, ``speedup_c32`` (engine / unbatched requests/s), ``gateway_cpu_ms_per_req``,
``gateway_cpu_ms_per_streamed_req``, ``load_start``, …
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

KEY = "sk-bench"
PROMPTS = [
    "### Instruction:\nReverse the word.\n### Input:\n{w}\n### Response:\n",
    "### Instruction:\nSort the letters alphabetically.\n### Input:\n{w}\n### Response:\n",
    "### Instruction:\nWrite the word in upper case.\n### Input:\n{w}\n### Response:\n",
    "### Instruction:\nAdd the numbers.\n### Input:\n{n} + {m}\n### Response:\n",
]
WORDS = ["river", "lantern", "orbit", "meadow", "copper", "falcon", "harbor", "tundra"]


def tiny_registry(root: Path) -> tuple[str, str]:
    from airloom.registry.registry import ModelRegistry
    from airloom.training.base import BaseModelSpec, build_base_model

    build_base_model(
        root / "model", BaseModelSpec(pretrain_lines=2000, pretrain_seconds=0), log=lambda *_: None
    )
    reg = ModelRegistry.from_uri(root / "registry")
    reg.register("bench-tiny", root / "model", metadata={"summary": "serve_load bench"}, actor="bench")
    reg.set_alias("bench-tiny", "production", 1, actor="bench")
    return str(root / "registry"), "bench-tiny@production"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``airloom serve`` process (and, for the gateway, the upstream it starts in its own group)."""

    def __init__(self, mode: str, argv: list[str], env: dict, log: Path) -> None:
        self.mode, self.log, self.port = mode, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [*argv, "--port", str(self.port)], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_up(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.mode} server exited ({self.process.returncode}):\n{self.tail()}")
            try:
                r = httpx.get(self.url + "/healthz", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.mode} server not up after {timeout:g}s:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the gateway stops its upstream's group itself
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def server_argv(args, registry: str, model: str, root: Path, mode: str) -> list[str]:
    max_batch = 1 if mode == "unbatched" else args.max_batch_size
    engine_flags = [
        "--max-batch-size",
        str(max_batch),
        "--batch-wait-ms",
        str(args.batch_wait_ms),
        "--torch-threads",
        str(args.torch_threads),
    ]
    common = [
        sys.executable,
        "-m",
        "airloom.cli",
        "--registry",
        registry,
        "serve",
        "--model",
        model,
        "--cache-dir",
        str(root / "cache"),
        "--traffic-dir",
        str(root / mode / "traffic"),
        "--feedback-dir",
        str(root / mode / "feedback"),
        "--poll-seconds",
        "60",
        "--api-keys-file",
        str(root / "keys"),
    ]
    if mode != "gateway":
        return [*common, *engine_flags]
    upstream = [
        "{python}",
        "-m",
        "airloom.cli",
        "serve",
        "--model-dir",
        "{model_dir}",
        "--port",
        "{port}",
        "--traffic-dir",
        str(root / "upstream" / "traffic"),
        "--feedback-dir",
        str(root / "upstream" / "feedback"),
        *engine_flags,
    ]
    return [*common, "--upstream-command", shlex.join(upstream)]


def body(i: int, model: str, max_tokens: int, stream: bool) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)].format(w=WORDS[i % len(WORDS)], n=i % 97, m=(i * 7) % 89)
    out = {
        "model": model.split("@")[0].split("/")[0],
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        out.update(stream=True, stream_options={"include_usage": True})
    return out


async def one_streamed(session: aiohttp.ClientSession, url: str, payload: dict) -> tuple[float | None, int]:
    """Seconds to the first chunk with text (None if none had any), completion tokens from usage."""
    t0, first, tokens, done = time.perf_counter(), None, 0, False
    async with session.post(url + "/v1/completions", json=payload) as r:
        if r.status != 200:
            raise SystemExit(f"streamed request answered {r.status}: {(await r.read())[:300]!r}")
        async for raw in r.content:  # line by line, to the end of the body (the connection is reused)
            line = raw.decode().rstrip("\r\n")
            if done or not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise SystemExit(f"stream failed: {chunk['error']}")
            if first is None and any(c.get("text") for c in chunk.get("choices") or ()):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if not done:
        raise SystemExit("a stream ended without [DONE]")
    return first, tokens


async def load(url: str, model: str, clients: int, total: int, max_tokens: int, stream: bool) -> dict:
    """``clients`` closed-loop clients share ``total`` requests; per-request latency (and time to first
    token when streamed), completion tokens and the wall time of the whole pass. The client is aiohttp:
    it costs several times less CPU per request than httpx, CPU the servers compete for."""
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    counter = iter(range(total))
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=aiohttp.ClientTimeout(total=300),
        connector=aiohttp.TCPConnector(limit=clients),
    ) as session:

        async def request(i: int) -> None:
            nonlocal tokens
            payload = body(i, model, max_tokens, stream)
            t0 = time.perf_counter()
            if stream:
                first, n = await one_streamed(session, url, payload)
                if first is not None:
                    ttfts.append(first * 1000)
            else:
                async with session.post(url + "/v1/completions", json=payload) as r:
                    if r.status != 200:
                        raise SystemExit(f"request answered {r.status}: {(await r.text())[:300]}")
                    n = (await r.json())["usage"]["completion_tokens"]
            latencies.append((time.perf_counter() - t0) * 1000)
            tokens += n

        await asyncio.gather(*(request(i) for i in range(min(clients, 4))))  # warm connections
        latencies.clear(), ttfts.clear()
        tokens = 0

        async def worker():
            for i in counter:
                await request(i)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"latencies": latencies, "ttfts": ttfts, "tokens": tokens, "wall": wall, "n": total}


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method), ms rounded to 0.1."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 1)


def summarize(plain: list[dict], streamed: list[dict]) -> dict:
    lat = [x for p in plain for x in p["latencies"]]
    ttft = [x for p in streamed for x in p["ttfts"]]
    wall = sum(p["wall"] for p in plain)
    return {
        "p50_ms": pct(lat, 50),
        "p95_ms": pct(lat, 95),
        "rps": round(sum(p["n"] for p in plain) / wall, 2),
        "tok_s": round(sum(p["tokens"] for p in plain) / wall, 1),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p95_ms": pct(ttft, 95),
        "stream_p50_ms": pct([x for p in streamed for x in p["latencies"]], 50),
        "stream_tok_s": round(sum(p["tokens"] for p in streamed) / sum(p["wall"] for p in streamed), 1),
    }


def cpu_ms(pid: int | None) -> float:
    """CPU time (user + system) a process has used so far, ms; 0 where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", help="registry URI (default: build a tiny model into a temporary one)")
    ap.add_argument("--model", help="NAME@ALIAS or NAME/VERSION (with --registry)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64, help="requests per (mode, level, pass, round)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="sweeps, pooled; the modes' order alternates between rounds (default 3)",
    )
    ap.add_argument("--warmup", type=int, default=32, help="requests per server before measuring")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="per server process; 1 on small shared CPUs: two threads are much slower for a tiny model",
    )
    ap.add_argument("--no-unbatched", action="store_true", help="leave out the unbatched engine")
    ap.add_argument("--no-gateway", action="store_true", help="leave out the gateway")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--keep-logs", help="copy the servers' logs into this folder")
    args = ap.parse_args(argv)
    if bool(args.registry) != bool(args.model):
        ap.error("--registry and --model go together")
    clients = [int(c) for c in args.clients.split(",")]
    modes = [
        "engine",
        *([] if args.no_gateway else ["gateway"]),
        *([] if args.no_unbatched else ["unbatched"]),
    ]
    load_start = os.getloadavg()[0]
    started = time.monotonic()
    results: dict[tuple[str, int], dict[str, list]] = {
        (m, c): {"plain": [], "streamed": []} for m in modes for c in clients
    }
    # CPU ms used by each server process during the measured passes, and requests served meanwhile
    cpu: dict[tuple[str, bool], float] = {}
    served: dict[tuple[str, bool], int] = {}
    with tempfile.TemporaryDirectory(prefix="airloom-serve-bench-") as tmp:
        root = Path(tmp)
        registry, model = (args.registry, args.model) if args.registry else tiny_registry(root)
        (root / "keys").write_text(KEY + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRLOOM_API_KEYS", "AIRFLOW_CONN_"))}
        threads = str(args.torch_threads)
        env.update(
            AIRLOOM_HOME=str(root / "home"),
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
            TOKENIZERS_PARALLELISM="false",
        )
        servers: dict[str, Server] = {}
        pids: dict[str, dict[str, int]] = {}  # mode -> process name -> pid
        try:
            for mode in modes:  # one at a time: loading on 2 cores is slow enough already
                servers[mode] = Server(
                    mode, server_argv(args, registry, model, root, mode), env, root / f"{mode}.log"
                )
                health = servers[mode].wait_up(args.start_timeout)
                pids[mode] = {mode: servers[mode].process.pid}
                if "upstream" in health:
                    pids[mode]["upstream"] = health["upstream"]["pid"]
                where = health.get("upstream", {}).get("url", "in process")
                print(f"{mode}: {health['model']} up ({where})", flush=True)
            for mode in modes:  # every prompt shape once, before anything is timed
                for stream in (False, True):
                    asyncio.run(load(servers[mode].url, model, 8, args.warmup, args.max_tokens, stream))
            for r in range(args.rounds):
                for c in clients:
                    for mode in modes if r % 2 == 0 else modes[::-1]:
                        n = max(args.requests, c)
                        for stream in (False, True):
                            before = {k: cpu_ms(pid) for k, pid in pids[mode].items()}
                            res = asyncio.run(load(servers[mode].url, model, c, n, args.max_tokens, stream))
                            for k, pid in pids[mode].items():
                                cpu[(k, stream)] = cpu.get((k, stream), 0.0) + cpu_ms(pid) - before[k]
                                # + the pass's own warm-up requests (load() sends them first)
                                served[(k, stream)] = served.get((k, stream), 0) + n + min(c, 4)
                            results[(mode, c)]["streamed" if stream else "plain"].append(res)
                        one = summarize(results[(mode, c)]["plain"][-1:], results[(mode, c)]["streamed"][-1:])
                        print(
                            f"round {r + 1} {mode:9} clients={c:<3} rps={one['rps']:<7} tok/s={one['tok_s']:<7} "
                            f"p50={one['p50_ms']}ms p95={one['p95_ms']}ms ttft p50={one['ttft_p50_ms']}ms "
                            f"p95={one['ttft_p95_ms']}ms  load={os.getloadavg()[0]:.1f}",
                            flush=True,
                        )
            for mode in modes:  # rows per generate call, warm-up included
                stats = httpx.get(servers[mode].url + "/healthz", timeout=10).json()
                if "upstream" in stats:
                    mode, stats = (
                        "upstream",
                        httpx.get(stats["upstream"]["url"] + "/healthz", timeout=10).json(),
                    )
                print(f"{mode}: batch sizes {stats['batch_sizes']}")
        finally:
            for server in servers.values():
                server.stop()
            if args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                for server in servers.values():
                    (Path(args.keep_logs) / server.log.name).write_text(server.log.read_text())
    figures: dict[str, float | str] = {}
    print("\n| mode | clients | req/s | tokens/s | p50 / p95 ms | TTFT p50 / p95 ms (streamed) |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in clients:
        for mode in modes:
            s = summarize(results[(mode, c)]["plain"], results[(mode, c)]["streamed"])
            print(
                f"| {mode} | {c} | {s['rps']} | {s['tok_s']} | {s['p50_ms']} / {s['p95_ms']} | "
                f"{s['ttft_p50_ms']} / {s['ttft_p95_ms']} |"
            )
            for k in ("p50_ms", "p95_ms", "rps", "tok_s", "ttft_p50_ms", "ttft_p95_ms"):
                figures[f"{mode}_c{c}_{k}"] = s[k]
    for c in clients:
        if "gateway" in modes:
            for k in ("p50", "p95", "ttft_p50"):
                figures[f"gateway_overhead_c{c}_{k}"] = round(
                    figures[f"gateway_c{c}_{k}_ms"] / figures[f"engine_c{c}_{k}_ms"], 3
                )
        if "unbatched" in modes:
            figures[f"speedup_c{c}"] = round(figures[f"engine_c{c}_rps"] / figures[f"unbatched_c{c}_rps"], 2)
    print("\nCPU ms per request, all levels (server processes only):")
    for (proc, stream), ms in sorted(cpu.items()):
        per = round(ms / served[(proc, stream)], 2)
        print(f"  {proc:9} {'streamed' if stream else 'plain':8} {per}")
        figures[f"{proc}_cpu_ms_per_{'streamed_' if stream else ''}req"] = per
    figures.update(
        requests=args.requests,
        rounds=args.rounds,
        max_tokens=args.max_tokens,
        max_batch_size=args.max_batch_size,
        torch_threads=args.torch_threads,
        load_start=round(load_start, 2),
        load_end=round(os.getloadavg()[0], 2),
        seconds=round(time.monotonic() - started, 1),
    )
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
