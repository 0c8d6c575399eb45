"""Turn the LLaVA-NeXT-Data parquet files (779K samples) into our training layout: one JSON list plus an image
folder, cleaned like the official p-MoD data (see clean_llava_json.py).

Works offline on parquet files you downloaded (the hub dataset `lmms-lab/LLaVA-NeXT-Data`, `data/*.parquet`).
Each row has `id` (str), `conversations` (list of {from, value}), `data_source` (str) and `image` (embedded
image bytes, or null for a text-only sample). Rows are streamed a batch at a time, so memory stays flat.

- Image files are named after the id with "/" replaced by "-" (as the official downloader did). By default the
  embedded bytes are written unchanged, with the extension of their format (lossless, no decoding cost);
  --jpeg re-encodes every image as an RGB JPEG named `<id>.jpg`, exactly like the official downloader.
- Two ids that map to the same file name get distinct names (the official downloader overwrote one image).
- A sample whose image is null keeps no `image` key; `<image>` tags left in its text are removed. A sample with
  an image but no `<image>` tag gets one at the start of its first human turn. Both are counted in the log.

Usage:
  python scripts/data/prepare_llava_next_data.py --parquet path/to/data \\
      --output-json playground/data/llava_next_data.json --image-folder playground/data/llava_next_images
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections import Counter
from pathlib import Path

from PIL import Image

from clean_llava_json import clean_records

logger = logging.getLogger("prepare_llava_next_data")

IMAGE_TAG = "<image>"
COLUMNS = ["id", "conversations", "data_source", "image"]
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tiff"}


def parquet_files(paths) -> list[Path]:
    """The given parquet files, and the `*.parquet` files (sorted) inside given folders."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.rglob("*.parquet"))
            if not found:
                raise FileNotFoundError(f"--parquet {path}: the folder holds no .parquet files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--parquet {path}: no such file or folder")
    return files


def iter_rows(files, batch_size: int = 256):
    """(file, row dict) for every row of every file, read one record batch at a time."""
    import pyarrow.parquet as pq

    for path in files:
        parquet = pq.ParquetFile(path)
        missing = {"id", "conversations"} - set(parquet.schema_arrow.names)
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected {COLUMNS}")
        columns = [name for name in COLUMNS if name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
            for row in batch.to_pylist():
                yield path, row


def image_bytes(value):
    """The encoded image of a row: HF's {bytes, path} struct, raw bytes, or None."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is None and value.get("path"):
            raise ValueError(f"image is stored by path only ({value['path']!r}), not embedded")
        return value.get("bytes")
    raise ValueError(f"unexpected image value of type {type(value).__name__}")


class ImageWriter:
    """Writes images under `folder` with unique names derived from sample ids."""

    def __init__(self, folder: Path, jpeg: bool):
        self.folder = folder
        self.jpeg = jpeg
        self.used: set[str] = set()
        self.renamed = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _unique(self, stem: str, extension: str) -> str:
        name, suffix = f"{stem}{extension}", 1
        while name in self.used:
            name, suffix = f"{stem}-{suffix}{extension}", suffix + 1
        if suffix > 1:
            self.renamed += 1
        self.used.add(name)
        return name

    def write(self, sample_id: str, data: bytes) -> str:
        """Save one image; returns its path relative to the folder."""
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            if self.jpeg:
                name = self._unique(safe_stem(sample_id), ".jpg")
                image.convert("RGB").save(self.folder / name, format="JPEG")
                return name
            image.verify()
        name = self._unique(safe_stem(sample_id), EXTENSIONS.get(image_format, ".img"))
        (self.folder / name).write_bytes(data)
        return name


def safe_stem(sample_id: str) -> str:
    return sample_id.replace("/", "-")


def first_human_turn(turns):
    return next((turn for turn in turns if turn.get("from") == "human"), None)


def convert_row(row, writer: ImageWriter, stats: Counter) -> dict:
    sample_id = str(row["id"])
    turns = [{"from": turn["from"], "value": turn["value"]} for turn in row["conversations"]]
    record = {"id": sample_id}
    data = image_bytes(row.get("image"))
    if data is None:
        stats["text_only"] += 1
        for turn in turns:
            if IMAGE_TAG in turn["value"]:
                turn["value"] = turn["value"].replace(f"{IMAGE_TAG}\n", "").replace(IMAGE_TAG, "")
                stats["tags_removed"] += 1
    else:
        record["image"] = writer.write(sample_id, data)
        stats["images"] += 1
        if not any(IMAGE_TAG in turn["value"] for turn in turns if turn["from"] == "human"):
            human = first_human_turn(turns)
            if human is None:
                raise ValueError("has an image but no human turn")
            human["value"] = f"{IMAGE_TAG}\n{human['value']}"
            stats["tags_added"] += 1
    record["conversations"] = turns
    if row.get("data_source") is not None:
        record["data_source"] = row["data_source"]
    return record


def prepare(parquet, output_json: Path, image_folder: Path, jpeg: bool = False, pad_to_multiple: int = 0,
            seed: int = 42, log_every: int = 10000) -> list:
    files = parquet_files(parquet)
    writer = ImageWriter(image_folder, jpeg)
    stats: Counter = Counter()
    records = []
    for path, row in iter_rows(files):
        try:
            records.append(convert_row(row, writer, stats))
        except (KeyError, TypeError, ValueError, OSError) as error:
            raise ValueError(f"{path}: row {len(records)} (id {row.get('id')!r}): {error}") from error
        if len(records) % log_every == 0:
            logger.info("%d samples converted", len(records))
    logger.info(
        "%d samples: %d with an image, %d text-only; %d <image> tag(s) added, %d removed; %d image(s) renamed "
        "to avoid a name clash", len(records), stats["images"], stats["text_only"], stats["tags_added"],
        stats["tags_removed"], writer.renamed,
    )
    records = clean_records(records, pad_to_multiple, seed)
    output_json.parent.mkdir(parents=True, exist_ok=True)
    output_json.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    logger.info("wrote %s and %s", output_json, image_folder)
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parquet", nargs="+", required=True, help="parquet files or folders holding them")
    parser.add_argument("--output-json", type=Path, default=Path("playground/data/llava_next_data.json"))
    parser.add_argument("--image-folder", type=Path, default=Path("playground/data/llava_next_images"))
    parser.add_argument("--jpeg", action="store_true", help="re-encode images as RGB JPEG (the official layout)")
    parser.add_argument("--pad-to-multiple", type=int, default=0,
                        help="duplicate samples so each modality count is a multiple of this (0: no duplicates)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        prepare(args.parquet, args.output_json, args.image_folder, args.jpeg, args.pad_to_multiple, args.seed)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
