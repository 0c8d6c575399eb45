"""Clean a LLaVA-format JSON list the way p-MoD cleaned its training data, optionally padding the modalities.

1. Delete the literal "ASSISTANT: " inside every turn. The v1 template separates rounds with that string, so a
   message that contains it splits the conversation in the wrong place and the sample's labels are masked out
   ("tokenization mismatch"). The official clean-up removed it from LLaVA-665K and the LLaVA-NeXT data.
2. Optionally (--pad-to-multiple N) append randomly chosen duplicates until the number of image samples and the
   number of text-only samples are each a multiple of N, as the official script did for N = 128 (its global
   batch). The official script added N duplicates to a count that was already a multiple; here such a count
   gets none. Our modality-grouped sampler does not need the padding: the partial remainders of both
   modalities form the last one or two steps of an epoch (the only steps that may mix image and text-only
   samples, which the model handles), so the default is no duplication and the data stays as published.

Usage: python scripts/data/clean_llava_json.py IN.json OUT.json [--pad-to-multiple 128 --seed 42]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

logger = logging.getLogger("clean_llava_json")

INNER_ROLE_TAG = "ASSISTANT: "


def strip_inner_role_tags(records: list) -> int:
    """Remove INNER_ROLE_TAG from every turn in place; returns the number of turns changed."""
    changed = 0
    for index, record in enumerate(records):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            raise ValueError(f"sample {index} (id {_id_of(record)!r}) has no 'conversations' list")
        for turn in turns:
            value = turn.get("value")
            if isinstance(value, str) and INNER_ROLE_TAG in value:
                turn["value"] = value.replace(INNER_ROLE_TAG, "")
                changed += 1
    return changed


def duplicates_needed(count: int, multiple: int) -> int:
    """How many samples to add so that `count` becomes a multiple of `multiple` (0 if it already is)."""
    return -count % multiple


def pad_modalities(records: list, multiple: int, seed: int = 42) -> list:
    """Append random duplicates so that image and text-only samples are each a multiple of `multiple`."""
    if multiple < 1:
        raise ValueError(f"--pad-to-multiple must be >= 1, got {multiple}")
    rng = random.Random(seed)
    padded = list(records)
    for has_image in (True, False):
        group = [record for record in records if (record.get("image") is not None) == has_image]
        extra = duplicates_needed(len(group), multiple) if group else 0
        padded.extend(rng.choice(group) for _ in range(extra))
        logger.info("%s samples: %d, duplicates added: %d", "image" if has_image else "text-only", len(group), extra)
    return padded


def _id_of(record):
    return record.get("id") if isinstance(record, dict) else None


def clean_records(records: list, pad_to_multiple: int = 0, seed: int = 42) -> list:
    changed = strip_inner_role_tags(records)
    logger.info("removed %r from %d turn(s)", INNER_ROLE_TAG, changed)
    return pad_modalities(records, pad_to_multiple, seed) if pad_to_multiple else records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="LLaVA-format JSON list")
    parser.add_argument("output", type=Path, help="cleaned JSON list (may equal the input)")
    parser.add_argument("--pad-to-multiple", type=int, default=0,
                        help="duplicate samples so each modality count is a multiple of this (0: no duplicates)")
    parser.add_argument("--seed", type=int, default=42, help="seed for choosing the duplicates")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        records = json.loads(args.input.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"cannot read {args.input}: {error}")
    if not isinstance(records, list):
        parser.error(f"{args.input} must hold a JSON list of samples")
    records = clean_records(records, args.pad_to_multiple, args.seed)
    args.output.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    logger.info("wrote %d samples to %s", len(records), args.output)


if __name__ == "__main__":
    main()
