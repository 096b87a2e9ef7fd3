"""Production mode end to end: PostgreSQL + CeleryExecutor + Redis, driven only through the REST API.

One stack for the module (:class:`tests.production.ProductionStack`: a fresh database, api-server,
scheduler, dag-processor, triggerer, and two Celery workers that share no disk: one on ``default``, one
on ``gpu``, each with an empty ``AIRLOOM_HOME`` of its own and every other home hidden from it by a mount
namespace), the registry and the artifact store (``AIRLOOM_ARTIFACTS``) on S3 through moto's server.
Every hand-over between tasks goes through the store; no XCom carries a path of any machine. The test
puts what the demo prepares before Airflow runs on S3 (synthetic raw data and history partitions,
uploaded as a user would; the tiny base model registered), then, as ``trainer`` over REST: ``llm_data_quality`` →
``llm_finetune`` with a run conf; while ``wait_for_signoff`` is deferred, ``reviewer`` approves through
the sign-off plugin's endpoint; the run deploys. Then a 3-day backfill of ``llm_eval_backfill``
created through ``POST /api/v2/backfills``. Fault checks: the Celery worker killed (SIGKILL, whole
session) while a task runs → the task fails by heartbeat timeout, is retried on the restarted worker
and the run succeeds; 20 sign-off sensors waiting at once are deferred in the triggerer and hold no
worker slot (Celery's active count and the pool's slot counts).

Needs the PostgreSQL on 127.0.0.1:5432 (user postgres, trust) and the Redis on 127.0.0.1:6379 that
CI machines run; skipped when either is missing.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest

from airloom.artifacts import Artifacts
from tests.production import GPU_WORKER, WORKER, ProductionStack

MODEL = "airloom-demo"
HOLD_MODEL = "airloom-hold"
HOLD_DAG = "airloom_hold_signoff"
WAITERS = 20
# A DAG of the test's own (a second DAG bundle), made of the project's sign-off sensor: WAITERS tasks
# waiting for one version at once. max_active_tasks above the default 16 so all of them start.
HOLD_DAG_SOURCE = f"""
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airloom.airflow.sensors.registry import ModelSignOffSensor

with DAG("{HOLD_DAG}", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         max_active_tasks={WAITERS}, tags=["airloom-test"]):
    for i in range({WAITERS}):
        ModelSignOffSensor(task_id=f"wait_{{i:02d}}", model_name="{HOLD_MODEL}", version=1,
                           policy={{"required_approvals": 1, "separation_of_duties": True,
                                    "allowed_users": "reviewer"}},
                           poll_interval=2, timeout=timedelta(hours=1), retries=0)
"""
# The fault check's retry without the DAG's one-minute retry_delay: a cluster policy (Airflow applies it
# where DAG files are parsed) shortens it for the evaluation task only; the retry itself is Airflow's.
RETRY_POLICY_SOURCE = """
from datetime import timedelta


def task_policy(task):
    if task.dag_id == "llm_eval_backfill" and task.task_id == "evaluate_partition":
        task.retry_delay = timedelta(seconds=3)
