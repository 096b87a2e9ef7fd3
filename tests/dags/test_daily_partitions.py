"""The daily DAGs read the day that has ended, for runs made the way Airflow makes them.

Each run is what the scheduler (the DAG's own timetable, after serialization, as the scheduler holds
it), the trigger API/UI, ``airflow dags test`` or ``airflow backfill create`` would create; its task's
partition field is then rendered by the worker's own context code (``RuntimeTaskInstance``) from the
DagRun as the execution API sends it.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAILY = {"llm_eval_backfill": "evaluate_partition", "llm_feedback_monitoring": "drift_and_feedback"}


@pytest.fixture(scope="module", params=sorted(DAILY))
def dag(request):
    """(the parsed DAG, the scheduler's deserialized copy of it)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    parsed = DagBag(dag_folder=str(DAGS / f"{request.param}.py")).dags[request.param]
    return parsed, DagSerialization.from_dict(DagSerialization.to_dict(parsed))


def partition(parsed, *, logical_date, data_interval, run_after, run_type) -> str:
    """The partition date the daily task reads in such a run (its ``ds`` field, rendered in the worker)."""
    from airflow.sdk.api.datamodels._generated import DagRun, TIRunContext
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    iso = lambda d: d and d.isoformat().replace("+00:00", "Z")  # noqa: E731  (as the API sends them)
    start, end = data_interval or (None, None)
    dag_run = DagRun.model_validate_json(
        json.dumps(
            {
                "dag_id": parsed.dag_id,
                "run_id": f"{run_type}__test",
                "logical_date": iso(logical_date),
                "data_interval_start": iso(start),
                "data_interval_end": iso(end),
                "run_after": iso(run_after),
                "start_date": iso(run_after),
                "end_date": None,
                "run_type": run_type,
                "state": "running",
                "conf": {},
                "consumed_asset_events": [],
                "partition_key": None,
            }
        )
    )
    task = copy.deepcopy(parsed.get_task(DAILY[parsed.dag_id]))
    ti = RuntimeTaskInstance.model_construct(
        id=uuid.uuid4(),
        task_id=task.task_id,
        dag_id=parsed.dag_id,
        run_id=dag_run.run_id,
        try_number=1,
        map_index=-1,
        task=task,
        start_date=run_after,
        max_tries=0,
    )
    ti._ti_context_from_server = TIRunContext(dag_run=dag_run, max_tries=0)
    task.render_template_fields(ti.get_template_context())
    return task.ds


def day(d: datetime | date) -> str:
    return d.strftime("%Y-%m-%d")


def test_scheduled_runs_read_the_day_that_has_ended(dag):
    from airflow.timetables.base import TimeRestriction

    parsed, scheduled = dag
    timetable = scheduled.timetable
    restriction = TimeRestriction(earliest=scheduled.start_date, latest=None, catchup=True)
    last, seen = None, []
    for _ in range(3):  # the first runs from start_date, each computed from the one before
        info = timetable.next_dagrun_info(last_automated_data_interval=last, restriction=restriction)
        read = partition(
            parsed,
            logical_date=info.logical_date,
            data_interval=info.data_interval,
            run_after=info.run_after,
            run_type="scheduled",
        )
        # The scheduler creates the run at run_after: the day it reads must be over by then.
        assert read == day(info.run_after - timedelta(days=1)), (info, read)
        seen.append(read)
        last = info.data_interval
    assert seen == ["2026-11-01", "2026-11-02", "2026-11-03"]


def test_unpausing_schedules_the_last_day_that_has_ended(dag):
    """catchup=False: on unpause the scheduler creates the latest interval's run, now (yesterday's)."""
    from airflow.timetables.base import TimeRestriction

    parsed, scheduled = dag
    restriction = TimeRestriction(earliest=scheduled.start_date, latest=None, catchup=False)
    info = scheduled.timetable.next_dagrun_info(last_automated_data_interval=None, restriction=restriction)
    now = datetime.now(UTC)
    assert info.run_after <= now  # due already: created on the next scheduler loop
    read = partition(
        parsed,
        logical_date=info.logical_date,
        data_interval=info.data_interval,
        run_after=info.run_after,
        run_type="scheduled",
    )
    assert read == day(now - timedelta(days=1))


def test_backfill_runs_read_the_days_asked_for(dag):
    from airflow.models.backfill import _get_info_list  # what `airflow backfill create` runs

    parsed, scheduled = dag
    infos = _get_info_list(
        from_date=datetime(2026, 11, 3, tzinfo=UTC),
        to_date=datetime(2026, 11, 5, tzinfo=UTC),
        reverse=False,
        dag=scheduled,
    )
    read = [
        partition(
            parsed,
            logical_date=i.logical_date,
            data_interval=i.data_interval,
            run_after=i.run_after,
            run_type="backfill",
        )
        for i in infos
    ]
    assert read == ["2026-11-03", "2026-11-04", "2026-11-05"]


@pytest.mark.parametrize(
    ("logical_date", "expected"),
    [
        # Trigger form / REST / `airflow dags test DAG 2026-11-20`: a logical date at 00:00 names the day.
        (datetime(2026, 11, 20, tzinfo=UTC), "2026-11-20"),
        # The Trigger form's default logical date is now: the last day that has ended.
        (datetime(2026, 11, 20, 14, 23, 5, tzinfo=UTC), "2026-11-19"),
    ],
)
def test_manual_runs_with_a_logical_date(dag, logical_date, expected):
    parsed, scheduled = dag
    read = partition(
        parsed,
        logical_date=logical_date,
        # What the trigger API and `dags test` attach to a manual run with a logical date.
        data_interval=scheduled.timetable.infer_manual_data_interval(run_after=logical_date),
        run_after=logical_date,
        run_type="manual",
    )
    assert read == expected


def test_manual_run_without_a_logical_date_reads_yesterday(dag):
    parsed, _ = dag
    run_after = datetime(2026, 11, 20, 0, 0, 30, tzinfo=UTC)
    read = partition(parsed, logical_date=None, data_interval=None, run_after=run_after, run_type="manual")
    assert read == "2026-11-19"
