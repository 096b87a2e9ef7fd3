"""Load test of ``airloom serve``: requests/s and p50/p95 latency at 1, 8 and 32 concurrent clients,
batched (``--max-batch-size``) vs. unbatched (batch size 1), in one run on the same model.

Each mode runs a real uvicorn server on 127.0.0.1 in this process and closed-loop clients over
HTTP (httpx), each sending ``/v1/completions`` requests shaped like the openai client's, greedy,
``max_tokens`` new tokens. By default it builds a tiny random-weight Llama (the demo's base
architecture, no pre-training) into a temporary registry; ``--registry``/``--model`` serve an
existing version instead (e.g. ``--model airloom-demo@production``).

    .venv/bin/python bench/serve_load.py [--requests 64] [--max-tokens 16] [--torch-threads 1]

The last line is ``key=value`` pairs (``batched_c8_rps=…``, ``unbatched_c32_p95_ms=…``, ``speedup_c32=…``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

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


def start_server(registry: str, model: str, root: Path, max_batch: int, wait_ms: float, threads: int | None):
    import uvicorn

    from airloom.registry.registry import ModelRegistry
    from airloom.serving.app import create_app
    from airloom.serving.engine import Engine

    engine = Engine(
        ModelRegistry.from_uri(registry),
        model,
        cache_dir=root / "cache",
        max_batch_size=max_batch,
        batch_wait_ms=wait_ms,
        poll_seconds=60,
        torch_threads=threads,
    )
    app = create_app(engine, traffic_dir=root / f"traffic-b{max_batch}", feedback_dir=root / "feedback")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("uvicorn did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def body(i: int, model: str, max_tokens: int) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)].format(w=WORDS[i % len(WORDS)], n=i % 97, m=(i * 7) % 89)
    return {
        "model": model.split("@")[0].split("/")[0],
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
    }


async def load(url: str, model: str, clients: int, total: int, max_tokens: int) -> dict:
    """``clients`` closed-loop clients share ``total`` requests; latency per request, throughput overall."""
    import httpx

    latencies: list[float] = []
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, timeout=300, limits=limits, headers={"Authorization": "Bearer sk-bench"}
    ) as client:
        await client.post("/v1/completions", json=body(0, model, max_tokens))  # warm-up

        async def worker():
            for i in counter:
                t0 = time.perf_counter()
                r = await client.post("/v1/completions", json=body(i, model, max_tokens))
                r.raise_for_status()
                latencies.append((time.perf_counter() - t0) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {
        "rps": round(total / elapsed, 2),
        "p50_ms": round(statistics.median(latencies), 1),
        "p95_ms": round(q[18], 1),
        "n": total,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", help="registry URI (default: build a tiny model into a temporary one)")
    ap.add_argument("--model", help="NAME@ALIAS or NAME/VERSION (with --registry)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64, help="requests per (mode, concurrency)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="1 on small shared CPUs: two threads are much slower for a tiny model",
    )
    args = ap.parse_args(argv)
    if bool(args.registry) != bool(args.model):
        ap.error("--registry and --model go together")
    clients = [int(c) for c in args.clients.split(",")]
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="airloom-serve-bench-") as tmp:
        root = Path(tmp)
        registry, model = (args.registry, args.model) if args.registry else tiny_registry(root)
        for mode, max_batch in (("batched", args.max_batch_size), ("unbatched", 1)):
            server, thread, url = start_server(
                registry, model, root, max_batch, args.batch_wait_ms, args.torch_threads
            )
            try:
                for c in clients:
                    res = asyncio.run(load(url, model, c, max(args.requests, c), args.max_tokens))
                    stats = server.config.app.state.engine.stats()
                    print(
                        f"{mode:9} clients={c:<3} rps={res['rps']:<8} p50={res['p50_ms']}ms "
                        f"p95={res['p95_ms']}ms  (batch sizes so far {stats['batch_sizes']})",
                        flush=True,
                    )
                    for k in ("rps", "p50_ms", "p95_ms"):
                        figures[f"{mode}_c{c}_{k}"] = res[k]
            finally:
                server.should_exit = True
                thread.join(timeout=60)
    for c in clients:
        figures[f"speedup_c{c}"] = round(figures[f"batched_c{c}_rps"] / figures[f"unbatched_c{c}_rps"], 2)
    figures.update(
        requests=args.requests,
        max_tokens=args.max_tokens,
        max_batch_size=args.max_batch_size,
        torch_threads=args.torch_threads,
    )
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
