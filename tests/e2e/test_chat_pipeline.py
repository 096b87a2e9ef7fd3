"""Conversations end to end through real Airflow (`airflow dags test`), as a new user would bring them.

A multi-turn chat dataset (OpenAI ``messages`` JSONL, and a ShareGPT file beside it) → ``llm_data_quality``
with its default form (only ``source`` set) → ``llm_finetune`` on the prepared dataset (sign-off given by a
second user through the CLI, as the demo does) → registered and deployed → ``airloom serve`` answers a
chat completion, prompted with the ChatML template the model was trained with.

Throwaway AIRLOOM_HOME/AIRFLOW_HOME; the tiny base model is built and registered here, as the demo does.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
AIRLOOM = [sys.executable, "-m", "airloom.cli"]
MODEL = "airloom-demo"  # the llm_finetune form's default
SYSTEM_PROMPTS = ["Answer with the answer only.", "You are a terse assistant."]
CONVERSATIONS = 300  # OpenAI messages; ShareGPT adds SHAREGPT more
SHAREGPT = 30
# The llm_finetune form, besides the base model: a short run, evaluated on a few examples. The gate only
# asks for what a model that learnt reaches (the untrained base is at a perplexity of ~500).
FINETUNE = {
    "launcher": "python",
    "max_steps": 40,
    "batch_size": 8,
    "eval_limit": 20,
    "sweep_eval_limit": 5,
    "gates": "perplexity<=50",
}

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


def chat_conversations(n: int, seed: int) -> list[list[dict]]:
    """``n`` conversations of 1-3 user/assistant exchanges made of consecutive synthetic records (each
    exchange an instruction and its answer), every fourth one opening with a system prompt."""
    from airloom.data.synth import generate_records

    records = iter(generate_records(3 * n, seed=seed))
    conversations = []
    for i in range(n):
        turns = [{"role": "system", "content": SYSTEM_PROMPTS[i % 2]}] if i % 4 == 0 else []
        for record in [next(records) for _ in range(1 + i % 3)]:
            turns.append({"role": "user", "content": f"{record['instruction']}\n\n{record['input']}"})
            turns.append({"role": "assistant", "content": record["response"]})
        conversations.append(turns)
    return conversations


def write_chat_data(folder: Path) -> dict[str, int]:
    """OpenAI fine-tuning JSONL and a ShareGPT JSONL (other records) in one folder."""
    folder.mkdir(parents=True)
    openai_rows = [{"messages": turns} for turns in chat_conversations(CONVERSATIONS, seed=0)]
    sharegpt_role = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt_rows = [
        {"conversations": [{"from": sharegpt_role[t["role"]], "value": t["content"]} for t in turns]}
        for turns in chat_conversations(SHAREGPT, seed=1)
    ]
    for name, rows in (("openai.jsonl", openai_rows), ("sharegpt.jsonl", sharegpt_rows)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"openai": len(openai_rows), "sharegpt": len(sharegpt_rows)}


def _run(cmd: list[str], env: dict, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd[:4]} exit {proc.returncode}:\n{out[-6000:]}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Both DAGs run once, from the data to a deployed version."""
    from airloom.demo import build_and_register_base
    from airloom.governance.signoff import signoff_status
    from airloom.registry.registry import ModelRegistry

    home = tmp_path_factory.mktemp("chat")
    env = _env(home)
    setup = subprocess.Popen(  # Airflow's database and settings while the base model is built here
        f"{shlex.quote(AIRFLOW)} db migrate && {shlex.quote(sys.executable)} -m airloom.cli settings "
        "airflow_settings.yaml",
        shell=True,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    counts = write_chat_data(home / "data" / "chat")
    registry = ModelRegistry.from_uri(home / "registry")
    base = build_and_register_base(registry, log=lambda *_: None)
    assert setup.wait(timeout=300) == 0, setup.stdout.read()[-3000:]

    source = {"source": str(home / "data" / "chat")}  # the rest of the form as it comes
    _run([AIRFLOW, "dags", "test", "llm_data_quality", "-c", json.dumps(source)], env)
    latest = json.loads((home / "datasets" / "latest.json").read_text())

    log_path = home / "llm_finetune.log"
    with log_path.open("w") as log:
        finetune = subprocess.Popen(
            [
                AIRFLOW,
                "dags",
                "test",
                "llm_finetune",
                "-c",
                json.dumps({**FINETUNE, "base_model": base["ref"], "dataset": latest["ref"]}),
            ],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:  # the sign-off sensor waits (deferred) for a second person, as in the demo
        deadline = time.monotonic() + 900
        while not (MODEL in registry.list_models() and signoff_status(registry, MODEL, 1)["requested_by"]):
            assert finetune.poll() is None, "llm_finetune ended early:\n" + log_path.read_text()[-6000:]
            assert time.monotonic() < deadline, "no sign-off request"
            time.sleep(1)
        _run([*AIRLOOM, "signoff", "approve", f"{MODEL}/1", "--user", "reviewer"], env)
        rc = finetune.wait(timeout=600)
    finally:
        if finetune.poll() is None:
            finetune.kill()
    assert rc == 0, log_path.read_text()[-6000:]
    return {
        "home": home,
        "env": env,
        "counts": counts,
        "dataset": Path(latest["path"]),
        # the data-quality run that prepared it (settings.run_dir under this home)
        "dq_run": home / "runs" / "llm_data_quality" / latest["run_id"].replace(":", "_").replace("+", "_"),
        "registry": registry,
    }


def test_data_quality_reads_both_formats_and_prepares_them_with_chatml(pipeline):
    """The default form: template "auto" picks the tokenizer's chat template, ChatML as the tiny base has none."""
    from airloom.data.splits import read_split
    from airloom.prompts import load_template

    dataset = pipeline["dataset"]
    validation = json.loads((pipeline["dq_run"] / "validate" / "validation.json").read_text())  # same run
    total = sum(pipeline["counts"].values())
    assert (validation["rows_read"], validation["accepted"], validation["quarantined"]) == (total, total, 0)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["counts"]["input"] == total == manifest["counts"]["output"]
    template = manifest["template"]
    assert (template["name"], template["kind"], template["requested"]) == ("chatml", "builtin", "auto")
    assert template["sha256"] == load_template("chatml").sha256
    assert manifest["tokenizer"]["ref"] == "registry:airloom-tiny-base/1"
    rows = read_split(dataset / "train.parquet")
    assert len(rows) == manifest["counts"]["train"] and all(isinstance(r["messages"], list) for r in rows)
    # A ShareGPT row reads as the same turns as an OpenAI one: roles mapped, its system turn kept.
    roles = {tuple(t["role"] for t in r["messages"]) for r in rows}
    assert ("system", "user", "assistant") in roles and ("user", "assistant") * 3 in roles
    prompt = rows[0]["prompt"]  # the turns before the last answer, ChatML, ending where the answer starts
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")


def test_finetune_trains_every_conversation_registers_and_deploys(pipeline):
    from airloom.prompts import BUILTIN_SOURCES

    reg, manifest = pipeline["registry"], json.loads((pipeline["dataset"] / "manifest.json").read_text())
    assert reg.get_alias(MODEL, "production") == 1
    mv = reg.get(MODEL, 1)
    # The form's dataset left empty: the newest prepared dataset, the one llm_data_quality just wrote.
    lineage = mv.metadata["lineage"]
    assert (lineage["dataset"], lineage["dataset_hash"]) == (
        str(pipeline["dataset"]),
        manifest["dataset_hash"],
    )
    training = mv.metadata["training"]
    conversations = training["conversations"]
    assert conversations["template"] == {k: manifest["template"][k] for k in ("name", "kind", "sha256")}
    assert conversations["truncation"] == "keep_last_turns"  # the form's default
    assert (
        conversations["kept"] + conversations["truncated"] == manifest["counts"]["train"] == training["rows"]
    )
    assert conversations["too_long"] == conversations["no_labels"] == 0
    assert conversations["truncated"] > 0  # three exchanges do not fit max_length: the latest ones trained
    assert training["steps"] == FINETUNE["max_steps"]
    # Learnt: the same test examples, the base model (nothing was in production) as the baseline.
    cand, base = mv.metadata["metrics"], mv.metadata["baseline"]["metrics"]
    assert cand["perplexity"] < base["perplexity"] / 10, (cand, base)
    # The registered folder carries the template it trained with as its chat template.
    from transformers import AutoTokenizer

    folder = reg.download(MODEL, 1, pipeline["home"] / "v1")
    assert AutoTokenizer.from_pretrained(folder).chat_template == BUILTIN_SOURCES["chatml"]


def test_served_chat_completion_is_prompted_with_the_trained_template(pipeline):
    """`airloom serve` on the registry: a test conversation sent by the official openai client, its last
    answer left out, is prompted exactly as preparation rendered it for training and evaluation (ChatML)."""
    import httpx
    from openai import OpenAI

    from airloom.data.splits import read_split
    from airloom.prompts import load_template

    home = pipeline["home"]
    test_rows = read_split(pipeline["dataset"] / "test.parquet")
    row = next(r for r in test_rows if r["messages"][0]["role"] == "system" and len(r["messages"]) > 3)
    messages = row["messages"][:-1]  # system, user, assistant, ..., user
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [*AIRLOOM, "serve", "--model", f"{MODEL}@production", "--port", str(port), "--torch-threads", "1"],
        env={**pipeline["env"], "AIRLOOM_API_KEYS": "sk-chat-test"},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "airloom serve did not come up"
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = OpenAI(base_url=url + "/v1", api_key="sk-chat-test", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=16, temperature=0
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    answer = reply.choices[0].message.content
    assert reply.model == f"{MODEL}/1" and answer.strip(), reply
    (logged,) = [
        json.loads(line)
        for part in sorted((home / "data" / "traffic").glob("ds=*/*.jsonl"))
        for line in part.read_text().splitlines()
        if json.loads(line)["response_id"] == reply.id
    ]
    assert logged["messages"] == messages and logged["response"] == answer
    assert logged["prompt"] == row["prompt"]
    assert row["prompt"] == load_template("chatml").render_turns(messages, add_generation_prompt=True)
