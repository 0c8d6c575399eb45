"""Benchmark harness: the --quick CLI runs both models end to end, KV bytes equal pmod.accounting exactly,
the layout comparison computes the same layer output, and the GPU sync check passes (and can fail). The
transformers-native presets (Qwen2.5-VL, LLaVA-OneVision through pmod.hf) run the same way, their p-MoD KV
cache follows the schedule, and they refuse the parts they do not measure.

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
    "decode, concatenating cache, latency per token", "decode, concatenating cache, throughput",
    "decode, uneven rows, concatenating cache, latency per token",
    "decode, uneven rows, concatenating cache, throughput",
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


def test_both_models_decode_on_the_same_kind_of_cache():
    from benchmarks.suite import new_cache
    from pmod.cache import CompactLayer, GrowableLayer

    pair = build_pair(PRESETS["tiny"], torch.device("cpu"), torch.float32)
    assert {type(layer) for layer in new_cache(pair.dense, False).layers} == {GrowableLayer}
    assert {type(layer) for layer in new_cache(pair.pmod, True).layers} == {GrowableLayer, CompactLayer}
    assert {type(layer).__name__ for layer in new_cache(pair.dense, False, preallocate=False).layers} == \
        {"DynamicLayer"}
    assert {type(layer).__name__ for layer in new_cache(pair.pmod, True, preallocate=False).layers} == \
        {"DynamicLayer", "ConcatenatingCompactLayer"}


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


def test_quick_run_packing_section(quick_result):
    """Packed: tokens computed = real tokens; padded layouts pay for padding; every layout's loss is the same."""
    pack = quick_result[0]["packing"]
    rows = {(row["model"], row["layout"]): row for row in pack["rows"]}
    assert set(rows) == {("dense", "padded"), ("dense", "packed"), ("p-MoD", "padded"), ("p-MoD", "packed"),
                         ("p-MoD", "padded input, packed p-MoD layers")}
    lengths = pack["lengths"]
    assert len(lengths) == 8 and len(set(lengths)) > 1
    assert rows["dense", "packed"]["tokens_computed"] == 8 * sum(lengths)  # 8 layers, no padding
    assert rows["dense", "padded"]["tokens_computed"] == 8 * 8 * max(lengths)
    for model in ("dense", "p-MoD"):
        packed = rows[model, "packed"]
        assert packed["tokens_computed"] == packed["real_tokens"] and packed["padding_share"] == 0
        assert rows[model, "padded"]["tokens_computed"] > packed["real_tokens"]
    assert rows["p-MoD", "packed"]["real_tokens"] < rows["dense", "packed"]["real_tokens"]
    assert (rows["p-MoD", "packed"]["real_tokens"] < rows["p-MoD", "padded input, packed p-MoD layers"][
        "tokens_computed"] < rows["p-MoD", "padded"]["tokens_computed"])
    assert all(row["loss_diff"] < 1e-4 and row["ms"] > 0 for row in pack["rows"])
    assert 0 < pack["padding_share"]["modality_length_grouped"] < 1 and 0 < pack["padding_share"]["random"] < 1
    prefill = quick_result[0]["uneven_prefill"]
    assert [row["layout"] for row in prefill["rows"]] == ["dense", "p-MoD, padded kept tokens",
                                                         "p-MoD, packed kept tokens"]
    assert len(set(prefill["vision_tokens"])) == 8 and all(row["ms"] > 0 for row in prefill["rows"])


def test_compiled_part_is_opt_in_and_times_both_caches_of_both_models(tmp_path):
    assert "compiled" not in parse_args(["--quick"]).parts.split(",")
    out = tmp_path / "compiled.json"
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--parts", "compiled", "--compile-backend", "eager",
               "--warmup", "0", "--repeats", "1", "--decode-tokens", "2", "--decode-batches", "1,2", "--json", str(out)]
    run_command(command, timeout=300)
    rows = json.loads(out.read_text())["model"]
    assert [(row["measurement"], row["batch"]) for row in rows] == [
        ("decode via generate, dynamic cache (eager), latency per token", 1),
        ("decode via generate, static cache (compiled, eager), latency per token", 1),
        ("decode via generate, static compiled throughput", 1),
        ("decode via generate, uneven rows, dynamic cache (eager), latency per token", 2),
        ("decode via generate, uneven rows, static cache (compiled, eager), latency per token", 2),
        ("decode via generate, uneven rows, static compiled throughput", 2),
    ]
    assert all(row["dense"] > 0 and row["pmod"] > 0 for row in rows)


