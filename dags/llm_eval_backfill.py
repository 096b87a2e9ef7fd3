"""
### llm_eval_backfill — daily evaluation of the deployed model over historical partitions

Each run evaluates one day's partition `history/ds=<day>/` and writes
`evaluations/<model>/ds=<day>/v<version>/metrics.json`; `trend` charts every evaluated day and version
and marks the days the `production` version changed.

**Which day** (UTC). The schedule is a data-interval timetable: the run the scheduler starts at
00:00 processes the day that has just ended, which is the run's *logical date* (its data interval
start). To evaluate day D, give D as the logical date: a backfill from D to D (dialog or
`airflow backfill create`), the Trigger form's logical date set to `D 00:00`, or
`airflow dags test llm_eval_backfill D`. A manual run with no logical date, or with a time of day
(the Trigger form's default, now), evaluates the last day that has ended. (For a manual run Airflow
shows the data interval *before* the logical date; the logical date is what counts here.)

**Which model** (`model_version`): `of_the_day` (default) scores each day with the version that was at
`production` when that day ended, from the registry's alias history, so a rerun gives the same answer
whenever it runs; `current` scores it with today's `production` version; `version` pins one. Results
are partitioned by version, so both can exist for one day, and a rerun replaces only its own
`ds=<day>/v<version>/`. A day with no partition, or with no `production` version yet under
`of_the_day`, is skipped with the reason in the task log.

    airflow backfill create --dag-id llm_eval_backfill --from-date 2026-11-01 --to-date 2026-11-07 \
        --dag-run-conf '{"model_version": "current"}'

Dates that already ran are skipped unless you reprocess them: "All Runs" in the backfill dialog's
*Reprocess Behavior*, or `--reprocess-behavior completed`.

A task that fails is mailed to the addresses in the Variable `airloom_notify_emails` (through the
connection `smtp_default`; nothing is sent without the Variable).
"""

from datetime import datetime

from airflow.sdk import DAG, CronDataIntervalTimetable, Param

from airloom.airflow.defaults import DEFAULT_ARGS, EVALUATIONS, HISTORY, MODEL_NAME, PARTITION_DATE
from airloom.airflow.notify import AirloomNotifier
from airloom.airflow.operators.evaluation import EvaluationTrendOperator, PartitionEvaluationOperator

with DAG(
    dag_id="llm_eval_backfill",
    # A data-interval timetable: the 00:00 run processes the day that has just ended (see above).
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 11, 1),
    catchup=False,
    default_args={**DEFAULT_ARGS, "on_failure_callback": AirloomNotifier("task_failed")},
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
            description="Empty: chosen by model_version",
        ),
        "model_version": Param(
            "of_the_day",
            type="string",
            enum=["of_the_day", "current"],
            title="Which production version scores each day",
            description="of_the_day: the one at production when that day ended (alias history); "
            "current: the one at production now",
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
        model_version="{{ params.model_version }}",
        ds=PARTITION_DATE,
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
