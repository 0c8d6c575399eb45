"""FLOPs / KV-cache calculator: hand-derived formulas, the paper's figures, and torch's FLOP counter."""

import json

import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pmod.accounting import (
    PRESETS,
    VICUNA_7B,
    ModelShape,
    VisionTowerShape,
    attention_flops,
    estimate,
    linear_flops,
    main,
    vision_tower_flops,
)
from pmod.schedule import parse_schedule

OFFICIAL = "shiftedcos_decay_0.85_0.15"
KEEP_576 = [486, 464, 440, 414, 388, 360, 331, 302, 273, 244, 215, 187, 161, 135, 111, 89] + [86] * 8
KEEP_2880 = [2432, 2321, 2201, 2074, 1940, 1800, 1658, 1512, 1367, 1221, 1079, 939, 805, 678, 558, 447] + [432] * 8


def schedule(beta, layers=32):
    return parse_schedule(OFFICIAL, beta, layers)


def preset_report(name, beta):
    preset = PRESETS[name]
    return estimate(preset.shape, schedule(beta), preset.n_text, preset.n_vision)


def test_vicuna_layer_formulas_by_hand():
    # 4 square projections (MHA) + 3 MLP matrices = 202,375,168 weights; 2 FLOPs per multiply-add.
    assert linear_flops(VICUNA_7B, 1) == 2 * (4 * 4096**2 + 3 * 4096 * 11008) == 404_750_336
    assert attention_flops(VICUNA_7B, 3) == 2 * 2 * 4096 * 6
    assert attention_flops(VICUNA_7B, 3, causal=False) == 2 * 2 * 4096 * 9


def test_grouped_query_attention_shrinks_k_and_v():
    gqa = ModelShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=10)
    assert gqa.head_dim == 16
    assert linear_flops(gqa, 5) == 2 * 5 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    report = estimate(gqa, None, 2, 3, kv_dtype="float32")
    assert report.layers[0].kv_bytes == 2 * 5 * 32 * 4


def test_per_layer_tokens_are_exact():
    report = preset_report("llava-1.5-7b", 0.5)
    assert [cost.vision_tokens for cost in report.layers] == [576] * 8 + KEEP_576
    assert [cost.tokens for cost in report.layers] == [640] * 8 + [64 + k for k in KEEP_576]
    assert [cost.is_mod for cost in report.layers] == [False] * 8 + [True] * 24
    next_report = preset_report("llava-next-7b", 0.5)
    assert [cost.vision_tokens for cost in next_report.layers] == [2880] * 8 + KEEP_2880
    assert all(cost.tokens == 2944 for cost in next_report.dense_layers)


def test_layer_cost_components():
    report = preset_report("llava-next-7b", 0.5)
    mod = report.layers[8]
    tokens = 64 + 2432
    assert mod.linear_flops == 404_750_336 * tokens
    assert mod.attention_flops == 2 * 4096 * tokens * (tokens + 1)
    assert mod.router_flops == 2 * 4096 * 2944
    assert mod.kv_bytes == 2 * tokens * 4096 * 2
    assert report.layers[0].router_flops == 0
    assert report.dense_kv_bytes == 32 * 2 * 2944 * 4096 * 2


def test_dense_figures_match_the_paper():
    """LLM prefill only (causal, no LM head, no vision tower), the convention the paper's dense numbers fit."""
    # LLaVA-NeXT: 39.46 TFLOPs is 32 causal layers over ~2880 tokens (0.05% above at exactly 2880).
    assert estimate(VICUNA_7B, None, 0, 2880).total_flops / 1e12 == pytest.approx(39.46, rel=1e-3)
    # LLaVA-1.5: 576 vision + our 64-token prompt gives 8.40 (8.38 is 576 + 63).
    assert preset_report("llava-1.5-7b", 0.5).dense_total_flops / 1e12 == pytest.approx(8.38, rel=3e-3)
    # Our LLaVA-NeXT preset adds the same 64 text tokens to 2880 vision tokens: 2.4% above the paper.
    assert preset_report("llava-next-7b", 0.5).dense_total_flops / 1e12 == pytest.approx(40.40, abs=0.005)