def test_llava_mix_lengths_follow_the_source_shares():
    from benchmarks.lengths import LLAVA_665K, draw_samples

    samples = draw_samples(4000, 576, anyres=False, seed=0, max_length=2048)
    text_only = sum(s.n_vision == 0 for s in samples) / len(samples)
    assert text_only == pytest.approx(40 / sum(source.samples_k for source in LLAVA_665K), abs=0.02)
    assert {s.n_vision for s in samples} == {0, 576}
    assert max(s.total for s in samples) <= 2048
    anyres = draw_samples(500, 2928, anyres=True, seed=0)
    vision = [s.n_vision for s in anyres if s.n_vision]
    assert min(vision) >= 1171 and max(vision) <= 2928


def test_packed_input_reads_no_device_value_on_the_host():
    """On the meta device, a packed training forward (row maps, packed p-MoD layers, loss) runs: no host read."""
    from benchmarks.packing import training_batch

    pair = build_pair(PRESETS["tiny"], torch.device("meta"), torch.float32)
    data = training_batch(pair, 3, seed=0)
    pair.pmod.config._attn_implementation = "pmod_packed_sdpa"
    with torch.no_grad():
        packed = pair.pmod(**data.packed(True), use_cache=False)
    assert packed.logits.is_meta and packed.logits.shape[:2] == (1, sum(s.total for s in data.samples))


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
    from benchmarks.syncs import (
        check_decode_syncs,
        check_packing_syncs,
        check_prefill_syncs,
        run_layer_loop_without_syncs,
    )

    pair = build_pair(PRESETS["tiny"], torch.device("cuda"), torch.bfloat16)
    assert check_prefill_syncs(pair)["passed"]
    assert check_decode_syncs(pair)["passed"]
    assert check_packing_syncs(pair)["passed"]

    layer = pair.pmod.get_model().layers[3]
    handle = layer.register_forward_hook(lambda module, args, output: output.sum().item())
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            run_layer_loop_without_syncs(pair.pmod, lambda: pair.pmod(
                inputs_embeds=torch.zeros(1, 8, 64, device="cuda", dtype=torch.bfloat16), use_cache=False))
    finally:
        handle.remove()


# transformers-native VLMs (benchmarks.hf_models): Qwen2.5-VL and LLaVA-OneVision through pmod.hf.

NATIVE_MEASUREMENTS = EXPECTED_MEASUREMENTS - {"prefill, whole model (pixels)"}
# pmod.accounting's 7B prompts (64 text + 1024 / 3699 visual tokens) divided by the tiny presets' scale, 16.
NATIVE_TINY = {"tiny-qwen2.5-vl": (4, 64), "tiny-llava-onevision": (4, 231)}


