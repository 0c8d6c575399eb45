"""VisionZip (Yang et al., 2024): each image's features shrink to dominant and contextual tokens before the LLM.

Rule, per image, on the vision tower layer LLaVA reads (``mm_vision_select_layer``, -2 = CLIP-L's layer 22):

* **dominant**: the CLS token and the D-1 patches with the highest attention from CLS in that layer (summed
  over heads), in their original order, CLS first;
* **contextual**: the other patches are grouped around C targets (every floor(M/C)-th of the M remaining
  patches, the first C of them) by cosine similarity of their keys (the layer's k projection of its
  layernormed input, averaged over heads); each contextual token is its target's feature plus the mean of the
  features assigned to it (the target is added, not averaged in).

Output: [CLS, dominant patches, contextual] features of the selected layer, D + C per image. The CLS
attention row and the keys are computed from the layer's own modules, so the tower keeps SDPA attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visionzip_features(tower, images: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """[B, dominant + contextual, tower hidden] features of ``images`` [B, 3, H, W] through ``tower`` (our
    ``CLIPVisionTower``); an error names the counts when the image has too few patches for them."""
    clip = tower.vision_tower
    layers = getattr(clip, "vision_model", clip).encoder.layers  # transformers < 5.20 nests a vision_model
    index = tower.select_layer % (len(layers) + 1)  # hidden_states[index] is the output of layers[index - 1]
    with torch.no_grad():
        outputs = clip(images.to(device=tower.device, dtype=tower.dtype), output_hidden_states=True)
    features, layer_input = outputs.hidden_states[index], outputs.hidden_states[index - 1]
    patches = features.shape[1] - 1
    if dominant - 1 + contextual > patches:
        raise ValueError(f"VisionZip dominant {dominant} + contextual {contextual} needs more than the {patches} "
                         "patches of one image")
    cls_attention, keys = _cls_attention_and_keys(layers[index - 1], layer_input)

    top = cls_attention[:, 1:].topk(dominant - 1, dim=1).indices.sort(dim=1).values + 1
    kept = torch.cat([top.new_zeros(top.shape[0], 1), top], dim=1)  # CLS first, then patches in order
    is_kept = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device).scatter_(1, kept, True)
    rest = is_kept.to(torch.int8).argsort(dim=1, stable=True)[:, : patches + 1 - dominant]  # in original order
    dominant_features = _gather(features, kept)
    if contextual == 0:
        return dominant_features
    rest_keys = F.normalize(_gather(keys, rest).float(), dim=-1)
    return torch.cat([dominant_features, _merge_contextual(_gather(features, rest), rest_keys, contextual)], dim=1)


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(1, index.unsqueeze(-1).expand(*index.shape, values.shape[-1]))


def _cls_attention_and_keys(layer, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] CLS attention summed over heads, and [B, T, head_dim] keys averaged over heads."""
    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    normed = layer.layer_norm1(hidden_states)
    keys = attention.k_proj(normed).view(batch, length, attention.num_heads, attention.head_dim)
    query = attention.q_proj(normed[:, :1]).view(batch, 1, attention.num_heads, attention.head_dim)
    scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), keys.float()) * attention.scale
    return scores.softmax(dim=-1).sum(dim=1)[:, 0], keys.mean(dim=2)


def _merge_contextual(features: torch.Tensor, keys: torch.Tensor, contextual: int) -> torch.Tensor:
    """C contextual tokens from the M remaining ``features`` (index maps built on the host: no device sync)."""
    remaining = features.shape[1]
    targets = list(range(0, remaining, max(1, remaining // contextual)))[:contextual]
    others = sorted(set(range(remaining)) - set(targets))
    targets, others = (torch.tensor(v, device=features.device) for v in (targets, others))
    similarity = keys[:, others] @ keys[:, targets].transpose(1, 2)  # [B, others, C]
    assignment = torch.zeros_like(similarity, dtype=features.dtype).scatter_(2, similarity.argmax(-1, keepdim=True), 1)
    counts = assignment.sum(dim=1).clamp(min=1).unsqueeze(-1)
    return features[:, targets] + assignment.transpose(1, 2) @ features[:, others] / counts
