"""Router weight normalisation ("TanhNorm" and the paper's Table 4 alternatives).

A p-MoD layer turns its router logits into token weights w = scale * g(logits) + bias. The official flag
``--mod_weight_norm`` spells this ``<name>_<scale>_<bias>``; the released checkpoints use ``tanh_0.2_1``,
i.e. w = 0.2 * tanh(logit) + 1 in (0.8, 1.2). The ``+ 1`` is the identity path of the paper's Eq. 4
(X' = f(w) T(X) + X), so the paper's f(w) = alpha * g(w) + b is ``<name>_<alpha>_<1 + b>`` here.

Kinds g:

* ``tanh``: tanh(logit) (TanhNorm; paper Table 4 "TanhNorm(alpha=0.2)" = ``tanh_0.2_1``, "alpha=1" = ``tanh_1_1``)
* ``sigmoid``: sigmoid(logit)
* ``softmax``: softmax of the logits over the sequence (last) dimension, taken over the target tokens only;
  non-targets get probability 0 (paper "Softmax": f = 0.2 * Softmax = ``softmax_0.2_1``)
* ``shifted_softmax``: 2 * softmax - 1, which spans (-1, 1) like tanh, so ``shifted_softmax_0.2_1`` is the
  paper's "Shifted softmax" f = 0.4 * Softmax - 0.2 ("the same range as TanhNorm"); it equals ``softmax_0.4_0.8``
* ``none``: the raw logit (paper's "-" row = ``none_1_1``)

A plain name without numbers (``"tanh"``) gets scale 1 and bias 1, as in the official code; note that
``tanh`` alone is therefore the unstable alpha = 1 variant, not the default ``tanh_0.2_1``.

The weights are computed and returned in float32 without any device-to-host synchronisation: this runs in
every p-MoD layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

WEIGHT_NORM_FLAG = "--mod_weight_norm"
KINDS = ("tanh", "sigmoid", "softmax", "shifted_softmax", "none")
DEFAULT_WEIGHT_NORM = "tanh_0.2_1"

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SPEC_RE = re.compile(rf"([a-z_]+?)_({_NUMBER})_(-?{_NUMBER})")


@dataclass(frozen=True)
class WeightNorm:
    """w = scale * g(logits) + bias, with g chosen by ``kind`` (see the module docstring)."""

    kind: str = "tanh"
    scale: float = 0.2
    bias: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{WEIGHT_NORM_FLAG}: unknown weight norm {self.kind!r}; known: {', '.join(KINDS)}")
        if not self.scale > 0:
            raise ValueError(f"{WEIGHT_NORM_FLAG}: scale must be > 0 (the router gets no gradient otherwise), "
                             f"got {self.scale}")

    @property
    def spec(self) -> str:
        """The ``<name>_<scale>_<bias>`` string that :func:`parse_weight_norm` turns back into this object."""
        return f"{self.kind}_{self.scale:g}_{self.bias:g}"

    def __call__(self, logits: torch.Tensor, target_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token weights in float32 for router logits ``[..., seq]``.

        ``target_mask`` (bool, same shape) restricts the softmax kinds to the target tokens; the element-wise
        kinds do not need it. Values at non-target positions weight nothing and carry no meaning.
        """
        x = logits.float()
        if self.kind == "tanh":
            normalised = torch.tanh(x)
        elif self.kind == "sigmoid":
            normalised = torch.sigmoid(x)
        elif self.kind == "none":
            normalised = x
        else:
            probabilities = _softmax_over_targets(x, target_mask)
            normalised = probabilities if self.kind == "softmax" else 2.0 * probabilities - 1.0
        return normalised * self.scale + self.bias


def parse_weight_norm(spec: str | None) -> WeightNorm:
    """Parse ``--mod_weight_norm``: ``<name>_<scale>_<bias>`` or a plain name (scale 1, bias 1)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"{WEIGHT_NORM_FLAG} is required when p-MoD is enabled (e.g. {DEFAULT_WEIGHT_NORM!r}), got {spec!r}"
        )
    if spec in KINDS:
        return WeightNorm(spec, 1.0, 1.0)
    match = _SPEC_RE.fullmatch(spec)
    if match is None:
        raise ValueError(
            f"{WEIGHT_NORM_FLAG} {spec!r} is not '<name>_<scale>_<bias>' (e.g. {DEFAULT_WEIGHT_NORM!r}) "
            f"or one of {', '.join(KINDS)}"
        )
    return WeightNorm(match.group(1), float(match.group(2)), float(match.group(3)))


def _softmax_over_targets(logits: torch.Tensor, target_mask: torch.Tensor | None) -> torch.Tensor:
    if target_mask is None:
        return torch.softmax(logits, dim=-1)
    if target_mask.shape != logits.shape:
        raise ValueError(f"target_mask shape {tuple(target_mask.shape)} != logits shape {tuple(logits.shape)}")
    # A finite floor (not -inf) keeps rows without any target NaN-free; their probabilities are zeroed below.
    floor = torch.finfo(logits.dtype).min
    probabilities = torch.softmax(logits.masked_fill(~target_mask, floor), dim=-1)
    return probabilities * target_mask
