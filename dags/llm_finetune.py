"""
### llm_finetune — train (one trial or a sweep) → evaluate vs. production → gates → register → sign-off → canary → promote

Fine-tunes the base model on the prepared dataset with the Airloom recipe, launched as a child
process through the DeepSpeed launcher (or torchrun) in the `gpu` pool. The run's options come from a
training preset (`config`: a shipped one such as `tiny_llama/0.5m_full_1proc`, the default, or
`llama_1b/1.1b_lora_1gpu_zero2_packed`, or the path of your own YAML) with the form's fields on top;
an empty field keeps the preset's value. Presets checkpoint, so a retried `train` resumes. Empty
splits, settings this machine cannot run and a base model whose context is below `max_length` fail
before training, without retry. Instruction rows carry loss on
their response; conversations (`llm_data_quality` prepares them from OpenAI `messages` or ShareGPT
files) carry loss on every assistant turn, rendered with the template the dataset was prepared with
(ChatML, when the base tokenizer has no chat template, becomes the trained model's chat template, so
`airloom serve` renders chat requests as training did). The candidate is
evaluated on the test split beside the model at alias `production` (or the base model when
nothing is deployed yet); quality gates decide whether it is registered. A registered version
waits, deferred, for a person other than its requester to approve it (the requester: who triggered
the run, or the run upstream whose asset event started it; `system:<dag_id>` when nobody did)
(in the UI: Browse → Model sign-off, or
`airloom signoff approve MODEL VERSION --api-url URL --username REVIEWER --password-stdin`; the
embedded default also takes `--user REVIEWER` without signing in), is then verified file by file and pointed
at by the alias `canary`; the canary asks it the test split's own prompts through the serving gateway,
and only when it answers is `production` moved to it (by the same promotion rule and sign-off policy).
A failed canary leaves `production` where it was.

Mail (when the Variable `airloom_notify_emails` lists addresses and the connection `smtp_default` is set):
sign-off requested (with the sign-off page's link), sign-off overdue or rejected, gate failed, canary
failed, any other task failed.

Runs on each new `prepared_dataset` (on exactly the version its event names), on a `retraining_request`
from monitoring (on `<name>@latest` of the data the served model learnt from), or by hand naming the
dataset (`name@version`; the form proposes them).
"""

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from airloom.airflow.assets import PREPARED_DATASET, RETRAINING_REQUEST
from airloom.airflow.defaults import (
    BASE_MODEL,
    DEFAULT_ARGS,
    EVAL_QUEUE,
    MODEL_NAME,
    SIGNOFF_POLICY_TEMPLATED,
)
from airloom.airflow.notify import AirloomNotifier
from airloom.airflow.operators.data import ResolveDatasetOperator, dataset_param
from airloom.airflow.operators.deepspeed import DeepSpeedTrainOperator, TrainingPreflightOperator
from airloom.airflow.operators.evaluation import EvaluateModelOperator, QualityGateOperator
from airloom.airflow.operators.registry import CanaryOperator, DeployModelOperator, RegisterModelOperator
from airloom.airflow.operators.sweep import (
    PlanOtherNodesOperator,
    PlanTrialsOperator,
    SelectBestTrialOperator,
)
from airloom.airflow.sensors.registry import ModelSignOffSensor
from airloom.training.config import CHAT_TRUNCATIONS, LAUNCHERS, METHODS, PRECISIONS
from airloom.training.presets import DEFAULT_PRESET, preset_names

# What each chat_truncation does, for the trigger form (airloom.training.chat applies it).
CHAT_TRUNCATION_HELP = {
    "keep_last_turns": "keep_last_turns: keep the system turn and the latest whole user/assistant "
    "exchanges that fit (dropped when not even the last one fits)",
    "drop": "drop: leave the whole conversation out",
}
METHOD_HELP = {
    None: "the preset's",
    "full": "full: every weight trains",
    "lora": "lora: low-rank adapters on a frozen base",
    "qlora": "qlora: adapters on a 4-bit base (CUDA and bitsandbytes)",
}
# The trigger form's sections.
RUN, TRAINING, LORA, NODES = "Run", "Training (empty: the preset's value)", "LoRA", "GPUs and nodes"
SWEEP, EVALUATION = "Sweep", "Evaluation and gates"
# Training options the form overrides, by TrainConfig name; plan_trials lays them over the preset.
OVERRIDES = (
    "method",
    "launcher",
    "zero_stage",
    "precision",
    "max_length",
    "learning_rate",
    "warmup_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "packing",
    "checkpoint_every",
    "chat_truncation",
    "seed",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "nproc_per_node",
    "nnodes",
    "master_addr",
    "master_port",
)


