"""DeepSpeed ZeRO-2 / ZeRO-3 through the ``deepspeed`` launcher with two CPU ranks (gloo).

The first DeepSpeed run on a machine compiles a small communication extension (about 1.5 minutes, cached
under ~/.cache/torch_extensions); later runs take about 30 seconds each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, run_command, tiny_script_env
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher (extra 'train')"),
]


@pytest.mark.parametrize("zero_config, port", [("scripts/zero2.json", 29602), ("scripts/zero3.json", 29603)])
def test_finetune_with_deepspeed_two_ranks(tiny_models, tiny_dataset, tmp_path, zero_config, port):
    output_dir = tmp_path / "ds"
    env = tiny_script_env(
        tiny_models, tiny_dataset, output_dir, LAUNCHER="deepspeed", NUM_GPUS=2, DS_CONFIG=zero_config,
        DATA_PATH=tiny_dataset.instruct_json, PRETRAIN_ADAPTER="", GLOBAL_BATCH=4, PER_DEVICE_BATCH=1,
        GRADIENT_CHECKPOINTING="True", OMP_NUM_THREADS=1, MASTER_PORT=port,
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
    )
    result = run_command(["bash", "scripts/finetune.sh"], env=env, timeout=900)
    assert "global batch 4 = 2 GPUs x 1 x 2 accumulation (deepspeed)" in result.stderr

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    weights = load_file(output_dir / "model.safetensors")
    base = load_file(f"{tiny_models.llm}/model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    assert weights[key].shape == base[key].shape, "ZeRO-3 must save gathered, full-size weights"
    assert not torch.equal(weights[key], base[key])
    assert weights["model.mm_projector.0.weight"].numel() > 0


@pytest.mark.parametrize("zero_config, port", [("scripts/zero2.json", 29604), ("scripts/zero3.json", 29605)])
def test_pmod_packing_with_deepspeed_two_ranks(tiny_models, tiny_dataset, tmp_path, zero_config, port):
    """``PACKING=True`` through scripts/finetune_pmod.sh: p-MoD, padding-free batches of 2 per rank, gradient
    checkpointing, ZeRO sharding; the routers train and the saved weights are whole."""
    output_dir = tmp_path / "ds-packed"
    env = tiny_script_env(
        tiny_models, tiny_dataset, output_dir, LAUNCHER="deepspeed", NUM_GPUS=2, DS_CONFIG=zero_config,
        DATA_PATH=tiny_dataset.instruct_json, PRETRAIN_ADAPTER="", GLOBAL_BATCH=4, PER_DEVICE_BATCH=2,
        GRADIENT_CHECKPOINTING="True", PACKING="True", OMP_NUM_THREADS=1, MASTER_PORT=port,
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
    )
    result = run_command(["bash", "scripts/finetune_pmod.sh"], env=env, timeout=900)
    assert "--packing: every batch runs as one row of its samples (attention pmod_packed_sdpa)" in result.stderr

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert all(entry["loss"] > 0 for entry in state["log_history"] if "loss" in entry)
    weights = load_file(output_dir / "model.safetensors")
    routers = [key for key in weights if key.endswith("router.router.weight")]
    assert routers and any(weights[key].abs().sum() > 0 for key in routers), "zero-initialised routers never trained"
    base = load_file(f"{tiny_models.llm}/model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    assert weights[key].shape == base[key].shape and not torch.equal(weights[key], base[key])


def start_node(env, node_rank):
    return subprocess.Popen(["bash", "scripts/finetune.sh"], cwd=REPO_ROOT, env={**env, "NODE_RANK": str(node_rank)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_nodes(env, count=2, timeout=900):
    """Start every "node" (one process each, on localhost) and wait for all; fail with a node's output."""
    nodes = [start_node(env, rank) for rank in range(count)]
    outputs = [node.communicate(timeout=timeout) for node in nodes]
    for rank, (node, (stdout, stderr)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{stdout[-2000:]}\n{stderr[-6000:]}"
    return outputs


@pytest.mark.parametrize("launcher, zero_config, port", [("torchrun", "scripts/zero2.json", 29611),
                                                         ("torchrun", "scripts/zero3.json", 29612),
                                                         ("deepspeed", "scripts/zero3.json", 29613)])
def test_two_nodes_on_localhost_keep_the_global_batch(tiny_models, tiny_dataset, tmp_path, launcher, zero_config,
                                                      port):
    """Two "nodes" of one CPU process each: torchrun with NNODES/NODE_RANK, deepspeed with HOSTFILE and NO_SSH."""
    output_dir = tmp_path / "nodes"
    env = tiny_script_env(
        tiny_models, tiny_dataset, output_dir, LAUNCHER=launcher, NUM_GPUS=1, DS_CONFIG=zero_config,
        DATA_PATH=tiny_dataset.instruct_json, PRETRAIN_ADAPTER="", GLOBAL_BATCH=4, PER_DEVICE_BATCH=1,
        GRADIENT_CHECKPOINTING="False", OMP_NUM_THREADS=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
    )
    if launcher == "deepspeed":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names for this machine
        env.update(HOSTFILE=str(hostfile), NO_SSH="1")
    else:
        env["NNODES"] = "2"
    outputs = run_nodes(env)
    assert "global batch 4 = 2 nodes x 1 GPUs x 1 x 2 accumulation" in outputs[0][1]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    weights = load_file(output_dir / "model.safetensors")
    base = load_file(f"{tiny_models.llm}/model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    assert weights[key].shape == base[key].shape and not torch.equal(weights[key], base[key])
