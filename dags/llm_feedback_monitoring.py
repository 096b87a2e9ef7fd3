"""
### llm_feedback_monitoring — daily drift and feedback check that can request retraining

Compares the day's traffic (`traffic/ds=<date>/`, written by `airloom serve`) with the training split of the newest
prepared dataset (population stability index of prompt length and task mix) and summarises
the day's thumbs-up/down feedback (`feedback/ds=<date>/`). On traffic logged by `airloom serve` it
also reports satisfaction, the rating distribution, latency and token percentiles and the share of
outputs failing checks (empty, PII), writes `dashboard.html` with daily trends, and turns corrected
answers into `corrected/instructions.jsonl` (raw rows for `llm_data_quality`). When a threshold is crossed,
`request_retraining` emits the asset `retraining_request`, which starts `llm_finetune`;
otherwise it is skipped and nothing is emitted.
"""

from datetime import datetime

from airflow.sdk import DAG, Param

from airloom.airflow.assets import RETRAINING_REQUEST
from airloom.airflow.defaults import DEFAULT_ARGS, FEEDBACK, TRAFFIC
from airloom.airflow.operators.monitoring import DriftMonitorOperator, RequestRetrainingOperator

with DAG(
    dag_id="llm_feedback_monitoring",
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["airloom", "monitoring"],
    doc_md=__doc__,
    params={
        "traffic_uri": Param(TRAFFIC, type="string", minLength=1, title="Served traffic (airloom serve's log)"),
        "feedback_uri": Param(FEEDBACK, type="string", minLength=1),
        "reference_file": Param("", type="string", title="Training split (empty: newest prepared dataset)"),
        "max_psi": Param(0.25, type="number", minimum=0),
        "max_negative_rate": Param(0.3, type="number", minimum=0, maximum=1),
        "max_failing_rate": Param(0.2, type="number", minimum=0, maximum=1,
                                  title="Most outputs failing checks (empty, PII) before retraining"),
    },
):
    monitor = DriftMonitorOperator(
        task_id="drift_and_feedback",
        ds="{{ ds }}",
        traffic_uri="{{ params.traffic_uri }}",
        feedback_uri="{{ params.feedback_uri }}",
        reference_file="{{ params.reference_file }}",
        max_psi="{{ params.max_psi }}",
        max_negative_rate="{{ params.max_negative_rate }}",
        max_failing_rate="{{ params.max_failing_rate }}",
    )
    request = RequestRetrainingOperator(task_id="request_retraining", decision=monitor.output,
                                        outlets=[RETRAINING_REQUEST])
    monitor >> request
