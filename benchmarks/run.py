"""Command line: dense vs p-MoD in one process, as a markdown table and JSON.

    python -m benchmarks.run --quick                                   # tiny shapes, CPU, a few seconds
    python -m benchmarks.run --preset small-llava-next --device cpu    # CPU, small shapes
    python -m benchmarks.run --preset llava-next-7b --device cuda --dtype bfloat16 --check-syncs
    python -m benchmarks.run --quick --preset tiny-qwen2.5-vl          # transformers' Qwen2.5-VL via pmod.hf
    python -m benchmarks.run --preset llava-1.5-7b --reducer fastv_k2_keep0.25   # dense vs a reducer
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

logger = logging.getLogger("benchmarks")
PARTS = ("prefill", "full", "decode", "uneven", "cache", "train", "kv", "layer", "attention", "packing",
         "uneven_prefill", "compiled")
OPT_IN_PARTS = ("compiled",)  # compiles each model's decode step (minutes on a CPU): run when asked for
REDUCER_PARTS = ("prefill", "full", "decode", "uneven", "cache", "kv")
DTYPES = ("float32", "bfloat16", "float16")


def all_presets() -> dict:
    """Our LLaVA class's presets and the transformers-native VLM presets (benchmarks.hf_models), by name."""
    from benchmarks.hf_models import HF_PRESETS
    from benchmarks.models import PRESETS

    return {**PRESETS, **HF_PRESETS}


