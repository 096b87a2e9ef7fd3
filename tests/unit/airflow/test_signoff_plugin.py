"""The sign-off UI plugin, served by Airflow's real API app in-process: auth, policy, page, file route.

One ``airflow db migrate`` per module; each test gets its own AIRLOOM_HOME (tests/conftest.py), so
its own registry and run folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airloom.governance.signoff import request_signoff, signoff_status
from airloom.registry.registry import ModelRegistry
from airloom.settings import home, registry_uri
from tests.airflow_api import api_app, bearer_tokens

MODEL = "demo-model"
RUN_ID = "manual__2026-01-02T03:04:05+00:00"
BUCKET = "airloom-registry-tests"  # created by the moto_endpoint fixture of tests/unit/conftest.py


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """Airflow's API app with the project's plugins folder and four SimpleAuthManager users."""
    from fastapi.testclient import TestClient

    with api_app(tmp_path_factory) as app, TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def tokens(client) -> dict[str, str]:
    return bearer_tokens(client)


def as_user(tokens, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[user]}"}


@pytest.fixture
def pending(tmp_path, make_model) -> ModelRegistry:
    """Version 1 of MODEL, trained by ``trainer`` in llm_finetune, awaiting sign-off, with its reports on disk."""
    runs = home() / "runs"
    data_run = runs / "llm_data_quality" / "manual__data"
    (data_run / "prepare").mkdir(parents=True)
    docs = data_run / "validate" / "data_docs"
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html>data docs</html>")
    (data_run / "validate" / "validation.json").write_text(
        json.dumps({"success": True, "data_docs": str(docs)})
    )
    (data_run / "validate" / "validation.html").write_text("<html>validation report</html>")
    (data_run / "eda_report").mkdir()
    (data_run / "eda_report" / "report.html").write_text("<html>eda</html>")
    (data_run / "eda_report" / "profile.json").write_text("{}")
    report = runs / "llm_finetune" / "manual__x" / "quality_gates" / "report.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html>eval report: exact_match 0.41</html>")

    registry = ModelRegistry.from_uri(registry_uri())
    metadata = {
        "base_model": "tiny-base",
        "metrics": {"exact_match": 0.41},
        "gates": [{"gate": "exact_match>=0.3", "passed": True, "message": "exact_match 0.41 >= 0.3"}],
        "lineage": {
            "dag_id": "llm_finetune",
            "run_id": RUN_ID,
            "dataset": str(data_run / "prepare"),
            "triggered_by": "trainer",
        },
    }
    registry.register(MODEL, make_model(tmp_path / "m1"), metadata=metadata, actor="trainer")
    request_signoff(
        registry, MODEL, 1, requested_by="trainer", evidence={"eval_report": str(report), "n": 300}
    )
    return registry


def _decide(client, headers, decision="approve", comment="looks good", **extra):
    body = {"model": MODEL, "version": 1, "decision": decision, "comment": comment, **extra}
    return client.post("/airloom/api/decisions", json=body, headers=headers)


def test_plugin_is_registered_with_nav_and_dag_run_views(client, tokens):
    r = client.get("/api/v2/plugins", headers=as_user(tokens, "admin"))
    assert r.status_code == 200, r.text
    plugin = next(p for p in r.json()["plugins"] if p["name"] == "airloom_signoff")
    assert {v["destination"] for v in plugin["external_views"]} == {"nav", "dag_run"}
    run_view = next(v for v in plugin["external_views"] if v["destination"] == "dag_run")
    assert "{DAG_ID}" in run_view["href"] and "{RUN_ID}" in run_view["href"]
    from airloom.airflow.signoff_ui import URL_PREFIX

    assert plugin["fastapi_apps"][0]["url_prefix"] == URL_PREFIX


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/airloom/api/pending"),
        ("get", "/airloom/signoff"),
        ("get", f"/airloom/api/models/{MODEL}/1/card"),
        ("get", "/airloom/files/runs/llm_finetune/manual__x/quality_gates/report.html"),
        ("get", "/airloom/files/evaluations/demo-model/trend.png"),
        ("get", "/airloom/evaluation-day/evaluations/demo-model/ds=2026-01-02/metrics.json"),
        ("post", "/airloom/api/decisions"),
    ],
)
def test_unauthenticated_calls_get_401(client, pending, method, path):
    kwargs = {"json": {"model": MODEL, "version": 1, "decision": "approve"}} if method == "post" else {}
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == 401, r.text
    r = getattr(client, method)(path, headers={"Authorization": "Bearer not-a-jwt"}, **kwargs)
    assert r.status_code in (401, 403), r.text
    assert signoff_status(pending, MODEL, 1)["state"] == "pending"


def test_browser_without_session_is_offered_the_login_page(client):
    r = client.get("/airloom/signoff", headers={"Accept": "text/html"})
    assert r.status_code == 401 and "/auth/login?next=" in r.text


def test_raw_model_card(client, tokens, pending):
    r = client.get(f"/airloom/api/models/{MODEL}/1/card", headers=as_user(tokens, "viewer"))
    assert r.status_code == 200 and r.text.startswith("---\n") and "# demo-model (version 1)" in r.text
    assert (
        client.get(f"/airloom/api/models/{MODEL}/2/card", headers=as_user(tokens, "viewer")).status_code
        == 404
    )


def test_viewer_sees_the_version_but_may_not_decide(client, tokens, pending):
    r = client.get("/airloom/api/pending", headers=as_user(tokens, "viewer"))
    assert r.status_code == 200, r.text
    [entry] = r.json()
    assert (entry["model"], entry["version"], entry["requested_by"]) == (MODEL, 1, "trainer")
    assert entry["can_approve"] is False and "read-only" in entry["why_not"]
    for decision in ("approve", "reject"):
        r = _decide(client, as_user(tokens, "viewer"), decision)
        assert r.status_code == 403, r.text
        assert "'viewer' may not sign off demo-model/1" in r.json()["detail"]
    status = signoff_status(pending, MODEL, 1)
    assert (status["state"], status["approvals"], status["rejections"]) == ("pending", [], [])


def test_self_approval_is_refused(client, tokens, pending):
    r = _decide(client, as_user(tokens, "trainer"))
    assert r.status_code == 403
    assert "'trainer' requested the sign-off of demo-model/1 and may not approve it" in r.json()["detail"]
    assert signoff_status(pending, MODEL, 1)["approvals"] == []
    r = client.get("/airloom/api/pending", headers=as_user(tokens, "trainer"))
    assert r.json()[0]["can_approve"] is False and r.json()[0]["can_reject"] is True


def test_reviewer_approves_as_the_token_says(client, tokens, pending):
    # The body cannot name the decider.
    r = _decide(client, as_user(tokens, "reviewer"), user="admin")
    assert r.status_code == 422
    request_id = signoff_status(pending, MODEL, 1)["request_id"]
    r = _decide(client, as_user(tokens, "reviewer"), comment="eval report checked", request_id=request_id)
    assert r.status_code == 200, r.text
    assert r.json()["status"]["state"] == "approved"
    status = signoff_status(pending, MODEL, 1)
    assert status["state"] == "approved"
    assert [(a["user"], a["comment"]) for a in status["approvals"]] == [("reviewer", "eval report checked")]
    audit = pending.history(MODEL)[-1]
    assert (audit["action"], audit["actor"], audit["decision"]) == ("signoff_decision", "reviewer", "approve")
    # The round is closed: a second decision is a conflict, and the version leaves the pending list.
    assert _decide(client, as_user(tokens, "admin")).status_code == 409
    assert client.get("/airloom/api/pending", headers=as_user(tokens, "reviewer")).json() == []


def test_reject_needs_a_reason_and_is_recorded(client, tokens, pending):
    r = _decide(client, as_user(tokens, "reviewer"), "reject", comment="  ")
    assert r.status_code == 422 and "needs a comment" in r.text
    r = _decide(client, as_user(tokens, "reviewer"), "reject", comment="hallucinates dates")
    assert r.status_code == 200, r.text
    status = signoff_status(pending, MODEL, 1)
    assert status["state"] == "rejected"
    assert [(x["user"], x["comment"]) for x in status["rejections"]] == [("reviewer", "hallucinates dates")]


def test_stale_request_and_unknown_version(client, tokens, pending):
    r = _decide(client, as_user(tokens, "reviewer"), request_id="an-older-round")
    assert r.status_code == 409 and "newer sign-off request" in r.json()["detail"]
    r = client.post(
        "/airloom/api/decisions",
        json={"model": MODEL, "version": 7, "decision": "approve"},
        headers=as_user(tokens, "reviewer"),
    )
    assert r.status_code == 404 and "no committed version 7" in r.json()["detail"]
    assert signoff_status(pending, MODEL, 1)["state"] == "pending"


def test_approvers_variable_limits_who_may_approve(client, tokens, pending, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_AIRLOOM_SIGNOFF_APPROVERS", "reviewer")
    r = _decide(client, as_user(tokens, "admin"))
    assert r.status_code == 403 and "airloom_signoff_approvers allows only reviewer" in r.json()["detail"]
    assert _decide(client, as_user(tokens, "reviewer")).status_code == 200


def test_cookie_session_needs_a_same_origin_json_post(client, tokens, pending):
    cookie = {"Cookie": f"_token={tokens['reviewer']}"}
    body = {"model": MODEL, "version": 1, "decision": "approve", "comment": "ok"}
    r = client.post("/airloom/api/decisions", json=body, headers={**cookie, "Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    r = client.post("/airloom/api/decisions", json=body, headers=cookie)
    assert r.status_code == 403 and "Origin" in r.json()["detail"]
    r = client.post(
        "/airloom/api/decisions", data=body, headers={**cookie, "Origin": "http://testserver"}
    )  # a classic HTML form post
    assert r.status_code in (415, 422)
    assert signoff_status(pending, MODEL, 1)["state"] == "pending"
    r = client.post("/airloom/api/decisions", json=body, headers={**cookie, "Origin": "http://testserver"})
    assert r.status_code == 200, r.text
    assert signoff_status(pending, MODEL, 1)["approvals"][0]["user"] == "reviewer"


def test_page_lists_the_pending_version_with_its_evidence(client, tokens, pending):
    r = client.get("/airloom/signoff", headers=as_user(tokens, "reviewer"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "demo-model / 1" in page and "requested by <b>trainer</b>" in page
    assert f'href="/dags/llm_finetune/runs/{RUN_ID.replace(":", "%3A").replace("+", "%2B")}"' in page
    assert 'value="approve"' in page and 'value="reject"' in page
    assert "/airloom/files/runs/llm_finetune/manual__x/quality_gates/report.html" in page
    assert "(unchanged)" in page and "✔ exact_match 0.41 &gt;= 0.3" in page
    for label in ("Data Docs", "EDA report"):
        assert f">{label}</a>" in page
    assert "<h1>demo-model (version 1)</h1>" in page  # the model card, rendered
    assert "<script src" not in page and "<link" not in page  # self-contained, no CDN
    # A viewer gets the page without decision buttons.
    viewer_page = client.get("/airloom/signoff", headers=as_user(tokens, "viewer")).text
    assert "demo-model / 1" in viewer_page and 'value="approve"' not in viewer_page
    # On a DAG run: only that run's versions.
    r = client.get(
        "/airloom/signoff",
        params={"dag_id": "llm_finetune", "run_id": RUN_ID},
        headers=as_user(tokens, "reviewer"),
    )
    assert "demo-model / 1" in r.text
    r = client.get(
        "/airloom/signoff",
        params={"dag_id": "llm_finetune", "run_id": "other"},
        headers=as_user(tokens, "reviewer"),
    )
    assert "Nothing is awaiting sign-off" in r.text


def test_evidence_that_changed_after_the_request_is_flagged(client, tokens, pending):
    report = home() / "runs" / "llm_finetune" / "manual__x" / "quality_gates" / "report.html"
    report.write_text("<html>edited after the request</html>")
    [entry] = client.get("/airloom/api/pending", headers=as_user(tokens, "reviewer")).json()
    [ev] = [e for e in entry["evidence"] if e["label"] == "eval_report"]
    assert ev["check"] == "changed since request"


def test_file_route_serves_reports_and_nothing_outside(client, tokens, pending, tmp_path):
    headers = as_user(tokens, "viewer")
    [entry] = client.get("/airloom/api/pending", headers=headers).json()
    eval_href = next(e["href"] for e in entry["evidence"] if e["label"] == "eval_report")
    r = client.get(eval_href, headers=headers)
    assert r.status_code == 200 and "exact_match 0.41" in r.text
    assert r.headers["content-security-policy"].startswith("sandbox")
    docs = next(e["href"] for e in entry["reports"] if e["label"] == "Data Docs")
    assert client.get(docs, headers=headers).text == "<html>data docs</html>"
    validation = next(e["href"] for e in entry["reports"] if e["label"] == "data validation")
    assert (
        client.get(validation, headers=headers).text == "<html>validation report</html>"
    )  # offline-readable

    secret = home() / "secret.txt"
    secret.write_text("do not serve")
    (home() / "runs" / "escape").symlink_to(home())
    for path in (
        "/airloom/files/runs/..%2Fsecret.txt",
        "/airloom/files/runs/llm_finetune/%2e%2e/%2e%2e/secret.txt",
        "/airloom/files/runs/escape/secret.txt",
        f"/airloom/files/runs/{'%2F'.join(['..'] * 12)}%2Fetc%2Fpasswd",
        "/airloom/files/secret.txt",  # in AIRLOOM_HOME, but not in a served folder
    ):
        r = client.get(path, headers=headers)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "outside the served folders (runs/, evaluations/, registry/)" in r.json()["detail"]
        assert "do not serve" not in r.text
    r = client.get("/airloom/files/%2Fetc%2Fpasswd", headers=headers)
    assert r.status_code == 403 and "root:" not in r.text
    assert client.get("/airloom/files/runs/nope.html", headers=headers).status_code == 404


@pytest.fixture
def backfill_day() -> Path:
    """A backfill day's metrics under ``evaluations/`` (with a version level) and the model's trend."""
    model_root = home() / "evaluations" / MODEL
    day = model_root / "ds=2026-01-02" / "v1"
    day.mkdir(parents=True)
    metrics = {
        "ds": "2026-01-02",
        "model_ref": f"registry:{MODEL}/1",
        "n": 20,
        "aggregate": {"exact_match": 0.35, "f1": 0.5},
        "by_task": {"qa<script>": {"n": 20, "exact_match": 0.35, "f1": 0.5}},
    }
    (day / "metrics.json").write_text(json.dumps(metrics))
    rows = [
        {"ds": "2026-01-01", "model_ref": f"registry:{MODEL}/1", "n": 20, "exact_match": 0.3},
        {"ds": "2026-01-02", "model_ref": f"registry:{MODEL}/1", "n": 20, "exact_match": 0.35},
    ]
    (model_root / "trend.json").write_text(json.dumps({"dates": 2, "rows": rows}))
    (model_root / "trend.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 32)
    return day / "metrics.json"


def test_evaluation_day_page_shows_the_days_metrics_and_the_trend(client, tokens, backfill_day):
    import base64

    rel = backfill_day.relative_to(home()).as_posix()
    r = client.get(f"/airloom/evaluation-day/{rel}", headers=as_user(tokens, "viewer"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"].startswith("sandbox")
    page = r.text
    assert "<h1>Evaluation of 2026-01-02</h1>" in page
    assert '<td>exact_match</td><td class="num">0.3500</td>' in page
    assert "qa&lt;script&gt;" in page and "qa<script>" not in page  # data text is escaped
    # the chart inline (a sandboxed page cannot fetch images with the session cookie) and the day marked
    png = (home() / "evaluations" / MODEL / "trend.png").read_bytes()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert '<tr class="day"><td>2026-01-02</td>' in page


def test_result_files_are_served_with_their_content_type(client, tokens, backfill_day):
    headers = as_user(tokens, "viewer")
    r = client.get(f"/airloom/files/evaluations/{MODEL}/trend.png", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG")
    rel = backfill_day.relative_to(home()).as_posix()
    r = client.get(f"/airloom/files/{rel}", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["aggregate"]["f1"] == 0.5


def test_evaluation_day_route_refuses_paths_outside_the_served_folders(client, tokens, backfill_day):
    headers = as_user(tokens, "viewer")
    secret = home() / "metrics.json"  # in AIRLOOM_HOME, but not in a served folder
    secret.write_text(backfill_day.read_text().replace("0.35", "0.99"))
    outside = home().parent / "outside"
    (outside / "evaluations").mkdir(parents=True)
    (outside / "evaluations" / "metrics.json").write_text(secret.read_text())
    (home() / "evaluations" / "escape").symlink_to(outside)
    for path in (
        "/airloom/evaluation-day/metrics.json",
        "/airloom/evaluation-day/evaluations/..%2Fmetrics.json",
        "/airloom/evaluation-day/evaluations/%2e%2e/metrics.json",
        "/airloom/evaluation-day/evaluations/escape/evaluations/metrics.json",
        f"/airloom/evaluation-day/evaluations/{'%2F'.join(['..'] * 12)}%2Fetc%2Fpasswd",
        "/airloom/evaluation-day/%2Fetc%2Fpasswd",
    ):
        r = client.get(path, headers=headers)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "0.9900" not in r.text and "root:" not in r.text
    # inside a served folder, but not a day's metrics: no page
    trend = f"/airloom/evaluation-day/evaluations/{MODEL}/trend.json"
    assert client.get(trend, headers=headers).status_code == 404
    missing = f"/airloom/evaluation-day/evaluations/{MODEL}/ds=2026-01-03/metrics.json"
    assert client.get(missing, headers=headers).status_code == 404


def test_s3_registry_from_the_variable_with_the_connection_in_the_metastore(
    client, tokens, moto_endpoint, monkeypatch, tmp_path, make_model
):
    """The API server reads ``aws_default`` from the DB (the Task SDK's hooks would not see it there)."""
    import boto3
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    from airloom.registry.store import S3Store

    store = S3Store(BUCKET, "signoff-ui", client=boto3.client("s3", endpoint_url=moto_endpoint))
    registry = ModelRegistry(store)
    registry.register(MODEL, make_model(tmp_path / "m"), metadata={}, actor="trainer")
    request_signoff(registry, MODEL, 1, requested_by="trainer", evidence={})
    conn = Connection(
        conn_id="aws_default",
        conn_type="aws",
        extra=json.dumps({"endpoint_url": moto_endpoint, "region_name": "us-east-1"}),
    )
    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == "aws_default").delete()
        session.add(conn)
    try:
        monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the connection knows where the store is
        monkeypatch.setenv("AIRFLOW_VAR_AIRLOOM_REGISTRY", f"s3://{BUCKET}/signoff-ui")
        [entry] = client.get("/airloom/api/pending", headers=as_user(tokens, "reviewer")).json()
        assert (entry["model"], entry["version"], entry["requested_by"]) == (MODEL, 1, "trainer")
        assert _decide(client, as_user(tokens, "reviewer")).status_code == 200
        assert signoff_status(registry, MODEL, 1)["approvals"][0]["user"] == "reviewer"
    finally:
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id == "aws_default").delete()
