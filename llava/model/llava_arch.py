"""LLaVA's multimodal glue: vision tower + projector, and splicing image features into the text.

`LlavaMetaModel` is mixed into the language model (so parameter names are LLaVA's: `model.vision_tower.*`,
`model.mm_projector.*`, `model.image_newline`); `LlavaMetaForCausalLM` into the causal-LM head class.
Input preparation also returns, per token, whether it is a vision token of the kind p-MoD routes
(`mod_target_token_type`), and the per-sample counts that p-MoD needs on the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import is_anyres
from llava.model.anyres_merge import merge_anyres_features
from llava.model.multimodal_encoder.builder import build_vision_tower
from llava.model.multimodal_projector.builder import build_vision_projector
from pmod.packing import PackedSequences
from pmod.routing import TokenCounts

logger = logging.getLogger(__name__)

TARGET_TOKEN_TYPES = ("vision_all", "vision_hr", "all")


class LlavaMetaModel:
    """Owns the vision tower, the projector and (for spatial_unpad) the learned row-end vector."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            checkpoint = Path(getattr(config, "_name_or_path", "") or ".")
            self.vision_tower = build_vision_tower(config, delay_load=True, search_dirs=(checkpoint, checkpoint.parent))
            self.mm_projector = build_vision_projector(config)
            if "unpad" in (getattr(config, "mm_patch_merge_type", None) or "flat"):
                self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))

    def get_vision_tower(self):
        return getattr(self, "vision_tower", None)

    def initialize_vision_modules(self, model_args) -> None:
        """Training entry: load the tower, write the mm_* config keys, build/load the projector."""
        config = self.config
        config.mm_vision_tower = model_args.vision_tower
        config.mm_vision_select_layer = model_args.mm_vision_select_layer
        config.mm_vision_select_feature = getattr(model_args, "mm_vision_select_feature", "patch")
        config.mm_projector_type = getattr(model_args, "mm_projector_type", "linear")
        config.mm_patch_merge_type = getattr(model_args, "mm_patch_merge_type", "flat")
        if self.get_vision_tower() is None:
            self.vision_tower = build_vision_tower(config)
        tower = self.vision_tower
        config.mm_hidden_size = tower.hidden_size
        config.use_mm_proj = True
        if getattr(self, "mm_projector", None) is None:
            self.mm_projector = build_vision_projector(config).to(self.embed_tokens.weight.dtype)
        else:
            self.mm_projector.requires_grad_(True)
        if "unpad" in config.mm_patch_merge_type and getattr(self, "image_newline", None) is None:
            scale = config.hidden_size**-0.5
            self.image_newline = nn.Parameter(torch.randn(config.hidden_size, dtype=self.embed_tokens.weight.dtype) * scale)
        adapter = getattr(model_args, "pretrain_mm_mlp_adapter", None)
        if adapter:
            load_projector_weights(self.mm_projector, adapter)


