"""The serving loop through real processes: `airloom serve` on a tiny deployed model, concurrent
requests shaped like the ``openai`` client's, feedback with thumbs-down and corrected answers, an
alias move the server follows, then `airflow dags test llm_feedback_monitoring` over the logged
partitions: report, dashboard, the feedback dataset, and the asset events in Airflow's database.

Throwaway AIRLOOM_HOME/AIRFLOW_HOME; the model has random weights (seconds to build, no training).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import NAME, REPO, airloom_serve, register_two_versions

DAG_ID = "llm_feedback_monitoring"
# What openai-python 1.x sends besides the body (it identifies itself and always sends a key).
OPENAI_HEADERS = {
    "Authorization": "Bearer sk-test",
    "Content-Type": "application/json",
    "Accept": "application/json",
    "User-Agent": "OpenAI/Python 1.109.1",
    "X-Stainless-Lang": "python",
}
AIRFLOW = str(Path(sys.executable).with_name("airflow"))

pytestmark = pytest.mark.slow


def _env(home: Path) -> dict[str, str]:
    from airloom.settings import airflow_env

    return airflow_env(
        {
            **os.environ,
            "AIRLOOM_HOME": str(home),
            "AIRFLOW_HOME": str(home / "airflow"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "airflow" / "pw.json"),
        }
    )


def _training_profile(home: Path) -> Path:
    """What llm_data_quality leaves behind: latest.json naming its run, and eda_report/profile.json."""
    from airloom.data.eda import build_profile
    from airloom.data.synth import generate_records
    from airloom.prompts import render_prompt
    from airloom.settings import run_dir

    run_id = "manual__2026-11-01T00:00:00+00:00"
    records = list(generate_records(400, seed=0))
    dataset = run_dir("llm_data_quality", run_id, "prepare")
    dataset.mkdir(parents=True)
    (dataset / "train.jsonl").write_text(
        "".join(
            json.dumps({**r, "prompt": render_prompt(r["instruction"], r["input"])}) + "\n" for r in records
        )
    )
    (home / "datasets").mkdir()
    (home / "datasets" / "latest.json").write_text(
        json.dumps({"path": str(dataset), "dag_id": "llm_data_quality", "run_id": run_id})
    )
    eda = run_dir("llm_data_quality", run_id, "eda_report")
    build_profile(records, eda, near_duplicate_threshold=None)
    return eda / "profile.json"


async def _post_many(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=OPENAI_HEADERS, timeout=120) as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


def test_serve_feedback_alias_move_and_monitoring_dag(tmp_path):
    from airloom.data.synth import generate_records
    from airloom.prompts import render_prompt

    home = Path(os.environ["AIRLOOM_HOME"])  # conftest gives each test its own
    env = _env(home)
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("# airloom serve keys\nsk-test\n")
    env["AIRLOOM_API_KEYS_FILE"] = str(keys_file)  # the key OPENAI_HEADERS sends
    reg = register_two_versions(home, "serving loop")
    reference_profile = _training_profile(home)
    migrate = subprocess.Popen(
        [AIRFLOW, "db", "migrate"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # runs while the server works

    argv = ["serve", "--model", f"{NAME}@production", "--torch-threads", "1"]
    argv += ["--poll-seconds", "0.5", "--batch-wait-ms", "20"]
    with airloom_serve(argv, log=tmp_path / "serve.log", env=env) as server:
        url = server.url
        assert server.health["model"] == f"{NAME}/1"
        records = list(generate_records(16, seed=7))
        bodies = [
            {
                "model": NAME,
                "prompt": render_prompt(r["instruction"], r["input"]),
                "max_tokens": 8,
                "temperature": 0,
            }
            for r in records[:12]
        ]
        chats = [
            {
                "model": NAME,
                "messages": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
                "max_completion_tokens": 8,
                "temperature": 0,
            }
            for r in records[12:]
        ]
        done = asyncio.run(_post_many(url, "/v1/completions", bodies))
        done += asyncio.run(_post_many(url, "/v1/chat/completions", chats))
        assert [r.status_code for r in done] == [200] * 16, [r.text for r in done if r.status_code != 200]
        assert {r.json()["model"] for r in done} == {f"{NAME}/1"}
        assert {r.headers["x-airloom-model-version"] for r in done} == {f"{NAME}/1"}
        assert httpx.get(url + "/healthz").json()["max_batch_size_seen"] > 1
        unauthorized = httpx.post(
            url + "/v1/completions", json=bodies[0], headers={"Authorization": "Bearer x"}
        )
        assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"

        # 7 thumbs-down of 9 ratings; corrected answers: two, one with an email (masked), a duplicate
        ids = [r.json()["id"] for r in done]
        feedback = [{"response_id": i, "rating": "down"} for i in ids[:6]]
        feedback += [{"response_id": ids[6], "rating": "up"}, {"response_id": ids[7], "rating": 5}]
        feedback[0]["corrected_answer"] = records[0]["response"]
        feedback[1]["corrected_answer"] = records[1]["response"]
        feedback[2].update(corrected_answer="mail ann@example.org", comment="wrong")
        feedback.append({"response_id": ids[0], "rating": "down", "corrected_answer": records[0]["response"]})
        posted = asyncio.run(_post_many(url, "/v1/feedback", feedback))
        assert [r.status_code for r in posted] == [201] * len(feedback), [r.text for r in posted]
        assert (
            httpx.post(
                url + "/v1/feedback",
                headers=OPENAI_HEADERS,
                json={"response_id": "cmpl-unknown", "rating": "up"},
            ).status_code
            == 404
        )

        reg.set_alias(NAME, "production", 2, actor="test", reason="serving loop")
        server.until(lambda: httpx.get(url + "/healthz").json()["version"] == 2, 60, "it to follow the alias")
        after = asyncio.run(_post_many(url, "/v1/completions", bodies[:8]))
        assert {r.json()["model"] for r in after} == {f"{NAME}/2"}
        assert {r.headers["x-airloom-model-version"] for r in after} == {f"{NAME}/2"}
        scraped = httpx.get(url + "/metrics").text  # open without a key, like /healthz
        assert "airloom_model_reloads_total 1.0" in scraped
        assert 'airloom_model_version{name="tiny",version="2"} 1.0' in scraped
        assert 'airloom_requests_total{endpoint="/v1/completions",status="401"} 1.0' in scraped
    assert "sk-test" not in server.output()  # keys never logged (the access log has no headers)
    assert migrate.wait(timeout=300) == 0, migrate.stdout.read()[-3000:]

    traffic, fb_root = home / "data" / "traffic", home / "data" / "feedback"
    (part,) = sorted(fb_root.glob("ds=*"))  # one day's partition (the requests took seconds)
    ds = part.name.removeprefix("ds=")
    conf = {"traffic_uri": str(traffic), "feedback_uri": str(fb_root)}
    proc = subprocess.run(
        [AIRFLOW, "dags", "test", DAG_ID, ds, "-c", json.dumps(conf)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    (report_path,) = (home / "runs" / DAG_ID).glob("*/drift_and_feedback/monitoring.json")
    report = json.loads(report_path.read_text())
    assert report["ds"] == ds and report["retrain"] is True
    assert "negative feedback rate 0.78 > 0.3" in report["reasons"]
    serving = report["serving"]
    assert serving["models"] == {f"{NAME}/1": 16, f"{NAME}/2": 8} and serving["satisfaction_rate"] == 0.2222
    assert (report["thumbs_down"], report["thumbs_up"]) == (7, 2)
    drift = report["input_drift"]
    assert drift["reference_profile"] == str(reference_profile)  # the newest dataset's EDA profile
    assert drift["reference_rows"] == 400 and drift["current_rows"] == 24
    assert set(drift["length_psi"]) >= {"instruction", "input", "response"}
    assert 0 <= drift["vocabulary"]["js_divergence"] <= 1
    assert drift["language"]["scripts"]["current"] and drift["input_psi"] is not None
    # vs. the train split: served traffic has no task labels, so no (false) task-mix shift
    assert report["psi_task_mix"] is None and report["reference_rows"] == 400
    page = (report_path.parent / "dashboard.html").read_text()
    assert "Input drift vs. training data (400 rows → 24 today)" in page and f"ds={ds}" in page
    assert (report_path.parent / "traffic_profile" / "report.html").is_file()

    dataset = report["corrected_dataset"]
    assert dataset["path"] == str(home / "data" / "feedback_datasets" / f"ds={ds}" / "instructions.jsonl")
    rows = [json.loads(line) for line in Path(dataset["path"]).read_text().splitlines()]
    # the server masked the email before anything was written; the duplicate correction was dropped
    assert sorted(r["response"] for r in rows) == sorted(
        [records[0]["response"], records[1]["response"], "mail <EMAIL>"]
    )
    first = next(r for r in rows if r["response"] == records[0]["response"])
    assert (first["instruction"], first["input"]) == (records[0]["instruction"], records[0]["input"])
    assert first["source"] == "feedback" and dataset["rows"] == 3 and dataset["dropped"] == {"duplicate": 1}

    # What Airflow recorded: both tasks succeeded and each asset got one event with our extra.
    query = (
        "import json\n"
        "from sqlalchemy import select\n"
        "from airflow.models.asset import AssetEvent, AssetModel\n"
        "from airflow.models.taskinstance import TaskInstance\n"
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    ev = s.execute(select(AssetModel.name, AssetEvent.extra, AssetEvent.source_task_id)"
        ".join(AssetEvent, AssetEvent.asset_id == AssetModel.id)).all()\n"
        f"    ti = s.execute(select(TaskInstance.task_id, TaskInstance.state).where(TaskInstance.dag_id == {DAG_ID!r})).all()\n"
        "print(json.dumps({'events': [list(e) for e in ev], 'states': {t: str(st) for t, st in ti}}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", query], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    db = json.loads(out.stdout.strip().splitlines()[-1])
    assert db["states"] == {
        "drift_and_feedback": "success",
        "request_retraining": "success",
        "publish_feedback_dataset": "success",
    }
    events = {name: (extra, task) for name, extra, task in db["events"]}
    assert set(events) == {"retraining_request", "feedback_dataset"}
    extra, task = events["retraining_request"]
    assert task == "request_retraining" and extra["reasons"] == report["reasons"]
    extra, task = events["feedback_dataset"]
    assert task == "publish_feedback_dataset"
    # `airflow dags test` has no signed-in user: the requester is AIRLOOM_USER, else the OS user
    requester = env.get("AIRLOOM_USER") or getpass.getuser()
    assert extra == {
        "path": dataset["path"],
        "rows": 3,
        "sha256": dataset["sha256"],
        "ds": ds,
        "requested_by": requester,
    }
