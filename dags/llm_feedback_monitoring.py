"""
### llm_feedback_monitoring — daily drift and feedback check that can request retraining

Reads the day's traffic (`data/traffic/ds=<date>/`, written by `airloom serve`) and feedback
(`data/feedback/ds=<date>/`) from the artifact store and writes `monitoring.json` and `dashboard.html`
(daily trends). The store is `AIRLOOM_ARTIFACTS` (production: `s3://bucket/prefix`, where the server
writes a batch object every N records or T seconds; every worker reads the same objects), else
`AIRLOOM_HOME` (the embedded default: local folders). On S3 the reference profile is read from the store
and the outputs (report, dashboard, corrected answers) are published there: the XCom and the asset events
below carry `s3://` URIs.

- **Input drift vs. the training data's EDA profile**: the day's prompts are profiled with the data
  stage's EDA and compared with the `profile.json` that `llm_data_quality`'s `eda_report` wrote for the
  training dataset named in the served model's lineage (the newest prepared dataset only as a stated
  fallback; or `reference_profile`; without one, a profile of the training split):
  population stability index (PSI) of instruction/input/response length, vocabulary shift
  (Jensen-Shannon divergence, new top words) and language shift (PSI of script and language mix).
  The traffic's own EDA report lands next to the dashboard (`traffic_profile/report.html`).
- PSI of rendered prompt length and task mix vs. the training split (task mix only when the traffic
  carries task labels).
- Feedback: satisfaction, rating distribution, thumbs-down rate; served outputs: latency and token
  percentiles, share failing checks (empty, PII).

When a threshold is crossed (`max_psi` for any PSI, `max_negative_rate`, `max_failing_rate`),
`request_retraining` emits the asset `retraining_request`, which starts `llm_finetune`; otherwise it is
skipped and nothing is emitted.

Corrected answers (validated, PII-free, deduplicated) become a dataset version,
`<corrections_uri>/ds=<date>/instructions.jsonl`; `publish_feedback_dataset` then emits the asset
`feedback_dataset` (extra: path — a URI on S3 —, rows, sha256, ds), or is skipped when there are none. Prepare it with
`airflow dags trigger llm_data_quality -c '{"source": "<path>"}'` (see `llm_data_quality`).

A retraining request, and any task that fails, is mailed to the addresses in the Variable
`airloom_notify_emails` (through the connection `smtp_default`; nothing is sent without the Variable).

**Which day** (UTC). The schedule is a data-interval timetable: the run the scheduler starts at 00:00
processes the day that has just ended, which is the run's *logical date* (its data interval start). To
check day D, give D as the logical date (a backfill from D to D, the Trigger form's logical date set to
`D 00:00`, or `airflow dags test llm_feedback_monitoring D`); a manual run with no logical date, or with a
time of day (the Trigger form's default, now), checks the last day that has ended. Asked for today
(logical date today 00:00), it judges the traffic logged so far and says so in the log.
"""

from datetime import datetime

from airflow.sdk import DAG, CronDataIntervalTimetable, Param

from airloom.airflow.assets import FEEDBACK_DATASET, RETRAINING_REQUEST
from airloom.airflow.defaults import DEFAULT_ARGS, FEEDBACK, FEEDBACK_DATASETS, PARTITION_DATE, TRAFFIC
from airloom.airflow.notify import AirloomNotifier
from airloom.airflow.operators.monitoring import (
    DriftMonitorOperator,
    PublishFeedbackDatasetOperator,
    RequestRetrainingOperator,
)

with DAG(
    dag_id="llm_feedback_monitoring",
    # A data-interval timetable: the 00:00 run processes the day that has just ended (see above).
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 11, 1),
    catchup=False,
    default_args={**DEFAULT_ARGS, "on_failure_callback": AirloomNotifier("task_failed")},
    tags=["airloom", "monitoring"],
    doc_md=__doc__,
    render_template_as_native_obj=True,  # params reach the operators as their own types (None, float)
    params={
        "traffic_uri": Param(
            TRAFFIC, type="string", minLength=1, title="Served traffic (airloom serve's log)"
        ),
        "feedback_uri": Param(FEEDBACK, type="string", minLength=1),
        "reference_file": Param(
            None, type=["null", "string"], title="Training split (empty: the served model's training dataset)"
        ),
        "reference_profile": Param(
            None,
            type=["null", "string"],
            title="Training data's EDA profile.json",
            description="Empty: the one llm_data_quality wrote for the served model's training dataset",
        ),
        "corrections_uri": Param(
            FEEDBACK_DATASETS,
            type="string",
            minLength=1,
            title="Where corrected answers become dataset versions (ds=<date>/)",
        ),
        "max_psi": Param(
            0.25,
            type="number",
            minimum=0,
            title="Most PSI of any drift measure (length, task, script, language mix)",
        ),
        "max_negative_rate": Param(0.3, type="number", minimum=0, maximum=1),
        "max_failing_rate": Param(
            0.2,
            type="number",
            minimum=0,
            maximum=1,
            title="Most outputs failing checks (empty, PII) before retraining",
        ),
    },
):
    monitor = DriftMonitorOperator(
        task_id="drift_and_feedback",
        ds=PARTITION_DATE,
        traffic_uri="{{ params.traffic_uri }}",
        feedback_uri="{{ params.feedback_uri }}",
        reference_file="{{ params.reference_file }}",
        reference_profile="{{ params.reference_profile }}",
        corrections_uri="{{ params.corrections_uri }}",
        max_psi="{{ params.max_psi }}",
        max_negative_rate="{{ params.max_negative_rate }}",
        max_failing_rate="{{ params.max_failing_rate }}",
    )
    request = RequestRetrainingOperator(
        task_id="request_retraining",
        decision=monitor.output,
        outlets=[RETRAINING_REQUEST],
        on_success_callback=AirloomNotifier("retraining_requested"),  # skipped: nothing requested, no mail
    )
    publish = PublishFeedbackDatasetOperator(
        task_id="publish_feedback_dataset", decision=monitor.output, outlets=[FEEDBACK_DATASET]
    )
    monitor >> [request, publish]