def load_projector_weights(projector: nn.Module, path: str | Path) -> None:
    """Load a stage-1 `mm_projector.bin` (keys `...mm_projector.<name>`) into `projector`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter: no such file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    stripped = {key.split("mm_projector.", 1)[1]: value for key, value in state.items() if "mm_projector." in key}
    if not stripped:
        raise ValueError(f"--pretrain_mm_mlp_adapter {path} holds no 'mm_projector.*' weights")
    projector.load_state_dict(stripped)


@dataclass
class MultimodalInputs:
    """Embeddings with image features spliced in, and everything that travels with them."""

    inputs_embeds: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # [B, L] bool
    position_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor | None  # [B, L]
    target_mask: torch.Tensor  # [B, L] bool: tokens p-MoD may route (per mod_target_token_type)
    counts: TokenCounts
    packing: PackedSequences | None = None  # set when the samples are packed into one row ([1, sum L])


@dataclass
class _ImageFeatures:
    features: torch.Tensor  # [N, D]
    base_tokens: int  # leading tokens that belong to the base (thumbnail) image; 0 when there is no anyres split


class LlavaMetaForCausalLM:
    """Encodes images and splices them into `input_ids` at IMAGE_TOKEN_INDEX (-200)."""

    truncated_samples = 0
    last_token_counts: TokenCounts | None = None  # of the last prepared batch (evaluation reads it)

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.get_model().mm_projector(self.get_vision_tower()(images))

    def _image_features(self, images, image_sizes) -> list[_ImageFeatures]:
        config = self.config
        tiles = [image if image.ndim == 4 else image[None] for image in images]
        projected = self.encode_images(torch.cat(tiles, dim=0)).split([t.shape[0] for t in tiles])
        merge_type = getattr(config, "mm_patch_merge_type", None) or "flat"
        if merge_type == "flat" or not is_anyres(getattr(config, "image_aspect_ratio", None)):
            return [_ImageFeatures(p.flatten(0, 1), 0) for p in projected]
        if not merge_type.startswith("spatial"):
            raise ValueError(f"Unknown mm_patch_merge_type {merge_type!r}: use flat, spatial or spatial_unpad")
        aspect = config.image_aspect_ratio
        max_tiles = int(aspect.rsplit("_", 1)[1]) if aspect.startswith("anyres_max_") else None
        newline = getattr(self.get_model(), "image_newline", None) if "unpad" in merge_type else None
        merged = []
        for index, features in enumerate(projected):
            if features.shape[0] == 1:
                merged.append(_ImageFeatures(*merge_anyres_features(features, None, None, 0, newline)))
                continue
            if image_sizes is None or image_sizes[index] is None:
                raise ValueError(f"image {index} has {features.shape[0]} anyres tiles but no image_sizes entry")
            merged.append(_ImageFeatures(*merge_anyres_features(
                features, tuple(int(v) for v in image_sizes[index]), config.image_grid_pinpoints,
                self.get_vision_tower().config.image_size, newline, unpad="unpad" in merge_type, max_tiles=max_tiles,
            )))
        return merged

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images,
        image_sizes=None,
        padding_side: str | None = None,
        pack: bool = False,
    ) -> MultimodalInputs:
        """Replace every IMAGE_TOKEN_INDEX by its image's features; re-pad (or, with ``pack``, concatenate into
        one row); truncate to the context length.

        Images are consumed in batch order, one per image token; a sample without image tokens consumes one
        (dummy) image without inserting it, so every rank always runs the vision path (ZeRO-3 needs that).
        """
        config = self.config
        if isinstance(images, torch.Tensor) and images.ndim in (3, 4):
            images = images if images.ndim == 4 else images[None]
            images = list(images)
        image_features = self._image_features(list(images), image_sizes)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        token_type = getattr(config, "mod_target_token_type", None) or "vision_all"
        if token_type not in TARGET_TOKEN_TYPES:
            raise ValueError(f"--mod_target_token_type {token_type!r}: use one of {', '.join(TARGET_TOKEN_TYPES)}")
        text_is_target = token_type == "all"
        embed = self.get_model().embed_tokens
        text_embeds = embed(input_ids.clamp(min=0))

        sequences, label_rows, target_rows = [], [], []
        next_image = 0
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][valid[row]]
            row_embeds = text_embeds[row][valid[row]]
            row_labels = labels[row][valid[row]] if labels is not None else None
            image_positions = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
            if not image_positions:
                if next_image >= len(image_features):
                    raise ValueError(f"sample {row} has no image token and the batch has no (dummy) image left for it")
                dummy = image_features[next_image].features[:0].to(row_embeds.dtype)
                next_image += 1
                sequences.append(torch.cat([row_embeds, dummy], dim=0))
                label_rows.append(row_labels)
                target_rows.append(torch.full((ids.shape[0],), text_is_target, device=ids.device))
                continue
            pieces, piece_labels, piece_targets = [], [], []
            start = 0
            for position in image_positions + [ids.shape[0]]:
                pieces.append(row_embeds[start:position])
                piece_targets.append(torch.full((position - start,), text_is_target, device=ids.device))
                if row_labels is not None:
                    piece_labels.append(row_labels[start:position])
                if position == ids.shape[0]:
                    break
                if next_image >= len(image_features):
                    raise ValueError(
                        f"sample {row} has more image tokens than the batch has images ({len(image_features)})"
                    )
                image = image_features[next_image]
                next_image += 1
                count = image.features.shape[0]
                pieces.append(image.features.to(row_embeds.dtype))
                is_target = torch.ones(count, dtype=torch.bool, device=ids.device)
                if token_type == "vision_hr":
                    is_target[: image.base_tokens] = False
                piece_targets.append(is_target)
                if row_labels is not None:
                    piece_labels.append(torch.full((count,), IGNORE_INDEX, dtype=row_labels.dtype, device=ids.device))
                start = position + 1
            sequences.append(torch.cat(pieces, dim=0))
            target_rows.append(torch.cat(piece_targets, dim=0))
            label_rows.append(torch.cat(piece_labels, dim=0) if row_labels is not None else None)
        if next_image != len(image_features):
            raise ValueError(f"the batch has {len(image_features)} images but consumed only {next_image}")
        sequences, label_rows, target_rows = self._truncate(sequences, label_rows, target_rows)
        if pack:
            prepared = _pack_batch(sequences, label_rows, target_rows)
        else:
            prepared = _pad_batch(
                sequences, label_rows, target_rows, padding_side or getattr(config, "tokenizer_padding_side", "right")
            )
        self.last_token_counts = prepared.counts
        return prepared

    def _truncate(self, sequences, label_rows, target_rows):
        limit = getattr(self.config, "tokenizer_model_max_length", None)
        if not limit:
            return sequences, label_rows, target_rows
        too_long = [i for i, seq in enumerate(sequences) if seq.shape[0] > limit]
        if too_long:
            LlavaMetaForCausalLM.truncated_samples += len(too_long)
            logger.warning(
                "Truncated %d sample(s) of this batch (rows %s) to tokenizer_model_max_length=%d after image "
                "expansion; %d truncated so far",
                len(too_long), too_long, limit, LlavaMetaForCausalLM.truncated_samples,
            )
        cut = slice(0, limit)
        return (
            [seq[cut] for seq in sequences],
            [lab[cut] if lab is not None else None for lab in label_rows],
            [tgt[cut] for tgt in target_rows],
        )


def _pad_batch(sequences, label_rows, target_rows, padding_side: str) -> MultimodalInputs:
    lengths = [seq.shape[0] for seq in sequences]
    width = max(lengths)
    first = sequences[0]
    batch = len(sequences)
    embeds = first.new_zeros(batch, width, first.shape[-1])
    mask = torch.zeros(batch, width, dtype=torch.bool, device=first.device)
    targets = torch.zeros(batch, width, dtype=torch.bool, device=first.device)
    positions = torch.zeros(batch, width, dtype=torch.long, device=first.device)
    has_labels = label_rows[0] is not None
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long, device=first.device) if has_labels else None
    for row, length in enumerate(lengths):
        span = slice(width - length, width) if padding_side == "left" else slice(0, length)
        embeds[row, span] = sequences[row]
        mask[row, span] = True
        targets[row, span] = target_rows[row]
        positions[row, span] = torch.arange(length, device=first.device)
        if has_labels:
            labels[row, span] = label_rows[row]
    n_target = tuple(targets.sum(dim=1).tolist())
    return MultimodalInputs(embeds, mask, positions, labels, targets, TokenCounts(n_target, tuple(lengths)))


def _pack_batch(sequences, label_rows, target_rows) -> MultimodalInputs:
    """All samples in one row, each with positions from 0. The first label of every sample is ignored: the
    loss's shift would otherwise have the last token of a sample predict the first of the next."""
    lengths = [seq.shape[0] for seq in sequences]
    device = sequences[0].device
    embeds = torch.cat(sequences)[None]
    labels = None
    if label_rows[0] is not None:
        labels = torch.cat([torch.cat([row.new_full((1,), IGNORE_INDEX), row[1:]]) for row in label_rows])[None]
    targets = torch.cat(target_rows)[None]
    packing = PackedSequences.from_lengths(lengths, device)
    mask = torch.ones(1, packing.total, dtype=torch.bool, device=device)
    n_target = tuple(int(n) for n in torch.stack([row.sum() for row in target_rows]).tolist())
    return MultimodalInputs(embeds, mask, packing.position_ids(device), labels, targets,
                            TokenCounts(n_target, tuple(lengths)), packing)