@pytest.mark.parametrize(
    ("name", "beta", "ours", "paper", "rel"),
    [
        ("llava-1.5-7b", 0.5, 4.88, 4.92, 0.01),
        ("llava-next-7b", 0.5, 21.81, 21.94, 0.01),
        ("llava-next-7b", 0.4, 19.30, 19.56, 0.015),
    ],
)
def test_pmod_figures_follow_from_the_schedule(name, beta, ours, paper, rel):
    tflops = preset_report(name, beta).total_flops / 1e12
    assert tflops == pytest.approx(ours, abs=0.005)
    assert tflops == pytest.approx(paper, rel=rel)


def test_beta_0_3_figures_do_not_follow_from_the_official_schedule():
    """The paper's beta 0.3 row (17.78 TFLOPs, 42.3% KV) implies ~0.42 retention; the schedule gives 0.394."""
    report = preset_report("llava-next-7b", 0.3)
    assert report.total_flops / 1e12 == pytest.approx(16.04, abs=0.005)
    assert report.vision_kv_ratio == pytest.approx(0.394, abs=5e-4)
    assert abs(report.vision_kv_ratio - 0.423) > 0.025


@pytest.mark.parametrize(("beta", "mean_ratio", "paper_kv"), [(0.5, 0.5375, 0.538), (0.4, 0.4747, 0.475)])
def test_kv_cache_retention_is_the_schedule_mean(beta, mean_ratio, paper_kv):
    """The paper's 53.8% / 47.5% are the mean keep ratios over the 32 layers (dense = 1), text ignored."""
    assert schedule(beta).mean_ratio() == pytest.approx(mean_ratio, abs=5e-5)
    for name in ("llava-1.5-7b", "llava-next-7b"):
        report = preset_report(name, beta)
        n = PRESETS[name].n_vision
        assert report.vision_kv_ratio == schedule(beta).mean_retention(n)
        assert report.vision_kv_ratio == pytest.approx(paper_kv, abs=2e-3)
        assert report.kv_ratio > report.vision_kv_ratio


def test_optional_parts():
    plain = estimate(VICUNA_7B, schedule(0.5), 64, 576)
    full = estimate(VICUNA_7B, schedule(0.5), 64, 576, include_vision_tower=True, lm_head_tokens=1)
    assert full.lm_head_flops == 2 * 4096 * 32000
    assert full.projector_flops == 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert full.vision_tower_flops == vision_tower_flops(VisionTowerShape(), 1)
    assert full.vision_tower_flops / 1e12 == pytest.approx(0.382, abs=1e-3)
    assert full.total_flops - plain.total_flops == full.lm_head_flops + full.vision_tower_flops + full.projector_flops
    tiles = estimate(VICUNA_7B, None, 0, 2880, include_vision_tower=True)
    assert tiles.vision_tower_flops == 5 * full.vision_tower_flops


def test_estimate_errors():
    with pytest.raises(ValueError, match="schedule has 40 layers but the model has 32"):
        estimate(VICUNA_7B, schedule(0.5, 40), 10, 576)
    with pytest.raises(ValueError, match="at least one token"):
        estimate(VICUNA_7B, None, 0, 0)
    with pytest.raises(ValueError, match="kv_dtype"):
        estimate(VICUNA_7B, None, 1, 1, kv_dtype="int3")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelShape(64, 128, 2, 4, 3, 10)


def tiny_llama_config():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101)
    config._attn_implementation = "sdpa"
    return config


