"""
### llm_eval_backfill — daily evaluation of the deployed model over historical partitions

Each run evaluates the version at alias `production` (resolved when the run executes and
recorded in the output; the `version` param pins one) on the partition
`history/ds=<logical date>/` and writes `evaluations/<model>/ds=<date>/metrics.json`. A rerun of
a date replaces that partition only, so it is safe to backfill:

    airflow backfill create --dag-id llm_eval_backfill --from-date 2026-11-01 --to-date 2026-11-07

A missing partition skips the run. `trend` charts every evaluated date.
"""

from datetime import datetime

from airflow.sdk import DAG, Param

from airloom.airflow.defaults import DEFAULT_ARGS, EVALUATIONS, HISTORY, MODEL_NAME
from airloom.airflow.operators.evaluation import EvaluationTrendOperator, PartitionEvaluationOperator

with DAG(
    dag_id="llm_eval_backfill",
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["airloom", "evaluation", "backfill"],
    doc_md=__doc__,
    max_active_runs=4,
    render_template_as_native_obj=True,  # params reach the operators as their own types (None, int)
    params={
        "model_name": Param(MODEL_NAME, type="string", pattern="^[a-z0-9][a-z0-9._-]*$"),
        "version": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Pin a version",
            description="Empty: the version at alias production when the run executes",
        ),
        "history_uri": Param(HISTORY, type="string", minLength=1, title="Historical partitions root"),
        "output_uri": Param(EVALUATIONS, type="string", minLength=1, title="Evaluations root"),
        "limit": Param(None, type=["null", "integer"], minimum=1, title="Records per day (empty: all)"),
    },
):
    evaluate = PartitionEvaluationOperator(
        task_id="evaluate_partition",
        model_name="{{ params.model_name }}",
        version="{{ params.version }}",
        ds="{{ ds }}",
        history_uri="{{ params.history_uri }}",
        output_uri="{{ params.output_uri }}",
        limit="{{ params.limit }}",
    )
    trend = EvaluationTrendOperator(
        task_id="trend",
        model_name="{{ params.model_name }}",
        output_uri="{{ params.output_uri }}",
        trigger_rule="none_failed",
    )
    evaluate >> trend
