"""What an operator reads in a task log: no Great Expectations chatter, no progress bars (Airflow logs a
task's stderr at ERROR), and why a task skipped at INFO outside the collapsed "Post Execute" group."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from airflow.sdk.exceptions import AirflowSkipException

from airloom.airflow.operators._base import PROGRESS_BAR_SWITCHES, AirloomBaseOperator
from airloom.airflow.operators.monitoring import PublishFeedbackDatasetOperator, RequestRetrainingOperator
from airloom.settings import source_checkout

# A validation as the validate task runs it (GX in a forked child, imported there for the first time),
# every log record at INFO and above to stderr; then a warning from a GX logger, which must still show.
VALIDATE_AND_WARN = textwrap.dedent(
    """
    import json, logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    from airloom.data.load import load_records
    from airloom.data.validate import validate_stream
    out = Path(sys.argv[1])
    src = out / "rows.jsonl"
    src.write_text("".join(
        json.dumps({"instruction": f"Say the number {i}", "input": "", "response": f"number {i}"}) + "\\n"
        for i in range(30)
    ))
    assert validate_stream(lambda: [load_records(src)], out / "out", source=str(src)).success
    logging.getLogger("great_expectations.checkpoint").warning("a real GX warning")
    """
)


def test_validation_logs_no_great_expectations_chatter_but_its_warnings(tmp_path):
    env = {"PYTHONPATH": str(source_checkout() / "include"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", VALIDATE_AND_WARN, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    # before: 221 lines (214 "Skipping registering function ...", SQLite connections, batch slices)
    assert [line for line in lines if "great_expectations" in line] == [
        "WARNING great_expectations.checkpoint a real GX warning"
    ]


def _progress_script() -> str:
    return "import sys, tqdm\nfor _ in tqdm.tqdm(range(3), file=sys.stderr, mininterval=0): pass\nprint('done')\n"


def test_progress_bars_off_in_the_task_and_the_training_child(monkeypatch, context):
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    from airloom.training.launcher import TrainingProcess, child_env

    for key in PROGRESS_BAR_SWITCHES:  # set then delete: monkeypatch restores "unset" afterwards
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    cmd = [sys.executable, "-c", _progress_script()]
    # The launcher logs the child's stderr with its stdout, through the operator's log.info: never as
    # ERROR. Without the switches a bar is many such lines.
    before: list[str] = []
    TrainingProcess(cmd, child_env()).run(log=before.append)
    assert any("3/3" in line for line in before), before

    hub_was_on = not are_progress_bars_disabled()
    enable_progress_bars()  # an already imported library must be switched off too
    try:
        AirloomBaseOperator(task_id="t").pre_execute(context)
        assert are_progress_bars_disabled()
    finally:
        if hub_was_on:
            enable_progress_bars()
    assert all(os.environ[k] == v for k, v in PROGRESS_BAR_SWITCHES.items())
    after: list[str] = []
    TrainingProcess(cmd, child_env()).run(log=after.append)
    assert after == ["launching: " + " ".join(cmd), "done"]


def test_a_value_the_user_set_stays(monkeypatch, context):
    monkeypatch.setenv("TQDM_DISABLE", "")
    AirloomBaseOperator(task_id="t").pre_execute(context)
    assert os.environ["TQDM_DISABLE"] == ""


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        (
            RequestRetrainingOperator(task_id="request_retraining", decision={"retrain": False}),
            "no drift or feedback threshold crossed: no retraining requested",
        ),
        (
            PublishFeedbackDatasetOperator(task_id="publish", decision={}),
            "no corrected answers passed validation and dedup: no feedback dataset",
        ),
    ],
)
def test_skip_reason_is_logged_at_info_before_skipping(op, reason, context):
    from structlog.testing import capture_logs

    with capture_logs() as logs, pytest.raises(AirflowSkipException, match=reason):
        op.execute(context)
    assert [(e["log_level"], e["event"]) for e in logs if e["log_level"] == "info"] == [
        ("info", f"skipping: {reason}")
    ]
