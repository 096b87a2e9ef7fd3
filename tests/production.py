"""Production mode on one machine: Airflow 3.3 on PostgreSQL with the CeleryExecutor and Redis.

What ``docker/docker-compose.yaml`` runs, as plain processes, so tests and users can prove the DAGs
there without a container engine:

- a fresh PostgreSQL database per run (``airloom_prod_<random>``), migrated with ``airflow db migrate``,
  with ``airflow_settings.yaml`` applied (pools ``gpu``/``eval``, variables, ``aws_default``);
- a Redis database of its own (1–15, claimed with a key) as the Celery broker; results in PostgreSQL;
- ``airflow api-server`` (a free port), ``scheduler``, ``dag-processor``, ``triggerer`` and one
  ``airflow celery worker --queues default,gpu --concurrency 2``, each a process group of its own
  with its own log file under ``<dir>/logs/``;
- the registry on S3 (``AIRLOOM_REGISTRY=s3://…``) when an S3 endpoint (MinIO, moto) is given.

:meth:`ProductionStack.start` returns once the API server reports the scheduler, triggerer and
dag-processor healthy and the Celery worker answers a ping; :meth:`ProductionStack.stop` stops every
process group by PID, then any process left in the components' sessions or carrying this stack's
marker in its environment (task children started in sessions of their own), drops the database and
empties the Redis database.

A test rig, so it lives with the tests, not in the installed package. From the repository root (state in
``<dir>/stack.json``; exit codes 0 ok, 1 unhealthy/failed, 2 bad usage)::

    python -m tests.production start --dir /tmp/airloom-prod [--s3-endpoint http://127.0.0.1:9000 \\
                                     --registry s3://airloom/registry]  # prints the UI URL and the env file
    python -m tests.production status --dir /tmp/airloom-prod
    python -m tests.production stop --dir /tmp/airloom-prod

``<dir>/env.sh`` holds the environment, so ``set -a; . <dir>/env.sh; set +a; airflow dags list`` talks
to the running stack. Logins are the embedded ones (``admin``, ``trainer``, ``reviewer``, password =
name): this is a test rig, not a deployment.

Use from a test (tests/integration/test_production_mode.py)::

    stack = ProductionStack(root).start()
    try:
        ... stack.api_url, stack.env ...
    finally:
        stack.stop()
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from airloom.exceptions import AirloomError, CheckFailed, UsageError
from airloom.settings import airflow_env, ensure_embedded_airflow_home
from airloom.training.launcher import free_port

REPO = Path(__file__).resolve().parents[1]

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"
QUEUES = ("default", "gpu")
MARKER = "AIRLOOM_PROD_STACK"
"""Environment variable every process of a stack inherits; its value is the stack id."""
STATE_FILE = "stack.json"
_REDIS_CLAIM_KEY = "airloom:prod:claim"
# Start order; stop goes the other way, so nothing is scheduled onto a worker that is gone.
CONTROL_PLANE = ("api-server", "scheduler", "dag-processor", "triggerer")
WORKER = "celery-worker"
GPU_WORKER = "celery-worker-gpu"


def tail(path: Path, lines: int = 40) -> str:
    """The end of a component's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time in clock ticks) of ``pid`` from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[3]), int(fields[19])


def _alive(pid: int, started: int | None) -> bool:
    """``pid`` runs (not a zombie) and is the process we started (same start time: not a reused PID).

    Not the environment: Airflow's setproctitle overwrites /proc/<pid>/environ of its processes.
    """
    st = _stat(pid)
    return st is not None and st[0] != "Z" and (started is None or st[2] == started)


def _carries_marker(pid: int, stack_id: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER}={stack_id}".encode() in environ.split(b"\0")


def _leftover_pids(stack_id: str | None, sessions: set[int], since: int) -> list[int]:
    """Processes of this stack still running: in one of ``sessions``, or (with ``stack_id``) started in a
    session of their own (the deepspeed launcher) but carrying its marker. Only those started after ``since``."""
    own = os.getpid()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == own:
            continue
        st = _stat(int(p.name))
        if st is None or st[0] == "Z" or st[2] < since:
            continue
        if st[1] in sessions or (stack_id and _carries_marker(int(p.name), stack_id)):
            found.append(int(p.name))
    return found


