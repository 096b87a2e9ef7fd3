"""Launch the training recipe as a child process and stream its progress.

The recipe runs under the ``deepspeed`` launcher or ``torchrun`` (or plain python), never in
the Airflow worker's own process: a crash or OOM in training cannot take the worker down, and
the same command line runs by hand, on a GPU node or in a pod.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from airloom.exceptions import AirloomError
from airloom.settings import project_dir, source_checkout

PROGRESS_PREFIX = "airloom-progress "
RECIPE_MODULE = "airloom.training.recipe"


class TrainingFailed(AirloomError):
    exit_code = 1


@dataclass
class LaunchSpec:
    config_path: Path
    launcher: str = "deepspeed"
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = pick a free port
    hostfile: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_command(spec: LaunchSpec) -> list[str]:
    port = spec.master_port or free_port()
    recipe_args = ["--config", str(spec.config_path)]
    if spec.launcher == "deepspeed":
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--master_addr",
            spec.master_addr,
            "--master_port",
            str(port),
        ]
        if spec.hostfile:
            cmd += ["--hostfile", spec.hostfile, "--num_nodes", str(spec.nnodes)]
        elif spec.nnodes > 1:
            # No-SSH mode: each node is started by its own task/pod with its rank. DeepSpeed still
            # takes the node list from a hostfile (without one it refuses nnodes > 1) but never
            # contacts those names here, so placeholder names do.
            hostfile = Path(spec.config_path).with_name("hostfile")
            hostfile.write_text("".join(f"node{i} slots={spec.nproc_per_node}\n" for i in range(spec.nnodes)))
            cmd += [
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(spec.node_rank),
                "--num_nodes",
                str(spec.nnodes),
            ]
        cmd += ["--num_gpus", str(spec.nproc_per_node), "--module", RECIPE_MODULE, *recipe_args]
        return cmd
    if spec.launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(spec.nproc_per_node),
            "--nnodes",
            str(spec.nnodes),
            "--node_rank",
            str(spec.node_rank),
            "--master_addr",
            spec.master_addr,
            "--master_port",
            str(port),
            "-m",
            RECIPE_MODULE,
            *recipe_args,
        ]
    return [sys.executable, "-m", RECIPE_MODULE, *recipe_args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Built DeepSpeed ops are cached per project, not rebuilt per run (first build ~25 s).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(project_dir() / ".cache" / "torch_extensions"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1))))
    # Imported from a checkout, airloom may not be installed at all (the parent put include/ on sys.path);
    # installed, the child's interpreter finds it by itself.
    checkout = source_checkout()
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(checkout / "include"), env.get("PYTHONPATH", "")] if p
        )
    env.update(extra or {})
    return env


def format_progress(p: dict) -> str:
    eta = p.get("eta_s")
    return (
        f"step {p['step']}/{p['total']} loss {p['loss']:.4f} lr {p['lr']:.2e} "
        f"{p.get('tokens_per_s', 0):,.0f} tok/s" + (f" eta {eta:.0f}s" if eta is not None else "")
    )


class TrainingProcess:
    """One launched training run: start, stream, wait, kill (the whole process group)."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path | None = None, tail_lines: int = 60):
        self.cmd, self.env, self.cwd = cmd, env, cwd
        self.proc: subprocess.Popen | None = None
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.last_progress: dict | None = None

    def run(self, log: Callable[[str], None] = print) -> int:
        log("launching: " + " ".join(self.cmd))
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            idx = line.find(PROGRESS_PREFIX)
            if idx >= 0:
                try:
                    self.last_progress = json.loads(line[idx + len(PROGRESS_PREFIX) :])
                    log(format_progress(self.last_progress))
                    continue
                except (json.JSONDecodeError, KeyError):
                    pass
            log(line)
        rc = self.proc.wait()
        if rc != 0:
            raise TrainingFailed(f"training exited with code {rc}; last lines:\n" + "\n".join(self.tail))
        return rc

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
