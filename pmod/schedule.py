"""Token-retention schedules: which decoder layers are p-MoD layers and what share of vision tokens each keeps.

A schedule is built from the two official flags, ``--mod_target_layers`` (a string) and
``--mod_router_factor`` (a float), plus the number of decoder layers L.

Schedule strings
----------------
Progressive ratio decay (PRD, paper Eq. 5-6), ``factor`` = the shift beta:

* ``shiftedcos_decay_{max}_{min}``: f(l) = cos(pi*l/(L-1))/2 + beta   (official default ``shiftedcos_decay_0.85_0.15``)
* ``shiftedlinear_decay_{max}_{min}``: f(l) = (0.5 - l/(L-1)) + beta  (paper Table 5 "Linear")

  Clipping (Eq. 6, with the official comparison): f(l) > max -> dense layer; otherwise the layer is a p-MoD
  layer with ratio max(f(l), min). The official code divides by a hard-coded 31; we divide by L-1, which is
  the same number for the 32-layer LLMs of the released checkpoints. ``max``/``min`` may be written with or
  without a decimal point (``..._decay_1_0.15``), which the official regex rejects.

Constant ratio, ``factor`` = the ratio itself (as in the official code):

* ``deep_all``: layers 2 .. L-2 (official)
* ``deep_all_include_last``: layers 2 .. L-1 (official)
* ``interleave``: odd layers 1, 3, 5, ... (official; paper Table 5 "Interleaved", e.g. factor 0.08 gives a mean
  retention of 0.54)
* ``constant``: every layer 0 .. L-1 (paper Table 5 "Constant": "the same ratio for all layers")

Stepped decay (paper Table 5 "Stepped"; the paper shows its steps only in a figure, so the values are explicit):

* ``stepped_{r1}_{r2}_..._{rk}``: the layers are cut into k contiguous groups of (nearly) equal size
  (layer l belongs to group floor(l*k/L)); group g keeps ratio r_g, and a ratio of 1 means dense.
  ``--mod_router_factor`` is not used. ``stepped_1_0.75_0.3_0.1`` has the same mean retention (0.5375)
  as the default cosine schedule on 32 layers.

Keep counts follow the official rule k = trunc(float32(n) * float32(ratio)) (see :func:`keep_count`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCHEDULE_FLAG = "--mod_target_layers"
FACTOR_FLAG = "--mod_router_factor"

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_DECAY_RE = re.compile(rf"(shiftedcos|shiftedlinear)_decay_{_NUMBER}_{_NUMBER}")
_STEPPED_RE = re.compile(rf"stepped((?:_{_NUMBER})+)")
_CONSTANT_MODES = ("deep_all", "deep_all_include_last", "interleave", "constant")
KNOWN_SCHEDULES = (
    "shiftedcos_decay_{max}_{min}",
    "shiftedlinear_decay_{max}_{min}",
    *_CONSTANT_MODES,
    "stepped_{r1}_..._{rk}",
)


def keep_count(n: int, ratio: float) -> int:
    """Tokens a layer with keep ratio ``ratio`` keeps out of ``n``, bit-exact with the official code.

    The official code multiplies an int32 count by a Python float in torch, i.e. in float32, then truncates;
    float64 arithmetic gives a different answer in rare cases (e.g. n=2365, ratio 0.764482... -> 1808, not 1807).
    """
    if n < 0:
        raise ValueError(f"token count must be >= 0, got {n}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    return int(np.float32(n) * np.float32(ratio))


@dataclass(frozen=True)
class RetentionSchedule:
    """One keep ratio per decoder layer; ``None`` marks a dense layer."""

    ratios: tuple[float | None, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", tuple(self.ratios))
        for layer, ratio in enumerate(self.ratios):
            if ratio is not None and not 0.0 < ratio <= 1.0:
                raise ValueError(f"layer {layer}: keep ratio must be in (0, 1] or None, got {ratio}")

    @property
    def num_layers(self) -> int:
        return len(self.ratios)

    @property
    def mod_layers(self) -> tuple[int, ...]:
        return tuple(layer for layer, ratio in enumerate(self.ratios) if ratio is not None)

    def is_mod(self, layer: int) -> bool:
        return self.ratios[layer] is not None

    def keep_count(self, layer: int, n: int) -> int:
        """Vision tokens layer ``layer`` processes out of ``n`` (all ``n`` for a dense layer)."""
        ratio = self.ratios[layer]
        return n if ratio is None else keep_count(n, ratio)

    def keep_counts(self, n: int) -> list[int]:
        return [self.keep_count(layer, n) for layer in range(self.num_layers)]

    def mean_ratio(self) -> float:
        """Mean keep ratio over all layers (dense = 1): the paper's KV-cache figure (0.5375 -> "53.8%")."""
        return sum(1.0 if ratio is None else ratio for ratio in self.ratios) / self.num_layers

    def mean_retention(self, n: int) -> float:
        """Mean over all layers of kept/n (dense = 1) after truncation: the exact share of n vision tokens kept.

        Slightly below :meth:`mean_ratio` (0.5369 vs 0.5375 for n=576) because keep counts are truncated.
        """
        if n <= 0:
            raise ValueError(f"token count must be > 0, got {n}")
        return sum(self.keep_counts(n)) / (n * self.num_layers)

    def describe(self, n: int = 576) -> str:
        """A text table of every layer's ratio and keep count for ``n`` vision tokens."""
        lines = [f"{'layer':>5}  {'kind':<5}  {'ratio':>8}  {f'keep/{n}':>9}"]
        for layer, ratio in enumerate(self.ratios):
            kind, shown = ("dense", "1") if ratio is None else ("p-MoD", f"{ratio:.6f}")
            lines.append(f"{layer:>5}  {kind:<5}  {shown:>8}  {self.keep_count(layer, n):>9}")
        lines.append(
            f"{len(self.mod_layers)} p-MoD layers of {self.num_layers}; "
            f"mean ratio {self.mean_ratio():.4f}, mean retention {self.mean_retention(n):.4f} of {n} vision tokens"
        )
        return "\n".join(lines)