def test_matmul_flops_match_torch_flop_counter():
    """Dense forward of a tiny random Llama. torch counts SDPA as a full (non-causal) square, and on CPU only
    through the math backend, so the expected count uses ``causal=False``."""
    torch.manual_seed(0)
    config = tiny_llama_config()
    model = transformers.LlamaForCausalLM(config).eval()
    tokens = 11
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 101, (1, tokens)))
    shape = ModelShape.from_config(config)
    report = estimate(shape, None, 4, tokens - 4, lm_head_tokens=tokens)
    non_causal = 3 * attention_flops(shape, tokens, causal=False)
    causal = sum(cost.attention_flops for cost in report.layers)
    assert counter.get_total_flops() == report.total_flops - causal + non_causal
    assert non_causal - causal == 3 * 2 * 2 * 64 * (tokens * tokens - tokens * (tokens + 1) // 2)


def test_vision_tower_flops_match_torch_flop_counter():
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=336, patch_size=14)
    tower = transformers.CLIPVisionModel(config).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        tower(torch.randn(2, 3, 336, 336))
    shape = VisionTowerShape(hidden_size=32, intermediate_size=64, num_layers=2)
    assert counter.get_total_flops() == vision_tower_flops(shape, 2)


def test_model_shape_from_configs():
    assert ModelShape.from_config(transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000)) == VICUNA_7B
    nested = {"text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "vocab_size": 10}}
    assert ModelShape.from_config(nested) == ModelShape(64, 128, 2, 4, 4, 10)


def test_cli_preset(capsys):
    assert main(["--preset", "llava-next-7b", "--beta", "0.4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:26].strip(): line[26:].split() for line in lines[2:]}
    assert rows["dense TFLOPs"] == ["40.40", "39.46"]
    assert rows["p-MoD TFLOPs"] == ["19.30", "19.56"]
    assert rows["KV cache, vision tokens"] == ["0.4747", "0.475"]


def test_cli_config(tmp_path, capsys):
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 32, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 1000, "mod_target_layers": OFFICIAL,
              "mod_router_factor": 0.5, "mod_target_layer_indices": list(range(8, 32))}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["--config", str(path), "--n-vision", "2144", "--n-text", "15", "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert "15 text + 2144 vision tokens, beta 0.5" in out
    assert "    8 p-MoD    1810    1825" in out
    config["mod_target_layer_indices"] = list(range(9, 32))
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mod_target_layer_indices"):
        main(["--config", str(path), "--n-vision", "10", "--n-text", "1"])
    with pytest.raises(SystemExit, match="--n-vision and --n-text"):
        main(["--config", str(path)])


def test_qwen_presets_use_the_released_shape_and_the_processors_token_count():
    """Qwen2.5-VL-7B / LLaVA-OneVision-7B share Qwen2-7B's decoder; 1024 tokens is what Qwen2.5-VL's own image
    processor makes of an 896 x 896 image (64 x 64 patches of 14 px, merged 2 x 2)."""
    released_text_config = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064}
    for name in ("qwen2.5-vl-7b", "llava-onevision-7b"):
        assert PRESETS[name].shape == ModelShape.from_config({"text_config": released_text_config})
    processor = transformers.Qwen2VLImageProcessor()
    grid = processor(images=[torch.zeros(3, 896, 896)], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert grid == [1, 64, 64] and grid[1] * grid[2] // 4 == PRESETS["qwen2.5-vl-7b"].n_vision
    report = estimate(PRESETS["qwen2.5-vl-7b"].shape, schedule(0.5, layers=28), 64, 1024)
    assert 0.5 < report.flops_ratio < 0.6 and report.kv_bytes < report.dense_kv_bytes


def test_vision_tower_figures_are_refused_for_towers_the_calculator_does_not_model(capsys):
    with pytest.raises(SystemExit, match="CLIP ViT-L/14-336 only"):
        main(["--preset", "qwen2.5-vl-7b", "--include-vision-tower"])
    assert main(["--preset", "llava-onevision-7b"]) == 0
    assert "64 text + 3699 vision tokens" in capsys.readouterr().out
