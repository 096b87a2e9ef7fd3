"""TrainConfig validation and coercion, the DeepSpeed JSON it derives, and the launcher command lines."""

from __future__ import annotations

import json
import sys

import pytest

from airloom.exceptions import UsageError
from airloom.training.config import TrainConfig
from airloom.training.launcher import RECIPE_MODULE, LaunchSpec, build_command

# -- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"method": "dpo"}, r"training method 'dpo' is not one of \('full', 'lora', 'qlora'\)"),
        ({"launcher": "mpirun"}, r"launcher 'mpirun' is not one of"),
        ({"zero_stage": 4}, r"zero_stage must be 0, 1, 2 or 3, got 4"),
        ({"precision": "int8"}, r"precision 'int8' is not one of"),
        ({"launcher": "python", "nproc_per_node": 2}, r"launcher 'python' runs one process"),
        ({"learning_rate": 0}, r"learning_rate must be > 0"),
        ({"batch_size": -1}, r"batch_size must be > 0"),
        ({"zero_stage": 0, "offload_optimizer": True}, r"offload_optimizer needs zero_stage 1, 2 or 3"),
        ({"lora_r": 0}, r"LoRA needs lora_r >= 1"),
        ({"lora_dropout": 1.0}, r"0 <= lora_dropout < 1"),
        ({"lora_target_modules": " , "}, r"lora_target_modules is empty"),
        ({"lora_target_modules": 3}, r"lora_target_modules must be text or a list"),
        ({"warmup_steps": -1}, r"warmup_steps must be >= 0"),
        ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps and nproc_per_node >= 1"),
    ],
)
def test_invalid_values_are_rejected(options, match):
    with pytest.raises(UsageError, match=match):
        TrainConfig.from_dict(options)


def test_unknown_key_is_rejected_and_known_keys_listed():
    with pytest.raises(
        UsageError, match=r"unknown training option\(s\) \['learning_rat'\]; known: .*'learning_rate'"
    ):
        TrainConfig.from_dict({"learning_rat": 1e-3})


def test_non_numeric_string_for_number_field():
    with pytest.raises(UsageError, match=r"training option learning_rate must be a number, got 'fast'"):
        TrainConfig.from_dict({"learning_rate": "fast"})


def test_yaml_1_1_exponent_string_is_coerced_to_float(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("learning_rate: 2e-3\nbatch_size: '16'\nmax_steps: 50\nmax_seconds: 1e2\nzero_stage: 3\n")
    import yaml

    assert yaml.safe_load(path.read_text())["learning_rate"] == "2e-3"  # the case being fixed
    cfg = TrainConfig.from_file(path)
    assert cfg.learning_rate == pytest.approx(0.002) and isinstance(cfg.learning_rate, float)
    assert cfg.batch_size == 16 and isinstance(cfg.batch_size, int)
    assert cfg.max_seconds == 100.0 and isinstance(cfg.max_seconds, float)
    assert cfg.max_steps == 50 and cfg.zero_stage == 3


def test_from_file_overrides_win_and_none_overrides_are_ignored(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("launcher: torchrun\nmax_steps: 10\nbase_model: base\n")
    cfg = TrainConfig.from_file(path, launcher="python", max_steps=None, output_dir=str(tmp_path / "o"))
    assert (cfg.launcher, cfg.max_steps, cfg.base_model, cfg.output_dir) == (
        "python",
        10,
        "base",
        str(tmp_path / "o"),
    )


def test_from_file_rejects_unreadable_and_non_mapping(tmp_path):
    with pytest.raises(UsageError, match=r"missing\.yaml: cannot read training config"):
        TrainConfig.from_file(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match=r"list\.yaml: training config must be a mapping, got list"):
        TrainConfig.from_file(path)


def test_save_round_trips(tmp_path):
    cfg = TrainConfig(
        base_model="b",
        train_file="t.jsonl",
        output_dir="out",
        method="lora",
        zero_stage=1,
        max_steps=7,
        extra={"note": "x"},
    )
    path = cfg.save(tmp_path / "train_config.json")
    assert TrainConfig.from_dict(json.loads(path.read_text())) == cfg
    assert TrainConfig.from_file(path) == cfg  # JSON is YAML: the recipe reads the saved file this way


# -- deepspeed config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    cfg = TrainConfig(
        zero_stage=stage, batch_size=32, gradient_accumulation_steps=2, max_grad_norm=0.5, precision="bf16"
    )
    ds = cfg.deepspeed_config(world_size=4)
    assert ds["zero_optimization"] == {"stage": stage}
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    json.dumps(ds)  # written next to the outputs as an artifact


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_optimizer_to_cpu(stage):
    ds = TrainConfig(zero_stage=stage, offload_optimizer=True).deepspeed_config()
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all-linear", "all-linear"),
        ("q_proj, v_proj", ["q_proj", "v_proj"]),
        (["q_proj", "o_proj"], ["q_proj", "o_proj"]),
    ],
)
def test_lora_target_modules_as_peft_takes_them(value, expected):
    assert TrainConfig.from_dict({"lora_target_modules": value}).peft_target_modules() == expected


