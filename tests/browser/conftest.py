"""A real Airflow (api-server, scheduler, dag-processor, triggerer) on the embedded default, and a real
headless browser (Debian's chromium driven by Playwright) pointed at it.

Everything lives in a throwaway folder: AIRFLOW_HOME (SQLite, LocalExecutor), AIRLOOM_HOME (raw data,
runs, the registry) and one log file per component. Each component runs in a session of its own, so
teardown stops it, and the task processes it started, by process group.

Screenshots of each step go to ``<tmp>/screens/``; set ``AIRLOOM_BROWSER_SHOTS=<dir>`` to also copy
them there (``pytest tests/browser`` keeps only the last few tmp folders).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from airloom.training.launcher import free_port
from tests.production import tail

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No sandbox: CI runs as root in a container; no GPU; no component updates or safe-browsing fetches.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


@dataclass
class EmbeddedAirflow:
    """The running components and how to reach them."""

    root: Path
    env: dict[str, str]
    url: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return Path(self.env["AIRLOOM_HOME"])

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def run(self, name: str, cmd: list[str], timeout: float = 300) -> str:
        """A setup command to completion; its output in ``logs/<name>.log``; fails the test with its tail."""
        log = self.logs / f"{name}.log"
        with log.open("w") as f:
            rc = subprocess.run(
                cmd, env=self.env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        if rc != 0:
            pytest.fail(f"{' '.join(cmd[:4])} exited {rc}; {log}:\n{tail(log)}")
        return log.read_text()

    def start(self) -> None:
        airflow = str(Path(sys.executable).with_name("airflow"))
        port = int(self.url.rsplit(":", 1)[1])
        commands = {
            "api-server": [
                airflow,
                "api-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            "scheduler": [airflow, "scheduler"],
            "dag-processor": [airflow, "dag-processor"],
            "triggerer": [airflow, "triggerer"],
        }
        for name in COMPONENTS:
            with (self.logs / f"{name}.log").open("w") as f:
                self.procs[name] = subprocess.Popen(
                    commands[name],
                    env=self.env,
                    cwd=REPO,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def stop(self) -> None:
        """SIGTERM each component's process group (task processes included), SIGKILL what is left after 5 s
        (a throwaway home: nothing of it is read after the module)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may outlive its leader (a task process still exiting)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def check_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                pytest.fail(
                    f"airflow {name} exited {proc.returncode}; {self.logs / (name + '.log')}:\n"
                    f"{tail(self.logs / (name + '.log'))}"
                )

    # -- REST API ------------------------------------------------------------------------------

    def token(self, user: str) -> str:
        from airloom.settings import EMBEDDED_PASSWORDS

        body = self.request(
            "POST", "/auth/token", {"username": user, "password": EMBEDDED_PASSWORDS[user]}, token=None
        )
        return body["access_token"]

    def request(self, method: str, path: str, body: dict | None = None, *, token: str | None = "") -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token == "":
            token = self.token("admin")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path} -> {exc.code}: {exc.read()[:500]!r}") from exc

    def wait_healthy(self, timeout: float) -> dict:
        """Until /api/v2/monitor/health reports every component healthy (and the DAG is parsed)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            self.check_running()
            try:
                with urllib.request.urlopen(self.url + "/api/v2/monitor/health", timeout=5) as resp:
                    last = json.loads(resp.read())
                states = {k: (v or {}).get("status") for k, v in last.items()}
                if all(s == "healthy" for s in states.values()):
                    return last
            except (OSError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        pytest.fail(f"Airflow not healthy within {timeout:.0f}s; last health answer: {last}")

    def wait_dag(self, dag_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        token = self.token("admin")
        while time.monotonic() < deadline:
            self.check_running()
            try:
                return self.request("GET", f"/api/v2/dags/{dag_id}", token=token)
            except AssertionError:
                time.sleep(0.5)
        pytest.fail(
            f"DAG {dag_id} not parsed within {timeout:.0f}s; dag-processor log:\n"
            f"{tail(self.logs / 'dag-processor.log')}"
        )


@pytest.fixture(scope="module")
def airflow_ui(tmp_path_factory):
    """Airflow on a free port with ``llm_data_quality``'s raw data in place; stopped after the module."""
    from airloom.settings import airflow_env, ensure_embedded_airflow_home

    root = tmp_path_factory.mktemp("browser")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__") and k != "AIRLOOM_REGISTRY"}
    env = airflow_env(
        {
            **base,
            "AIRLOOM_HOME": str(root / "airloom"),
            "AIRFLOW_HOME": str(root / "airflow"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "airflow" / "passwords.json"),
            # Tasks report to the Execution API of this api-server, not the default :8080.
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            "AIRFLOW__CORE__PARALLELISM": "2",  # two cores, shared
        }
    )
    ensure_embedded_airflow_home(env)
    af = EmbeddedAirflow(root=root, env=env, url=url)
    af.logs.mkdir()
    af.run("db-migrate", [str(Path(sys.executable).with_name("airflow")), "db", "migrate"])
    af.run("settings", [sys.executable, "-m", "airloom.cli", "settings", str(REPO / "airflow_settings.yaml")])
    try:
        af.start()
        yield af
    finally:
        af.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """``shot(page, name)`` saves a full-page PNG (and copies it to $AIRLOOM_BROWSER_SHOTS)."""
    folder = tmp_path_factory.mktemp("screens")
    extra = os.environ.get("AIRLOOM_BROWSER_SHOTS")

    def shot(page, name: str) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, Path(extra) / path.name)
        return path

    shot.folder = folder
    return shot


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