@pytest.fixture(scope="module", params=sorted(NATIVE_TINY))
def native_result(request, tmp_path_factory):
    """One quick CLI run per tiny native preset, in process (``--threads`` as the test process has them)."""
    import contextlib
    import io

    from benchmarks.run import main

    out = tmp_path_factory.mktemp("native") / "result.json"
    argv = ["--quick", "--preset", request.param, "--warmup", "0", "--repeats", "1", "--decode-tokens", "2",
            "--decode-batches", "1,2", "--threads", str(torch.get_num_threads()), "--json", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return request.param, json.loads(out.read_text()), stdout.getvalue()


def test_native_quick_run_measures_both_models(native_result):
    name, result, stdout = native_result
    rows = result["model"]
    assert {row["measurement"] for row in rows} == NATIVE_MEASUREMENTS
    assert {row["batch"] for row in rows if row["measurement"].startswith("decode, l")} == {1, 2}
    for row in rows:
        if row["measurement"] == "training step, peak memory":
            continue  # peak RSS growth can be 0 or n/a on CPU
        assert row["dense"] > 0 and row["pmod"] > 0, row
    shapes = result["shapes"]
    assert (shapes["n_text"], shapes["n_vision"]) == NATIVE_TINY[name]
    assert shapes["mod_layers"] == 6 and "vision tower not run" in shapes["vision"]
    assert "| measurement | batch | unit | dense | p-MoD | p-MoD / dense |" in stdout
    assert "| prefill, LLM only | 1 | ms |" in stdout and f"### {name} on cpu" in stdout


def expected_kept_tokens(n_text: int, n_vision: int, num_layers: int = 8) -> list[int]:
    """shiftedcos_decay_0.85_0.15 at beta 0.5, from the paper's formula: f(l) = cos(pi l / (L-1)) / 2 + 0.5;
    dense where f > 0.85, else keep trunc(float32(n) * float32(max(f, 0.15))) of the n visual tokens."""
    import math

    import numpy as np

    kept = []
    for layer in range(num_layers):
        f = math.cos(math.pi * layer / (num_layers - 1)) / 2 + 0.5
        vision = n_vision if f > 0.85 else int(np.float32(n_vision) * np.float32(max(f, 0.15)))
        kept.append(n_text + vision)
    return kept


def test_native_pmod_kv_cache_follows_the_schedule(native_result):
    name, result, _ = native_result
    n_text, n_vision = NATIVE_TINY[name]
    per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads x 16 dims, float32
    expected = [tokens * per_token for tokens in expected_kept_tokens(n_text, n_vision)]
    kv = result["kv_per_layer"]
    assert kv["pmod"]["measured"] == expected and kv["pmod"]["predicted"] == expected
    assert kv["dense"]["measured"] == [(n_text + n_vision) * per_token] * 8
    measured = next(row for row in result["model"] if row["measurement"] == "KV cache after prefill, measured")
    assert measured["pmod"] == pytest.approx(sum(expected) / 2**20)


def test_native_presets_refuse_what_they_do_not_measure(capsys):
    from benchmarks.hf_models import PARTS

    assert parse_args(["--preset", "small-qwen2.5-vl"]).parts == ",".join(PARTS)
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tiny-llava-onevision", "--parts", "prefill,full"])
    assert "--parts full: not for the transformers-native preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tiny-qwen2.5-vl", "--parts", "packing"])
    assert "packing: padding-free training (--packing) is built for our LLaVA class only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tiny-qwen2.5-vl", "--parts", "compiled"])
    assert "compiled: the static cache with compiled decoding is built for our LLaVA class" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--preset", "qwen2.5-vl-7b", "--check-syncs"])
    assert "--check-syncs: not for the transformers-native preset" in capsys.readouterr().err


def test_native_pair_shares_weights_and_has_random_routers():
    from benchmarks.hf_models import HF_PRESETS, build_hf_pair

    pair = build_hf_pair(HF_PRESETS["tiny-llava-onevision"], torch.device("cpu"), torch.float32)
    dense_layers, pmod_layers = pair.dense.model.language_model.layers, pair.pmod.model.language_model.layers
    index = pair.schedule.mod_layers[0]
    assert pmod_layers[index].mlp.up_proj.weight is dense_layers[index].mlp.up_proj.weight
    assert pair.pmod.lm_head.weight is pair.dense.lm_head.weight
    routers = [pmod_layers[i].router.router.weight for i in pair.schedule.mod_layers]
    assert all(w.abs().min() > 0 for w in routers) and not torch.equal(routers[0], routers[1])
    assert not any(t.is_meta for t in [*pair.pmod.parameters(), *pair.pmod.buffers()])


