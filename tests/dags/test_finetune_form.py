"""The llm_finetune form: a preset chosen by name (or a path), every field on top of it, each value
arriving where the run uses it: the TrainConfig the train task writes before launching, the launch
command, the evaluation tasks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"

# Every form field set to a value that is neither its default nor the chosen preset's.
FORM = {
    "config": "tiny_llama/0.5m_full_1proc_packed",
    "method": "lora",
    "launcher": "torchrun",
    "zero_stage": 1,
    "precision": "bf16",  # DeepSpeed takes bf16 on CPU too
    "max_length": 64,
    "learning_rate": 0.01,
    "warmup_steps": 5,
    "batch_size": 4,
    "gradient_accumulation_steps": 2,
    "max_steps": 7,
    "packing": False,  # the preset packs: an explicit "off" overrides it
    "checkpoint_every": 3,
    "chat_truncation": "drop",
    "seed": 3,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.1,
    "lora_target_modules": "q_proj,v_proj",
    "nproc_per_node": 2,
    "nnodes": 2,
    "master_addr": "10.1.2.3",
    "master_port": 29611,
    "eval_batch_size": 8,
    "eval_max_new_tokens": 16,
    "eval_precision": "bf16",
    "eval_limit": 11,
    "sweep_eval_limit": 5,
}
TRAIN_FIELDS = [k for k in FORM if k != "config" and not k.startswith(("eval", "sweep"))]


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS)).dags["llm_finetune"]


class _TI:
    dag_id, task_id, map_index = "llm_finetune", "train", 0

    def __init__(self):
        self.pushed = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value

    def xcom_pull(self, task_ids=None, key="return_value", **_):
        return f"xcom:{task_ids}.{key}"


def _rendered(task, params: dict) -> dict:
    """The task's templated arguments as a run renders them (a mapped task keeps them in partial_kwargs)."""
    context = {"params": params, "ti": _TI()}
    given = getattr(task, "partial_kwargs", None)
    return {
        name: task.render_template(given.get(name) if given is not None else getattr(task, name), context)
        for name in task.template_fields
    }


def _plan(dag, params: dict) -> list[dict]:
    plan = copy.deepcopy(dag.get_task("plan_trials"))  # rendering replaces the templates in place
    plan.render_template_fields({"params": params})
    return plan.execute(context={})


def _tiny_base(folder: Path) -> Path:
    """Config and tokenizer only: what the train task checks before launching (no weights needed)."""
    from transformers import LlamaConfig

    from airloom.training.base import train_tokenizer

    LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(folder)  # max_position_embeddings 2048
    train_tokenizer(["add 12 and 30", "reverse the word river"] * 20, vocab_size=300).save_pretrained(folder)
    return folder


class _Launch:
    """Stands in for the training child process: records the command and writes what the recipe writes."""

    commands: list[list[str]] = []

    def __init__(self, cmd, env, cwd):
        self.cmd, self.cwd = cmd, Path(cwd)
        _Launch.commands.append(cmd)

    def run(self, log):
        (self.cwd / "train_metrics.json").write_text(json.dumps({"steps": 7, "final_loss": 1.0}))

    def kill(self):
        pass


def test_default_run_trains_as_before(dag):
    """Left alone, the form trains the demo's preset with the values the DAG used before presets."""
    from airloom.training.config import TrainConfig

    params = dag.params.validate()
    assert params["config"] == "tiny_llama/0.5m_full_1proc"
    (trial,) = _plan(dag, params)
    cfg = TrainConfig.from_dict({k: v for k, v in trial.items() if v is not None})
    before = {
        "method": "full",
        "launcher": "deepspeed",
        "nproc_per_node": 1,
        "zero_stage": 2,
        "precision": "fp32",
        "learning_rate": 3e-3,
        "warmup_steps": 20,
        "batch_size": 32,
        "gradient_accumulation_steps": 1,
        "max_steps": 1500,
        "max_length": 128,
        "packing": False,
        "chat_truncation": "keep_last_turns",
        "seed": 0,
        "lora_target_modules": "all-linear",
    }
    assert {k: getattr(cfg, k) for k in before} == before
    assert cfg.checkpoint_every > 0  # new: a retry resumes
    evaluation = _rendered(dag.get_task("evaluate_candidate"), params)
    assert (evaluation["batch_size"], evaluation["max_new_tokens"]) == (
        64,
        32,
    )  # the operator's defaults before