@dataclass
class ProductionStack:
    """One production-mode Airflow under ``root``: ``airflow/`` (AIRFLOW_HOME), ``airloom/`` (AIRLOOM_HOME),
    ``logs/`` (one file per component and setup step).

    :param root: the folder for everything this stack writes.
    :param s3_endpoint: an S3 endpoint (MinIO, moto); with it the registry is ``registry`` on S3.
    :param registry: the ``s3://bucket/prefix`` registry URI used with ``s3_endpoint``.
    :param artifacts: an ``s3://bucket/prefix`` artifact store (``AIRLOOM_ARTIFACTS``). With it the stack runs two
        workers that share no disk, as machines would: ``celery-worker`` (queue ``default``) and
        ``celery-worker-gpu`` (queue ``gpu``), each with an ``AIRLOOM_HOME`` of its own under ``<root>/<name>/``;
        each runs in a mount namespace where every other home (the other worker's, the control plane's
        ``<root>/airloom``) is an empty tmpfs, so a task that reads a path another machine wrote fails.
    :param worker_concurrency: Celery worker slots (the machine has 2 cores).
    :param pg_admin_dsn: a PostgreSQL login that may create and drop databases.
    :param redis_url: the Redis server (without a database number).
    :param base_env: the environment to start from (default ``os.environ``).
    :param extra_env: set last, over the stack's own values (e.g. a shorter heartbeat timeout for a
        fault test, or a second DAG bundle).
    """

    root: Path
    s3_endpoint: str | None = None
    registry: str = "s3://airloom-registry/registry"
    artifacts: str | None = None
    worker_concurrency: int = 2
    pg_admin_dsn: str = PG_ADMIN_DSN
    redis_url: str = REDIS_URL
    base_env: dict[str, str] | None = None
    extra_env: dict[str, str] | None = None
    stack_id: str = field(default_factory=lambda: secrets.token_hex(4))
    db_name: str = ""
    redis_db: int | None = None
    port: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    started: dict[str, int] = field(default_factory=dict)
    """Component -> its start time in /proc clock ticks, to tell our process from a reused PID."""
    sessions: list[int] = field(default_factory=list)
    """Every session a component ever led (restarts add one), for the leftover sweep."""
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.db_name = self.db_name or f"airloom_prod_{self.stack_id}"
        if self.s3_endpoint and not self.registry.startswith("s3://"):
            raise UsageError(
                f"registry must be s3://bucket/prefix with an S3 endpoint, got {self.registry!r}"
            )

    # -- paths and URLs ------------------------------------------------------------------------

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_url(self) -> str:
        base = self.pg_admin_dsn.rsplit("/", 1)[0]  # postgresql://user@host:port
        return f"{base}/{self.db_name}"

    @property
    def workers(self) -> dict[str, tuple[str, ...]]:
        """Celery worker component -> its queues: one worker on every queue, or one per queue with no
        disk in common (``artifacts`` set)."""
        if self.artifacts:
            return {WORKER: (QUEUES[0],), GPU_WORKER: (QUEUES[1],)}
        return {WORKER: QUEUES}

    @property
    def components(self) -> tuple[str, ...]:
        return (*CONTROL_PLANE, *self.workers)

    def worker_name(self, component: str = WORKER) -> str:
        return f"airloom-{self.stack_id}-{component}@{socket.gethostname()}"

    def home(self, component: str | None = None) -> Path:
        """The ``AIRLOOM_HOME`` of a component: its own for each worker of a no-shared-disk stack, else the stack's."""
        if self.artifacts and component in self.workers:
            return self.root / component / "airloom"
        return self.root / "airloom"

    @property
    def broker_url(self) -> str:
        return f"{self.redis_url}/{self.redis_db}"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 420) -> ProductionStack:
        """Create the database, migrate, apply settings, start every component and wait until all are healthy.

        On any failure everything started so far is stopped and the database dropped before the error
        propagates; the error names the component and quotes its log.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        try:
            self._create_database()
            self._claim_redis_db()
            self.port = free_port()
            self.env = self._build_env()
            self._write_state()
            ensure_embedded_airflow_home(self.env)
            if self.s3_endpoint:
                self._ensure_bucket()
            self._run_step("db-migrate", [self._airflow, "db", "migrate"], deadline)
            self._run_step(
                "settings",
                [
                    sys.executable,
                    "-m",
                    "airloom.airflow.settings_file",
                    str(REPO / "airflow_settings.yaml"),
                    "--airflow-bin",
                    self._airflow,
                ],
                deadline,
            )
            for name in self.components:
                self.home(name).mkdir(parents=True, exist_ok=True)
            for name in self.components:
                self._spawn(name, self._command(name))
            self._write_state()
            self.wait_healthy(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 20) -> dict[str, str]:
        """Stop every component (SIGTERM to its group, SIGKILL after ``grace`` s), sweep marked leftovers,
        drop the database and empty the Redis database. Safe to call twice, and after a partial start.

        :returns: component -> how it ended (``exit 0``, ``killed``, ``not running``).
        """
        ended: dict[str, str] = {}
        for name in reversed(self.components):
            pid = self.pids.get(name)
            if pid is not None:
                ended[name] = self._stop_group(pid, self.started.get(name), grace)
        since = min(self.started.values(), default=0)
        leftovers = _leftover_pids(self.stack_id, set(self.sessions), since) if self.sessions else []
        for pid in leftovers:  # task children (the deepspeed launcher) may run in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if leftovers:
            ended["leftovers"] = f"killed {len(leftovers)}"
        self.pids.clear()
        self.started.clear()
        errors = []
        for cleanup in (self._drop_database, self._release_redis_db):
            try:
                cleanup()
            except Exception as e:  # keep going: the other resource must still be released
                errors.append(f"{cleanup.__name__}: {type(e).__name__}: {e}")
        (self.root / STATE_FILE).unlink(missing_ok=True)
        if errors:
            raise AirloomError("stack stopped, but cleanup failed: " + "; ".join(errors))
        return ended

    def __enter__(self) -> ProductionStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- health --------------------------------------------------------------------------------

    def health(self) -> dict[str, str]:
        """Component -> ``healthy`` or why not, from the API server's health endpoint and a Celery ping."""
        out: dict[str, str] = {}
        for name, pid in self.pids.items():
            if not _alive(pid, self.started.get(name)):
                out[name] = "not running"
        try:
            with urllib.request.urlopen(f"{self.api_url}/api/v2/monitor/health", timeout=5) as r:
                body = json.loads(r.read())
            out.setdefault("api-server", "healthy")
            for key, name in (
                ("metadatabase", "metadatabase"),
                ("scheduler", "scheduler"),
                ("triggerer", "triggerer"),
                ("dag_processor", "dag-processor"),
            ):
                status = (body.get(key) or {}).get("status")
                out.setdefault(name, "healthy" if status == "healthy" else f"status {status}")
        except (OSError, ValueError) as e:
            out.setdefault("api-server", f"no answer ({e})")
        for worker in self.workers:
            out.setdefault(worker, "healthy" if self.ping_worker(worker) else "no answer to ping")
        return out

    def ping_worker(self, component: str = WORKER, timeout: float = 2.0) -> bool:
        """Celery's own remote-control ping to one of this stack's workers (no Airflow import)."""
        from celery import Celery

        name = self.worker_name(component)
        app = Celery(broker=self.broker_url, set_as_current=False)
        try:
            replies = app.control.ping(destination=[name], timeout=timeout)
        except Exception:  # broker down or the worker not consuming yet: not healthy
            return False
        finally:
            app.close()
        return any(name in r for r in replies)

    def wait_healthy(self, deadline: float) -> dict[str, str]:
        last: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, pid in self.pids.items():
                if not _alive(pid, self.started.get(name)):
                    raise CheckFailed(
                        f"{name} exited during start-up; last lines of {self._log(name)}:\n"
                        f"{tail(self._log(name))}"
                    )
            last = self.health()
            if all(v == "healthy" for v in last.values()):
                return last
            time.sleep(2)
        bad = {k: v for k, v in last.items() if v != "healthy"}
        logs = "\n".join(f"--- {self._log(n)}\n{tail(self._log(n), 15)}" for n in bad if n in self.pids)
        raise CheckFailed(f"production stack not healthy in time: {bad}\n{logs}")

    # -- state, for the CLI ----------------------------------------------------------------------

    def _write_state(self) -> None:
        state = {
            "stack_id": self.stack_id,
            "db_name": self.db_name,
            "redis_db": self.redis_db,
            "port": self.port,
            "pids": self.pids,
            "started": self.started,
            "sessions": self.sessions,
            "pg_admin_dsn": self.pg_admin_dsn,
            "redis_url": self.redis_url,
            "artifacts": self.artifacts,
            "api_url": self.api_url,
            "logs": str(self.log_dir),
        }
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=2))
        env_sh = "".join(
            f"{k}={shlex.quote(v)}\n"
            for k, v in sorted(self.env.items())
            if k.startswith(("AIRFLOW", "AIRLOOM", "AWS_", MARKER)) or k == "PATH"
        )
        target = self.root / "env.sh"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the Fernet key
        with os.fdopen(fd, "w") as f:
            f.write(env_sh)

    @classmethod
    def load(cls, root: Path) -> ProductionStack:
        """The stack a previous ``start`` left running under ``root`` (from ``stack.json``)."""
        path = Path(root).resolve() / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise UsageError(f"{path}: no running stack here (no state file)") from e
        except ValueError as e:
            raise UsageError(f"{path}: not a stack state file ({e})") from e
        return cls(
            root=Path(root),
            stack_id=state["stack_id"],
            db_name=state["db_name"],
            redis_db=state["redis_db"],
            port=state["port"],
            pids=dict(state["pids"]),
            started=dict(state["started"]),
            sessions=list(state["sessions"]),
            pg_admin_dsn=state["pg_admin_dsn"],
            redis_url=state["redis_url"],
            artifacts=state.get("artifacts"),
        )

    # -- internals -----------------------------------------------------------------------------

    @property
    def _airflow(self) -> str:
        return str(Path(sys.executable).with_name("airflow"))

    def _log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _build_env(self) -> dict[str, str]:
        base = dict(os.environ if self.base_env is None else self.base_env)
        airflow_home = self.root / "airflow"
        # The Celery result backend is SQLAlchemy too, through psycopg2 like the metadata database.
        pg = self.db_url.replace("postgresql://", "postgresql+psycopg2://", 1)
        own = {
            MARKER: self.stack_id,
            "AIRFLOW_HOME": str(airflow_home),
            "AIRLOOM_HOME": str(self.root / "airloom"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(airflow_home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg,
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.db_url,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": QUEUES[0],
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            # Log servers on free ports: another Airflow on this machine may hold the defaults (8793/8794).
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # Production sign-off: only authenticated decisions (the page, the API) count.
            "AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY": "1",
        }
        if self.s3_endpoint:
            own["AWS_ENDPOINT_URL"] = self.s3_endpoint
            own["AIRLOOM_REGISTRY"] = self.registry
        if self.artifacts:
            own["AIRLOOM_ARTIFACTS"] = self.artifacts
        # Ours win over whatever the caller's environment points at (another Airflow, SQLite).
        return airflow_env({**base, **own, **(self.extra_env or {})})

    def _command(self, name: str) -> list[str]:
        if name == "api-server":
            return [
                self._airflow,
                "api-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ]
        if name in self.workers:
            worker = [
                self._airflow,
                "celery",
                "worker",
                "--queues",
                ",".join(self.workers[name]),
                "--concurrency",
                str(self.worker_concurrency),
                "--celery-hostname",
                self.worker_name(name),
                "--without-gossip",
                "--without-mingle",
            ]
            return self._isolated(name, worker)
        return [self._airflow, name]

    @property
    def isolated(self) -> bool:
        """Whether each worker runs in a mount namespace hiding the other homes (needs root and ``unshare``)."""
        return bool(self.artifacts) and os.geteuid() == 0 and shutil.which("unshare") is not None

    def _isolated(self, name: str, cmd: list[str]) -> list[str]:
        """``cmd`` in a mount namespace of its own where every other component's home is an empty tmpfs:
        the worker sees only its own disk, as on a machine of its own (else only distinct homes)."""
        if not self.isolated:
            return cmd
        others = sorted({str(self.home(c)) for c in self.components} - {str(self.home(name))})
        mounts = " && ".join(
            f"mount -t tmpfs -o size=1m,mode=0555 airloom-hidden {shlex.quote(o)}" for o in others
        )
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'{mounts} && exec "$@"',
            "sh",
            *cmd,
        ]

    def component_env(self, name: str) -> dict[str, str]:
        env = {**self.env, "AIRLOOM_HOME": str(self.home(name))}
        if name == GPU_WORKER:  # a log server port of its own: two workers share this machine's ports
            env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(free_port())
        return env

    def _spawn(self, name: str, cmd: list[str]) -> int:
        with self._log(name).open("a") as f:
            proc = subprocess.Popen(
                cmd,
                env=self.component_env(name),
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pids[name] = proc.pid
        st = _stat(proc.pid)
        self.started[name] = st[2] if st else 0
        self.sessions.append(proc.pid)  # start_new_session: the PID is the session id
        return proc.pid

    def restart(self, name: str, grace: float = 20) -> int:
        """Stop one component and start it again (same command, same log file, appended)."""
        if name in self.pids:
            self._stop_group(self.pids.pop(name), self.started.pop(name, None), grace)
        pid = self._spawn(name, self._command(name))
        self._write_state()
        return pid

    def kill(self, name: str) -> int:
        """SIGKILL one component and every process in its session, as a crash of its machine would:
        no warm shutdown, and task processes (their own process groups, same session) die with it.

        :returns: how many processes were killed.
        """
        pid, started = self.pids.pop(name), self.started.pop(name, None)
        victims = [pid] if _alive(pid, started) else []
        if victims:
            victims += [p for p in _leftover_pids(None, {pid}, started or 0) if p != pid]
        for victim in victims:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(pid, 10)
        self._write_state()
        return len(victims)

    def active_tasks(self, component: str = WORKER, timeout: float = 2.0) -> int | None:
        """Tasks a Celery worker is executing now (``celery inspect active``); None when it does not answer."""
        from celery import Celery

        name = self.worker_name(component)
        app = Celery(broker=self.broker_url, set_as_current=False)
        try:
            replies = app.control.inspect(destination=[name], timeout=timeout).active()
        finally:
            app.close()
        return None if not replies or name not in replies else len(replies[name])

    def _stop_group(self, pid: int, started: int | None, grace: float) -> str:
        if not _alive(pid, started):
            self._reap(pid, 0.1)  # collect it if it died as our child
            return "not running"
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return "not running"
        if self._reap(pid, grace):
            return "stopped"
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap(pid, 10)
        return "killed"

    @staticmethod
    def _reap(pid: int, timeout: float) -> bool:
        """Wait for ``pid`` to end (collecting it when it is our child); True when it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return True
            except ChildProcessError:  # not our child (a CLI `stop`): watch /proc instead
                st = _stat(pid)
                if st is None or st[0] == "Z":
                    return True
            time.sleep(0.2)
        return False

    def _run_step(self, name: str, cmd: list[str], deadline: float) -> None:
        started = time.monotonic()
        with self._log(name).open("w") as f:
            try:
                subprocess.run(
                    cmd,
                    env=self.env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    check=True,
                    timeout=max(1.0, deadline - started),
                )
            except subprocess.CalledProcessError as e:
                raise CheckFailed(
                    f"{name} failed (exit {e.returncode}); last lines of {self._log(name)}:\n"
                    f"{tail(self._log(name))}"
                ) from e
            except subprocess.TimeoutExpired as e:
                raise CheckFailed(
                    f"{name} did not finish before the start-up deadline; see {self._log(name)}"
                ) from e

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')

    def _drop_database(self) -> None:
        import psycopg

        with psycopg.connect(self.pg_admin_dsn, autocommit=True) as conn:
            # FORCE: a crashed component may still hold a connection.
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    def _claim_redis_db(self) -> None:
        """Take an empty Redis database (1–15) for the broker; 0 is left to whoever uses the default."""
        import redis

        if self.redis_db is not None:
            return
        for db in range(1, 16):
            client = redis.Redis.from_url(f"{self.redis_url}/{db}")
            try:
                if client.dbsize() == 0 and client.set(_REDIS_CLAIM_KEY, self.stack_id, nx=True):
                    self.redis_db = db
                    return
            finally:
                client.close()
        raise AirloomError(f"{self.redis_url}: no empty Redis database among 1-15 for the Celery broker")

    def _release_redis_db(self) -> None:
        import redis

        if self.redis_db is None:
            return
        client = redis.Redis.from_url(self.broker_url)
        try:
            if client.get(_REDIS_CLAIM_KEY) == self.stack_id.encode():  # only a database we claimed
                client.flushdb()
        finally:
            client.close()
        self.redis_db = None

    def _ensure_bucket(self) -> None:
        import boto3
        from botocore.exceptions import ClientError

        bucket = self.registry[len("s3://") :].split("/", 1)[0]
        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint)
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError:
            s3.create_bucket(Bucket=bucket)


# -- CLI (python -m tests.production ...) -------------------------------------------------------


def cmd_prod(args) -> int:
    """``python -m tests.production start|stop|status --dir DIR``: see the module docstring."""
    root = Path(args.dir)
    if args.prod_cmd == "start":
        if (root / STATE_FILE).exists():
            raise UsageError(
                f"{root / STATE_FILE}: a stack is already recorded here; "
                f"`python -m tests.production stop --dir {root}`"
            )
        if args.s3_endpoint and not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
            raise UsageError("--s3-endpoint needs credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        stack = ProductionStack(
            root,
            s3_endpoint=args.s3_endpoint,
            registry=args.registry,
            artifacts=args.artifacts,
            worker_concurrency=args.concurrency,
        ).start(timeout=args.timeout)
        print(
            f"production stack {stack.stack_id} up: UI {stack.api_url} (admin/admin, trainer/trainer, "
            f"reviewer/reviewer)\n  database {stack.db_name}, broker {stack.broker_url}, logs {stack.log_dir}\n"
            f"  environment: set -a; . {root.resolve() / 'env.sh'}; set +a"
        )
        return 0
    stack = ProductionStack.load(root)
    if args.prod_cmd == "status":
        health = stack.health()
        for name, state in health.items():
            print(f"{name:<14} {state}")
        return 0 if all(v == "healthy" for v in health.values()) else 1
    ended = stack.stop()
    print(
        "stopped: " + ", ".join(f"{k} {v}" for k, v in ended.items()) + f"; dropped database {stack.db_name}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 ok, 1 unhealthy or a start-up step failed, 2 bad usage."""
    p = argparse.ArgumentParser(
        prog="python -m tests.production",
        description="production mode here: PostgreSQL + CeleryExecutor + Redis",
    )
    psub = p.add_subparsers(dest="prod_cmd", required=True)
    for name, help_ in (
        ("start", "create a database, migrate, start every component, wait until healthy"),
        ("status", "health of each component of the stack under --dir"),
        ("stop", "stop every component by PID, drop the database"),
    ):
        sp = psub.add_parser(name, help=help_, description=help_)
        sp.add_argument(
            "--dir", required=True, help="folder for AIRFLOW_HOME, AIRLOOM_HOME, logs and the state file"
        )
        if name == "start":
            sp.add_argument(
                "--s3-endpoint", help="S3 endpoint (MinIO, moto): the registry goes to --registry there"
            )
            sp.add_argument(
                "--registry",
                default="s3://airloom-registry/registry",
                help="s3://bucket/prefix for the registry with --s3-endpoint (default: %(default)s)",
            )
            sp.add_argument(
                "--artifacts",
                help="s3://bucket/prefix for every artifact (with --s3-endpoint): two workers, one per queue, "
                "that share no disk",
            )
            sp.add_argument(
                "--concurrency", type=int, default=2, help="Celery worker slots (default: %(default)s)"
            )
            sp.add_argument(
                "--timeout", type=float, default=420, help="seconds to wait for health (default: %(default)s)"
            )
    try:
        return cmd_prod(p.parse_args(argv))
    except AirloomError as e:  # CheckFailed exits 1, UsageError 2
        print(f"tests.production: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
