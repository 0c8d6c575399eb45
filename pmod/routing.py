"""Token routing for p-MoD layers: the per-batch plan (host) and the per-layer selection (device).

Every shape a p-MoD layer needs (how many vision tokens each sample keeps, how long each sample's kept
sequence is) follows from per-sample token counts that input preparation already knows on the host. The
plan turns those counts into per-layer keep counts once per batch, so the per-layer selection below is
pure device work (top-k, cumsum, gather) with no device-to-host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn

from pmod.packing import PackedSequences
from pmod.schedule import RetentionSchedule


class TokenRouter(nn.Module):
    """One logit per token. The child is named ``router`` so state-dict keys match the official release."""

    def __init__(self, hidden_size: int, bias: bool, zero_init: bool):
        super().__init__()
        self.router = nn.Linear(hidden_size, 1, bias=bias)
        self.router.pmod_zero_init = zero_init  # read by the model's weight initialisation
        if zero_init:
            self.reset_to_zero()

    def reset_to_zero(self) -> None:
        """Logit 0 for every token: w = 1 under TanhNorm, so training starts from the dense layer's output."""
        zero_linear(self.router)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.router(hidden_states).squeeze(-1)


def zero_linear(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()


@dataclass(frozen=True)
class TokenCounts:
    """Per-sample host-side counts: routing targets (vision tokens) and valid (non-padding) tokens."""

    n_target: tuple[int, ...]
    n_valid: tuple[int, ...]

    @classmethod
    def from_masks(cls, target_mask: torch.Tensor, valid_mask: torch.Tensor | None) -> TokenCounts:
        """Fallback for callers that only have masks: one host synchronisation per forward pass."""
        if valid_mask is None:
            valid_mask = torch.ones_like(target_mask)
        n_target = (target_mask & valid_mask).sum(dim=1).tolist()
        n_valid = valid_mask.sum(dim=1).tolist()
        return cls(tuple(n_target), tuple(n_valid))


@dataclass(frozen=True)
class PackedKept:
    """A layer's kept tokens as one packed row: which slots of the ``[B, Lk_max]`` compact grid are real."""

    slots: torch.Tensor  # [sum Lk] long: b * Lk_max + j for every real compact slot, in sample order
    sequences: PackedSequences  # the kept lengths


@dataclass(frozen=True)
class LayerPlan:
    """What one p-MoD layer keeps for one batch; host ints for shapes, device tensors for masks."""

    keep: torch.Tensor  # [B] vision tokens kept per sample
    keep_counts: tuple[int, ...]  # the same, on the host
    kept_lengths: tuple[int, ...]  # per sample: valid text tokens + kept vision tokens
    max_kept_length: int
    kept_lengths_tensor: torch.Tensor  # [B] the same, on the device
    packed: PackedKept | None = None  # set when the layer runs its kept tokens packed

    @property
    def max_keep(self) -> int:
        return max(self.keep_counts)


def _packed_kept_host(lengths: tuple[int, ...]) -> list[torch.Tensor]:
    width = max(lengths)
    slots = torch.cat([torch.arange(n) + row * width for row, n in enumerate(lengths)])
    return [slots, torch.tensor((0, *accumulate(lengths)))]


def build_layer_plans(
    schedule: RetentionSchedule, counts: TokenCounts, device: torch.device, packed: bool = False
) -> dict[int, LayerPlan]:
    """Keep counts of every p-MoD layer for a batch (and, when ``packed``, each layer's packed row), with a
    single host-to-device copy."""
    layers = schedule.mod_layers
    keep_rows = [[schedule.keep_count(layer, n) for n in counts.n_target] for layer in layers]
    if not layers:
        return {}
    n_text = [valid - target for valid, target in zip(counts.n_valid, counts.n_target)]
    lengths_rows = [tuple(t + k for t, k in zip(n_text, keep)) for keep in keep_rows]
    parts = [torch.tensor([n_text] + keep_rows, dtype=torch.long).flatten()]
    if packed:
        parts += [part for lengths in lengths_rows for part in _packed_kept_host(lengths)]
    on_device = torch.cat(parts).to(device, non_blocking=True).split([part.numel() for part in parts])
    table = on_device[0].view(len(layers) + 1, -1)
    text_tensor, keep_all = table[0], table[1:]
    plans = {}
    for row, (layer, keep, lengths) in enumerate(zip(layers, keep_rows, lengths_rows)):
        packed_kept = None
        if packed:
            slots, offsets = on_device[1 + 2 * row], on_device[2 + 2 * row]
            packed_kept = PackedKept(slots, PackedSequences(lengths, offsets.to(torch.int32)))
        plans[layer] = LayerPlan(keep_all[row], tuple(keep), lengths, max(lengths), text_tensor + keep_all[row],
                                 packed_kept)
    return plans


@dataclass(frozen=True)
class Selection:
    """Which tokens a layer processes, as index maps between the full and the compact sequence."""

    kept: torch.Tensor  # [B, L] bool: token is processed by the layer
    compact_index: torch.Tensor  # [B, Lk] long: full-sequence index of each compact slot (slots past a sample's length are filler)
    full_to_compact: torch.Tensor  # [B, L] long: compact slot of each kept token (0 for tokens not kept)


def select_tokens(
    router_logits: torch.Tensor,
    target_mask: torch.Tensor,
    valid_mask: torch.Tensor,
    plan: LayerPlan,
) -> Selection:
    """Each sample keeps its own top-k targets (ranked by router logit) and every valid non-target token.

    Non-targets and padding rank at -inf, so they can never take a target's slot (the official code ranks them
    at a finite weight and can let padding in). Kept tokens stay in their original order.
    """
    batch, length = target_mask.shape
    scores = router_logits.float().masked_fill(~target_mask, float("-inf"))
    top = scores.topk(plan.max_keep, dim=1, sorted=True).indices
    within_budget = torch.arange(plan.max_keep, device=top.device) < plan.keep[:, None]
    selected = torch.zeros_like(target_mask).scatter_(1, top, within_budget)
    kept = selected | (valid_mask & ~target_mask)

    slot = kept.long().cumsum(dim=1) - 1
    overflow_slot = plan.max_kept_length
    destination = torch.where(kept, slot, overflow_slot)
    positions = torch.arange(length, device=kept.device).expand(batch, length)
    compact_index = torch.zeros(batch, overflow_slot + 1, dtype=torch.long, device=kept.device)
    compact_index.scatter_(1, destination, positions)
    return Selection(kept, compact_index[:, :overflow_slot], slot.clamp(min=0))


def gather_tokens(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[b, index[b, j], ...] for a [B, L, ...] tensor (batch dim 1 is broadcast)."""
    if values.shape[0] != index.shape[0]:
        values = values.expand(index.shape[0], *values.shape[1:])
    trailing = values.shape[2:]
    expanded = index.view(*index.shape, *([1] * len(trailing))).expand(*index.shape, *trailing)
    return values.gather(1, expanded)