def test_every_form_field_reaches_the_run(dag, tmp_path, monkeypatch):
    """Each field arrives: in the trial, in the TrainConfig the train task writes before launching,
    in the launch command (nodes, address, port) and in the evaluation tasks."""
    import airloom.training.launcher as launcher
    from airloom.airflow.operators.deepspeed import DeepSpeedTrainOperator

    params = {**dag.params.validate(), **FORM}
    (trial,) = _plan(dag, params)
    assert {k: trial[k] for k in TRAIN_FIELDS} == {k: FORM[k] for k in TRAIN_FIELDS}

    train_args = _rendered(dag.get_task("train"), params)
    base = _tiny_base(tmp_path / "base")
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    train_args.update(
        base_model=str(base),
        train_file=str(tmp_path / "train.jsonl"),
        validation_file=str(tmp_path / "validation.jsonl"),
        output_dir=str(tmp_path / "run"),
        config=trial,
    )
    monkeypatch.setattr(launcher, "TrainingProcess", _Launch)
    _Launch.commands.clear()
    op = DeepSpeedTrainOperator(task_id="train", **{k: v for k, v in train_args.items() if v is not None})
    ti = _TI()
    result = op.execute({"ti": ti, "run_id": "manual__1"})
    written = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert {k: written[k] for k in TRAIN_FIELDS} == {k: FORM[k] for k in TRAIN_FIELDS}
    assert result["config"] == written and written["base_model"] == str(base)
    (cmd,) = _Launch.commands
    flags = dict(zip(cmd, cmd[1:], strict=False))
    assert cmd[2] == "torch.distributed.run"
    assert (flags["--nnodes"], flags["--nproc_per_node"]) == ("2", "2")
    assert (flags["--master_addr"], flags["--master_port"]) == ("10.1.2.3", "29611")

    for task_id, limit in (("evaluate_candidate", 11), ("evaluate_production", 11), ("evaluate_trial", 5)):
        evaluation = _rendered(dag.get_task(task_id), params)
        assert (evaluation["batch_size"], evaluation["max_new_tokens"], evaluation["limit"]) == (8, 16, limit)
        assert evaluation["precision"] == "bf16"
    preflight = _rendered(dag.get_task("preflight"), params)
    assert (preflight["nnodes"], preflight["master_addr"]) == (2, "10.1.2.3")


def test_sweep_values_override_the_form_and_the_preset(dag):
    params = {**dag.params.validate(), "config": "tiny_llama/0.5m_lora_1proc", "lora_r": 4}
    params["sweep"] = {"lora_r": [8, 16]}
    trials = _plan(dag, params)
    assert [(t["method"], t["lora_r"], t["launcher"]) for t in trials] == [
        ("lora", 8, "torchrun"),
        ("lora", 16, "torchrun"),
    ]


