"""``airloom signoff approve|reject NAME VERSION --api-url`` against Airflow's real API app, served over HTTP
on loopback by uvicorn in this process, with the project's plugin and SimpleAuthManager users.

The CLI signs in (``POST /auth/token``) and posts to the sign-off page's own endpoint, so the server, not
the command line, says who decided; production mode refuses the local CLI's claimed names; the two-person
rule counts distinct people; the sign-off card compares candidate and production on the same examples and
confirms a decision afterwards.
"""

from __future__ import annotations

import html
import io
import sys
import urllib.request

import pytest

from airloom.cli import main
from airloom.governance.signoff import SignOffPolicy, request_signoff, signoff_status
from airloom.governance.signoff_client import SignOffClient
from airloom.registry.registry import ModelRegistry
from airloom.settings import registry_uri
from tests.airflow_api import PASSWORDS, api_app
from tests.serving_helpers import uvicorn_thread

MODEL = "demo-model"
RUN_ID = "asset_triggered__2026-03-01T00:00:00+00:00"


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    """Airflow's API app (plugins folder = the project's) served by uvicorn on a free loopback port."""
    with api_app(tmp_path_factory) as app, uvicorn_thread(app, name="airflow-api") as url:
        yield url


@pytest.fixture
def pending(tmp_path, make_model) -> ModelRegistry:
    """Version 1 of MODEL, trained by an asset-triggered run that ``trainer`` started upstream, with the
    quality gates' comparison against production (paired, 30 examples) stored in the version."""
    from airloom.evaluation.report import write_report

    ids = range(30)
    cand = [{"id": i, "exact_match": float(i % 3 != 0), "f1": 0.5 + (i % 7) / 10} for i in ids]
    base = [{"id": i, "exact_match": float(i % 2 == 0), "f1": 0.45 + (i % 5) / 10} for i in ids]

    def metrics(model, rows):
        agg = {m: sum(r[m] for r in rows) / len(rows) for m in ("exact_match", "f1")}
        return {"model": model, "aggregate": agg, "per_example": rows}

    write_report(
        tmp_path / "gates", metrics("candidate", cand), metrics(f"registry:{MODEL}/0", base), n_resamples=200
    )
    registry = ModelRegistry.from_uri(registry_uri())
    registry.register(
        MODEL,
        make_model(tmp_path / "m1"),
        metadata={
            "metrics": metrics("candidate", cand)["aggregate"],
            "lineage": {"dag_id": "llm_finetune", "run_id": RUN_ID, "triggered_by": "trainer"},
        },
        actor="trainer",
        attachments={"evaluation/comparison.json": str(tmp_path / "gates" / "comparison.json")},
    )
    request_signoff(registry, MODEL, 1, requested_by="trainer", evidence={}, via="task")
    return registry