"""
BUCKET = "airloom-registry-tests"  # created by the moto_endpoint fixture (tests/conftest.py)
TERMINAL = {"success", "failed"}


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not (_reachable(5432) and _reachable(6379)),
    reason="production mode needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379",
)


class Api:
    """The stack's REST API as one user (token from POST /auth/token)."""

    def __init__(self, base: str, user: str):
        import httpx

        self.user = user
        self.http = httpx.Client(base_url=base, timeout=60)
        r = self.http.post("/auth/token", json={"username": user, "password": user})
        assert r.status_code == 201, r.text
        self.http.headers["Authorization"] = f"Bearer {r.json()['access_token']}"

    def get(self, path: str, **params):
        r = self.http.get(path, params=params)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:500]}"
        return r.json()

    def unpause(self, dag_id: str) -> None:
        r = self.http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        assert r.status_code == 200 and r.json()["is_paused"] is False, r.text

    def trigger(self, dag_id: str, conf: dict) -> str:
        r = self.http.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        assert r.status_code == 200, r.text
        return r.json()["dag_run_id"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def diagnose(self, dag_id: str, run_id: str) -> str:
        """Task states, and the log tail of every task that did not succeed: the failure message's body."""
        lines = []
        for ti in self.task_instances(dag_id, run_id):
            lines.append(f"{ti['task_id']}[{ti['map_index']}] {ti['state']} (try {ti['try_number']})")
            if ti["state"] in ("failed", "up_for_retry", "upstream_failed") and ti["try_number"]:
                r = self.http.get(
                    f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/logs/{ti['try_number']}",
                    params={"map_index": ti["map_index"], "full_content": True},
                    headers={"Accept": "application/x-ndjson"},
                )  # Airflow 3.3: json or ndjson only
                lines.append(r.text[-3000:])
        return "\n".join(lines)

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in TERMINAL:
                return run
            time.sleep(1)
        pytest.fail(f"{dag_id} {run_id} not finished in {timeout:.0f}s:\n{self.diagnose(dag_id, run_id)}")

    def wait_task_state(
        self, dag_id: str, run_id: str, task_id: str, state: str, timeout: float, poll: float = 1
    ) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ti = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
            if ti["state"] == state:
                return ti
            run = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in TERMINAL:
                pytest.fail(
                    f"{dag_id} {run_id} ended {run['state']} before {task_id} was {state}:\n"
                    f"{self.diagnose(dag_id, run_id)}"
                )
            time.sleep(poll)
        pytest.fail(f"{task_id} not {state} in {timeout:.0f}s:\n{self.diagnose(dag_id, run_id)}")

    def link(self, dag_id: str, run_id: str, task_id: str, name: str) -> str:
        """A task's stored extra link, fetched through the plugin's file route; returns the page."""
        links = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/links")
        url = links["extra_links"].get(name)
        assert url and url.startswith("/airloom/files/"), f"{task_id}: no {name!r} link in {links}"
        r = self.http.get(url)
        assert r.status_code == 200, f"{url}: {r.status_code} {r.text[:300]}"
        return r.text


def _upload(folder: Path, uri: str) -> None:
    import boto3

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    s3 = boto3.client("s3")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def read_json(prod, key: str):
    """An object of the artifact store (what every worker reads), not a file of some machine."""
    return json.loads(prod["artifacts"].store.get_bytes(key))


def modified(prod, key: str) -> str | None:
    """When an object of the artifact store was last written (None: not there)."""
    from botocore.exceptions import ClientError

    store = prod["artifacts"].store
    try:
        head = store.client.head_object(Bucket=store.bucket, Key=store._key(key))
    except ClientError:
        return None
    return head["LastModified"].isoformat()


def local_paths_in_xcom(api, stack, dag_id: str, run_id: str) -> list[str]:
    """XCom values of a run that name a path of any machine of the stack (they must carry URIs)."""
    found = []
    for ti in api.task_instances(dag_id, run_id):
        entries = api.get(
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/xcomEntries",
            map_index=ti["map_index"],
            deserialize=True,
        )["xcom_entries"]
        for entry in entries:
            text = json.dumps(entry.get("value"), default=str)
            if str(stack.root) in text:
                found.append(f"{ti['task_id']}[{ti['map_index']}].{entry['key']}: {text[:200]}")
    return found


@pytest.fixture(scope="module")
def prod(tmp_path_factory, moto_endpoint):
    from airloom.demo import build_and_register_base, write_demo_data
    from airloom.registry.registry import ModelRegistry

    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("prod")
    prefix = f"s3://{BUCKET}/prod-{secrets.token_hex(3)}"
    registry_uri, artifacts_uri = f"{prefix}/registry", f"{prefix}/artifacts"
    # What the demo prepares before Airflow runs: raw data with faulty rows, five past days of
    # history partitions (ending yesterday: one for the worker-kill check, three to backfill, and
    # yesterday, the scheduler's), uploaded to the artifact store's data/ as `aws s3 cp` would (no
    # worker has them on disk), and the base model registered on S3.
    local_data = root / "upload"
    data = write_demo_data(local_data, rows=600, history_days=5, history_rows=20, today=date.today())
    _upload(local_data, artifacts_uri + "/data")
    registry = ModelRegistry.from_uri(registry_uri)
    base = build_and_register_base(registry, log=lambda m: None)
    policy = root / "airflow" / "config" / "airflow_local_settings.py"  # on Airflow's sys.path
    policy.parent.mkdir(parents=True)
    policy.write_text(RETRY_POLICY_SOURCE)
    test_dags = root / "test_dags"
    test_dags.mkdir()
    (test_dags / f"{HOLD_DAG}.py").write_text(HOLD_DAG_SOURCE)
    bundles = [
        {
            "name": "dags-folder",
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
            "kwargs": {},
        },
        {
            "name": "airloom-test-dags",
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
            "kwargs": {"path": str(test_dags)},
        },
    ]
    extra_env = {
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
        # A task whose worker died is failed (and retried) after this long without a heartbeat, looked
        # for this often; the defaults (300 s, every 10 s) would make the worker-kill check slow.
        # Heartbeats come every 5 s (`[workers] min_heartbeat_interval`).
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    }
    stack = ProductionStack(
        root, s3_endpoint=moto_endpoint, registry=registry_uri, artifacts=artifacts_uri, extra_env=extra_env
    )
    stack.start(timeout=600)
    timings = {"start": round(time.monotonic() - t0, 1)}
    try:
        yield {
            "stack": stack,
            "data": data,
            "base": base,
            "registry": registry,
            "artifacts": Artifacts(artifacts_uri, cache_dir=root / "test-cache"),
            "timings": timings,
            "trainer": Api(stack.api_url, "trainer"),
            "reviewer": Api(stack.api_url, "reviewer"),
        }
    finally:
        stack.stop()
        timings["module"] = round(time.monotonic() - t0, 1)
        print(f"\nproduction-mode timings (s): {json.dumps(timings)}")
        (root / "timings.json").write_text(json.dumps(timings))


def test_stack_components_are_healthy_and_celery_runs_tasks(prod):
    stack = prod["stack"]
    assert set(stack.health().values()) == {"healthy"}
    assert stack.env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert stack.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    health = prod["trainer"].get("/api/v2/monitor/health")
    assert health["metadatabase"]["status"] == "healthy"
    # The pools from airflow_settings.yaml are in the new database.
    pools = {p["name"]: p["slots"] for p in prod["trainer"].get("/api/v2/pools")["pools"]}
    assert pools["gpu"] == 1 and pools["eval"] == 2
    # Two workers, one per queue, each seeing only its own AIRLOOM_HOME: the other worker's and the
    # control plane's are empty mounts in its namespace (what a second machine would see there).
    assert stack.workers == {WORKER: ("default",), GPU_WORKER: ("gpu",)}
    for worker in stack.workers:
        mounts = Path(f"/proc/{stack.pids[worker]}/mountinfo").read_text()
        hidden = {str(stack.home(c)) for c in stack.components} - {str(stack.home(worker))}
        assert all(f" {path} " in mounts for path in hidden), (worker, hidden)
        assert f" {stack.home(worker)} " not in mounts


def test_data_quality_then_finetune_signed_off_over_rest_deploys(prod):
    from airloom.governance.signoff import signoff_status

    trainer, reviewer, timings = prod["trainer"], prod["reviewer"], prod["timings"]
    t0 = time.monotonic()
    # llm_finetune stays paused until data quality is done: a paused DAG queues no asset-triggered run,
    # so the only fine-tuning run is the one triggered below with a small conf.
    trainer.unpause("llm_data_quality")
    # The form's default source: the artifact store's data/raw (s3://…), read through the connection.
    dq_run = trainer.trigger("llm_data_quality", {})
    run = trainer.wait_run("llm_data_quality", dq_run, timeout=900)
    assert run["state"] == "success", trainer.diagnose("llm_data_quality", dq_run)
    assert run["triggering_user_name"] == "trainer"
    eda = trainer.link("llm_data_quality", dq_run, "eda_report", "EDA report")
    assert "<html" in eda.lower() and "data:image/png;base64," in eda
    timings["llm_data_quality"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    trainer.unpause("llm_finetune")
    # Test perplexity after 40 steps: 7.0-7.3 (seeds 0-2); the untrained base: ~555. Exact match on
    # 20 examples (1-3 right) is too coarse to gate on at this size.
    # A manual run names its dataset: the version this data-quality run published.
    latest = read_json(prod, "datasets/latest.json")
    assert latest["run_id"] == dq_run and latest["path"].startswith("s3://"), latest
    conf = {"max_steps": 40, "eval_limit": 20, "gates": "perplexity<=20", "dataset": latest["ref"]}
    ft_run = trainer.trigger("llm_finetune", conf)
    # The sensor defers: the wait holds a triggerer slot, not a Celery worker slot.
    trainer.wait_task_state("llm_finetune", ft_run, "wait_for_signoff", "deferred", timeout=1500)
    timings["llm_finetune_to_signoff"] = round(time.monotonic() - t0, 1)
    train = [ti for ti in trainer.task_instances("llm_finetune", ft_run) if ti["task_id"] == "train"]
    assert [(t["state"], t["queue"], t["pool"]) for t in train] == [("success", "gpu", "gpu")]

    pending = reviewer.get("/airloom/api/pending", dag_id="llm_finetune", run_id=ft_run)
    assert [e["model"] for e in pending] == [MODEL], pending
    version = pending[0]["version"]
    decision = {
        "model": MODEL,
        "version": version,
        "decision": "approve",
        "comment": "REST: metrics reviewed",
    }
    # Separation of duties: the user who triggered the training may not approve it.
    refused = trainer.http.post("/airloom/api/decisions", json=decision)
    assert refused.status_code == 403, refused.text
    r = reviewer.http.post("/airloom/api/decisions", json=decision)
    assert r.status_code == 200, r.text
    assert r.json()["status"]["state"] == "approved"

    t0 = time.monotonic()
    run = trainer.wait_run("llm_finetune", ft_run, timeout=600)
    assert run["state"] == "success", trainer.diagnose("llm_finetune", ft_run)
    timings["llm_finetune_after_signoff"] = round(time.monotonic() - t0, 1)
    states = {
        (ti["task_id"], ti["map_index"]): ti["state"] for ti in trainer.task_instances("llm_finetune", ft_run)
    }
    # One node: the extra nodes' mapped task has nothing to expand and is skipped; everything else ran.
    assert states.pop(("train_other_nodes", -1)) == "skipped", states
    assert set(states.values()) == {"success"}, states
    assert {"deploy", "canary", "promote"} <= {task for task, _ in states}

    registry = prod["registry"]
    # canary before promotion: the version went to `canary`, answered, and only then to `production`
    assert registry.get_alias(MODEL, "production") == registry.get_alias(MODEL, "canary") == version
    mv = registry.get(MODEL, version)
    assert mv.metadata["training"]["steps"] == 40
    assert mv.metadata["lineage"]["run_id"] == ft_run
    status = signoff_status(registry, MODEL, version)
    assert (status["state"], status["requested_by"]) == ("approved", "trainer")
    assert [a["user"] for a in status["approvals"]] == ["reviewer"]
    report = trainer.link("llm_finetune", ft_run, "quality_gates", "Eval report")
    assert "exact_match" in report
    prod["version"] = version
    # The hand-overs went through the store: no XCom names a path of any machine of the stack, and
    # training ran on the gpu worker while evaluation, registration and deployment ran on the other.
    stack = prod["stack"]
    for dag_id, run_id in (("llm_data_quality", dq_run), ("llm_finetune", ft_run)):
        assert local_paths_in_xcom(trainer, stack, dag_id, run_id) == []
    queues = {ti["task_id"]: ti["queue"] for ti in trainer.task_instances("llm_finetune", ft_run)}
    assert (queues["train"], queues["evaluate_candidate"], queues["register_candidate"]) == (
        "gpu",
        "default",
        "default",
    )
    run_dir = Path("runs", "llm_finetune", ft_run.replace(":", "_").replace("+", "_"))
    assert (stack.home(GPU_WORKER) / run_dir / "train").is_dir()  # trained on the gpu worker's disk …
    assert not (stack.home(WORKER) / run_dir / "train").exists()  # … which the default worker never saw
    assert (stack.home(WORKER) / run_dir / "evaluate_candidate").is_dir()


def test_three_day_backfill_over_rest_evaluates_production_per_day(prod):
    if "version" not in prod:
        pytest.skip("needs the deployed version from the fine-tuning test")
    trainer, timings = prod["trainer"], prod["timings"]
    # The first day is the worker-kill check's; the last (yesterday) gets a scheduled run on unpause.
    days = prod["data"]["days"][1:4]
    assert len(days) == 3
    t0 = time.monotonic()
    trainer.unpause("llm_eval_backfill")
    r = trainer.http.post(
        "/api/v2/backfills",
        json={
            "dag_id": "llm_eval_backfill",
            "from_date": f"{days[0]}T00:00:00Z",
            "to_date": f"{days[-1]}T00:00:00Z",
            "max_active_runs": 3,
            "reprocess_behavior": "none",
            # The days predate the deployment: score them with today's production version.
            "dag_run_conf": {"model_version": "current"},
        },
    )
    assert r.status_code == 200, r.text
    backfill = r.json()
    assert backfill["max_active_runs"] == 3

    deadline = time.monotonic() + 900
    runs: list[dict] = []
    while time.monotonic() < deadline:
        runs = [
            run
            for run in trainer.get("/api/v2/dags/llm_eval_backfill/dagRuns", limit=50)["dag_runs"]
            if run["run_type"] == "backfill"
        ]
        if len(runs) == 3 and all(run["state"] in TERMINAL for run in runs):
            break
        time.sleep(1)
    timings["backfill"] = round(time.monotonic() - t0, 1)
    detail = "\n".join(
        trainer.diagnose("llm_eval_backfill", run["dag_run_id"]) for run in runs if run["state"] != "success"
    )
    assert sorted(run["logical_date"][:10] for run in runs) == days, runs
    assert {run["state"] for run in runs} == {"success"}, detail
    for run in runs:  # each day scored on the default worker, handed over by URI
        assert local_paths_in_xcom(trainer, prod["stack"], "llm_eval_backfill", run["dag_run_id"]) == []
    # Unpausing made the scheduler start the run of the last day that has ended (yesterday).
    scheduled = [
        run
        for run in trainer.get("/api/v2/dags/llm_eval_backfill/dagRuns", limit=50)["dag_runs"]
        if run["run_type"] == "scheduled"
    ]
    assert [run["logical_date"][:10] for run in scheduled] == prod["data"]["days"][-1:], scheduled
    # The scheduler marks the backfill complete on a later loop than the last run's end.
    while trainer.get(f"/api/v2/backfills/{backfill['id']}")["completed_at"] is None:
        assert time.monotonic() < deadline + 60, f"backfill {backfill['id']} never marked complete"
        time.sleep(1)

    version = f"v{prod['version']}"

    def metrics_key(ds: str) -> str:
        return f"evaluations/{MODEL}/ds={ds}/{version}/metrics.json"

    for ds in days:
        metrics = read_json(prod, metrics_key(ds))
        assert metrics["model_ref"] == f"registry:{MODEL}/{prod['version']}"
        assert metrics["n"] == 20 and metrics["aggregate"]["perplexity"] < 20, metrics["aggregate"]
    assert prod["artifacts"].store.exists(f"evaluations/{MODEL}/trend.png")

    # Airflow's CLI backfill, reprocessing one completed day: only that day's partition is rewritten.
    before = {ds: modified(prod, metrics_key(ds)) for ds in days}
    stack = prod["stack"]
    cli = subprocess.run(
        [
            str(Path(sys.executable).with_name("airflow")),
            "backfill",
            "create",
            "--dag-id",
            "llm_eval_backfill",
            "--from-date",
            days[1],
            "--to-date",
            days[1],
            "--reprocess-behavior",
            "completed",
            "--dag-run-conf",
            json.dumps({"model_version": "current"}),
        ],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
    # The rerun clears the day's existing run (or adds one): wait for its partition to be rewritten
    # and every run of that day to end.
    wait_until = time.monotonic() + 600
    while time.monotonic() < wait_until:
        reruns = [
            run
            for run in trainer.get("/api/v2/dags/llm_eval_backfill/dagRuns", limit=50)["dag_runs"]
            if run["logical_date"][:10] == days[1]
        ]
        rewritten = modified(prod, metrics_key(days[1])) != before[days[1]]
        if rewritten and all(r["state"] in TERMINAL for r in reruns):
            break
        time.sleep(1)
    assert {r["state"] for r in reruns} == {"success"}, reruns
    after = {ds: modified(prod, metrics_key(ds)) for ds in days}
    assert [ds for ds in days if after[ds] != before[ds]] == [days[1]], (before, after)


# The two fault checks add ~2-3 minutes (a 30 s heartbeat timeout, the retry; 40 task starts on 2 worker
# slots) to a module of ~8 minutes: slow, so `-m "not slow"` can skip them.
@pytest.mark.slow
def test_worker_killed_during_a_task_the_task_is_retried_and_the_run_succeeds(prod):
    if "version" not in prod:
        pytest.skip("needs the deployed version from the fine-tuning test")
    trainer, stack, timings = prod["trainer"], prod["stack"], prod["timings"]
    day = prod["data"]["days"][0]
    t0 = time.monotonic()
    r = trainer.http.post(
        "/api/v2/dags/llm_eval_backfill/dagRuns",
        json={"logical_date": f"{day}T00:00:00Z", "conf": {"model_version": "current"}},
    )
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    ti = trainer.wait_task_state(
        "llm_eval_backfill", run_id, "evaluate_partition", "running", timeout=600, poll=0.5
    )
    assert ti["try_number"] == 1
    killed = stack.kill("celery-worker")
    assert killed >= 2, "the worker and at least the task's process"
    assert stack.active_tasks(timeout=1) is None  # nobody answers: the worker is gone
    stack.restart("celery-worker")
    deadline = time.monotonic() + 180
    while not stack.ping_worker():
        assert time.monotonic() < deadline, (
            f"restarted worker silent; see {stack.log_dir / 'celery-worker.log'}"
        )
        time.sleep(0.5)

    run = trainer.wait_run("llm_eval_backfill", run_id, timeout=900)
    timings["worker_kill_retry"] = round(time.monotonic() - t0, 1)
    assert run["state"] == "success", trainer.diagnose("llm_eval_backfill", run_id)
    tries = trainer.get(
        f"/api/v2/dags/llm_eval_backfill/dagRuns/{run_id}/taskInstances/evaluate_partition/tries"
    )
    states = [(t["try_number"], t["state"]) for t in tries["task_instances"]]
    # Try 1 died with its worker (failed by heartbeat timeout), try 2 ran on the restarted worker.
    assert [n for n, _ in states] == [1, 2] and states[0][1] != "success" and states[1][1] == "success", (
        states
    )
    metrics = read_json(prod, f"evaluations/{MODEL}/ds={day}/v{prod['version']}/metrics.json")
    assert metrics["model_ref"] == f"registry:{MODEL}/{prod['version']}"


@pytest.mark.slow
def test_twenty_deferred_signoff_sensors_hold_no_worker_slot(prod, tmp_path):
    from airloom.governance.signoff import request_signoff

    trainer, reviewer, stack, timings = prod["trainer"], prod["reviewer"], prod["stack"], prod["timings"]
    registry = prod["registry"]
    folder = tmp_path / "hold"
    folder.mkdir()
    (folder / "weights.txt").write_text("a version for the waiting sensors\n")
    registry.register(HOLD_MODEL, folder, actor="trainer", metadata={"summary": "deferred-sensor check"})
    request_signoff(registry, HOLD_MODEL, 1, requested_by="trainer", evidence={})

    t0 = time.monotonic()
    deadline = time.monotonic() + 300
    while HOLD_DAG not in {d["dag_id"] for d in trainer.get("/api/v2/dags", limit=100)["dags"]}:
        assert time.monotonic() < deadline, (
            f"{HOLD_DAG} never parsed; see {stack.log_dir / 'dag-processor.log'}"
        )
        time.sleep(1)
    trainer.unpause(HOLD_DAG)
    run_id = trainer.trigger(HOLD_DAG, {})
    deadline = time.monotonic() + 600
    states: dict[str, int] = {}
    while time.monotonic() < deadline:
        tis = trainer.task_instances(HOLD_DAG, run_id)
        states = {s: sum(ti["state"] == s for ti in tis) for s in {ti["state"] for ti in tis}}
        if states.get("deferred") == WAITERS:
            break
        assert not {"failed", "upstream_failed"} & set(states), trainer.diagnose(HOLD_DAG, run_id)
        time.sleep(1)
    assert states.get("deferred") == WAITERS, states
    timings["twenty_sensors_deferred"] = round(time.monotonic() - t0, 1)

    # The last workloads end a moment after their task reports "deferred" (the supervisor's teardown).
    deadline = time.monotonic() + 60
    while (
        active := sum(stack.active_tasks(w) or 0 for w in stack.workers)
    ) != 0 and time.monotonic() < deadline:
        time.sleep(1)
    pool = trainer.get("/api/v2/pools/default_pool")
    slots = {
        k: pool[k]
        for k in ("slots", "occupied_slots", "running_slots", "queued_slots", "deferred_slots", "open_slots")
    }
    print(
        f"\n{WAITERS} sensors deferred: celery workers' active tasks {active} of "
        f"{stack.worker_concurrency * len(stack.workers)}; default_pool {slots}"
    )
    assert active == 0  # every worker slot free while all of them wait
    assert slots["deferred_slots"] == WAITERS and slots["running_slots"] == 0
    assert slots["occupied_slots"] == 0  # default_pool does not count deferred tasks (include_deferred False)

    r = reviewer.http.post(
        "/airloom/api/decisions",
        json={"model": HOLD_MODEL, "version": 1, "decision": "approve", "comment": "release them"},
    )
    assert r.status_code == 200, r.text
    run = trainer.wait_run(HOLD_DAG, run_id, timeout=600)
    timings["twenty_sensors_total"] = round(time.monotonic() - t0, 1)
    assert run["state"] == "success", trainer.diagnose(HOLD_DAG, run_id)
    assert {ti["state"] for ti in trainer.task_instances(HOLD_DAG, run_id)} == {"success"}


def test_two_node_training_through_celery_meets_at_one_rendezvous(prod):
    """nnodes 2 from the run conf: `train` (node 0) and `train_other_nodes` (node 1) run at once on the
    Celery workers (pool `gpu` given a slot per node), meet at the master address, train one model
    together; node 0 writes it. An impossible gate then ends the run before registration."""
    from airloom.training.launcher import free_port

    trainer = prod["trainer"]
    admin = Api(prod["stack"].api_url, "admin")
    latest = read_json(prod, "datasets/latest.json")
    pool = admin.get("/api/v2/pools/gpu")

    def set_slots(n: int) -> None:
        body = {"name": "gpu", "slots": n, "include_deferred": pool["include_deferred"]}
        r = admin.http.patch("/api/v2/pools/gpu", json=body)
        assert r.status_code == 200 and r.json()["slots"] == n, r.text

    set_slots(2)
    try:
        t0 = time.monotonic()
        conf = {
            "dataset": latest["ref"],
            "nnodes": 2,
            "master_addr": "127.0.0.1",
            "master_port": free_port(),
            "max_steps": 10,
            "sweep_eval_limit": 5,
            "eval_limit": 5,
            "gates": "exact_match>=2",
        }
        run_id = trainer.trigger("llm_finetune", conf)
        run = trainer.wait_run("llm_finetune", run_id, timeout=900)
        prod["timings"]["two_node_finetune"] = round(time.monotonic() - t0, 1)
    finally:
        set_slots(pool["slots"])
    states = {(ti["task_id"], ti["map_index"]): ti for ti in trainer.task_instances("llm_finetune", run_id)}
    assert run["state"] == "failed", trainer.diagnose("llm_finetune", run_id)  # the impossible gate
    assert states[("quality_gates", -1)]["state"] == "failed", trainer.diagnose("llm_finetune", run_id)
    node0, node1 = states[("train", 0)], states[("train_other_nodes", 0)]
    assert (node0["state"], node1["state"]) == ("success", "success"), trainer.diagnose(
        "llm_finetune", run_id
    )
    # They ran at the same time (a rendezvous needs both), each on the gpu queue and pool.
    assert node0["start_date"] < node1["end_date"] and node1["start_date"] < node0["end_date"]
    assert {(ti["queue"], ti["pool"]) for ti in (node0, node1)} == {("gpu", "gpu")}
    run_folder = "runs/llm_finetune/" + run_id.replace(":", "_").replace("+", "_")
    metrics = read_json(prod, f"{run_folder}/train/0/train_metrics.json")
    assert metrics["world_size"] == 2 and metrics["steps"] == 10
    store = prod["artifacts"].store
    assert store.exists(f"{run_folder}/train/0/model/config.json")
    assert not store.list(f"{run_folder}/train_other_nodes/0/model/")


def test_monitoring_reads_the_traffic_airloom_serve_wrote_to_the_store(prod, tmp_path):
    """``airloom serve`` on a machine of its own (its own empty AIRLOOM_HOME) answers requests from the
    production version and writes its traffic and feedback to the artifact store in batched objects;
    ``llm_feedback_monitoring``, run over REST for that day on the workers, reads them from there."""
    import asyncio

    import httpx

    from airloom.data.synth import generate_records
    from airloom.prompts import render_prompt
    from tests.serving_helpers import airloom_serve

    if "version" not in prod:
        pytest.skip("needs the deployed version from the fine-tuning test")
    trainer, stack = prod["trainer"], prod["stack"]
    env = {**stack.env, "AIRLOOM_HOME": str(tmp_path / "serve-home")}
    records = list(generate_records(12, seed=11))
    bodies = [
        {
            "model": MODEL,
            "prompt": render_prompt(r["instruction"], r["input"]),
            "max_tokens": 8,
            "temperature": 0,
        }
        for r in records
    ]

    async def post_all(url: str, path: str, items: list[dict]) -> list:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post(path, json=b) for b in items))

    argv = ["serve", "--model", f"{MODEL}@production", "--torch-threads", "1", "--batch-wait-ms", "20"]
    with airloom_serve(argv, log=tmp_path / "serve.log", env=env) as server:
        done = asyncio.run(post_all(server.url, "/v1/completions", bodies))
        assert [r.status_code for r in done] == [200] * len(bodies), [r.text for r in done]
        ids = [r.json()["id"] for r in done]
        feedback = [{"response_id": i, "rating": "down"} for i in ids[:8]] + [
            {"response_id": ids[8], "rating": "up"}
        ]
        posted = asyncio.run(post_all(server.url, "/v1/feedback", feedback))
        assert [r.status_code for r in posted] == [201] * len(feedback), [r.text for r in posted]
    # Batched: the day's requests landed in a few objects, not one per request; nothing on the server's disk.
    art = prod["artifacts"]
    traffic = [k for k in art.list("data/traffic/") if not k.endswith("_airloom_artifact.json")]
    assert traffic and len(traffic) < len(bodies), traffic
    ds = traffic[0].split("ds=", 1)[1].split("/", 1)[0]
    assert not list((tmp_path / "serve-home").rglob("*.jsonl"))

    # The retraining the monitoring run asks for is not this test's: with llm_finetune paused its asset
    # event queues no run, and no training still runs when the stack stops.
    r = trainer.http.patch("/api/v2/dags/llm_finetune", json={"is_paused": True})
    assert r.status_code == 200 and r.json()["is_paused"] is True, r.text
    trainer.unpause("llm_feedback_monitoring")
    r = trainer.http.post(
        "/api/v2/dags/llm_feedback_monitoring/dagRuns", json={"logical_date": f"{ds}T00:00:00Z", "conf": {}}
    )
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    run = trainer.wait_run("llm_feedback_monitoring", run_id, timeout=600)
    assert run["state"] == "success", trainer.diagnose("llm_feedback_monitoring", run_id)
    run_folder = "runs/llm_feedback_monitoring/" + run_id.replace(":", "_").replace("+", "_")
    report = read_json(prod, f"{run_folder}/drift_and_feedback/monitoring.json")
    assert report["ds"] == ds
    assert sum(report["serving"]["models"].values()) == len(bodies), report["serving"]
    assert (report["thumbs_down"], report["thumbs_up"]) == (8, 1)
    assert local_paths_in_xcom(trainer, stack, "llm_feedback_monitoring", run_id) == []