def parse_schedule(spec: str, router_factor: float, num_layers: int) -> RetentionSchedule:
    """Build the schedule named by ``--mod_target_layers`` for an LLM with ``num_layers`` decoder layers."""
    if not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"a p-MoD schedule needs an LLM with at least 2 layers, got num_layers={num_layers!r}")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{SCHEDULE_FLAG} must be a schedule string ({', '.join(KNOWN_SCHEDULES)}), got {spec!r}")
    factor = _check_factor(router_factor)

    if (match := _DECAY_RE.fullmatch(spec)) is not None:
        kind, max_ratio, min_ratio = match.group(1), float(match.group(2)), float(match.group(3))
        ratios = _decay_ratios(spec, kind, max_ratio, min_ratio, factor, num_layers)
    elif spec in _CONSTANT_MODES:
        ratios = _constant_ratios(spec, factor, num_layers)
    elif (match := _STEPPED_RE.fullmatch(spec)) is not None:
        ratios = _stepped_ratios(spec, match.group(1), num_layers)
    else:
        raise ValueError(f"unknown {SCHEDULE_FLAG} {spec!r}; known schedules: {', '.join(KNOWN_SCHEDULES)}")

    schedule = RetentionSchedule(tuple(ratios))
    if not schedule.mod_layers:
        raise ValueError(
            f"{SCHEDULE_FLAG} {spec!r} with {FACTOR_FLAG} {factor} leaves no p-MoD layer in a "
            f"{num_layers}-layer LLM"
        )
    return schedule