def test_native_prompts_hold_the_placeholders_and_qwen_positions_of_the_image_grid():
    from benchmarks.hf_models import HF_PRESETS, build_hf_pair, vision_counts

    pair = build_hf_pair(HF_PRESETS["tiny-qwen2.5-vl"], torch.device("cpu"), torch.float32)
    config = pair.dense.config
    inputs = pair.inputs(4, uneven=True)
    counts = vision_counts(pair.preset, 4, uneven=True)
    assert counts == [64, 56, 48, 40]  # whole rows of the 8 x 8 grid: 8 x 8, 7 x 8, 6 x 8, 5 x 8
    placeholders = inputs.input_ids == config.image_token_id
    assert placeholders.sum(1).tolist() == counts
    assert inputs.attention_mask.sum(1).tolist() == [4 + n for n in counts]
    assert (inputs.input_ids == config.vision_start_token_id).sum(1).tolist() == [1] * 4
    assert inputs.extra["image_grid_thw"].tolist() == [[1, 16, 16], [1, 14, 16], [1, 12, 16], [1, 10, 16]]
    assert (inputs.labels[placeholders] == -100).all()
    # The image spans max(height, width) = 8 positions, not 64: generation continues 64 - 8 positions earlier.
    full = pair.inputs(1)
    _, deltas = pair.dense.model.get_rope_index(full.input_ids, **full.extra)
    assert deltas.tolist() == [[8 - 64]]


@pytest.mark.parametrize(("name", "n_vision"), [("qwen2.5-vl-7b", 1024), ("llava-onevision-7b", 3699)])
def test_native_7b_presets_build_offline_at_qwen2_7b_shapes(name, n_vision):
    """On the meta device: the decoder is Qwen2-7B and the prompt pmod.accounting's (64 text tokens)."""
    from benchmarks.hf_models import HF_PRESETS, build_hf_pair

    pair = build_hf_pair(HF_PRESETS[name], torch.device("meta"), torch.bfloat16)
    text = pair.pmod.config.get_text_config()
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (3584, 18944, 28)
    assert (text.num_key_value_heads, text.vocab_size) == (4, 152064)
    assert (pair.preset.n_text, pair.preset.n_vision) == (64, n_vision)
    assert len(pair.schedule.mod_layers) == 21 and pair.pmod.dtype == torch.bfloat16
    llm_params = sum(p.numel() for n, p in pair.dense.named_parameters() if "language_model" in n or "lm_head" in n)
    assert 7.5e9 < llm_params < 7.7e9


def test_reducer_run_times_the_dense_model_under_the_reducer(tmp_path):
    out = tmp_path / "reducer.json"
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--warmup", "0", "--repeats", "1",
               "--decode-tokens", "2", "--decode-batches", "1", "--parts", "prefill,decode,kv",
               "--reducer", "pdrop_layers2-4-6_lambda0.5", "--json", str(out)]
    stdout = run_command(command, timeout=300).stdout
    result = json.loads(out.read_text())
    assert result["shapes"]["reducer"] == "pdrop_layers2-4-6_lambda0.5" and result["shapes"]["mod_layers"] == 6
    assert "| dense | pdrop_layers2-4-6_lambda0.5 | pdrop_layers2-4-6_lambda0.5 / dense |" in stdout
    kv = result["kv_per_layer"]["pmod"]
    assert kv["measured"] == kv["predicted"]
    per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads x 16 dims, float32
    assert [b // per_token for b in kv["measured"]] == [104, 104, 64, 64, 44, 44, 34, 34]  # 24 text + 80/40/20/10
    prefill = next(row for row in result["model"] if row["measurement"] == "prefill, LLM only")
    assert prefill["predicted_ratio"] < 0.7 and prefill["pmod"] > 0


def test_reducer_flags_are_checked(capsys):
    for argv, message in [
        (["--reducer", "fastv"], "--reducer: reducer 'fastv'"),
        (["--reducer", "fastv_k2_keep0.5", "--parts", "prefill,train"], "--parts train: a training-free reducer"),
        (["--reducer", "fastv_k2_keep0.5", "--preset", "tiny-qwen2.5-vl"], "not on the transformers-native"),
        (["--reducer", "visionzip_dominant5_contextual3"], "VisionZip shrinks the vision tower's output"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
