"""Benchmark harness: the --quick CLI runs both models end to end, KV bytes equal pmod.accounting exactly,
the layout comparison computes the same layer output, and the GPU sync check passes (and can fail).

Timings are never asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import run_command

from benchmarks.models import PRESETS, build_pair, llm_inputs
from benchmarks.run import parse_args
from benchmarks.suite import kv_cache

EXPECTED_MEASUREMENTS = {
    "prefill, LLM only", "prefill, whole model (pixels)", "decode, latency per token", "decode, throughput",
    "decode, uneven rows, latency per token", "decode, uneven rows, throughput",
    "training step (fwd+bwd, grad ckpt)", "training step, peak memory", "KV cache after prefill, measured",
    "KV cache after prefill, pmod.accounting",
}


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--warmup", "0", "--repeats", "1",
               "--decode-tokens", "2", "--decode-batches", "1,2", "--json", str(out)]
    completed = run_command(command, timeout=300)
    return json.loads(out.read_text()), completed.stdout


def test_quick_run_reports_environment_and_shapes(quick_result):
    result, stdout = quick_result
    env = result["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "float32"
    assert env["torch"] == torch.__version__
    assert result["command"].startswith("python -m benchmarks.run --quick")
    shapes = result["shapes"]
    assert (shapes["n_text"], shapes["n_vision"], shapes["n_tiles"]) == (24, 80, 5)
    assert shapes["llm"]["hidden_size"] == 64 and shapes["mod_layers"] == 6
    assert "| measurement | batch | unit | dense | p-MoD |" in stdout
    assert result["command"] in stdout


def test_quick_run_measures_both_models(quick_result):
    rows = quick_result[0]["model"]
    assert {row["measurement"] for row in rows} == EXPECTED_MEASUREMENTS
    assert {row["batch"] for row in rows if row["measurement"].startswith("decode, l")} == {1, 2}
    assert {row["batch"] for row in rows if "uneven" in row["measurement"]} == {2}
    for row in rows:
        if row["unit"] == "MiB" and row["measurement"].startswith("training"):
            continue  # peak RSS growth can be 0 or n/a on CPU
        assert row["dense"] > 0 and row["pmod"] > 0, row
        assert row["ratio"] == pytest.approx(row["pmod"] / row["dense"])
    flops = {row["measurement"]: row["predicted_ratio"] for row in rows if row["predicted_kind"] == "FLOPs"}
    assert 0 < flops["prefill, LLM only"] < 1 and 0 < flops["prefill, whole model (pixels)"] < 1


def test_quick_run_kv_layer_and_layout_sections(quick_result):
    result = quick_result[0]
    for name in ("dense", "pmod"):
        assert result["kv_per_layer"][name]["measured"] == result["kv_per_layer"][name]["predicted"]
    kept = [row["kept_tokens"] for row in result["layer_costs"]]
    assert kept == sorted(kept, reverse=True) and kept[0] == 24 + 80
    rows = {row["layout"]: row for row in result["attention"]["rows"]}
    packed = rows["packed [1, sum Lk, D], per-sample SDPA"]
    assert packed["ms"] > 0 and packed["max_abs_diff"] < 1e-5
    assert packed["tokens_computed"] == sum(result["attention"]["lengths"])
    padded = rows["padded [B, Lk_max, D], causal SDPA (model today)"]
    assert padded["tokens_computed"] == 8 * max(result["attention"]["lengths"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_equal_accounting_per_layer(dtype):
    pair = build_pair(PRESETS["tiny"], torch.device("cpu"), dtype)
    kv = kv_cache(pair)
    assert kv["pmod"]["measured"] == kv["pmod"]["predicted"]
    assert kv["dense"]["measured"] == kv["dense"]["predicted"]
    # Tiny Llama: 2 KV heads x 16 dims, 104 tokens; layer 7 keeps 24 text + int(80 * 0.15) = 12 vision tokens.
    per_token = 2 * 2 * 16 * dtype.itemsize
    assert kv["dense"]["measured"][7] == 104 * per_token
    assert kv["pmod"]["measured"][7] == 36 * per_token


def test_dense_twin_shares_the_pmod_weights():
    pair = build_pair(PRESETS["tiny"], torch.device("cpu"), torch.float32)
    index = pair.pmod.get_model().schedule.mod_layers[0]
    routed = pair.pmod.get_model().layers[index].decoder_layer.mlp.up_proj.weight
    assert pair.dense.get_model().layers[index].mlp.up_proj.weight is routed
    assert not any(t.is_meta for t in list(pair.dense.parameters()) + list(pair.dense.buffers()))


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub's offline switch is read at import; set it directly so a hub name never waits on the network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-next-7b"])
def test_gpu_presets_build_offline_at_7b_shapes(name, offline_hub):
    """On the meta device: the built-in CLIP-L/336 config is used (no hub), and the shapes are Vicuna-7B's."""
    pair = build_pair(PRESETS[name], torch.device("meta"), torch.bfloat16)
    config = pair.pmod.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 11008, 32)
    assert pair.pmod.get_model().vision_tower.config.image_size == 336
    assert pair.pmod.dtype == torch.bfloat16
    assert len(pair.pmod.get_model().schedule.mod_layers) == 24
    llm_params = sum(p.numel() for n, p in pair.dense.named_parameters() if "vision_tower" not in n)
    assert 6.7e9 < llm_params < 7.0e9


