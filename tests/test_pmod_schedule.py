"""Retention schedules against the official 32-layer tables (reference/pmod-official.md section 2)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from pmod.schedule import (
    RetentionSchedule,
    check_layer_indices,
    keep_count,
    parse_schedule,
    schedule_from_config,
)

OFFICIAL = "shiftedcos_decay_0.85_0.15"
FIXTURE_JSON = Path("/work/shared/fixtures/official_pmod/case_B.json")

# beta -> (first p-MoD layer, ratios of the p-MoD layers before the 0.15 floor, keep counts for n=576)
OFFICIAL_TABLES = {
    0.5: (
        8,
        [0.844483, 0.806053, 0.764482, 0.720197, 0.673653, 0.625326, 0.575714, 0.525325, 0.474675, 0.424286,
         0.374674, 0.326347, 0.279803, 0.235518, 0.193947, 0.155517],
        [486, 464, 440, 414, 388, 360, 331, 302, 273, 244, 215, 187, 161, 135, 111, 89],
    ),
    0.4: (
        5,
        [0.837173, 0.810382, 0.779379, 0.744483, 0.706053, 0.664482, 0.620197, 0.573653, 0.525326, 0.475714,
         0.425325, 0.374675, 0.324286, 0.274674, 0.226347, 0.179803],
        [482, 466, 448, 428, 406, 382, 357, 330, 302, 274, 244, 215, 186, 158, 130, 103],
    ),
    0.3: (
        0,
        [0.800000, 0.797435, 0.789765, 0.777070, 0.759479, 0.737173, 0.710382, 0.679379, 0.644483, 0.606053,
         0.564482, 0.520197, 0.473653, 0.425326, 0.375714, 0.325325, 0.274675, 0.224286, 0.174674],
        [460, 459, 454, 447, 437, 424, 409, 391, 371, 349, 325, 299, 272, 244, 216, 187, 158, 129, 100],
    ),
}
MEAN_RATIO = {0.5: 0.5375, 0.4: 0.4747, 0.3: 0.394}
KEEP_2928 = [2472, 2360, 2238, 2108, 1972, 1830, 1685, 1538, 1389, 1242, 1097, 955, 819, 689, 567, 455] + [439] * 8
KEEP_2144 = [1810, 1728, 1639, 1544, 1444, 1340, 1234, 1126, 1017, 909, 803, 699, 599, 504, 415, 333] + [321] * 8


@pytest.mark.parametrize("beta", sorted(OFFICIAL_TABLES))
def test_official_tables(beta):
    first, decaying, keep = OFFICIAL_TABLES[beta]
    schedule = parse_schedule(OFFICIAL, beta, 32)
    floor = 32 - first - len(decaying)
    assert schedule.num_layers == 32
    assert schedule.mod_layers == tuple(range(first, 32))
    assert [schedule.is_mod(layer) for layer in range(32)] == [layer >= first for layer in range(32)]
    assert schedule.ratios[first:] == pytest.approx(decaying + [0.15] * floor, abs=1e-6)
    assert schedule.keep_counts(576) == [576] * first + keep + [86] * floor
    assert schedule.mean_ratio() == pytest.approx(MEAN_RATIO[beta], abs=5e-5)


def test_default_schedule_keep_counts_for_large_images():
    schedule = parse_schedule(OFFICIAL, 0.5, 32)
    assert schedule.keep_counts(2928) == [2928] * 8 + KEEP_2928
    assert schedule.keep_counts(2144) == [2144] * 8 + KEEP_2144
    assert schedule.mean_retention(576) == pytest.approx(sum([576] * 8 + OFFICIAL_TABLES[0.5][2] + [86] * 8) / 576 / 32)
    assert schedule.mean_retention(576) < schedule.mean_ratio()


def test_ratios_bit_equal_to_official_fixture():
    if not FIXTURE_JSON.exists():
        pytest.skip("official parity fixtures not available")
    per_layer = json.loads(FIXTURE_JSON.read_text())["per_layer"]
    schedule = parse_schedule(OFFICIAL, 0.5, 32)
    assert list(schedule.ratios) == [entry["ratio"] for entry in per_layer]
    assert schedule.keep_counts(2144)[8:] == [entry["n_kept_vision"] for entry in per_layer][8:]


def test_keep_count_uses_float32_like_the_official_code():
    schedule = parse_schedule(OFFICIAL, 0.5, 32)
    assert schedule.keep_count(10, 2365) == 1808
    assert math.trunc(2365 * schedule.ratios[10]) == 1807
    assert schedule.keep_count(9, 5584) == 4501
    assert math.trunc(5584 * schedule.ratios[9]) == 4500
    assert keep_count(0, 0.5) == 0
    assert keep_count(576, 1.0) == 576
    assert schedule.keep_count(0, 2365) == 2365


def test_keep_count_rejects_bad_arguments():
    with pytest.raises(ValueError, match="token count"):
        keep_count(-1, 0.5)
    with pytest.raises(ValueError, match="keep ratio"):
        keep_count(10, 0.0)
    with pytest.raises(ValueError, match="keep ratio"):
        keep_count(10, 1.5)


def test_layer_count_generalises_with_l_minus_1():
    schedule = parse_schedule(OFFICIAL, 0.5, 40)
    assert schedule.num_layers == 40
    assert schedule.ratios[-1] == 0.15
    ratios = [r for r in schedule.ratios if r is not None]
    assert ratios == sorted(ratios, reverse=True)


def test_shifted_linear():
    schedule = parse_schedule("shiftedlinear_decay_0.85_0.15", 0.5, 32)
    assert schedule.mod_layers == tuple(range(5, 32))
    assert schedule.ratios[5] == pytest.approx(1 - 5 / 31)
    assert schedule.ratios[26] == pytest.approx(1 - 26 / 31)
    assert schedule.ratios[27:] == (0.15,) * 5
    assert schedule.mean_ratio() == pytest.approx(16.75 / 32)


def test_max_min_without_decimal_point():
    with_point = parse_schedule("shiftedcos_decay_1.0_0.15", 0.4, 32)
    assert parse_schedule("shiftedcos_decay_1_0.15", 0.4, 32) == with_point
    assert with_point.mod_layers == tuple(range(32))
    assert parse_schedule("shiftedcos_decay_.85_.15", 0.5, 32) == parse_schedule(OFFICIAL, 0.5, 32)


def test_constant_modes():
    assert parse_schedule("deep_all", 0.5, 32).mod_layers == tuple(range(2, 31))
    assert parse_schedule("deep_all_include_last", 0.5, 32).mod_layers == tuple(range(2, 32))
    assert parse_schedule("interleave", 0.08, 32).mod_layers == tuple(range(1, 32, 2))
    constant = parse_schedule("constant", 0.54, 32)
    assert constant.ratios == (0.54,) * 32
    assert parse_schedule("interleave", 0.08, 32).mean_ratio() == pytest.approx(0.54)


def test_stepped():
    schedule = parse_schedule("stepped_1_0.75_0.3_0.1", 0.5, 32)
    assert schedule.ratios == (None,) * 8 + (0.75,) * 8 + (0.3,) * 8 + (0.1,) * 8
    assert schedule.mean_ratio() == pytest.approx(0.5375)
    uneven = parse_schedule("stepped_0.9_0.5_0.2", 0.5, 10)
    assert uneven.ratios == (0.9,) * 4 + (0.5,) * 3 + (0.2,) * 3


def test_describe_lists_every_layer():
    text = parse_schedule(OFFICIAL, 0.5, 32).describe(576)
    lines = text.splitlines()
    assert len(lines) == 34
    assert lines[9].split() == ["8", "p-MoD", "0.844483", "486"]
    assert lines[1].split() == ["0", "dense", "1", "576"]
    assert "24 p-MoD layers of 32" in lines[-1]


@pytest.mark.parametrize(
    ("spec", "factor", "layers", "message"),
    [
        ("cosine_decay_0.85_0.15", 0.5, 32, "unknown --mod_target_layers"),
        ("shiftedcos_decay_0.85", 0.5, 32, "unknown --mod_target_layers"),
        ("shiftedcos_decay_0.85_0.15_junk", 0.5, 32, "unknown --mod_target_layers"),
        ("", 0.5, 32, "--mod_target_layers must be"),
        (None, 0.5, 32, "--mod_target_layers must be"),
        ("shiftedcos_decay_1.5_0.15", 0.5, 32, r"\(0, 1\]"),
        ("shiftedcos_decay_0.85_0", 0.5, 32, r"\(0, 1\]"),
        ("shiftedcos_decay_0.15_0.85", 0.5, 32, "above max"),
        ("shiftedcos_decay_0.85_0.15", -0.6, 32, "--mod_router_factor -0.6 makes every ratio"),
        ("shiftedcos_decay_0.85_0.15", 1.4, 32, "leaves no p-MoD layer"),
        ("shiftedcos_decay_0.85_0.15", float("nan"), 32, "--mod_router_factor must be finite"),
        ("shiftedcos_decay_0.85_0.15", None, 32, "--mod_router_factor must be a number"),
        ("shiftedcos_decay_0.85_0.15", 0.5, 1, "at least 2 layers"),
        ("deep_all", 0.0, 32, "--mod_router_factor is the keep ratio"),
        ("constant", 1.2, 32, "--mod_router_factor is the keep ratio"),
        ("interleave", -0.1, 32, "--mod_router_factor is the keep ratio"),
        ("deep_all", 0.5, 2, "leaves no p-MoD layer"),
        ("stepped_0.5", 0.5, 32, "at least two step ratios"),
        ("stepped_0.5_0", 0.5, 32, r"\(0, 1\]"),
        ("stepped_0.5_0.4_0.3", 0.5, 2, "3 steps for only 2 layers"),
        ("stepped_1_1", 0.5, 32, "leaves no p-MoD layer"),
    ],
)
def test_errors(spec, factor, layers, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(spec, factor, layers)


def test_check_layer_indices():
    schedule = parse_schedule(OFFICIAL, 0.5, 32)
    check_layer_indices(schedule, list(range(8, 32)))
    check_layer_indices(schedule, None)
    with pytest.raises(ValueError, match="mod_target_layer_indices .* 32 decoder layers"):
        check_layer_indices(schedule, list(range(9, 32)))
    forty = parse_schedule(OFFICIAL, 0.5, 40)
    with pytest.raises(ValueError, match="different number of layers"):
        check_layer_indices(forty, list(range(8, 32)))


def test_schedule_from_config():
    config = SimpleNamespace(
        num_hidden_layers=32, mod_target_layers=OFFICIAL, mod_router_factor=0.5,
        mod_target_layer_indices=list(range(8, 32)),
    )
    assert schedule_from_config(config) == parse_schedule(OFFICIAL, 0.5, 32)
    assert schedule_from_config(SimpleNamespace(num_hidden_layers=32)) is None
    nested = SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=40), mod_target_layers=OFFICIAL,
                             mod_router_factor=0.5, mod_target_layer_indices=list(range(8, 32)))
    with pytest.raises(ValueError, match="40 decoder layers"):
        schedule_from_config(nested)


def test_schedule_validates_ratios():
    with pytest.raises(ValueError, match="layer 1"):
        RetentionSchedule((None, 0.0))
    assert RetentionSchedule([None, 0.5]).ratios == (None, 0.5)