def cli(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(["signoff", *args])
    out, err = capsys.readouterr()
    # The server runs in this process: leave its log lines out of what the command printed.
    out = "\n".join(
        line for line in out.splitlines() if "[info     ]" not in line and "[warning  ]" not in line
    )
    return rc, out, err


def page(api_url: str, token: str, query: str = "") -> str:
    req = urllib.request.Request(
        f"{api_url}/airloom/signoff{query}",
        headers={"Authorization": f"Bearer {token}", "Accept": "text/html"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return html.unescape(
            resp.read().decode()
        )  # sentences read as a person reads them ('x', not &#39;x&#39;)


def test_cli_decides_as_the_user_airflow_signs_in(api_url, pending, capsys, monkeypatch):
    sign_in = ["--api-url", api_url, "--username", "reviewer", "--password-stdin"]
    rc, out, err = cli(
        capsys,
        monkeypatch,
        "approve",
        MODEL,
        "1",
        *sign_in,
        "--comment",
        "eval checked",
        stdin="reviewer-pw\n",
    )
    assert rc == 0, err
    assert out.strip() == (
        f"Approved {MODEL} v1 as reviewer — 1 of 1 approvals; the version is approved and may be deployed"
    )
    status = signoff_status(pending, MODEL, 1)
    assert [(a["user"], a["via"], a["comment"]) for a in status["approvals"]] == [
        ("reviewer", "api", "eval checked")
    ]
    audit = pending.history(MODEL)[-1]
    assert (audit["action"], audit["actor"], audit["via"]) == ("signoff_decision", "reviewer", "api")
    # Counted under the production policy too: the API is an authenticated path.
    assert signoff_status(pending, MODEL, 1, SignOffPolicy(authenticated_only=True))["state"] == "approved"


def test_the_api_path_cannot_claim_a_name(api_url, pending, capsys, monkeypatch):
    rc, _, err = cli(capsys, monkeypatch, "approve", f"{MODEL}/1", "--api-url", api_url, "--user", "reviewer")
    assert rc == 2 and "the token says who you are" in err
    rc, _, err = cli(
        capsys,
        monkeypatch,
        "approve",
        MODEL,
        "1",
        "--api-url",
        api_url,
        "--username",
        "reviewer",
        "--password-stdin",
        stdin="wrong\n",
    )
    assert rc == 2 and "signing in as 'reviewer' failed (HTTP 401" in err
    rc, _, err = cli(capsys, monkeypatch, "approve", MODEL, "1", "--api-url", api_url)
    assert rc == 2 and "--api-url needs credentials" in err
    # The trainer signs in as themself: the server knows they requested it (exit 1, the rule refused).
    token = SignOffClient(api_url).login("trainer", "trainer-pw")
    monkeypatch.setenv("AIRLOOM_API_TOKEN", token)
    rc, _, err = cli(capsys, monkeypatch, "approve", MODEL, "1", "--api-url", api_url)
    assert rc == 1 and "'trainer' requested the sign-off of demo-model/1 and may not approve it" in err
    status = signoff_status(pending, MODEL, 1)
    assert (status["state"], status["approvals"], status["not_counted"]) == ("pending", [], [])


def test_production_mode_refuses_the_local_cli_and_takes_the_api(api_url, pending, capsys, monkeypatch):
    monkeypatch.setenv(
        "AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY", "1"
    )  # as docker compose and production tests set it
    for args in (
        ("approve", f"{MODEL}/1", "--user", "reviewer"),
        ("request", MODEL, "1", "--user", "reviewer"),
    ):
        rc, out, err = cli(capsys, monkeypatch, *args)
        assert rc == 2, (args, out, err)
        assert "counts only authenticated sign-off decisions" in err and "--api-url URL" in err
    records = pending.read_records(f"{pending.model_prefix(MODEL)}signoffs/1/")
    assert [r["kind"] for r in records] == ["request"]  # nothing recorded

    monkeypatch.setenv("AIRLOOM_API_URL", api_url)
    monkeypatch.setenv("AIRLOOM_API_TOKEN", SignOffClient(api_url).login("reviewer", "reviewer-pw"))
    rc, out, err = cli(capsys, monkeypatch, "approve", MODEL, "1", "--comment", "ok")
    assert rc == 0, err
    assert signoff_status(pending, MODEL, 1, SignOffPolicy.from_environment())["state"] == "approved"


def test_two_person_rule_through_the_api(api_url, pending, capsys, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_VAR_AIRLOOM_SIGNOFF_MIN_APPROVALS", "2"
    )  # the Variable, as the server reads it
    tokens = {u: SignOffClient(api_url).login(u, PASSWORDS[u]) for u in ("reviewer", "admin", "trainer")}

    def approve(user):
        monkeypatch.setenv("AIRLOOM_API_TOKEN", tokens[user])
        return cli(capsys, monkeypatch, "approve", MODEL, "1", "--api-url", api_url)

    rc, out, err = approve("reviewer")
    assert rc == 0, err
    assert out.strip() == (
        f"Approved {MODEL} v1 as reviewer — 1 of 2 approvals; "
        "waiting for 1 more approval from anyone but reviewer, trainer"
    )
    rc, _, err = approve("reviewer")  # the same person twice does not count
    assert rc == 1 and "'reviewer' already approved demo-model/1 (1 of 2 approvals)" in err
    rc, _, err = approve("trainer")  # nor does the requester
    assert rc == 1 and "separation of duties" in err
    two = SignOffPolicy(required_approvals=2)
    assert signoff_status(pending, MODEL, 1, two)["state"] == "pending"
    rc, out, err = approve("admin")
    assert rc == 0, err
    assert "as admin — 2 of 2 approvals; the version is approved" in out
    assert [a["user"] for a in signoff_status(pending, MODEL, 1, two)["approvals"]] == ["reviewer", "admin"]


def test_card_compares_on_the_same_examples_says_why_not_and_confirms(api_url, pending, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_AIRLOOM_SIGNOFF_APPROVERS", "reviewer")
    client = SignOffClient(api_url)
    tokens = {u: client.login(u, PASSWORDS[u]) for u in ("reviewer", "admin", "trainer")}
    card = page(api_url, tokens["reviewer"])
    assert "Candidate vs. production on the same examples" in card
    assert f"candidate vs. registry:{MODEL}/0: 30 test examples, change with its 95% paired bootstrap" in card
    # 20/30 vs 15/30 exact matches, rounded to 3 decimals; the change with its interval.
    assert (
        '<td>exact_match</td><td class="num">0.667</td><td class="num">0.500</td><td class="num">+0.167</td>'
        in card
    )
    table = card.split('<table class="comparison">', 1)[1].split("</table>", 1)[0]
    assert "0.6666" not in table
    exact = table.split("<td>exact_match</td>", 1)[1].split("</tr>", 1)[0]
    assert '<td class="num">30</td>' in exact and ("[+" in exact or "[-" in exact)
    assert "Sign-off waiting for 1 more approval from one of reviewer." in card

    # Why the others may not approve, in a sentence each.
    assert (
        "'admin' may not sign off demo-model/1: the Variable airloom_signoff_approvers allows only reviewer"
        in (page(api_url, tokens["admin"]))
    )
    monkeypatch.delenv("AIRFLOW_VAR_AIRLOOM_SIGNOFF_APPROVERS")
    assert "'trainer' requested the sign-off of demo-model/1 and may not approve it" in page(
        api_url, tokens["trainer"]
    )

    # After deciding, the page confirms; the confirmation is read back from the registry, for its author only.
    answer = client.decide(tokens["reviewer"], MODEL, 1, "approve", "card read")
    assert answer["message"].startswith(f"Approved {MODEL} v1 as reviewer — 1 of 1 approvals")
    decided = f"?decided={MODEL}/1/{answer['record']['id']}"
    assert (
        '<div class="card flash" role="status">Approved demo-model v1 as reviewer — 1 of 1 approvals'
        in page(api_url, tokens["reviewer"], decided)
    )
    assert 'class="card flash"' not in page(api_url, tokens["admin"], decided)
    assert 'class="card flash"' not in page(api_url, tokens["reviewer"], f"?decided={MODEL}/1/forged-id")


def test_numbers_on_the_card_are_rounded_for_reading():
    from airloom.reports import rounded

    values = (0.66666, 0.0456, 12.3456, 1234.7, 3, None, float("nan"))
    assert [rounded(v) for v in values] == ["0.667", "0.046", "12.3", "1,235", "3", "–", "–"]
    assert [rounded(v, signed=True) for v in (0.1234, -0.0456, -0.0004)] == ["+0.123", "-0.046", "0.000"]