def test_routed_prefill_reads_no_device_value_on_the_host():
    """CPU stand-in for --check-syncs: on the meta device any data-dependent host read raises."""
    from benchmarks.suite import new_cache

    pair = build_pair(PRESETS["tiny"], torch.device("meta"), torch.float32)
    inputs = llm_inputs(pair, 2)
    with torch.no_grad():
        out = pair.pmod(inputs_embeds=inputs.inputs_embeds, past_key_values=new_cache(pair.pmod, True),
                        use_cache=True, logits_to_keep=1, **inputs.routing())
    assert out.logits.shape == (2, 1, 1000) and out.logits.is_meta


def test_bad_flags_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--parts", "prefill,bogus"])
    assert "--parts: unknown bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_sync_check_refuses_cpu():
    from benchmarks.syncs import check_prefill_syncs

    pair = build_pair(PRESETS["tiny"], torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="--check-syncs needs"):
        check_prefill_syncs(pair)


def test_uneven_inputs_are_left_padded_with_fewer_vision_tokens_per_row():
    pair = build_pair(PRESETS["tiny"], torch.device("cpu"), torch.float32)
    inputs = llm_inputs(pair, 4, uneven=True)
    assert inputs.counts.n_target == (80, 70, 60, 50) and inputs.counts.n_valid == (104, 94, 84, 74)
    assert inputs.attention_mask.sum(1).tolist() == list(inputs.counts.n_valid)
    assert inputs.target_mask.sum(1).tolist() == list(inputs.counts.n_target)
    assert not (inputs.target_mask & ~inputs.attention_mask).any() and inputs.attention_mask[:, -1].all()


@pytest.mark.gpu
def test_layer_loop_has_no_device_to_host_sync_at_prefill_and_uneven_decode():
    from benchmarks.syncs import check_decode_syncs, check_prefill_syncs, run_layer_loop_without_syncs

    pair = build_pair(PRESETS["tiny"], torch.device("cuda"), torch.bfloat16)
    assert check_prefill_syncs(pair)["passed"]
    assert check_decode_syncs(pair)["passed"]

    layer = pair.pmod.get_model().layers[3]
    handle = layer.register_forward_hook(lambda module, args, output: output.sum().item())
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            run_layer_loop_without_syncs(pair.pmod, lambda: pair.pmod(
                inputs_embeds=torch.zeros(1, 8, 64, device="cuda", dtype=torch.bfloat16), use_cache=False))
    finally:
        handle.remove()
