"""Defaults the DAG files share (cheap: no I/O, no heavy imports)."""

import os
from datetime import timedelta

from airloom.artifacts import artifacts_uri

DEFAULT_ARGS = {
    "owner": "airloom",
    "retries": 1,
    "retry_delay": timedelta(minutes=1),
}
# The Celery queue of the tasks that evaluate a trained model. Airflow fixes a task's queue when the DAG
# is parsed, so it is a deployment setting, not a form field: a deployment that fine-tunes GPU-sized
# models sets AIRLOOM_EVAL_QUEUE=gpu for its dag-processor (and gives the gpu pool the slots).
EVAL_QUEUE = os.environ.get("AIRLOOM_EVAL_QUEUE", "default")
MODEL_NAME = "airloom-demo"
BASE_MODEL = "registry:airloom-tiny-base"
# Where the data and outputs the DAGs' forms default to live: the artifact store (AIRLOOM_ARTIFACTS, e.g.
# s3://bucket/prefix in production: every worker reads the same place), else AIRLOOM_HOME. No I/O here.
ARTIFACTS = artifacts_uri()
RAW_DATA = f"{ARTIFACTS}/data/raw"
HISTORY = f"{ARTIFACTS}/data/history"
FEEDBACK = f"{ARTIFACTS}/data/feedback"
TRAFFIC = f"{ARTIFACTS}/data/traffic"  # where `airloom serve` logs requests and responses
FEEDBACK_DATASETS = f"{ARTIFACTS}/data/feedback_datasets"  # corrected answers, one version per day
EVALUATIONS = f"{ARTIFACTS}/evaluations"

# The day (YYYY-MM-DD, UTC) a daily run reads and writes: every task with a daily partition uses this.
# The daily DAGs use CronDataIntervalTimetable, so a scheduled or backfill run's logical date is 00:00 of
# the day that has ended, and a manual run whose logical date is 00:00 of day D processes D (Airflow keeps
# logical dates unique, so that is the day's one run). A manual run without a logical date (the REST/CLI
# default) or with a time of day (the Trigger form's default: now) processes the last day that has ended.
PARTITION_DATE = (
    "{% set t = dag_run.logical_date or dag_run.run_after %}"
    "{{ t | ds if dag_run.logical_date and (t | ts).endswith('T00:00:00+00:00')"
    " else macros.ds_add(t | ds, -1) }}"
)
# Conversations, rendered through the deployed model's own template by the canary (as the chat endpoint
# renders them): a chat model is asked in its chat template, an instruction model gets the alpaca prompt
# of the user turn, the blank line parting instruction from input.
CANARY_PROMPTS = [
    [{"role": "user", "content": "Write the number in words.\n\n42"}],
    [{"role": "user", "content": "Write the date in words.\n\n2026-03-14"}],
    [{"role": "user", "content": "What is the last word?\n\napple river stone"}],
]

# The sign-off policy the sign-off sensor, deploy and rollback apply and the UI plugin enforces, from two
# Variables: the approvers (comma-separated; empty = anyone but the requester) and the two-person rule's
# number of distinct approvers (empty = 1). Deployment-wide on purpose: a DAG param would let the person
# who triggers a run lower it. `authenticated_only` comes from AIRLOOM_SIGNOFF_AUTHENTICATED_ONLY (on in
# production: only the sign-off page and the Airflow API count, never the local CLI's claimed names).
SIGNOFF_APPROVERS_VARIABLE = "airloom_signoff_approvers"
SIGNOFF_MIN_APPROVALS_VARIABLE = "airloom_signoff_min_approvals"
SIGNOFF_POLICY_VARIABLES = {
    "allowed_users": SIGNOFF_APPROVERS_VARIABLE,
    "required_approvals": SIGNOFF_MIN_APPROVALS_VARIABLE,
}
SIGNOFF_POLICY = {"required_approvals": 1, "separation_of_duties": True}
# The same policy as a templated operator argument (sensor, deploy, rollback): the Variables are read when
# the task runs, not when the DAG file is parsed.
SIGNOFF_POLICY_TEMPLATED = {
    **SIGNOFF_POLICY,
    **{
        key: "{{ var.value.get('" + variable + "', '') }}"
        for key, variable in SIGNOFF_POLICY_VARIABLES.items()
    },
}