def _override(title: str, kind: str = "string", section: str = TRAINING, **schema) -> Param:
    """An optional form field: empty keeps the preset's value."""
    schema.setdefault("description", "Empty: the preset's")
    return Param(None, type=["null", kind], title=title, section=section, **schema)


def model_dir_of(train_result: dict) -> str:
    return train_result["model_dir"]


with DAG(
    dag_id="llm_finetune",
    schedule=(PREPARED_DATASET | RETRAINING_REQUEST),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={**DEFAULT_ARGS, "on_failure_callback": AirloomNotifier("task_failed")},
    tags=["airloom", "training", "deepspeed"],
    doc_md=__doc__,
    max_active_runs=1,
    render_template_as_native_obj=True,  # params reach the operators as their own types (None, int, dict)
    params={
        "model_name": Param(
            MODEL_NAME,
            type="string",
            pattern="^[a-z0-9][a-z0-9._-]*$",
            title="Registered model",
            section=RUN,
        ),
        "base_model": Param(
            BASE_MODEL,
            type="string",
            minLength=1,
            title="Base model",
            description="registry:NAME[/N|@ALIAS], a local folder or a hub id",
            section=RUN,
        ),
        "dataset": dataset_param(section=RUN),
        "config": Param(
            DEFAULT_PRESET,
            type="string",
            minLength=1,
            examples=preset_names(),
            title="Training preset",
            description="A shipped preset (<family>/<size>_<method>_<topology>; the default is the demo's "
            "tiny model) or the path of your own YAML training config. The fields below override it.",
            section=RUN,
        ),
        "method": _override("Fine-tuning method", enum=[None, *METHODS], values_display=METHOD_HELP),
        "launcher": _override("Launcher", enum=[None, *LAUNCHERS]),
        "zero_stage": _override("DeepSpeed ZeRO stage", "integer", enum=[None, 0, 1, 2, 3]),
        "precision": _override(
            "Precision",
            enum=[None, *PRECISIONS],
            description="bf16 needs an Ampere or newer GPU (DeepSpeed also takes it on CPU); fp16 a GPU",
        ),
        "max_length": _override("Sequence length (tokens)", "integer", minimum=8),
        "learning_rate": _override("Learning rate", "number", exclusiveMinimum=0),
        "warmup_steps": _override("Warmup steps", "integer", minimum=0),
        "batch_size": _override(
            "Batch size",
            "integer",
            minimum=1,
            description="Rows per optimizer step (packed rows when packing), across all GPUs",
        ),
        "gradient_accumulation_steps": _override("Gradient accumulation steps", "integer", minimum=1),
        "max_steps": _override(
            "Optimizer steps",
            "integer",
            minimum=1,
            description="Empty: the preset's (its max_steps, else its epochs)",
        ),
        "packing": _override(
            "Pack examples into full rows",
            "boolean",
            description="Unset: the preset's; switched, on or off whatever the preset says",
        ),
        "checkpoint_every": _override(
            "Checkpoint every N steps",
            "integer",
            minimum=0,
            description="A retry resumes from the newest complete checkpoint; 0 = none",
        ),
        "chat_truncation": Param(
            "keep_last_turns",
            enum=list(CHAT_TRUNCATIONS),
            title="Conversations too long to train on",
            values_display=CHAT_TRUNCATION_HELP,
            description="Conversations longer than the training max_length after the chat template; "
            "instruction rows are cut at max_length instead",
            section=TRAINING,
        ),
        "seed": Param(0, type="integer", minimum=0, title="Seed", section=TRAINING),
        "lora_r": _override("LoRA rank r", "integer", minimum=1, section=LORA),
        "lora_alpha": _override("LoRA alpha", "number", exclusiveMinimum=0, section=LORA),
        "lora_dropout": _override("LoRA dropout", "number", minimum=0, exclusiveMaximum=1, section=LORA),
        "lora_target_modules": _override(
            "LoRA target modules",
            minLength=1,
            description="all-linear, or module names separated by commas (q_proj,v_proj)",
            section=LORA,
        ),
        "nproc_per_node": _override(
            "GPUs per node",
            "integer",
            minimum=1,
            description="Processes per node; the gpu pool slots are taken per task, not per GPU",
            section=NODES,
        ),
        "nnodes": _override(
            "Nodes",
            "integer",
            minimum=1,
            description="Empty: the preset's (one). More than one: a train_other_nodes task per extra node "
            "starts beside train (node 0); the gpu pool needs a slot per node and every node's worker must "
            "reach the master address",
            section=NODES,
        ),
        "master_addr": _override(
            "Master address", minLength=1, section=NODES, description="Node 0's address"
        ),
        "master_port": _override(
            "Master port", "integer", minimum=1, maximum=65535, section=NODES, description="Empty: 29500"
        ),
        "sweep": Param(
            None,
            type=["null", "object"],
            title="Hyperparameter sweep",
            description='Empty: one trial. Grid: {"learning_rate": [0.001, 0.003], "lora_r": [8, 16]}. '
            'Random: {"learning_rate": {"log_uniform": [0.0001, 0.01]}} with sweep_trials draws',
            section=SWEEP,
        ),
        "sweep_trials": Param(
            4, type="integer", minimum=1, maximum=64, title="Random-search trials", section=SWEEP
        ),
        "sweep_metric": Param(
            "exact_match",
            type="string",
            title="Metric that picks the best trial",
            description="An evaluation metric on the validation split, or validation_loss",
            section=SWEEP,
        ),
        "sweep_eval_limit": Param(
            100, type="integer", minimum=1, title="Validation examples per trial", section=SWEEP
        ),
        "eval_limit": Param(
            300,
            type="integer",
            minimum=1,
            title="Test examples to evaluate",
            description="A conversation is scored on its last assistant turn, generated from the turns before it",
            section=EVALUATION,
        ),
        "eval_batch_size": Param(
            64,
            type="integer",
            minimum=1,
            title="Evaluation batch size",
            section=EVALUATION,
            description="Prompts generated together",
        ),
        "eval_max_new_tokens": Param(
            32, type="integer", minimum=1, title="Longest generated answer (tokens)", section=EVALUATION
        ),
        "eval_precision": Param(
            "auto",
            enum=["auto", "fp32", "bf16", "fp16"],
            title="Evaluation precision",
            description="auto: the dtype each model was saved in (a bf16 preset's model evaluates in bf16, "
            "the demo's in fp32); fp32 scores do not depend on the hardware. Evaluation runs on the queue "
            "AIRLOOM_EVAL_QUEUE names: default, or gpu where the deployment sets it",
            section=EVALUATION,
        ),
        "gates": Param(
            "exact_match>=0.3,exact_match>=baseline-0.02",
            type="string",
            title="Quality gates",
            description="Comma-separated: metric>=value or metric>=baseline-delta",
            section=EVALUATION,
        ),
    },
):
    dataset = ResolveDatasetOperator(task_id="resolve_dataset", dataset="{{ params.dataset }}")
    # Every split must have rows and a multi-node run a master address: fail here, at once and
    # without retry, not after the run has waited for the gpu pool and trained.
    preflight = TrainingPreflightOperator(
        task_id="preflight",
        splits={split: dataset.output[split] for split in ("train", "validation", "test")},
        nnodes="{{ params.nnodes }}",
        master_addr="{{ params.master_addr }}",
        retries=0,
    )
    # The preset with the form's values on top: one trial unless a sweep space is given; each trial
    # is a mapped training task in the gpu pool, evaluated on the validation split; only the best goes on.
    plan = PlanTrialsOperator(
        task_id="plan_trials",
        preset="{{ params.config }}",
        base_config={name: f"{{{{ params.{name} }}}}" for name in OVERRIDES},
        space="{{ params.sweep }}",
        trials="{{ params.sweep_trials }}",
        seed="{{ params.seed }}",
    )
    # What every node's training task shares. partial() does not apply the operator's own defaults at
    # parse time: name pool and queue here.
    training = {
        "base_model": "{{ params.base_model }}",
        "train_file": dataset.output["train"],
        "validation_file": dataset.output["validation"],
        "execution_timeout": timedelta(hours=12),
        "pool": "gpu",
        "queue": "gpu",
    }
    train = DeepSpeedTrainOperator.partial(task_id="train", **training).expand(config=plan.output)
    # Multi-node: nodes 1..n-1 of each trial train beside its node-0 task (mapped over node_rank; none and
    # skipped for one node). Node 0 writes the model; a node that does not join within the config's
    # rendezvous_timeout_s fails them all.
    node_plan = PlanOtherNodesOperator(task_id="plan_other_nodes", trials=plan.output)
    other_nodes = DeepSpeedTrainOperator.partial(task_id="train_other_nodes", **training).expand_kwargs(
        node_plan.output
    )
    preflight >> [train, other_nodes]
    evaluate_trials = EvaluateModelOperator.partial(
        task_id="evaluate_trial",
        dataset_file=dataset.output["validation"],
        limit="{{ params.sweep_eval_limit }}",
        batch_size="{{ params.eval_batch_size }}",
        max_new_tokens="{{ params.eval_max_new_tokens }}",
        precision="{{ params.eval_precision }}",
        queue=EVAL_QUEUE,
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
        batch_size="{{ params.eval_batch_size }}",
        max_new_tokens="{{ params.eval_max_new_tokens }}",
        precision="{{ params.eval_precision }}",
        queue=EVAL_QUEUE,
        bias_probes=True,
    )
    evaluate_production = EvaluateModelOperator(
        task_id="evaluate_production",
        model="registry:{{ params.model_name }}@production",
        fallback_model=best.output["base_model_path"],
        dataset_file=dataset.output["test"],
        limit="{{ params.eval_limit }}",
        batch_size="{{ params.eval_batch_size }}",
        max_new_tokens="{{ params.eval_max_new_tokens }}",
        precision="{{ params.eval_precision }}",
        queue=EVAL_QUEUE,
    )
    gates = QualityGateOperator(
        task_id="quality_gates",
        candidate=evaluate_candidate.output,
        baseline=evaluate_production.output,
        gates="{{ params.gates }}",
        retries=0,
        on_failure_callback=AirloomNotifier("gate_failed"),
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
                "dataset_ref": dataset.output["ref"],
                "dataset_run": dataset.output["data_quality_run"],
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
        on_success_callback=AirloomNotifier("signoff_requested"),
    )
    signoff = ModelSignOffSensor(
        task_id="wait_for_signoff",
        model_name="{{ params.model_name }}",
        version=register.output["version"],
        policy=SIGNOFF_POLICY_TEMPLATED,
        poll_interval=5,
        timeout=timedelta(days=7),
        retries=0,
        on_failure_callback=AirloomNotifier("signoff_overdue"),
    )
    # Canary before promotion: the approved version goes to the alias `canary` first (verified, sign-off
    # checked), answers the test split's prompts through the serving gateway, and only then is `production`
    # moved to it, by the same promotion rule and policy. A failed canary leaves `production` where it was.
    deploy = DeployModelOperator(
        task_id="deploy",
        model_name="{{ params.model_name }}",
        version=register.output["version"],
        alias="canary",
        require_approval=True,
        policy=SIGNOFF_POLICY_TEMPLATED,
    )
    canary = CanaryOperator(
        task_id="canary",
        model_name="{{ params.model_name }}",
        alias="canary",
        version=register.output["version"],
        dataset_file=dataset.output["test"],
        on_failure_callback=AirloomNotifier("canary_failed"),
    )
    promote = DeployModelOperator(
        task_id="promote",
        model_name="{{ params.model_name }}",
        version=register.output["version"],
        alias="production",
        policy=SIGNOFF_POLICY_TEMPLATED,
    )

    best >> [evaluate_candidate, evaluate_production] >> gates >> register >> signoff
    signoff >> deploy >> canary >> promote
