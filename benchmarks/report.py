"""The benchmark result as JSON and as a markdown report (command, environment, shapes, tables)."""

from __future__ import annotations

import math
import platform

import torch
import transformers


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {
        "device": str(device), "device_name": name, "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu_threads": threads,
    }


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1e3 else f"{value:,.0f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_number(v) for v in row) + " |" for row in rows]
    return lines


def _llm(llm: dict) -> str:
    return (f"hidden {llm['hidden_size']}, MLP {llm['intermediate_size']}, {llm['num_layers']} layers, "
            f"{llm['num_heads']} heads ({llm['num_kv_heads']} KV), vocab {llm['vocab_size']}")


def _tower(tower: dict) -> str:
    name = f"{tower['known_name']}, " if tower.get("known_name") else ""
    return (f"{name}{tower['image_size']} px, patch {tower['patch_size']}, hidden {tower['hidden_size']}, "
            f"{tower['num_layers']} layers")


def _vision(shapes: dict) -> str:
    """Our LLaVA presets run a vision tower; the transformers-native ones state what stands in for it."""
    tokens = f"{shapes['n_text']} text + {shapes['n_vision']} vision tokens"
    if shapes.get("tower") is None:
        return f"{shapes['vision']}; {tokens}"
    return f"vision tower {_tower(shapes['tower'])}; {tokens} ({shapes['n_tiles']} tile(s))"


def markdown(result: dict) -> str:
    env, shapes = result["environment"], result["shapes"]
    method = shapes.get("reducer") or "p-MoD"
    if shapes.get("reducer"):
        what = f"reducer {shapes['reducer']} on the dense model ({shapes['mod_layers']} reduced layers"
    else:
        what = (f"p-MoD schedule {shapes['schedule']}, beta {shapes['router_factor']} ({shapes['mod_layers']} "
                "p-MoD layers")
    lines = [
        f"### {result['preset']} on {env['device']} ({env['device_name']}), {env['dtype']}",
        "",
        f"Command: `{result['command']}`",
        "",
        (f"torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}, "
         f"CPU threads {env['cpu_threads']}; warm-up {result['settings']['warmup']}, "
         f"median of {result['settings']['repeats']} repeats."),
        "",
        f"Shapes: LLM {_llm(shapes['llm'])}; {_vision(shapes)}; {what} of {shapes['llm']['num_layers']}).",
        "",
    ]
    if result.get("model"):
        lines += _table(
            ["measurement", "batch", "unit", "dense", method, f"{method} / dense", "predicted ratio", "predicted from"],
            [[r["measurement"], r["batch"], r["unit"], r["dense"], r["pmod"], r["ratio"], r["predicted_ratio"],
              r["predicted_kind"]] for r in result["model"]],
        )
        lines.append("")
    if result.get("kv_per_layer"):
        kv = result["kv_per_layer"]
        exact = all(v["measured"] == v["predicted"] for v in kv.values())
        lines.append(f"KV bytes per layer, measured from the returned cache == pmod.accounting: **{exact}** "
                     f"({method} per layer: {kv['pmod']['measured']}).")
        lines.append("")
    if result.get("layer_costs"):
        lines.append("One p-MoD layer vs the same layer run densely (batch 1), by keep ratio:")
        lines.append("")
        lines += _table(
            ["keep ratio", "kept tokens", "dense layer ms", "p-MoD layer ms", "routing-only ms", "p-MoD / dense",
             "predicted (FLOPs)"],
            [[r["keep_ratio"], r["kept_tokens"], r["dense_ms"], r["routed_ms"], r["routing_ms"], r["ratio"],
              r["predicted_ratio"]] for r in result["layer_costs"]],
        )
        lines.append("")
    if result.get("attention"):
        att = result["attention"]
        lines.append(f"Kept-token layout for one decoder layer, batch {att['batch']}, kept lengths {att['lengths']}:")
        lines.append("")
        lines += _table(
            ["layout", "tokens computed", "ms", "vs padded", "predicted (FLOPs)", "max abs diff", "note"],
            [[r["layout"], r["tokens_computed"], r["ms"], r["ratio_to_padded"], r["predicted_ratio"],
              r["max_abs_diff"], r["note"]] for r in att["rows"]],
        )
        lines.append("")
    if result.get("packing"):
        lines += _packing_section(result["packing"])
    if result.get("uneven_prefill"):
        lines += _uneven_prefill_section(result["uneven_prefill"])
    if result.get("sync_check"):
        lines.append(f"Sync check: {result['sync_check']}")
        lines.append("")
    return "\n".join(lines)


def _packing_section(pack: dict) -> list[str]:
    shares = pack["padding_share"]
    lines = [
        f"Training step (fwd+bwd, gradient checkpointing) on one LLaVA-mix batch of {pack['batch']} "
        f"(benchmarks.lengths): lengths {pack['lengths']}, vision tokens {pack['vision_tokens']}. Tokens are summed "
        "over decoder layers; real tokens are what the packed layout computes.",
        "",
    ]
    lines += _table(
        ["model", "layout", "ms", "vs dense padded", "tokens computed", "real tokens", "padding share", "loss",
         "loss vs padded"],
        [[r["model"], r["layout"], r["ms"], r["ratio_to_dense_padded"], r["tokens_computed"], r["real_tokens"],
          r["padding_share"], r["loss"], f"{r['loss_diff']:.1e}"] for r in pack["rows"]],
    )
    lines += ["", f"Padding share of right-padded batches of {pack['batch']} from the mix: random "
              f"{_number(shares['random'])}, LLaVA's modality-length grouping on {shares['world_size']} ranks "
              f"{_number(shares['modality_length_grouped'])}.", ""]
    return lines


def _uneven_prefill_section(prefill: dict) -> list[str]:
    lines = [f"Generation prefill (filling the cache), left-padded batch of {prefill['batch']} with vision tokens "
             f"{prefill['vision_tokens']}:", ""]
    lines += _table(["layout", "ms", "vs dense"], [[r["layout"], r["ms"], r["ratio_to_dense"]]
                                                   for r in prefill["rows"]])
    return lines + [""]
