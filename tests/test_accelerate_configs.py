"""configs/accelerate/*.yaml parse under the installed accelerate, and every key is one it reads.

accelerate checks a config's top-level keys (ClusterConfig) but copies the keys under
fsdp_config / deepspeed_config onto its launch arguments unchecked, so a misspelt one is
silently ignored: each nested key must therefore name an `accelerate launch` option.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

FOLDER = Path(__file__).parents[1] / "configs" / "accelerate"
NAMES = ["ddp", "multinode", "fsdp_full_shard", "fsdp_shard_grad_op", "deepspeed_zero2", "deepspeed_zero3_offload"]


def _launch_args(path: Path, *extra: str):
    # machine_rank 1: rank 0 would check that the config's port is free on this machine.
    args = launch_command_parser().parse_args(["--config_file", str(path), "--machine_rank", "1", *extra, "x.py"])
    return _validate_launch_command(args)[0]


def test_every_named_config_is_there_and_nothing_else():
    assert sorted(p.stem for p in FOLDER.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_parses_and_says_how_to_launch_it(name):
    path = FOLDER / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert f"accelerate launch --config_file configs/accelerate/{name}.yaml" in "\n".join(header)
    assert "-m difftrain train CONFIG" in "\n".join(header)
    options = {action.dest for action in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in yaml.safe_load(path.read_text()).get(section, {}):
            assert key in options, f"{name}.yaml: {section}.{key} is no `accelerate launch` option"


def test_multinode_is_a_two_machine_template():
    config = load_config_from_file(str(FOLDER / "multinode.yaml"))
    assert (config.num_machines, config.main_process_ip) == (2, "MAIN_NODE_IP")
    args = _launch_args(FOLDER / "multinode.yaml")
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)


@pytest.mark.parametrize("name, reshard, checkpointing, precision", [
    ("fsdp_full_shard", True, False, "no"),
    ("fsdp_shard_grad_op", False, True, "bf16"),
])
def test_fsdp_configs_build_the_plugin_accelerate_would(name, reshard, checkpointing, precision):
    args = _launch_args(FOLDER / f"{name}.yaml")
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == precision
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.reshard_after_forward, plugin.activation_checkpointing) == (2, reshard, checkpointing)


@pytest.mark.parametrize("name, stage, offload", [("deepspeed_zero2", 2, "none"), ("deepspeed_zero3_offload", 3, "cpu")])
def test_deepspeed_configs_build_the_plugin_accelerate_would(name, stage, offload):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    launch = launch_command_parser().parse_args(["--config_file", str(FOLDER / f"{name}.yaml"), "--machine_rank", "1",
                                                 "x.py"])
    args, defaults, _ = _validate_launch_command(launch)
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == offload
    # difftrain refuses zero3_init_flag (it would partition the frozen models as they load)
    assert plugin.zero3_init_flag is False


def test_fsdp_1_is_refused_with_the_key_to_set():
    """FSDP 1 is accelerate's default when a config names no fsdp_version; on a GPU accelerate would run it,
    after difftrain built the optimizer on parameters FSDP 1 then replaces."""
    from difftrain.training.sharding import ShardingError, check_launch

    args = _launch_args(FOLDER / "fsdp_full_shard.yaml")
    ours = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, ours):
        check_launch()  # version 2
    for version in ({"FSDP_VERSION": "1"}, {}):
        env = {key: value for key, value in ours.items() if key != "FSDP_VERSION"} | version
        with mock.patch.dict(os.environ, env, clear=True):
            with pytest.raises(ShardingError, match="fsdp_version 1 .*set fsdp_version: 2 in the accelerate config"):
                check_launch()
