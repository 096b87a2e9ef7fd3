"""
### llm_finetune — train (one trial or a sweep) → evaluate vs. production → gates → register → sign-off → deploy → canary

Fine-tunes the base model on the prepared dataset with the Airloom recipe, launched as a child
process through the DeepSpeed launcher (or torchrun) in the `gpu` pool. Instruction rows carry loss on
their response; conversations (`llm_data_quality` prepares them from OpenAI `messages` or ShareGPT
files) carry loss on every assistant turn, rendered with the template the dataset was prepared with
(ChatML, when the base tokenizer has no chat template, becomes the trained model's chat template, so
`airloom serve` renders chat requests as training did). The candidate is
evaluated on the test split beside the model at alias `production` (or the base model when
nothing is deployed yet); quality gates decide whether it is registered. A registered version
waits, deferred, for a person other than the one who triggered the run to approve it
(in the UI: Browse → Model sign-off, or
`airloom signoff approve MODEL/VERSION --user REVIEWER`), is then verified file by file and
promoted to `production`, and a canary generates with it.

Runs on each new `prepared_dataset`, on a `retraining_request` from monitoring, or by hand.
"""

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from airloom.airflow.assets import PREPARED_DATASET, RETRAINING_REQUEST
from airloom.airflow.defaults import (
    BASE_MODEL,
    CANARY_PROMPTS,
    DEFAULT_ARGS,
    MODEL_NAME,
    SIGNOFF_POLICY_TEMPLATED,
)
from airloom.airflow.operators.data import ResolveDatasetOperator
from airloom.airflow.operators.deepspeed import DeepSpeedTrainOperator
from airloom.airflow.operators.evaluation import EvaluateModelOperator, QualityGateOperator
from airloom.airflow.operators.registry import CanaryOperator, DeployModelOperator, RegisterModelOperator
from airloom.airflow.operators.sweep import PlanTrialsOperator, SelectBestTrialOperator
from airloom.airflow.sensors.registry import ModelSignOffSensor
from airloom.training.config import CHAT_TRUNCATIONS

# What each chat_truncation does, for the trigger form (airloom.training.chat applies it).
CHAT_TRUNCATION_HELP = {
    "keep_last_turns": "keep_last_turns: keep the system turn and the latest whole user/assistant "
    "exchanges that fit (dropped when not even the last one fits)",
    "drop": "drop: leave the whole conversation out",
}


def model_dir_of(train_result: dict) -> str:
    return train_result["model_dir"]