def check_layer_indices(schedule: RetentionSchedule, indices: Sequence[int] | None) -> None:
    """Check a saved ``mod_target_layer_indices`` list against the schedule recomputed from the config.

    A mismatch means the config was written for an LLM with another layer count or with other schedule flags.
    """
    if indices is None:
        return
    saved = [int(i) for i in indices]
    expected = list(schedule.mod_layers)
    if saved != expected:
        raise ValueError(
            f"mod_target_layer_indices {saved} in the config disagrees with the layers {expected} recomputed from "
            f"{SCHEDULE_FLAG} and {FACTOR_FLAG} for {schedule.num_layers} decoder layers; the config was written "
            "for a different schedule or a model with a different number of layers"
        )


def schedule_from_config(config) -> RetentionSchedule | None:
    """The schedule of a p-MoD config (``mod_target_layers``, ``mod_router_factor``), or None for a dense one.

    Reads ``num_hidden_layers`` from the config or its ``text_config`` and checks a saved
    ``mod_target_layer_indices`` list.
    """
    spec = getattr(config, "mod_target_layers", None)
    if spec is None:
        return None
    text_config = getattr(config, "text_config", None) or config
    num_layers = getattr(config, "num_hidden_layers", None) or text_config.num_hidden_layers
    schedule = parse_schedule(spec, getattr(config, "mod_router_factor", None), num_layers)
    check_layer_indices(schedule, getattr(config, "mod_target_layer_indices", None))
    return schedule


def _check_factor(router_factor: float) -> float:
    if isinstance(router_factor, bool) or not isinstance(router_factor, (int, float)):
        raise ValueError(f"{FACTOR_FLAG} must be a number, got {router_factor!r}")
    if not math.isfinite(router_factor):
        raise ValueError(f"{FACTOR_FLAG} must be finite, got {router_factor}")
    return float(router_factor)


def _decay_ratios(spec: str, kind: str, max_ratio: float, min_ratio: float, factor: float, num_layers: int):
    if not (0.0 < min_ratio <= 1.0 and 0.0 < max_ratio <= 1.0):
        raise ValueError(f"{SCHEDULE_FLAG} {spec!r}: max and min ratios must lie in (0, 1]")
    if min_ratio > max_ratio:
        raise ValueError(f"{SCHEDULE_FLAG} {spec!r}: min ratio {min_ratio} is above max ratio {max_ratio}")
    if factor + 0.5 <= 0.0:
        raise ValueError(
            f"{FACTOR_FLAG} {factor} makes every ratio of {spec!r} non-positive (the curve starts at {factor + 0.5})"
        )
    denom = num_layers - 1
    ratios = []
    for layer in range(num_layers):
        if kind == "shiftedcos":
            raw = math.cos(layer * math.pi / denom) / 2 + factor
        else:
            raw = (-layer / denom + 0.5) + factor
        ratios.append(None if raw > max_ratio else max(raw, min_ratio))
    return ratios


def _constant_ratios(spec: str, factor: float, num_layers: int):
    if not 0.0 < factor <= 1.0:
        raise ValueError(
            f"{FACTOR_FLAG} is the keep ratio of {SCHEDULE_FLAG} {spec!r} and must be in (0, 1], got {factor}"
        )
    layers = {
        "deep_all": range(2, num_layers - 1),
        "deep_all_include_last": range(2, num_layers),
        "interleave": range(1, num_layers, 2),
        "constant": range(num_layers),
    }[spec]
    return [factor if layer in layers else None for layer in range(num_layers)]


def _stepped_ratios(spec: str, values: str, num_layers: int):
    steps = [float(v) for v in values.strip("_").split("_")]
    if len(steps) < 2:
        raise ValueError(f"{SCHEDULE_FLAG} {spec!r}: a stepped schedule needs at least two step ratios")
    if len(steps) > num_layers:
        raise ValueError(f"{SCHEDULE_FLAG} {spec!r}: {len(steps)} steps for only {num_layers} layers")
    if any(not 0.0 < step <= 1.0 for step in steps):
        raise ValueError(f"{SCHEDULE_FLAG} {spec!r}: step ratios must lie in (0, 1]")
    groups = [steps[layer * len(steps) // num_layers] for layer in range(num_layers)]
    return [None if step == 1.0 else step for step in groups]