def test_config_is_a_preset_name_or_a_yaml_path(dag, tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from airloom.training.presets import preset_names

    form = dag.params.get_param("config")
    assert form.schema["examples"] == preset_names()
    assert {"tiny_llama/0.5m_full_1proc", "llama_1b/1.1b_lora_1gpu_zero2_packed"} <= set(preset_names())
    own = tmp_path / "mine.yaml"
    own.write_text("method: lora\nlora_r: 2\nmax_steps: 9\n")
    (trial,) = _plan(dag, {**dag.params.validate(), "config": str(own)})
    assert (trial["method"], trial["lora_r"], trial["max_steps"]) == ("lora", 2, 9)
    with pytest.raises(
        AirflowFailException, match=r"'tiny/nope' is neither a shipped preset nor a YAML file"
    ):
        _plan(dag, {**dag.params.validate(), "config": "tiny/nope"})
    # a form value that cannot work with the preset is refused when the run starts, naming it
    with pytest.raises(
        AirflowFailException, match=r"offload_optimizer needs zero_stage.*mine.yaml with .*zero_stage set"
    ):
        own.write_text("offload_optimizer: true\n")
        _plan(dag, {**dag.params.validate(), "config": str(own), "zero_stage": 0})


def test_form_refuses_values_outside_each_fields_choices(dag):
    from airflow.sdk.exceptions import ParamValidationError

    for name, bad in (
        ("method", "dpo"),
        ("precision", "int8"),
        ("zero_stage", 4),
        ("lora_dropout", 1.0),
        ("nnodes", 0),
        ("chat_truncation", "truncate"),
        ("eval_batch_size", 0),
    ):
        with pytest.raises(ParamValidationError):
            dag.params[name] = bad
    form = dag.params.get_param("chat_truncation")
    assert set(form.schema["values_display"]) == set(form.schema["enum"]) == {"keep_last_turns", "drop"}


def test_form_is_sectioned_and_titled(dag):
    for name, param in dag.params.items():
        assert param.schema.get("title"), name
        if name != "dataset":  # its wording belongs to the dataset catalog
            assert param.schema.get("section"), name
    sections = {p.schema.get("section") for p in dag.params.values()} - {None}
    assert len(sections) >= 5


def test_preflight_task_fails_an_empty_split_without_retry(dag, tmp_path):
    """The 12-row case: the test split came out empty; the run fails at once, naming the file."""
    from airflow.sdk.exceptions import AirflowFailException

    from airloom.airflow.operators.deepspeed import TrainingPreflightOperator

    splits = {}
    for split, rows in (("train", 10), ("validation", 2), ("test", 0)):
        splits[split] = tmp_path / f"{split}.jsonl"
        splits[split].write_text('{"prompt": "p", "response": "r"}\n' * rows)
    task = dag.get_task("preflight")
    op = TrainingPreflightOperator(task_id="preflight", splits={k: str(v) for k, v in splits.items()})
    with pytest.raises(AirflowFailException, match=rf"{splits['test']}: the test split is empty"):
        op.execute(context={})
    splits["test"].write_text('{"prompt": "p", "response": "r"}\n')
    assert op.execute(context={}) == {"train": 10, "validation": 2, "test": 1}
    assert task.retries == 0
    multi = TrainingPreflightOperator(task_id="p", splits={}, nnodes=2, master_addr=None)
    with pytest.raises(AirflowFailException, match="nnodes 2 needs master_addr"):
        multi.execute(context={})


def test_a_multi_node_run_fans_out_one_task_per_extra_node(dag, tmp_path, monkeypatch):
    """nnodes 3 over a 2-trial sweep: each trial's nodes 1 and 2 get a train_other_nodes launch sharing
    the trial's own master port (trials running at once must not meet at one rendezvous)."""
    import airloom.training.launcher as launcher
    from airloom.airflow.operators.deepspeed import DeepSpeedTrainOperator

    params = {
        **dag.params.validate(),
        "nnodes": 3,
        "master_addr": "10.1.2.3",
        "master_port": 29600,
        "sweep": {"learning_rate": [0.001, 0.003]},
    }
    trials = _plan(dag, params)
    assert [t["master_port"] for t in trials] == [29600, 29601]
    others = _other_nodes(dag, trials)
    assert [(o["config"]["master_port"], o["node_rank"]) for o in others] == [
        (29600, 1),
        (29600, 2),
        (29601, 1),
        (29601, 2),
    ]
    assert {"preflight", "plan_other_nodes"} <= dag.get_task("train_other_nodes").upstream_task_ids

    # One extra node's task launches node_rank 1 at the trial's rendezvous and returns no model.
    base = _tiny_base(tmp_path / "base")
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    monkeypatch.setattr(launcher, "TrainingProcess", _Launch)
    _Launch.commands.clear()
    op = DeepSpeedTrainOperator(
        task_id="train_other_nodes",
        base_model=str(base),
        train_file=str(tmp_path / "train.jsonl"),
        validation_file=str(tmp_path / "validation.jsonl"),
        output_dir=str(tmp_path / "node1"),
        **others[2],
    )
    result = op.execute({"ti": _TI(), "run_id": "manual__1"})
    assert result == {"node_rank": 1, "output_dir": str(tmp_path / "node1"), "config": result["config"]}
    (cmd,) = _Launch.commands
    flags = dict(zip(cmd, cmd[1:], strict=False))
    assert (flags["--node_rank"], flags["--num_nodes"], flags["--master_port"]) == ("1", "3", "29601")
    assert "--no_ssh" in cmd


def test_one_node_has_no_other_node_launches(dag):
    assert _other_nodes(dag, _plan(dag, dag.params.validate())) == []


def _other_nodes(dag, trials: list[dict]) -> list[dict]:
    task = copy.deepcopy(dag.get_task("plan_other_nodes"))
    task.trials = trials
    return task.execute(context={})
