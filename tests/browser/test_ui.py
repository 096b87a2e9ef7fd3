"""The Airflow UI in a real browser: what a trainer and a reviewer do, click by click.

A trainer logs in, triggers ``llm_data_quality`` through its params form with a non-default split
seed, waits for the run to succeed and opens the EDA report through the ``eda_report`` task's extra
link (served by Airloom's plugin). A reviewer opens Browse → Model sign-off and approves a version
the trainer registered and sent for sign-off from the CLI; the registry records the approval under
the reviewer's Airflow identity. A day of ``llm_eval_backfill`` (that version pinned, a few records)
runs through the scheduler, and its tasks' extra links open the day's metrics page (with the trend
chart) and the trend chart. A day of served traffic (written as ``airloom serve`` logs it) runs through
``llm_feedback_monitoring``, whose ``drift_and_feedback`` task links to the day's monitoring dashboard.
``llm_model_rollback`` points ``production`` at the approved version and its canary links to the
answers; a 20-step ``llm_finetune`` trial (stopped after ``train``) links to its loss curve. A
screenshot of every step lands in the ``screens`` tmp folder.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from airloom.settings import EMBEDDED_PASSWORDS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
        reason="no chromium on PATH: run `make browser` (Debian package)",
    ),
    pytest.mark.timeout(900),
]

DAG = "llm_data_quality"
BACKFILL = "llm_eval_backfill"
MONITORING = "llm_feedback_monitoring"
ROLLBACK = "llm_model_rollback"
FINETUNE = "llm_finetune"
DAY = "2026-11-10"  # long before any scheduled run of the test's "today": that one finds no partition
MODEL = "airloom-demo"
SEED = 7  # the form's default is 0
UI_TIMEOUT_MS = 60_000  # React pages on two busy cores


@pytest.fixture(scope="module")
def stack(airflow_ui, tmp_path_factory):
    """Raw data for the DAG and a version awaiting sign-off, made while Airflow boots; then wait for it."""
    from airloom.demo import write_demo_data
    from airloom.training.base import BaseModelSpec, build_base_model

    af = airflow_ui
    # Where the DAG's `source` param points by default ($AIRLOOM_HOME/data/raw), as `airloom demo` writes it.
    write_demo_data(af.home / "data", rows=300, history_days=0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    build_base_model(
        folder,
        BaseModelSpec(hidden_size=48, num_layers=1, num_heads=2, intermediate_size=96, pretrain_lines=2000),
        log=lambda m: None,
    )
    cli = [sys.executable, "-m", "airloom.cli", "--registry", str(af.home / "registry")]
    af.run("register", [*cli, "registry", "register", MODEL, str(folder), "--user", "trainer"])
    af.run(
        "signoff-request",
        [
            *cli,
            "signoff",
            "request",
            f"{MODEL}/1",
            "--user",
            "trainer",
            "--comment",
            "tiny model for the browser test",
        ],
    )
    af.wait_healthy(timeout=300)
    af.wait_dag(DAG, timeout=300)
    return af


@pytest.fixture(autouse=True)
def _patient_expect():
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)  # expect() waits 5 s by default, the page's timeout aside


def _login(browser, af, user: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    page.goto(af.url + "/")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(EMBEDDED_PASSWORDS[user])
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("link", name="Dags").first.wait_for()  # the app's nav: signed in
    return context, page


def _wait_run(af, run_id: str, timeout: float, dag_id: str = DAG) -> dict:
    token = af.token("admin")
    path = f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
    deadline = time.monotonic() + timeout
    run = {"state": "unknown"}
    while time.monotonic() < deadline:
        af.check_running()
        run = af.request("GET", path, token=token)
        if run["state"] in ("success", "failed"):
            return run
        time.sleep(0.5)
    pytest.fail(f"{dag_id} run {run_id} still {run['state']} after {timeout:.0f}s; logs in {af.logs}")


def test_trainer_triggers_from_the_params_form_and_opens_the_eda_report(stack, browser, shots):
    from playwright.sync_api import expect

    af = stack
    context, page = _login(browser, af, "trainer")
    try:
        expect(page.get_by_text("Welcome")).to_be_visible()
        shots(page, "01_trainer_logged_in")

        page.goto(f"{af.url}/dags/{DAG}")
        page.get_by_role("button", name="Trigger Dag").click()
        form = page.get_by_role("dialog")
        expect(form.get_by_text(f"Trigger Dag - {DAG}")).to_be_visible()
        seed = form.get_by_label("Split seed")
        seed.fill(str(SEED))
        seed.scroll_into_view_if_needed()
        shots(page, "02_params_form_seed_7")
        trigger = form.get_by_role("button", name="Trigger", exact=True)
        if not trigger.is_enabled():
            empty = [
                el.get_attribute("name")
                for el in form.locator("input[required]").all()
                if not el.input_value()
            ]
            shots(page, "02_params_form_blocked")
            pytest.fail(
                f"the params form of {DAG} keeps Trigger disabled with its defaults; required but "
                f"empty: {empty} (a Param whose type excludes null must not default to empty)"
            )
        before = {r["dag_run_id"] for r in af.request("GET", f"/api/v2/dags/{DAG}/dagRuns")["dag_runs"]}
        trigger.click()

        deadline = time.monotonic() + 60
        while not (
            new := [
                r
                for r in af.request("GET", f"/api/v2/dags/{DAG}/dagRuns")["dag_runs"]
                if r["dag_run_id"] not in before
            ]
        ):
            assert time.monotonic() < deadline, "the form's Trigger created no DAG run within 60 s"
            time.sleep(0.25)
        run_id = new[0]["dag_run_id"]
        assert new[0]["conf"]["seed"] == SEED, new[0]["conf"]
        assert new[0]["triggering_user_name"] == "trainer"

        run = _wait_run(af, run_id, timeout=420)
        states = {
            ti["task_id"]: ti["state"]
            for ti in af.request(
                "GET", f"/api/v2/dags/{DAG}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
            )["task_instances"]
        }
        assert run["state"] == "success", f"run {run_id}: {states}; scheduler log {af.logs / 'scheduler.log'}"
        run_url = f"{af.url}/dags/{DAG}/runs/{urllib.parse.quote(run_id, safe='')}"
        page.goto(run_url)
        expect(page.get_by_text("Triggering User")).to_be_visible()
        expect(page.get_by_text("Success").first).to_be_visible()
        shots(page, "03_run_succeeded")

        # What the seed changed: the split manifest of this run records it.
        run_dir = af.home / "runs" / DAG / run_id.replace(":", "_").replace("+", "_")  # = settings.run_dir
        latest = json.loads((af.home / "datasets" / "latest.json").read_text())
        assert latest["run_id"] == run_id
        assert json.loads((Path(latest["path"]) / "manifest.json").read_text())["seed"] == SEED

        page.goto(f"{run_url}/tasks/eda_report/details")
        link = page.get_by_role("link", name="EDA report", exact=True)
        expect(link).to_be_visible()
        shots(page, "04_eda_task_extra_link")
        link.click()
        page.wait_for_url("**/airloom/files/runs/llm_data_quality/**/eda_report/report.html")
        expect(page.get_by_role("heading", name="Instruction data profile")).to_be_visible()
        # the report profiles the rows validation read (the quarantined ones too): its scan of the source
        validation = json.loads((run_dir / "validate" / "validation.json").read_text())
        quarantine = (run_dir / "validate" / "quarantine.jsonl").read_text().splitlines()
        unreadable = sum(1 for line in quarantine if "raw" in json.loads(line))  # not records: not profiled
        read = validation["rows_read"] - unreadable
        assert page.title() == f"Data profile: {read} rows" and read > validation["accepted"]
        shots(page, "05_eda_report")
    finally:
        context.close()


def test_reviewer_approves_on_the_signoff_page(stack, browser, shots):
    from playwright.sync_api import expect

    from airloom.governance.signoff import signoff_status
    from airloom.registry.registry import ModelRegistry

    af = stack
    # The trainer who asked may see the request but gets no Approve button (approvers Variable).
    context, page = _login(browser, af, "trainer")
    try:
        page.goto(f"{af.url}/airloom/signoff")
        expect(page.get_by_text(f"{MODEL} / 1")).to_be_visible()
        expect(page.get_by_text("allows only reviewer")).to_be_visible()
        assert page.get_by_role("button", name="Approve").count() == 0
        shots(page, "06_signoff_as_trainer_no_approve")
    finally:
        context.close()

    context, page = _login(browser, af, "reviewer")
    try:
        page.get_by_role("button", name="Browse").click()
        page.get_by_role("menuitem", name="Model sign-off").click()
        expect(page).to_have_url(
            re.compile(r"/plugin/airloom-signoff")
        )  # the plugin's page, in Airflow's frame
        frame = page.frame_locator("iframe").first
        card = frame.locator("section.card", has_text=f"{MODEL} / 1")
        expect(card.get_by_text("pending", exact=True)).to_be_visible()
        expect(frame.get_by_text("Signed in as reviewer")).to_be_visible()
        card.get_by_role("textbox").fill("browser test: card and metrics reviewed")
        shots(page, "07_signoff_pending_as_reviewer")
        card.get_by_role("button", name="Approve").click()
        # The page reloads after the decision, confirms it and lists open rounds only; decided ones on request.
        expect(frame.locator(".flash")).to_have_text(
            f"Approved {MODEL} v1 as reviewer — 1 of 1 approvals; the version is approved and may be deployed"
        )
        expect(frame.get_by_text("Nothing is awaiting sign-off.")).to_be_visible()
        shots(page, "08a_signoff_confirmation")
        page.goto(f"{af.url}/airloom/signoff?include_decided=true")
        decided = page.locator("section.card", has_text=f"{MODEL} / 1")
        expect(decided.get_by_text("approved", exact=True)).to_be_visible()
        expect(decided.get_by_text("approved by reviewer")).to_be_visible()
        shots(page, "08_signoff_approved_by_reviewer")
    finally:
        context.close()

    status = signoff_status(ModelRegistry.from_uri(af.home / "registry"), MODEL, 1)
    assert status["state"] == "approved"
    assert [(a["user"], a["comment"]) for a in status["approvals"]] == [
        ("reviewer", "browser test: card and metrics reviewed")
    ]
    assert status["requested_by"] == "trainer"


def test_backfill_day_links_open_its_metrics_page_and_trend_chart(stack, browser, shots):
    from datetime import date

    from playwright.sync_api import expect

    from airloom.data.synth import write_history

    af = stack
    write_history(af.home / "data" / "history", [date.fromisoformat(DAY)], per_day=6)
    af.request("PATCH", f"/api/v2/dags/{BACKFILL}", {"is_paused": False})
    run = af.request(
        "POST",
        f"/api/v2/dags/{BACKFILL}/dagRuns",
        {
            "dag_run_id": f"browser_{DAY}",
            "logical_date": f"{DAY}T00:00:00Z",  # the day the run evaluates
            "conf": {"model_name": MODEL, "version": 1, "limit": 4},  # pinned: no production alias needed
        },
    )
    run_id = run["dag_run_id"]
    run = _wait_run(af, run_id, timeout=420, dag_id=BACKFILL)
    assert run["state"] == "success", f"run {run_id}; scheduler log {af.logs / 'scheduler.log'}"

    context, page = _login(browser, af, "trainer")
    try:
        run_url = f"{af.url}/dags/{BACKFILL}/runs/{urllib.parse.quote(run_id, safe='')}"
        page.goto(f"{run_url}/tasks/evaluate_partition/details")
        link = page.get_by_role("link", name="Day metrics", exact=True)
        expect(link).to_be_visible()
        shots(page, "09_backfill_task_extra_link")
        link.click()
        page.wait_for_url(f"**/airloom/evaluation-day/evaluations/{MODEL}/ds={DAY}/**metrics.json")
        expect(page.get_by_role("heading", name=f"Evaluation of {DAY}")).to_be_visible()
        expect(page.get_by_text(f"registry:{MODEL}/1").first).to_be_visible()
        chart = page.get_by_role("img", name="trend of the daily evaluation")
        expect(chart).to_be_visible()
        assert chart.evaluate("img => img.naturalWidth") > 100  # the inline PNG decoded
        shots(page, "10_backfill_day_page")

        page.goto(f"{run_url}/tasks/trend/details")
        link = page.get_by_role("link", name="Trend chart", exact=True)
        expect(link).to_be_visible()
        link.click()
        page.wait_for_url(f"**/airloom/files/evaluations/{MODEL}/**trend.png")
        assert page.locator("img").evaluate("img => img.naturalWidth") > 100
        shots(page, "11_backfill_trend_chart")
    finally:
        context.close()


def test_monitoring_day_links_open_its_dashboard(stack, browser, shots):
    from datetime import datetime

    from playwright.sync_api import expect

    from airloom.data.synth import generate_records, write_jsonl
    from airloom.prompts import render_prompt
    from airloom.serving.logs import FeedbackLog, TrafficLog

    af = stack
    day = "2026-11-11"
    served = datetime.fromisoformat(f"{day}T12:00:00+00:00")
    records = [
        {
            "response_id": f"cmpl-browser-{i}",
            "choice": 0,
            "endpoint": "completions",
            "created": served.isoformat(),
            "model": f"{MODEL}/1",
            "prompt": render_prompt(r["instruction"], r["input"]),
            "response": r["response"],
            "finish_reason": "stop",
            "latency_ms": 40.0 + 5 * i,
            "prompt_tokens": 20 + i,
            "completion_tokens": 4 + i % 3,
        }
        for i, r in enumerate(generate_records(12, seed=11))
    ]
    # The library's own writers, into the folders the DAG reads by default ($AIRLOOM_HOME/data/...).
    logged = TrafficLog(af.home / "data" / "traffic").write(records, served)
    feedback = FeedbackLog(af.home / "data" / "feedback")
    for rec, rating in zip(logged, (1, 1, 1, -1), strict=False):  # 25% down: under max_negative_rate
        feedback.write(
            {"id": f"fb-{rec['response_id']}", "response_id": rec["response_id"], "rating": rating}, served
        )
    # Its own training reference, so the test does not depend on the first test's prepared dataset.
    reference = write_jsonl(
        [{**r, "prompt": render_prompt(r["instruction"], r["input"])} for r in generate_records(40, seed=3)],
        af.home / "browser_reference" / "train.jsonl",
    )

    af.request("PATCH", f"/api/v2/dags/{MONITORING}", {"is_paused": False})
    run = af.request(
        "POST",
        f"/api/v2/dags/{MONITORING}/dagRuns",
        {
            "dag_run_id": f"browser_{day}",
            "logical_date": f"{day}T00:00:00Z",  # the day the run judges
            "conf": {"reference_file": str(reference)},
        },
    )
    run_id = run["dag_run_id"]
    run = _wait_run(af, run_id, timeout=300, dag_id=MONITORING)
    assert run["state"] == "success", f"run {run_id}; scheduler log {af.logs / 'scheduler.log'}"

    context, page = _login(browser, af, "trainer")
    try:
        run_url = f"{af.url}/dags/{MONITORING}/runs/{urllib.parse.quote(run_id, safe='')}"
        page.goto(f"{run_url}/tasks/drift_and_feedback/details")
        link = page.get_by_role("link", name="Monitoring dashboard", exact=True)
        expect(link).to_be_visible()
        shots(page, "12_monitoring_task_extra_link")
        link.click()
        page.wait_for_url(f"**/airloom/files/runs/{MONITORING}/**/dashboard.html")
        expect(page.get_by_role("heading", name=f"Serving monitor, ds={day}")).to_be_visible()
        expect(page.get_by_role("heading", name="Input drift vs. training data")).to_be_visible()
        # the day's row: 12 requests, 4 feedback posts, 3 of them up
        expect(page.locator("tr", has_text=day).locator("td")).to_have_text(
            [day, "12", "4", "0.75", re.compile(r"\d"), re.compile(r"\d"), "0.0"]
        )
        latency = page.get_by_role("img", name="Latency (ms)")
        assert latency.evaluate("img => img.naturalWidth") > 100  # the inline PNG decoded
        shots(page, "13_monitoring_dashboard")
    finally:
        context.close()


def test_rollback_canary_link_opens_its_answers(stack, browser, shots):
    from playwright.sync_api import expect

    from airloom.governance.signoff import signoff_status
    from airloom.registry.registry import ModelRegistry

    af = stack
    if signoff_status(ModelRegistry.from_uri(af.home / "registry"), MODEL, 1)["state"] != "approved":
        # run on its own, without the sign-off test: approve from the CLI, as the demo does
        af.run(
            "signoff-approve",
            [
                sys.executable,
                "-m",
                "airloom.cli",
                "--registry",
                str(af.home / "registry"),
                "signoff",
                "approve",
                f"{MODEL}/1",
                "--user",
                "reviewer",
            ],
        )
    # Nothing is at production yet: the rollback DAG points it at approved version 1, and its canary answers.
    af.request("PATCH", f"/api/v2/dags/{ROLLBACK}", {"is_paused": False})
    run = af.request(
        "POST",
        f"/api/v2/dags/{ROLLBACK}/dagRuns",
        {
            "dag_run_id": "browser_rollback",
            "logical_date": None,
            "conf": {"model_name": MODEL, "to_version": 1, "reason": "browser test"},
        },
    )
    run_id = run["dag_run_id"]
    _wait_run(af, run_id, timeout=300, dag_id=ROLLBACK)
    states = {
        ti["task_id"]: ti["state"]
        for ti in af.request("GET", f"/api/v2/dags/{ROLLBACK}/dagRuns/{run_id}/taskInstances")[
            "task_instances"
        ]
    }
    # The stack's barely pre-trained model may answer nothing (the canary then fails): its link must be
    # there either way, to show what the model said.
    assert states["rollback"] == "success" and states["canary"] in ("success", "failed"), states
    verdict = "answered" if states["canary"] == "success" else "empty output for every prompt"

    context, page = _login(browser, af, "trainer")
    try:
        run_url = f"{af.url}/dags/{ROLLBACK}/runs/{urllib.parse.quote(run_id, safe='')}"
        page.goto(f"{run_url}/tasks/canary/details")
        link = page.get_by_role("link", name="Canary answers", exact=True)
        expect(link).to_be_visible()
        shots(page, "14_canary_task_extra_link")
        link.click()
        page.wait_for_url(f"**/airloom/files/runs/{ROLLBACK}/**/canary.html")
        expect(page.get_by_role("heading", name="Canary answers")).to_be_visible()
        expect(page.get_by_text(f"{MODEL}/1").first).to_be_visible()
        expect(page.get_by_text(verdict, exact=True)).to_be_visible()
        expect(page.locator("tr").filter(has=page.locator("td.num"))).to_have_count(3)  # one per prompt
        shots(page, "15_canary_answers")
    finally:
        context.close()


def test_finetune_train_link_opens_its_loss_curve(stack, browser, shots):
    from playwright.sync_api import expect

    from airloom.data.synth import generate_records, write_jsonl

    af = stack
    # A small clean dataset of its own (the demo's raw data carries bad rows for validation to find).
    raw = write_jsonl(generate_records(120, seed=5), af.home / "browser_finetune" / "raw.jsonl")
    dataset = af.home / "browser_finetune" / "prepared"
    af.run(
        "prepare",
        [
            sys.executable,
            "-m",
            "airloom.cli",
            "prepare",
            str(raw),
            "--out",
            str(dataset),
        ],
    )
    conf = {
        "model_name": MODEL,
        "base_model": f"registry:{MODEL}/1",
        "dataset": str(dataset),
        "launcher": "python",
        "max_steps": 20,  # the recipe logs every 10th step: two points
        "batch_size": 4,
    }
    af.request("PATCH", f"/api/v2/dags/{FINETUNE}", {"is_paused": False})
    run_id = af.request(
        "POST",
        f"/api/v2/dags/{FINETUNE}/dagRuns",
        {"dag_run_id": "browser_finetune", "logical_date": None, "conf": conf},
    )["dag_run_id"]
    token = af.token("admin")
    path = f"/api/v2/dags/{FINETUNE}/dagRuns/{run_id}/taskInstances"
    deadline = time.monotonic() + 300
    state = None  # train is mapped: index -1 until plan_trials has run (upstream_failed if it failed), then 0
    while state not in ("success", "failed", "upstream_failed"):
        assert time.monotonic() < deadline, f"train still {state}; logs in {af.logs}"
        af.check_running()
        time.sleep(0.5)
        tis = af.request("GET", path, token=token)["task_instances"]
        state = next((t["state"] for t in tis if t["task_id"] == "train" and t["map_index"] in (-1, 0)), None)
    # Evaluation, gates and sign-off are not this test's business: stop the run here.
    af.request("PATCH", f"/api/v2/dags/{FINETUNE}/dagRuns/{run_id}", {"state": "failed"}, token=token)
    assert state == "success", f"train failed; logs under {af.root / 'airflow' / 'logs'}"

    context, page = _login(browser, af, "trainer")
    try:
        run_url = f"{af.url}/dags/{FINETUNE}/runs/{urllib.parse.quote(run_id, safe='')}"
        page.goto(f"{run_url}/tasks/train/mapped/0/details")
        link = page.get_by_role("link", name="Loss curve", exact=True)
        expect(link).to_be_visible()
        shots(page, "16_train_task_extra_link")
        link.click()
        page.wait_for_url(f"**/airloom/files/runs/{FINETUNE}/**loss_curve.png")
        assert page.locator("img").evaluate("img => img.naturalWidth") > 100
        shots(page, "17_loss_curve")
    finally:
        context.close()
