"""LLaVA's modality-grouped length sampler: every optimizer step sees image samples only or text samples only.

Indices are shuffled per modality and cut into megabatches of `batch_size * world_size` (LLaVA passes
world size x gradient accumulation); each megabatch is sorted by length and dealt into `world_size` chunks of
similar total length, one per rank. Full megabatches of both modalities are shuffled together; the partial
remainders of the two modalities come last, together (the only steps that may mix modalities). Unlike LLaVA,
this works when the data holds only one modality, and every random draw comes from the given generator.
"""

from typing import Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(indices: List[int], lengths: Sequence[int], num_chunks: int) -> List[List[int]]:
    """Deal indices (longest first) to the chunk with the smallest total; uneven counts fall back to striding."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: List[List[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for index in indices:
        open_chunks = [c for c in range(num_chunks) if len(chunks[c]) < per_chunk]
        target = min(open_chunks, key=lambda c: totals[c])
        chunks[target].append(index)
        totals[target] += lengths[index]
    return chunks


def _arrange(megabatch: List[int], lengths: Sequence[int], world_size: int) -> List[int]:
    by_length = sorted(megabatch, key=lambda i: lengths[i], reverse=True)
    return [i for chunk in split_to_even_chunks(by_length, lengths, world_size) for i in chunk]


def _megabatches(indices: List[int], megabatch_size: int, generator) -> List[List[int]]:
    order = torch.randperm(len(indices), generator=generator).tolist()
    shuffled = [indices[k] for k in order]
    return [shuffled[k : k + megabatch_size] for k in range(0, len(shuffled), megabatch_size)]


def modality_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator=None
) -> List[int]:
    """One epoch of indices; `lengths` are positive for image samples and negative for text-only ones."""
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero (positive: image sample, negative: text-only)")
    abs_lengths = [abs(length) for length in lengths]
    megabatch_size = batch_size * world_size
    full, leftover = [], []
    for modality in (lambda x: x > 0, lambda x: x < 0):
        indices = [i for i, length in enumerate(lengths) if modality(length)]
        for megabatch in _megabatches(indices, megabatch_size, generator):
            (full if len(megabatch) == megabatch_size else leftover).append(megabatch)
    order = torch.randperm(len(full), generator=generator).tolist()
    rest = [i for megabatch in leftover for i in megabatch]
    groups = [full[k] for k in order] + [rest[k : k + megabatch_size] for k in range(0, len(rest), megabatch_size)]
    return [i for group in groups for i in _arrange(group, abs_lengths, world_size)]


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int, generator=None) -> List[int]:
    """One epoch of indices grouped by length only (modality ignored)."""
    abs_lengths = [abs(length) for length in lengths]
    megabatches = _megabatches(list(range(len(lengths))), batch_size * world_size, generator)
    return [i for megabatch in megabatches for i in _arrange(megabatch, abs_lengths, world_size)]


class LengthGroupedSampler(Sampler):
    """Yields one epoch of indices, grouped by modality (LLaVA's `group_by_modality_length`) or by length."""

    def __init__(
        self,
        batch_size: int,
        world_size: int,
        lengths: Sequence[int],
        generator: Optional[torch.Generator] = None,
        group_by_modality: bool = True,
    ):
        if lengths is None:
            raise ValueError("LengthGroupedSampler needs the per-sample lengths")
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = list(lengths)
        self.generator = generator
        self.group_by_modality = group_by_modality

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        group = modality_grouped_indices if self.group_by_modality else length_grouped_indices
        return iter(group(self.lengths, self.batch_size, self.world_size, generator=self.generator))
