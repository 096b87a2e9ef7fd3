"""
### llm_model_rollback — move `production` back to an earlier approved version

By default the alias returns to the approved version it pointed to before the current one;
the `to_version` param picks another. The version must be approved under the same sign-off
policy as deploys (approvers: the Variable `airloom_signoff_approvers`), every file is verified
first, and the move is a compare-and-swap recorded in the registry's audit trail with who did
it and why.
"""

from datetime import datetime

from airflow.sdk import DAG, Param

from airloom.airflow.defaults import CANARY_PROMPTS, DEFAULT_ARGS, MODEL_NAME, SIGNOFF_POLICY_TEMPLATED
from airloom.airflow.operators.registry import CanaryOperator, RollbackModelOperator

with DAG(
    dag_id="llm_model_rollback",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["airloom", "registry", "deploy"],
    doc_md=__doc__,
    max_active_runs=1,
    render_template_as_native_obj=True,  # params reach the operators as their own types (None, int)
    params={
        "model_name": Param(MODEL_NAME, type="string", pattern="^[a-z0-9][a-z0-9._-]*$"),
        "to_version": Param(
            None, type=["null", "integer"], minimum=1, title="Version (empty: the previous approved one)"
        ),
        "alias": Param("production", type="string", minLength=1),
        "reason": Param(None, type=["null", "string"], title="Why (kept in the audit trail)"),
    },
):
    rollback = RollbackModelOperator(
        task_id="rollback",
        model_name="{{ params.model_name }}",
        to_version="{{ params.to_version }}",
        alias="{{ params.alias }}",
        reason="{{ params.reason }}",
        policy=SIGNOFF_POLICY_TEMPLATED,
        retries=0,  # a compare-and-swap that lost must be looked at, not retried blindly
    )
    canary = CanaryOperator(
        task_id="canary",
        model_name="{{ params.model_name }}",
        alias="{{ params.alias }}",
        prompts=CANARY_PROMPTS,
    )
    rollback >> canary
