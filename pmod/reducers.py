"""Training-free vision-token reducers (FastV, PyramidDrop, random, uniform) as retention schedules plus a score.

A reducer drops vision tokens for good at some layers; a dropped token takes no part in any later layer and
has no slot in those layers' KV caches. In this code base that is a p-MoD model without routers: the layers
from the first drop on run on each sample's kept tokens (``pmod.layer.routed_forward`` with no reweighting),
and the kept set only shrinks, so tokens skipped once are never seen again. What differs between methods is
where the ranking score comes from and which layers drop:

* ``fastv_k{K}_keep{f}`` (or ``_r{R}`` with R = 1 - f, FastV's drop ratio): the attention that the last prompt
  token pays to each vision token in layer K-1, averaged over heads (FastV, Chen et al. 2024, Sec. 4.2); the
  top ``f`` of the vision tokens go on into layers K..L-1.
* ``pdrop_layers{l1-l2-..}_lambda{λ}``: before each layer l_s of the list, the last prompt token's attention
  to the tokens still kept, with layer l_s's own layernorm, q/k projections and RoPE (PyramidDrop, Xing et al.
  2024, Sec. 3.2); the top ``λ^s`` of the *original* vision tokens go on (576 -> 288 -> 144 -> 72 at λ 0.5).
* ``random_keep{f}_seed{s}`` and ``uniform_keep{f}`` (optional ``_layer{K}``, default 0): a seeded random
  subset of each image's token positions, or every image's tokens at an even stride; sanity baselines.
* ``visionzip_dominant{D}_contextual{C}``: before the LLM, each image becomes D "dominant" tokens (CLS plus
  the D-1 patches the vision tower's CLS attends to most) and C "contextual" tokens merged from the rest
  (VisionZip, Yang et al. 2024; ``llava.model.visionzip``). The LLM then runs densely on D + C tokens per image.

Keep counts use the p-MoD rule trunc(float32(n) * float32(ratio)) of each sample's vision-token count.
Spec strings contain no ``,``, ``=`` or space, so they pass through lmms-eval ``model_args`` and file names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from pmod.schedule import RetentionSchedule, keep_count

REDUCER_NAMES = ("fastv", "pdrop", "random", "uniform", "visionzip")
REDUCER_CONFIG_KEY = "token_reducer"  # the config (text config for pmod.hf) of a reduced model names its spec
_PART = re.compile(r"^([a-z]+)([0-9][0-9.\-]*)$")


@dataclass(frozen=True)
class ReducerSpec:
    """A parsed reducer: its method, its drop stages and the ratio of the original vision tokens each keeps."""

    method: str
    drop_layers: tuple[int, ...]  # the first layer of each stage (the layer whose input is reduced)
    stage_ratios: tuple[float, ...]  # kept share of the original vision tokens from that layer on
    seed: int = 0
    dominant: int = 0  # VisionZip: tokens kept per image, CLS included
    contextual: int = 0  # VisionZip: merged tokens per image

    def __post_init__(self) -> None:
        if list(self.drop_layers) != sorted(set(self.drop_layers)):
            raise ValueError(f"reducer {self.method}: drop layers must increase, got {list(self.drop_layers)}")
        if any(not 0.0 < r <= 1.0 for r in self.stage_ratios):
            raise ValueError(f"reducer {self.method}: kept shares must lie in (0, 1], got {list(self.stage_ratios)}")
        if list(self.stage_ratios) != sorted(self.stage_ratios, reverse=True):
            raise ValueError(f"reducer {self.method}: a later stage cannot keep more tokens than an earlier one")

    @property
    def name(self) -> str:
        """The canonical spec string (``parse_reducer(spec.name) == spec``)."""
        if self.method == "fastv":
            return f"fastv_k{self.drop_layers[0]}_keep{self.stage_ratios[0]:g}"
        if self.method == "pdrop":
            layers = "-".join(str(layer) for layer in self.drop_layers)
            lam = self.stage_ratios[0]
            return f"pdrop_layers{layers}_lambda{lam:g}"
        if self.method == "visionzip":
            return f"visionzip_dominant{self.dominant}_contextual{self.contextual}"
        suffix = f"_seed{self.seed}" if self.method == "random" else ""
        return f"{self.method}_keep{self.stage_ratios[0]:g}_layer{self.drop_layers[0]}{suffix}"

    @property
    def score_layer_offset(self) -> int:
        """FastV ranks with the layer before the drop (its attention map); the others with the drop layer."""
        return -1 if self.method == "fastv" else 0

    @property
    def uses_attention(self) -> bool:
        return self.method in ("fastv", "pdrop")

    @property
    def merges_before_llm(self) -> bool:
        """VisionZip shortens the image features themselves; the LLM then has no reduced layer."""
        return self.method == "visionzip"

    @property
    def tokens_per_image(self) -> int:
        return self.dominant + self.contextual

    def schedule(self, num_layers: int) -> RetentionSchedule | None:
        """Per-layer kept share: None (every token) before the first drop, then each stage's ratio; no schedule
        (None) for a reducer that merges before the LLM."""
        if self.merges_before_llm:
            return None
        if self.drop_layers[-1] >= num_layers:
            raise ValueError(f"reducer {self.name}: drop layer {self.drop_layers[-1]} does not exist in a "
                             f"{num_layers}-layer LLM")
        ratios: list[float | None] = [None] * num_layers
        for stage, (start, ratio) in enumerate(zip(self.drop_layers, self.stage_ratios)):
            end = self.drop_layers[stage + 1] if stage + 1 < len(self.drop_layers) else num_layers
            ratios[start:end] = [ratio] * (end - start)
        return RetentionSchedule(tuple(ratios))


def parse_reducer(spec: str) -> ReducerSpec:
    """``fastv_k2_keep0.25``, ``fastv_k3_r0.5``, ``pdrop_layers8-16-24_lambda0.5``, ``random_keep0.25_seed1``,
    ``uniform_keep0.25_layer2``; an error names the spec and what is wrong with it."""
    parts = str(spec).strip().split("_")
    method, options = parts[0], {}
    if method not in REDUCER_NAMES:
        raise ValueError(f"reducer {spec!r}: unknown method {method!r}; known: {', '.join(REDUCER_NAMES)}")
    for part in parts[1:]:
        match = _PART.match(part)
        if match is None or match.group(1) in options:
            raise ValueError(f"reducer {spec!r}: cannot read {part!r} (write each option as name+value, e.g. keep0.25)")
        options[match.group(1)] = match.group(2)
    try:
        return _build(method, options)
    except (KeyError, ValueError) as error:
        missing = f"missing option {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"reducer {spec!r}: {missing}; {USAGE[method]}") from None


USAGE = {
    "fastv": "write fastv_k{K}_keep{kept share} or fastv_k{K}_r{dropped share}, e.g. fastv_k2_keep0.25",
    "pdrop": "write pdrop_layers{l1-l2-...}_lambda{λ}, e.g. pdrop_layers8-16-24_lambda0.5",
    "random": "write random_keep{kept share}[_seed{s}][_layer{K}], e.g. random_keep0.25_seed0",
    "uniform": "write uniform_keep{kept share}[_layer{K}], e.g. uniform_keep0.25",
    "visionzip": "write visionzip_dominant{D}_contextual{C} (D counts the CLS token), "
                 "e.g. visionzip_dominant54_contextual10",
}


def _build(method: str, options: dict[str, str]) -> ReducerSpec:
    allowed = {"fastv": {"k", "keep", "r"}, "pdrop": {"layers", "lambda"}, "random": {"keep", "seed", "layer"},
               "uniform": {"keep", "layer"}, "visionzip": {"dominant", "contextual"}}[method]
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}")
    if method == "fastv":
        k = int(options["k"])
        if k < 1:
            raise ValueError("FastV drops at layer K >= 1 (it ranks with layer K-1's attention)")
        if ("keep" in options) == ("r" in options):
            raise ValueError("give exactly one of keep and r")
        keep = float(options["keep"]) if "keep" in options else 1.0 - float(options["r"])
        return ReducerSpec("fastv", (k,), (keep,))
    if method == "pdrop":
        layers = tuple(int(layer) for layer in options["layers"].split("-"))
        lam = float(options["lambda"])
        if not 0.0 < lam <= 1.0 or layers[0] < 1:
            raise ValueError("λ must lie in (0, 1] and the first drop layer must be >= 1")
        return ReducerSpec("pdrop", layers, tuple(lam ** (stage + 1) for stage in range(len(layers))))
    if method == "visionzip":
        dominant, contextual = int(options["dominant"]), int(options["contextual"])
        if dominant < 1 or contextual < 0:
            raise ValueError("VisionZip keeps at least the CLS token (dominant >= 1) and contextual >= 0")
        return ReducerSpec("visionzip", (), (), dominant=dominant, contextual=contextual)
    keep = float(options["keep"])
    return ReducerSpec(method, (int(options.get("layer", 0)),), (keep,), int(options.get("seed", 0)))


def mean_vision_tokens(spec: ReducerSpec, n_vision: int, num_layers: int) -> float:
    """The field's layer-averaged vision-token count T_avg = Σ_l kept_l / L (e.g. FastV K=2 keep 144 -> 171);
    for VisionZip, D + C (one image of one tile)."""
    if spec.merges_before_llm:
        return float(spec.tokens_per_image)
    schedule = spec.schedule(num_layers)
    return sum(schedule.keep_count(layer, n_vision) for layer in range(num_layers)) / num_layers


def fastv_for_budget(k: int, n_vision: int, num_layers: int, mean_tokens: float) -> ReducerSpec:
    """FastV with drop layer ``k`` whose T_avg is ``mean_tokens`` (the kept share rounded to 4 digits)."""
    keep = (mean_tokens * num_layers - k * n_vision) / ((num_layers - k) * n_vision)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"FastV with K={k} cannot average {mean_tokens} of {n_vision} vision tokens")
    return ReducerSpec("fastv", (k,), (_round_up(keep, n_vision),))


def pdrop_for_budget(layers: tuple[int, ...], n_vision: int, num_layers: int, mean_tokens: float) -> ReducerSpec:
    """PyramidDrop at ``layers`` whose λ (by bisection, 4 digits) gives T_avg closest to ``mean_tokens``."""
    def average(lam: float) -> float:
        spec = ReducerSpec("pdrop", layers, tuple(lam ** (s + 1) for s in range(len(layers))))
        return mean_vision_tokens(spec, n_vision, num_layers)

    low, high = 1e-6, 1.0
    if not average(low) <= mean_tokens <= average(high):
        raise ValueError(f"PyramidDrop at layers {list(layers)} cannot average {mean_tokens} of {n_vision} tokens")
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) < mean_tokens else (low, middle)
    lam = round(high, 4)
    return ReducerSpec("pdrop", layers, tuple(lam ** (s + 1) for s in range(len(layers))))


def pre_llm_for_budget(method: str, n_vision: int, mean_tokens: float, seed: int = 0) -> ReducerSpec:
    """Random or uniform pruning before the LLM keeping ``mean_tokens`` of ``n_vision`` tokens in every layer."""
    return ReducerSpec(method, (0,), (_round_up(mean_tokens / n_vision, n_vision),), seed)


def for_budget(family: str, share: float, n_vision: int, num_layers: int) -> ReducerSpec:
    """The reducer of ``family`` whose T_avg is ``share`` of ``n_vision`` in a ``num_layers``-layer LLM.

    ``family`` is a spec without its budget: ``fastv`` / ``fastv_k{K}`` (default K = max(1, L // 16):
    FastV's K=2 on 32 layers), ``pdrop`` / ``pdrop_layers{..}`` (default L/16, L/4, L/2: 2-8-16 on 32
    layers, the author's advice for budgets under PyramidDrop's 8-16-24 floor of 25%, PyramidDrop issue #29),
    ``random[_seed{s}]``, ``uniform``, ``visionzip`` (dominant : contextual = 54 : 10, VisionZip's README
    setting). A budget the family cannot reach is an error.
    """
    parts = family.split("_")
    method, options = parts[0], dict(_PART.match(part).groups() for part in parts[1:] if _PART.match(part))
    allowed = {"fastv": {"k"}, "pdrop": {"layers"}, "random": {"seed"}, "uniform": set(),
               "visionzip": set()}.get(method)
    if allowed is None or len(options) != len(parts) - 1 or not set(options) <= allowed:
        raise ValueError(f"reducer family {family!r}: write fastv[_k{{K}}], pdrop[_layers{{l1-l2-..}}], "
                         "random[_seed{s}] or uniform")
    target = share * n_vision
    if method == "fastv":
        return fastv_for_budget(int(options.get("k", max(1, num_layers // 16))), n_vision, num_layers, target)
    if method == "pdrop":
        default = (max(1, num_layers // 16), max(2, num_layers // 4), max(3, num_layers // 2))
        layers = tuple(int(v) for v in options["layers"].split("-")) if "layers" in options else default
        return pdrop_for_budget(layers, n_vision, num_layers, target)
    if method == "visionzip":
        total = max(2, round(target))
        dominant = max(1, round(total * 54 / 64))
        return ReducerSpec("visionzip", (), (), dominant=dominant, contextual=total - dominant)
    return pre_llm_for_budget(method, n_vision, target, int(options.get("seed", 0)))


def _round_up(share: float, n_vision: int) -> float:
    """The shortest decimal share whose trunc(float32) keep count of ``n_vision`` is round(share * n)."""
    target = max(1, round(share * n_vision))
    for digits in range(2, 9):
        candidate = math.ceil(target / n_vision * 10**digits) / 10**digits
        if keep_count(n_vision, candidate) == target:
            return candidate
    raise ValueError(f"no decimal share keeps exactly {target} of {n_vision} tokens")


def host_scores(spec: ReducerSpec, n_vision: tuple[int, ...], keep: tuple[int, ...]) -> torch.Tensor:
    """[B, max n] ranking scores of each sample's vision tokens (in their order) for random/uniform pruning.

    Built on the host from counts the batch plan already holds, so a sample's kept positions do not depend on
    the other samples of its batch. Uniform keeps the last token of each of ``keep`` equal-width bins.
    """
    width = max(max(n_vision), 1)
    rows = torch.full((len(n_vision), width), float("-inf"))
    for row, (n, k) in enumerate(zip(n_vision, keep)):
        if n == 0:
            continue
        if spec.method == "random":
            generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + n)
            rows[row, :n] = torch.rand(n, generator=generator)
        else:
            ordinal = torch.arange(n)
            rows[row, :n] = ((ordinal + 1) * k // n > ordinal * k // n).float()
    return rows