def test_micro_batch_never_below_one():
    assert TrainConfig(batch_size=2).deepspeed_config(world_size=8)["train_micro_batch_size_per_gpu"] == 1
    assert TrainConfig(batch_size=32).deepspeed_config()["train_micro_batch_size_per_gpu"] == 32


# -- launcher commands --------------------------------------------------------------------------------


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_deepspeed_single_node(tmp_path):
    cfg = tmp_path / "train_config.json"
    cmd = build_command(
        LaunchSpec(config_path=cfg, launcher="deepspeed", nproc_per_node=2, master_port=29511)
    )
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert _after(cmd, "--master_addr") == "127.0.0.1"
    assert _after(cmd, "--master_port") == "29511"
    assert _after(cmd, "--num_gpus") == "2"
    assert cmd[-4:] == ["--module", RECIPE_MODULE, "--config", str(cfg)]
    for flag in ("--no_ssh", "--hostfile", "--node_rank", "--num_nodes"):
        assert flag not in cmd


def test_deepspeed_picks_a_free_port_when_none_given(tmp_path):
    cmd = build_command(LaunchSpec(config_path=tmp_path / "c.json"))
    port = int(_after(cmd, "--master_port"))
    assert 0 < port < 65536


def test_deepspeed_multi_node_without_ssh(tmp_path):
    cfg = tmp_path / "c.json"
    cmd = build_command(
        LaunchSpec(
            config_path=cfg,
            launcher="deepspeed",
            nproc_per_node=8,
            nnodes=3,
            node_rank=2,
            master_addr="10.0.0.5",
            master_port=29500,
        )
    )
    assert "--no_ssh" in cmd
    assert _after(cmd, "--node_rank") == "2"
    assert _after(cmd, "--num_nodes") == "3"
    assert _after(cmd, "--master_addr") == "10.0.0.5"
    assert _after(cmd, "--num_gpus") == "8"
    # DeepSpeed refuses nnodes > 1 without a hostfile even with --no_ssh: one is written next to the config.
    hostfile = tmp_path / "hostfile"
    assert _after(cmd, "--hostfile") == str(hostfile)
    assert hostfile.read_text().splitlines() == ["node0 slots=8", "node1 slots=8", "node2 slots=8"]
    # Launcher options come before the module; only the recipe's own options after it.
    assert cmd.index("--no_ssh") < cmd.index("--module")
    assert cmd[-4:] == ["--module", RECIPE_MODULE, "--config", str(cfg)]


def test_deepspeed_hostfile(tmp_path):
    cmd = build_command(
        LaunchSpec(
            config_path=tmp_path / "c.json",
            launcher="deepspeed",
            nnodes=2,
            hostfile="/etc/hostfile",
            master_port=29500,
        )
    )
    assert _after(cmd, "--hostfile") == "/etc/hostfile"
    assert _after(cmd, "--num_nodes") == "2"
    assert "--no_ssh" not in cmd and "--node_rank" not in cmd


def test_torchrun(tmp_path):
    cfg = tmp_path / "c.json"
    cmd = build_command(
        LaunchSpec(
            config_path=cfg,
            launcher="torchrun",
            nproc_per_node=4,
            nnodes=2,
            node_rank=1,
            master_addr="head",
            master_port=29400,
        )
    )
    assert cmd == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "4",
        "--nnodes",
        "2",
        "--node_rank",
        "1",
        "--master_addr",
        "head",
        "--master_port",
        "29400",
        "-m",
        RECIPE_MODULE,
        "--config",
        str(cfg),
    ]


