"""Router weight normalisation: values, dtype, parsing, errors, softmax over targets, gradients, no host syncs."""

import pytest
import torch

from pmod.weight_norm import DEFAULT_WEIGHT_NORM, WeightNorm, parse_weight_norm

LOGITS = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 3.0]])
TARGETS = torch.tensor([[False, True, True, True, False]])


def test_default_is_official_tanhnorm():
    norm = parse_weight_norm(DEFAULT_WEIGHT_NORM)
    assert norm == WeightNorm("tanh", 0.2, 1.0) == WeightNorm()
    expected = 0.2 * torch.tanh(LOGITS) + 1
    torch.testing.assert_close(norm(LOGITS), expected)
    assert norm(torch.tensor([0.0])).item() == 1.0
    assert norm(torch.tensor([-1e4])).item() == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sigmoid_0.5_0.75", 0.5 * torch.sigmoid(LOGITS) + 0.75),
        ("none_1_1", LOGITS + 1),
        ("tanh", torch.tanh(LOGITS) + 1),
        ("tanh_0.2_-1", 0.2 * torch.tanh(LOGITS) - 1),
        ("softmax_0.2_1", 0.2 * torch.softmax(LOGITS, dim=-1) + 1),
        ("shifted_softmax_0.2_1", 0.4 * torch.softmax(LOGITS, dim=-1) + 0.8),
    ],
)
def test_values_without_mask(spec, expected):
    torch.testing.assert_close(parse_weight_norm(spec)(LOGITS), expected)


def test_shifted_softmax_matches_paper_definition_and_range():
    shifted = parse_weight_norm("shifted_softmax_0.2_1")
    torch.testing.assert_close(shifted(LOGITS, TARGETS), parse_weight_norm("softmax_0.4_0.8")(LOGITS, TARGETS))
    weights = shifted(torch.randn(3, 50) * 5)
    assert bool(((weights >= 0.8) & (weights <= 1.2)).all())
    assert weights.max().item() > 1.0


def test_output_is_float32_for_half_inputs():
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        for spec in ("tanh_0.2_1", "softmax_0.2_1", "none"):
            weights = parse_weight_norm(spec)(LOGITS.to(dtype), TARGETS)
            assert weights.dtype == torch.float32
    bf16 = parse_weight_norm("tanh_0.2_1")(LOGITS.bfloat16())
    torch.testing.assert_close(bf16, 0.2 * torch.tanh(LOGITS.bfloat16().float()) + 1)


def test_softmax_is_restricted_to_targets():
    norm = parse_weight_norm("softmax_1_0")
    weights = norm(LOGITS, TARGETS)
    torch.testing.assert_close(weights[0, 1:4], torch.softmax(LOGITS[0, 1:4], dim=0))
    assert weights[0, 0].item() == 0.0 and weights[0, 4].item() == 0.0
    changed = LOGITS.clone()
    changed[0, 0], changed[0, 4] = 50.0, -50.0
    torch.testing.assert_close(norm(changed, TARGETS), weights)


def test_softmax_per_row_and_rows_without_targets():
    logits = torch.randn(2, 6)
    mask = torch.tensor([[True, True, False, False, True, False], [False] * 6])
    weights = parse_weight_norm("softmax_1_0")(logits, mask)
    assert not torch.isnan(weights).any()
    assert weights[0].sum().item() == pytest.approx(1.0)
    assert weights[1].abs().sum().item() == 0.0


def test_softmax_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="target_mask shape"):
        parse_weight_norm("softmax_0.2_1")(LOGITS, TARGETS[:, :3])


@pytest.mark.parametrize("spec", ["tanh_0.2_1", "sigmoid_1_1", "softmax_0.2_1", "shifted_softmax_0.2_1", "none_1_1"])
def test_gradients_flow(spec):
    logits = LOGITS.clone().bfloat16().requires_grad_(True)
    weights = parse_weight_norm(spec)(logits, TARGETS)
    (weights * torch.arange(5.0)).sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert logits.grad[TARGETS].abs().sum().item() > 0
    if "softmax" in spec:
        assert logits.grad[~TARGETS].abs().sum().item() == 0


@pytest.mark.parametrize("spec", ["tanh_0.2_1", "softmax_0.2_1", "shifted_softmax_0.2_1"])
def test_no_host_sync(spec):
    """Meta tensors have no data: .item(), .tolist() and boolean-mask indexing all fail on them."""
    logits = torch.empty(2, 7, device="meta", dtype=torch.bfloat16)
    mask = torch.empty(2, 7, device="meta", dtype=torch.bool)
    weights = parse_weight_norm(spec)(logits, mask)
    assert weights.shape == (2, 7) and weights.dtype == torch.float32 and weights.device.type == "meta"


@pytest.mark.parametrize(
    ("spec", "scale", "bias"),
    [("tanh_0.2_1", 0.2, 1.0), ("sigmoid_2_0", 2.0, 0.0), ("softmax_.5_-0.25", 0.5, -0.25),
     ("shifted_softmax_0.2_1.", 0.2, 1.0), ("none", 1.0, 1.0), ("softmax", 1.0, 1.0)],
)
def test_parse_and_spec_round_trip(spec, scale, bias):
    norm = parse_weight_norm(spec)
    assert (norm.scale, norm.bias) == (scale, bias)
    assert parse_weight_norm(norm.spec) == norm


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (None, "--mod_weight_norm is required"),
        ("", "--mod_weight_norm is required"),
        ("relu_0.2_1", "unknown weight norm 'relu'"),
        ("relu", "is not '<name>_<scale>_<bias>'"),
        ("tanh_0.2", "is not '<name>_<scale>_<bias>'"),
        ("tanh_0.2_1_junk", "is not '<name>_<scale>_<bias>'"),
        ("tanh_-0.2_1", "is not '<name>_<scale>_<bias>'"),
        ("TANH_0.2_1", "is not '<name>_<scale>_<bias>'"),
        ("tanh_0_1", "scale must be > 0"),
    ],
)
def test_parse_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_weight_norm(spec)