def parse_args(argv):
    from benchmarks import hf_models

    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(all_presets()),
                        help="default: tiny with --quick, else small-llava-next")
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up, 3 repeats, 4 decode tokens; the tiny preset unless --preset names another "
                             "(e.g. tiny-qwen2.5-vl)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all the preset "
                                        f"supports but {','.join(OPT_IN_PARTS)})")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing (default 2; 1 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed calls, median reported (default 5; 3 with --quick)")
    parser.add_argument("--decode-tokens", type=int, help="new tokens per decode run (default 32; 4 with --quick)")
    parser.add_argument("--decode-batches", default="1,8", help="comma-separated decode batch sizes")
    parser.add_argument("--train-batch", type=int, default=8,
                        help="samples per training step (packing part) and rows (uneven_prefill part); default 8")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: stable on a shared machine; GPU runs ignore it)")
    parser.add_argument("--check-syncs", action="store_true",
                        help="also run the p-MoD layer loop (prefill, uneven-batch decode) under "
                             "torch.cuda.set_sync_debug_mode('error')")
    parser.add_argument("--reducer", help="time a training-free reducer (e.g. fastv_k2_keep0.25, docs/reducers.md) on "
                                          f"the dense model instead of p-MoD; parts {','.join(REDUCER_PARTS)}")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled part (default inductor; 'eager' checks the "
                             "capture without code generation)")
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the markdown report here")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "small-llava-next")
    native = args.preset in hf_models.HF_PRESETS
    if native:
        _refuse_unmeasured(parser, args)
    if args.reducer:
        _check_reducer(parser, args, native)
    default_parts = [part for part in PARTS if part not in OPT_IN_PARTS]
    args.parts = args.parts or ",".join(hf_models.PARTS if native else REDUCER_PARTS if args.reducer else default_parts)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    for flag in ("warmup", "repeats", "decode_tokens", "threads", "train_batch"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            parser.error(f"--{flag.replace('_', '-')} must be {'>= 0' if flag == 'warmup' else '>= 1'}, got {value}")
    try:
        args.decode_batches = tuple(int(b) for b in args.decode_batches.split(","))
    except ValueError:
        parser.error(f"--decode-batches must be comma-separated integers, got {args.decode_batches!r}")
    return args


def _check_reducer(parser, args, native: bool) -> None:
    """A reducer runs on our LLaVA presets, for the inference parts, from a spec that parses."""
    from pmod.reducers import parse_reducer

    if native:
        parser.error(f"--reducer: reducers run on our LLaVA presets, not on the transformers-native {args.preset}")
    try:
        reducer = parse_reducer(args.reducer)
    except ValueError as error:
        parser.error(f"--reducer: {error}")
    if reducer.merges_before_llm:
        parser.error(f"--reducer {args.reducer}: VisionZip shrinks the vision tower's output, and these parts feed "
                     "the LLM embeddings directly; scripts/compare.sh times its prefill from pixels")
    refused = [part for part in (args.parts or "").split(",") if part and part not in REDUCER_PARTS]
    if refused:
        parser.error(f"--parts {','.join(refused)}: a training-free reducer is timed on {','.join(REDUCER_PARTS)} "
                     "(no training step; the layer and attention parts time p-MoD's own layer)")


def _refuse_unmeasured(parser, args) -> None:
    """Refuse, with the reason, what a transformers-native preset does not measure."""
    from benchmarks import hf_models

    if args.check_syncs:
        parser.error(f"--check-syncs: not for the transformers-native preset {args.preset} (the sync check hooks "
                     "our LLaVA class's layer loop; pmod.hf runs the same p-MoD layer and session code)")
    refused = [part for part in (args.parts or "").split(",") if part in hf_models.REFUSED_PARTS]
    if refused:
        reasons = "; ".join(f"{part}: {hf_models.REFUSED_PARTS[part]}" for part in refused)
        parser.error(f"--parts {','.join(refused)}: not for the transformers-native preset {args.preset} ({reasons}). "
                     f"It measures {','.join(hf_models.PARTS)}")


def shapes(preset, pair) -> dict:
    """The shapes the report states: LLM, vision tower or what stands in for it, tokens, schedule."""
    from benchmarks.hf_models import HfPreset
    from benchmarks.models import reducer_of

    reducer = reducer_of(pair.pmod)
    common = {"llm": dataclasses.asdict(preset.llm), "n_text": preset.n_text, "n_vision": preset.n_vision,
              "schedule": preset.schedule, "router_factor": preset.router_factor,
              "mod_layers": len(pair.schedule.mod_layers), "reducer": reducer.name if reducer else None}
    if isinstance(preset, HfPreset):
        return {**common, "family": preset.family, "vision": preset.describe_vision()}
    return {**common, "tower": dataclasses.asdict(preset.tower), "n_tiles": preset.n_tiles}


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # shapes come from built-in configs; never reach the hub
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    import torch

    from benchmarks import attention, layer_costs, packing, report, static_decode, suite, syncs
    from benchmarks.hf_models import HF_PRESETS, build_hf_pair
    from benchmarks.models import build_pair, with_reducer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.check_syncs and device.type != "cuda":
        raise SystemExit(f"--check-syncs needs --device cuda (sync debug mode is CUDA-only), got {device}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.set_num_threads(args.threads)
    preset = all_presets()[args.preset]
    native = args.preset in HF_PRESETS
    settings = suite.Settings(
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        repeats=args.repeats or (3 if args.quick else 5),
        decode_tokens=args.decode_tokens or (4 if args.quick else 32),
        decode_batches=args.decode_batches,
    )
    parts = set(args.parts.split(","))
    logger.info("building %s on %s in %s", preset.name, device, dtype)
    pair = (build_hf_pair if native else build_pair)(preset, device, dtype)
    if args.reducer:
        pair = with_reducer(pair, args.reducer)
    decode = suite.generate_decode if native else suite.decode
    result = {
        "command": "python -m benchmarks.run " + shlex.join(argv),
        "preset": preset.name,
        "environment": report.environment(device, dtype, torch.get_num_threads()),
        "settings": dataclasses.asdict(settings),
        "shapes": shapes(preset, pair),
        "model": [],
    }
    rows = result["model"]
    if "prefill" in parts:
        logger.info("prefill, LLM only")
        rows.append(suite.prefill_llm(pair, settings))
    if "full" in parts:
        logger.info("prefill, whole model")
        rows.append(suite.prefill_full(pair, settings))
    if "decode" in parts:
        for batch in settings.decode_batches:
            logger.info("decode, batch %d", batch)
            rows.extend(decode(pair, settings, batch))
    if "uneven" in parts:
        for batch in (b for b in settings.decode_batches if b > 1):
            logger.info("decode, batch %d, uneven rows", batch)
            rows.extend(decode(pair, settings, batch, uneven=True))
    if "cache" in parts:
        for batch in settings.decode_batches:
            logger.info("decode, batch %d, concatenating cache", batch)
            rows.extend(decode(pair, settings, batch, uneven=batch > 1, preallocate=False))
    if "compiled" in parts:
        for batch in settings.decode_batches:
            logger.info("decode via generate, batch %d, eager dynamic vs compiled static cache", batch)
            rows.extend(static_decode.static_decode(pair, settings, batch, args.compile_backend))
    if "train" in parts:
        logger.info("training step")
        rows.extend(suite.training_step(pair, settings))
    if "kv" in parts:
        logger.info("KV cache")
        result["kv_per_layer"] = suite.kv_cache(pair)
        rows.extend(suite.kv_rows(result["kv_per_layer"]))
    result["model"] = [row.as_dict() for row in rows]
    if "layer" in parts:
        logger.info("layer cost vs kept tokens")
        result["layer_costs"] = [r.as_dict() for r in layer_costs.layer_costs(pair, settings.warmup, settings.repeats)]
    if "attention" in parts:
        logger.info("padded vs packed layout")
        batch = 8
        result["attention"] = {
            "batch": batch,
            "lengths": attention.uneven_kept_lengths(preset.n_text, preset.n_vision, batch),
            "rows": [r.as_dict() for r in attention.compare_layouts(pair, settings.warmup, settings.repeats, batch)],
        }
    if "packing" in parts:
        logger.info("training step, padded vs packed, batch %d", args.train_batch)
        result["packing"] = packing.training_layouts(pair, settings.warmup, settings.repeats, args.train_batch)
    if "uneven_prefill" in parts:
        logger.info("generation prefill, uneven batch %d, padded vs packed kept tokens", args.train_batch)
        result["uneven_prefill"] = packing.prefill_layouts(pair, settings.warmup, settings.repeats, args.train_batch)
    if args.check_syncs:
        logger.info("sync check")
        checks = [syncs.check_prefill_syncs(pair), syncs.check_decode_syncs(pair), syncs.check_packing_syncs(pair)]
        result["sync_check"] = {"passed": all(check["passed"] for check in checks),
                                "checked": [item for check in checks for item in check["checked"]]}

    text = report.markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