def test_python(tmp_path):
    cfg = tmp_path / "c.json"
    assert build_command(LaunchSpec(config_path=cfg, launcher="python")) == [
        sys.executable,
        "-m",
        RECIPE_MODULE,
        "--config",
        str(cfg),
    ]


def test_deepspeed_runner_accepts_the_commands(tmp_path):
    """Parse each command with the installed DeepSpeed runner's own parser and hostfile reader."""
    runner = pytest.importorskip("deepspeed.launcher.runner")
    user_hostfile = tmp_path / "hosts"
    user_hostfile.write_text("gpu-a slots=2\ngpu-b slots=2\n")
    specs = {
        "single": LaunchSpec(config_path=tmp_path / "single" / "c.json", nproc_per_node=2, master_port=1234),
        "no_ssh": LaunchSpec(
            config_path=tmp_path / "c.json",
            nproc_per_node=2,
            nnodes=2,
            node_rank=1,
            master_addr="10.0.0.5",
            master_port=1234,
        ),
        "hostfile": LaunchSpec(
            config_path=tmp_path / "c.json",
            nproc_per_node=2,
            nnodes=2,
            hostfile=str(user_hostfile),
            master_port=1234,
        ),
    }
    for name, spec in specs.items():
        args = runner.parse_args(build_command(spec)[3:])
        assert args.module and args.user_script == RECIPE_MODULE, name
        assert args.user_args == ["--config", str(spec.config_path)], name
        assert (args.num_gpus, args.master_port) == (2, 1234), name
        if spec.nnodes > 1:
            assert args.num_nodes == 2
            assert list(runner.fetch_hostfile(args.hostfile)) == (
                ["gpu-a", "gpu-b"] if spec.hostfile else ["node0", "node1"]
            )
        assert args.no_ssh == (name == "no_ssh"), name
        if name == "no_ssh":
            assert (args.node_rank, args.master_addr) == (1, "10.0.0.5")


def test_qlora_is_refused_before_any_work_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    from airloom.training.recipe import preflight

    cfg = TrainConfig(
        base_model="b", train_file="t.jsonl", output_dir=str(tmp_path), method="qlora", precision="bf16"
    )
    if torch.cuda.is_available():
        pytest.skip("this check is about machines without CUDA")
    with pytest.raises(UsageError, match="qlora .* needs a CUDA GPU"):
        preflight(cfg)
    with pytest.raises(UsageError, match="qlora needs zero_stage 0-2 and precision bf16 or fp16"):
        TrainConfig(method="qlora", precision="fp32")


def test_boolean_options_take_booleans_only():
    # DAGs render params as native objects; text would make "False" true.
    assert TrainConfig.from_dict({"packing": True}).packing is True
    for text in ("False", "maybe"):
        with pytest.raises(UsageError, match=f"packing must be true or false, got '{text}'"):
            TrainConfig.from_dict({"packing": text})


def test_parameter_offload_is_a_zero3_option():
    ds = TrainConfig(zero_stage=3, offload_params=True, offload_optimizer=True).deepspeed_config()
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(UsageError, match="offload_params needs zero_stage 3"):
        TrainConfig(zero_stage=2, offload_params=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nnodes": 2}, "nnodes 2 needs master_addr"),
        (
            {"nnodes": 2, "master_addr": "10.0.0.1", "launcher": "python"},
            "needs launcher deepspeed or torchrun",
        ),
        ({"nnodes": 0}, "nnodes must be >= 1"),
        ({"master_port": 70000}, "master_port must be 1-65535"),
        ({"rendezvous_timeout_s": 0}, "rendezvous_timeout_s must be > 0"),
    ],
)
def test_multi_node_settings_that_cannot_rendezvous_are_refused(options, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig(**options)


def test_multi_node_trials_get_a_port_each_and_a_launch_per_extra_node():
    from airloom.training.sweep import other_node_launches, plan_trials, spread_master_ports

    base = {"nnodes": 2, "master_addr": "10.0.0.1"}
    trials = spread_master_ports(plan_trials({"learning_rate": [1e-3, 2e-3]}, base))
    assert [t["master_port"] for t in trials] == [29500, 29501]
    assert [(o["config"]["learning_rate"], o["node_rank"]) for o in other_node_launches(trials)] == [
        (1e-3, 1),
        (2e-3, 1),
    ]
    single = spread_master_ports(plan_trials(None, {}))
    assert "master_port" not in single[0] and other_node_launches(single) == []
