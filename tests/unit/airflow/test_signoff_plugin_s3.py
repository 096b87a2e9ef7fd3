"""The plugin's report routes when the artifact store is on S3 (``AIRLOOM_ARTIFACTS=s3://…``, moto's server):
the API server has no worker's disk, so what a link names is read from the store through the plugin,
behind Airflow's auth, with the same allowed folders as on disk.

Each test publishes from a "worker" folder (``AIRLOOM_HOME=…/worker``) that is deleted before the API app
is asked, and the API app runs with an AIRLOOM_HOME that holds nothing.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import uuid
from urllib.parse import urljoin

import boto3
import pytest

from airloom.airflow.links import EvalReportLink, EvaluationDayLink, files_url
from airloom.artifacts import Artifacts
from airloom.governance.signoff import request_signoff
from airloom.registry.registry import ModelRegistry
from airloom.settings import home, registry_uri
from tests.airflow_api import api_app, bearer_tokens

MODEL = "demo-model"
RUN = "runs/llm_finetune/manual__x"
DATA_RUN = "runs/llm_data_quality/manual__data"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
DAYS = {"2026-01-01": 0.25, "2026-01-02": 0.5}
REPORT = (
    '<html><body>eval report: exact_match 0.41<img src="plot.png"><a href="data_docs/">docs</a></body></html>'
)


def _day(ds: str, f1: float, model: str = MODEL) -> bytes:
    metrics = {"ds": ds, "model_ref": f"registry:{model}/1", "version": 1, "n": 20, "aggregate": {"f1": f1}}
    return json.dumps(metrics).encode()


@pytest.fixture(scope="module")
def client(tmp_path_factory, moto_endpoint):
    from fastapi.testclient import TestClient

    with api_app(tmp_path_factory) as app, TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def tokens(client) -> dict[str, str]:
    return bearer_tokens(client)


def as_user(tokens, user: str = "viewer") -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[user]}"}


@pytest.fixture
def store(moto_endpoint, moto_bucket, monkeypatch, tmp_path) -> Artifacts:
    """The artifact store on moto (its own prefix), holding a published eval report (HTML with a PNG and
    Data Docs beside it), a data-quality run, a backfill day with its trend, and objects outside the served
    folders. The worker's folder is gone afterwards; the API server's AIRLOOM_HOME is empty."""
    uri = f"s3://{moto_bucket}/ui-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("AIRLOOM_ARTIFACTS", uri)
    server_home = home()
    worker = tmp_path / "worker"
    monkeypatch.setenv("AIRLOOM_HOME", str(worker))
    artifacts = Artifacts(uri, client=boto3.client("s3", endpoint_url=moto_endpoint))
    files = {
        f"{RUN}/quality_gates/report.html": REPORT.encode(),
        f"{RUN}/quality_gates/plot.png": PNG,
        f"{RUN}/quality_gates/data_docs/index.html": b'<html><link href="static/style.css">docs</html>',
        f"{RUN}/quality_gates/data_docs/static/style.css": b"body { color: red }",
        f"{RUN}/quality_gates/metrics.json": b'{"aggregate": {"f1": 0.5}}',
        f"{DATA_RUN}/validate/validation.json": b'{"success": true}',
        f"{DATA_RUN}/validate/validation.html": b"<html>validation report</html>",
        f"{DATA_RUN}/validate/data_docs/index.html": b"<html>data docs</html>",
        f"{DATA_RUN}/eda_report/report.html": b"<html>eda</html>",
        f"{DATA_RUN}/eda_report/profile.json": b"{}",
        f"{DATA_RUN}/prepare/train.jsonl": b"{}\n",
        **{f"evaluations/{MODEL}/ds={ds}/v1/metrics.json": _day(ds, f1) for ds, f1 in DAYS.items()},
        # a store that holds the local default's layout (the trend beside the days, one artifact)
        "evaluations/legacy/ds=2026-01-02/metrics.json": _day("2026-01-02", 0.5, "legacy"),
        "evaluations/legacy/trend.png": PNG,
        "evaluations/legacy/trend.json": json.dumps(
            {"rows": [{"ds": "2026-01-02", "model_ref": "registry:legacy/1", "f1": 0.5}]}
        ).encode(),
        "datasets/private/1/rows.jsonl": b"do not serve",  # in the store, outside the served folders
    }
    for key, data in files.items():
        (worker / key).parent.mkdir(parents=True, exist_ok=True)
        (worker / key).write_bytes(data)
    for folder in (
        f"{RUN}/quality_gates",
        f"{DATA_RUN}/validate",
        f"{DATA_RUN}/eda_report",
        f"{DATA_RUN}/prepare",
        *(
            f"evaluations/{MODEL}/ds={ds}/v1" for ds in DAYS
        ),  # each day its own artifact, as the operator does
        "evaluations/legacy",
        "datasets/private/1",
    ):
        artifacts.publish(worker / folder)
    artifacts.put_json("secret.json", {"secret": "do not serve"})  # at the store's root
    shutil.rmtree(worker)
    monkeypatch.setenv("AIRLOOM_HOME", str(server_home))
    assert not any(server_home.iterdir())  # the API server reads nothing from its own disk
    return artifacts


def test_a_published_report_and_the_files_beside_it_are_served_from_the_store(client, tokens, store):
    url = files_url(store.uri(f"{RUN}/quality_gates/report.html"))
    assert url == f"/airloom/files/{RUN}/quality_gates/report.html"
    r = client.get(url, headers=as_user(tokens))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["content-security-policy"].startswith("sandbox")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.text == REPORT
    # the report's relative links resolve to sibling keys through the same route
    img = urljoin("http://testserver" + url, re.search(r'src="([^"]+)"', r.text)[1])
    r = client.get(img, headers=as_user(tokens))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == PNG
    assert r.headers["content-length"] == str(len(PNG))
    docs = urljoin("http://testserver" + url, re.search(r'href="([^"]+)"', REPORT)[1])
    r = client.get(docs, headers=as_user(tokens))  # a folder: its index.html
    assert r.status_code == 200 and r.text == '<html><link href="static/style.css">docs</html>'
    css = urljoin(docs, "static/style.css")
    r = client.get(css, headers=as_user(tokens))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
    assert r.text == "body { color: red }"
    r = client.get(f"/airloom/files/{RUN}/quality_gates/metrics.json", headers=as_user(tokens))
    assert r.headers["content-type"] == "application/json" and r.json() == {"aggregate": {"f1": 0.5}}
    assert not (home() / "runs").exists()  # streamed from the store, nothing written to the server's disk


def test_the_store_route_keeps_airflows_auth(client, tokens, store):
    url = f"/airloom/files/{RUN}/quality_gates/report.html"
    assert client.get(url).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer not-a-jwt"}).status_code in (401, 403)
    day = f"/airloom/evaluation-day/evaluations/{MODEL}/ds=2026-01-02/v1/metrics.json"
    assert client.get(day).status_code == 401


def test_traversal_and_keys_outside_the_served_folders_are_refused(client, tokens, store):
    headers = as_user(tokens)
    for path in (
        "/airloom/files/secret.json",  # in the store, at its root
        "/airloom/files/datasets/private/1/rows.jsonl",  # in the store, not a report folder
        "/airloom/files/runs/..%2Fsecret.json",
        "/airloom/files/runs/..%2Fdatasets%2Fprivate%2F1%2Frows.jsonl",
        "/airloom/files/runs/llm_finetune/%2e%2e/%2e%2e/datasets/private/1/rows.jsonl",
        "/airloom/files/runs/.%2Fllm_finetune/manual__x/quality_gates/report.html",
        "/airloom/files/runs//llm_finetune/manual__x/quality_gates/report.html",
        "/airloom/files/runs/llm_finetune%5C..%5C..%5Csecret.json",
        f"/airloom/files/runs/{'%2F'.join(['..'] * 12)}%2Fetc%2Fpasswd",
        "/airloom/evaluation-day/runs/..%2Fsecret.json",
        "/airloom/evaluation-day/datasets/private/1/rows.jsonl",
    ):
        r = client.get(path, headers=headers)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "outside the served folders (runs/, evaluations/, registry/)" in r.json()["detail"], path
        assert "do not serve" not in r.text
    r = client.get("/airloom/files/%2Fetc%2Fpasswd", headers=headers)
    assert r.status_code == 403 and "root:" not in r.text
    r = client.get(f"/airloom/files/{RUN}/quality_gates/nope.html", headers=headers)
    assert r.status_code == 404 and "does not exist in the artifact store" in r.json()["detail"]
    r = client.get(f"/airloom/files/{RUN}/quality_gates/.airloom-tmp", headers=headers)
    assert r.status_code in (403, 404)


def test_links_built_from_store_uris_point_at_the_route(client, tokens, store, monkeypatch):
    from airflow.sdk.execution_time.xcom import XCom

    report = store.uri(f"{RUN}/quality_gates/report.html")
    day = store.uri(f"evaluations/{MODEL}/ds=2026-01-02/v1/metrics.json")
    xcoms = {"report": report, "metrics_path": day}
    monkeypatch.setattr(XCom, "get_value", lambda *, ti_key, key: xcoms.get(key))
    link = EvalReportLink().get_link(None, ti_key=None)
    assert link == f"/airloom/files/{RUN}/quality_gates/report.html"
    assert client.get(link, headers=as_user(tokens)).text == REPORT
    link = EvaluationDayLink().get_link(None, ti_key=None)
    assert link == f"/airloom/evaluation-day/evaluations/{MODEL}/ds=2026-01-02/v1/metrics.json"
    assert client.get(link, headers=as_user(tokens)).status_code == 200
    # only the store's own URIs: another bucket or prefix gets no link, nor a key that climbs out
    bucket, prefix = store.root[len("s3://") :].split("/", 1)
    assert files_url(f"s3://other-bucket/{prefix}/{RUN}/quality_gates/report.html") == ""
    assert files_url(f"s3://{bucket}/other-prefix/{RUN}/quality_gates/report.html") == ""
    assert files_url(f"{store.root}/runs/../secret.json") == ""
    # a path under AIRLOOM_HOME names the same artifact as its URI
    assert (
        files_url(home() / RUN / "quality_gates" / "report.html")
        == f"/airloom/files/{RUN}/quality_gates/report.html"
    )


def test_a_backfill_day_in_the_store_renders_with_the_trend_of_every_published_day(client, tokens, store):
    day = f"/airloom/evaluation-day/evaluations/{MODEL}/ds=2026-01-02/v1/metrics.json"
    r = client.get(day, headers=as_user(tokens))
    assert r.status_code == 200, r.text
    assert r.headers["content-security-policy"].startswith("sandbox")
    assert "<h1>Evaluation of 2026-01-02</h1>" in r.text
    # no trend beside the days (each trend task writes its own run folder): built from the published days
    assert re.search(r'<tr class="day"><td>2026-01-02</td>', r.text)
    assert re.search(r"<tr><td>2026-01-01</td>", r.text), r.text
    assert "data:image/png;base64,iVBORw0KGgo" in r.text  # a chart, drawn on request
    r = client.get(
        f"/airloom/evaluation-day/evaluations/{MODEL}/ds=2026-01-03/v1/metrics.json", headers=as_user(tokens)
    )
    assert r.status_code == 404
    r = client.get(f"/airloom/evaluation-day/{RUN}/quality_gates/report.html", headers=as_user(tokens))
    assert r.status_code == 404  # served, but not a day's metrics
    assert not (home() / "cache").exists()  # what was read for the page did not stay on the server


def test_a_day_with_the_trend_beside_it_in_the_store_shows_that_trend(client, tokens, store):
    r = client.get(
        "/airloom/evaluation-day/evaluations/legacy/ds=2026-01-02/metrics.json", headers=as_user(tokens)
    )
    assert r.status_code == 200, r.text
    assert f"data:image/png;base64,{base64.b64encode(PNG).decode()}" in r.text
    assert '<tr class="day"><td>2026-01-02</td>' in r.text
    r = client.get("/airloom/evaluation-day/evaluations/legacy/trend.json", headers=as_user(tokens))
    assert r.status_code == 404


def test_the_signoff_page_links_evidence_and_data_reports_in_the_store(
    client, tokens, store, tmp_path, make_model
):
    registry = ModelRegistry.from_uri(registry_uri())  # a local registry beside a remote artifact store
    report = store.uri(f"{RUN}/quality_gates/report.html")
    metadata = {"lineage": {"dag_id": "llm_finetune", "run_id": "r", "dataset_run": store.uri(DATA_RUN)}}
    registry.register(MODEL, make_model(tmp_path / "m1"), metadata=metadata, actor="trainer")
    request_signoff(registry, MODEL, 1, requested_by="trainer", evidence={"eval_report": report})
    headers = as_user(tokens, "reviewer")
    [entry] = client.get("/airloom/api/pending", headers=headers).json()
    [ev] = entry["evidence"]
    assert (ev["uri"], ev["check"]) == (report, "unchanged")
    assert ev["href"] == f"/airloom/files/{RUN}/quality_gates/report.html"
    assert client.get(ev["href"], headers=headers).text == REPORT
    reports = {e["label"]: e for e in entry["reports"]}
    assert sorted(reports) == ["Data Docs", "EDA report", "data validation"]
    assert reports["data validation"]["uri"] == store.uri(f"{DATA_RUN}/validate/validation.html")
    for label, text in (
        ("data validation", "<html>validation report</html>"),
        ("Data Docs", "<html>data docs</html>"),
        ("EDA report", "<html>eda</html>"),
    ):
        assert reports[label]["href"].startswith(f"/airloom/files/{DATA_RUN}/")
        assert client.get(reports[label]["href"], headers=headers).text == text
    page = client.get("/airloom/signoff", headers=headers).text
    assert f'href="/airloom/files/{RUN}/quality_gates/report.html"' in page
    assert "<h1>demo-model (version 1)</h1>" in page  # the card, read through the registry's store
    # the report changed in the store after the request: flagged
    store.store.put_bytes(f"{RUN}/quality_gates/report.html", b"<html>edited</html>")
    [entry] = client.get("/airloom/api/pending", headers=headers).json()
    assert entry["evidence"][0]["check"] == "changed since request"


def test_the_store_is_read_with_the_aws_default_connection(client, tokens, store, moto_endpoint, monkeypatch):
    """The API server reads ``aws_default`` from the metastore, as the operators' S3Hook does, on each
    request: a connection fixed while the API server runs applies at once."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    def set_connection(endpoint: str) -> None:
        extra = {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
        }
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id == "aws_default").delete()
            session.add(Connection(conn_id="aws_default", conn_type="aws", extra=json.dumps(extra)))

    url = f"/airloom/files/{RUN}/quality_gates/plot.png"
    try:
        monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the connection knows where the store is
        set_connection("http://127.0.0.1:9")  # nothing listens there
        r = client.get(url, headers=as_user(tokens))
        assert r.status_code == 502 and "could not read" in r.json()["detail"], r.text
        set_connection(moto_endpoint)
        r = client.get(url, headers=as_user(tokens))
        assert r.status_code == 200 and r.content == PNG
    finally:
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id == "aws_default").delete()


def test_local_reports_are_not_served_when_the_store_is_remote(client, tokens, store):
    """In production the disk of the API server is not where reports live: a stale local copy is not served."""
    stale = home() / RUN / "quality_gates" / "stale.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("<html>stale local copy</html>")
    r = client.get(f"/airloom/files/{RUN}/quality_gates/stale.html", headers=as_user(tokens))
    assert r.status_code == 404 and "stale local copy" not in r.text
