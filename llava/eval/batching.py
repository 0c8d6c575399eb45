"""Order and chunk evaluation requests into batches, and put the answers back in request order.

Requests are grouped by their generation kwargs (one `generate()` call needs one set of kwargs), then
sorted longest first so a batch holds prompts of similar length. Each batch keeps the original
positions of its requests, so every request still resolves its own task, split and document.
"""

import json
from typing import Any, Callable, Dict, Hashable, Iterator, List, Sequence, Tuple, TypeVar

import torch

T = TypeVar("T")


def kwargs_key(gen_kwargs: Dict[str, Any]) -> str:
    """A hashable, order-independent key for a generation-kwargs dict."""
    return json.dumps(gen_kwargs, sort_keys=True, default=repr)


def plan_batches(
    items: Sequence[T],
    batch_size: int,
    group_key: Callable[[T], Hashable],
    length: Callable[[T], int],
) -> Iterator[List[Tuple[int, T]]]:
    """Yield batches of `(original_index, item)`, grouped by `group_key`, longest first within a group."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: Dict[Hashable, List[Tuple[int, T]]] = {}
    for index, item in enumerate(items):
        groups.setdefault(group_key(item), []).append((index, item))
    for members in groups.values():
        members.sort(key=lambda pair: (-length(pair[1]), pair[0]))
        for start in range(0, len(members), batch_size):
            yield members[start:start + batch_size]


def restore_order(size: int, answered: Sequence[Tuple[int, Any]]) -> List[Any]:
    """Place `(original_index, answer)` pairs back into a list of length `size`; every slot must be filled."""
    result: List[Any] = [None] * size
    filled = [False] * size
    for index, answer in answered:
        result[index] = answer
        filled[index] = True
    missing = [index for index, done in enumerate(filled) if not done]
    if missing:
        raise RuntimeError(f"no answer was produced for request(s) {missing[:10]}")
    return result


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as left-padded ``input_ids`` and ``attention_mask`` (batched generation pads on the left)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask

