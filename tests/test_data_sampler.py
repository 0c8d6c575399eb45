"""Modality-grouped sampler: a permutation per epoch, single-modality steps, works with one modality."""

import random

import pytest
import torch

from llava.train.sampler import LengthGroupedSampler, split_to_even_chunks


def mixed_lengths(n_image, n_text, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 300) for _ in range(n_image)] + [-rng.randint(1, 300) for _ in range(n_text)]


def epoch(lengths, batch_size=2, world_size=3, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return list(LengthGroupedSampler(batch_size, world_size, lengths, generator=generator, **kwargs))


@pytest.mark.parametrize("n_image, n_text", [(37, 23), (30, 12), (50, 0), (0, 19), (5, 4)])
def test_every_index_once_and_steps_single_modality_except_leftover(n_image, n_text):
    lengths = mixed_lengths(n_image, n_text)
    batch_size, world_size = 2, 3
    megabatch = batch_size * world_size
    order = epoch(lengths, batch_size, world_size)
    assert sorted(order) == list(range(len(lengths)))
    n_leftover = n_image % megabatch + n_text % megabatch
    full_part = order[: len(order) - n_leftover]
    assert len(full_part) % megabatch == 0
    for start in range(0, len(full_part), megabatch):
        signs = {lengths[i] > 0 for i in full_part[start : start + megabatch]}
        assert len(signs) == 1
    leftover = order[len(full_part):]
    assert sum(lengths[i] > 0 for i in leftover) == n_image % megabatch
    assert sum(lengths[i] < 0 for i in leftover) == n_text % megabatch


def test_single_modality_data_is_length_grouped_within_megabatches():
    lengths = mixed_lengths(0, 24, seed=3)
    order = epoch(lengths, batch_size=4, world_size=2)
    for start in range(0, 24, 8):
        chunk = order[start : start + 8]
        totals = [sum(-lengths[i] for i in chunk[:4]), sum(-lengths[i] for i in chunk[4:])]
        longest = max(chunk, key=lambda i: -lengths[i])
        assert longest == chunk[0]
        assert abs(totals[0] - totals[1]) <= max(-lengths[i] for i in chunk)


def test_deterministic_given_generator_and_differs_across_seeds():
    lengths = mixed_lengths(40, 25)
    assert epoch(lengths, seed=7) == epoch(lengths, seed=7)
    assert epoch(lengths, seed=7) != epoch(lengths, seed=8)


def test_full_megabatches_are_shuffled_across_modalities():
    lengths = mixed_lengths(60, 60)
    order = epoch(lengths, batch_size=2, world_size=3)
    step_modalities = [lengths[order[s]] > 0 for s in range(0, 120, 6)]
    assert step_modalities != sorted(step_modalities) and step_modalities != sorted(step_modalities, reverse=True)


def test_plain_length_grouping_ignores_modality():
    lengths = mixed_lengths(13, 11)
    order = epoch(lengths, group_by_modality=False)
    assert sorted(order) == list(range(24))


def test_zero_length_and_bad_sizes_raise():
    with pytest.raises(ValueError, match="non-zero"):
        epoch([3, 0, -2])
    with pytest.raises(ValueError, match="batch_size and world_size"):
        LengthGroupedSampler(0, 1, [1, 2])


def test_split_to_even_chunks_balances_totals():
    lengths = [10, 9, 8, 7, 2, 1]
    chunks = split_to_even_chunks([0, 1, 2, 3, 4, 5], lengths, 2)
    assert [len(c) for c in chunks] == [3, 3]
    assert sorted(sum(lengths[i] for i in c) for c in chunks) == [18, 19]