with DAG(
    dag_id="llm_finetune",
    schedule=(PREPARED_DATASET | RETRAINING_REQUEST),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["airloom", "training", "deepspeed"],
    doc_md=__doc__,
    max_active_runs=1,
    render_template_as_native_obj=True,  # params reach the operators as their own types (None, int, dict)
    params={
        "model_name": Param(
            MODEL_NAME, type="string", pattern="^[a-z0-9][a-z0-9._-]*$", title="Registered model"
        ),
        "base_model": Param(
            BASE_MODEL,
            type="string",
            minLength=1,
            title="Base model",
            description="registry:NAME[/N|@ALIAS], a local folder or a hub id",
        ),
        "dataset": Param(
            None,
            type=["null", "string"],
            title="Prepared dataset folder",
            description="Empty: the triggering asset event, else the newest prepared dataset",
        ),
        "method": Param("full", enum=["full", "lora"], title="Fine-tuning method"),
        "launcher": Param("deepspeed", enum=["deepspeed", "torchrun", "python"]),
        "zero_stage": Param(2, type="integer", enum=[0, 1, 2, 3], title="DeepSpeed ZeRO stage"),
        "learning_rate": Param(3e-3, type="number", exclusiveMinimum=0),
        "batch_size": Param(32, type="integer", minimum=1),
        "max_steps": Param(1500, type="integer", minimum=1, title="Optimizer steps"),
        "seed": Param(0, type="integer", minimum=0),
        "eval_limit": Param(
            300,
            type="integer",
            minimum=1,
            title="Test examples to evaluate",
            description="A conversation is scored on its last assistant turn, generated from the turns before it",
        ),
        "packing": Param(False, type="boolean", title="Pack examples into full rows"),
        "chat_truncation": Param(
            "keep_last_turns",
            enum=list(CHAT_TRUNCATIONS),
            title="Conversations too long to train on",
            values_display=CHAT_TRUNCATION_HELP,
            description="Conversations longer than the training max_length after the chat template; "
            "instruction rows are cut at max_length instead",
        ),
        "sweep": Param(
            None,
            type=["null", "object"],
            title="Hyperparameter sweep",
            description='Empty: one trial. Grid: {"learning_rate": [0.001, 0.003], "lora_r": [8, 16]}. '
            'Random: {"learning_rate": {"log_uniform": [0.0001, 0.01]}} with sweep_trials draws',
        ),
        "sweep_trials": Param(4, type="integer", minimum=1, maximum=64, title="Random-search trials"),
        "sweep_metric": Param(
            "exact_match",
            type="string",
            title="Metric that picks the best trial",
            description="An evaluation metric on the validation split, or validation_loss",
        ),
        "sweep_eval_limit": Param(100, type="integer", minimum=1, title="Validation examples per trial"),
        "gates": Param(
            "exact_match>=0.3,exact_match>=baseline-0.02",
            type="string",
            title="Quality gates",
            description="Comma-separated: metric>=value or metric>=baseline-delta",
        ),
    },
):
    dataset = ResolveDatasetOperator(task_id="resolve_dataset", dataset="{{ params.dataset }}")
    # One trial (the params above) unless a sweep space is given: each trial is a mapped training
    # task in the gpu pool, evaluated on the validation split; only the best goes on.
    plan = PlanTrialsOperator(
        task_id="plan_trials",
        base_config={
            "method": "{{ params.method }}",
            "zero_stage": "{{ params.zero_stage }}",
            "learning_rate": "{{ params.learning_rate }}",
            "batch_size": "{{ params.batch_size }}",
            "max_steps": "{{ params.max_steps }}",
            "packing": "{{ params.packing }}",
            "chat_truncation": "{{ params.chat_truncation }}",
            "seed": "{{ params.seed }}",
        },
        space="{{ params.sweep }}",
        trials="{{ params.sweep_trials }}",
        seed="{{ params.seed }}",
    )
    train = DeepSpeedTrainOperator.partial(
        task_id="train",
        base_model="{{ params.base_model }}",
        train_file=dataset.output["train"],
        validation_file=dataset.output["validation"],
        launcher="{{ params.launcher }}",
        execution_timeout=timedelta(hours=12),
        # partial() does not apply the operator's own defaults at parse time: name pool and queue here.
        pool="gpu",
        queue="gpu",
    ).expand(config=plan.output)
    evaluate_trials = EvaluateModelOperator.partial(
        task_id="evaluate_trial",
        dataset_file=dataset.output["validation"],
        limit="{{ params.sweep_eval_limit }}",
        pool="eval",
    ).expand(model=train.output.map(model_dir_of))
    best = SelectBestTrialOperator(
        task_id="select_best_trial",
        trials=train.output,
        evaluations=evaluate_trials.output,
        metric="{{ params.sweep_metric }}",
    )
    evaluate_candidate = EvaluateModelOperator(
        task_id="evaluate_candidate",
        model=best.output["model_dir"],
        dataset_file=dataset.output["test"],
        limit="{{ params.eval_limit }}",
        bias_probes=True,
    )
    evaluate_production = EvaluateModelOperator(
        task_id="evaluate_production",
        model="registry:{{ params.model_name }}@production",
        fallback_model=best.output["base_model_path"],
        dataset_file=dataset.output["test"],
        limit="{{ params.eval_limit }}",
    )
    gates = QualityGateOperator(
        task_id="quality_gates",
        candidate=evaluate_candidate.output,
        baseline=evaluate_production.output,
        gates="{{ params.gates }}",
        retries=0,
    )
    register = RegisterModelOperator(
        task_id="register_candidate",
        model_name="{{ params.model_name }}",
        model_dir=best.output["model_dir"],
        metadata={
            "base_model": best.output["base_model"],
            "metrics": evaluate_candidate.output["aggregate"],
            "metrics_by_task": evaluate_candidate.output["by_task"],
            "baseline": {
                "model": evaluate_production.output["model"],
                "metrics": evaluate_production.output["aggregate"],
            },
            "gates": gates.output["gates"],
            "training": best.output["metrics"],
            "lineage": {
                "dataset": dataset.output["path"],
                "dataset_hash": dataset.output["dataset_hash"],
                "train_config": best.output["config"],
            },
        },
        evidence={
            "eval_report": gates.output["report"],
            "eval_metrics": evaluate_candidate.output["metrics_path"],
        },
        attachments={
            "evaluation/report.html": gates.output["report"],
            "evaluation/metrics.json": evaluate_candidate.output["metrics_path"],
            "evaluation/comparison.json": gates.output["comparison"],
        },
    )
    signoff = ModelSignOffSensor(
        task_id="wait_for_signoff",
        model_name="{{ params.model_name }}",
        version=register.output["version"],
        policy=SIGNOFF_POLICY_TEMPLATED,
        poll_interval=5,
        timeout=timedelta(days=7),
        retries=0,
    )
    deploy = DeployModelOperator(
        task_id="deploy",
        model_name="{{ params.model_name }}",
        version=register.output["version"],
        alias="production",
        policy=SIGNOFF_POLICY_TEMPLATED,
    )
    canary = CanaryOperator(task_id="canary", model_name="{{ params.model_name }}", prompts=CANARY_PROMPTS)

    best >> [evaluate_candidate, evaluate_production] >> gates >> register >> signoff >> deploy >> canary
