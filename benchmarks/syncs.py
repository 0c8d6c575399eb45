"""Prove that the p-MoD layer loop never makes the host wait for the GPU, at prefill and at decode.

``torch.cuda.set_sync_debug_mode("error")`` turns every device-to-host synchronisation (``.item()``,
``.tolist()``, ``nonzero``, boolean indexing, ``if tensor``) into an exception. It is switched on by a hook
just before the first decoder layer and off just after the last, so input preparation (which may read
per-sample counts once) is outside the check and everything between the layers (masks, plans, cache
bookkeeping) is inside it.
"""

from __future__ import annotations

import torch

from benchmarks.models import ModelPair, llm_inputs
from benchmarks.suite import decode_steps, new_cache, prefill_with_cache
from llava.model.language_model.llava_llama import padded_decode_mask
from pmod.static_cache import PmodStaticCache


def run_layer_loop_without_syncs(model, forward) -> None:
    """Call ``forward()`` with sync debug mode "error" from the first decoder layer to the end of the last."""
    if not torch.cuda.is_available():
        raise RuntimeError("--check-syncs needs a CUDA device (sync debug mode exists only for CUDA)")
    layers = model.get_model().layers

    def enter(*_):
        torch.cuda.set_sync_debug_mode("error")

    def leave(*_):
        torch.cuda.set_sync_debug_mode(0)

    handles = [layers[0].register_forward_pre_hook(enter), layers[-1].register_forward_hook(leave)]
    try:
        with torch.no_grad():
            forward()
        torch.cuda.synchronize()
    finally:
        leave()
        for handle in handles:
            handle.remove()


def check_prefill_syncs(pair: ModelPair, batch: int = 2) -> dict:
    """Routed prefill (with and without a cache) of the p-MoD model under the sync check; raises on a sync."""
    if pair.device.type != "cuda":
        raise RuntimeError(f"--check-syncs needs --device cuda, got {pair.device}")
    inputs = llm_inputs(pair, batch)
    model = pair.pmod
    checked = []
    for use_cache in (False, True):
        cache = new_cache(model, is_pmod=True) if use_cache else None

        def forward(cache=cache, use_cache=use_cache):
            model(inputs_embeds=inputs.inputs_embeds, past_key_values=cache, use_cache=use_cache, logits_to_keep=1,
                  **inputs.routing())

        run_layer_loop_without_syncs(model, forward)
        checked.append(f"prefill batch {batch}, use_cache={use_cache}")
    return {"passed": True, "checked": checked}


def check_decode_syncs(pair: ModelPair, batch: int = 2, steps: int = 3) -> dict:
    """Decode steps of a left-padded batch whose rows kept different lengths (masks for filler slots)."""
    if pair.device.type != "cuda":
        raise RuntimeError(f"--check-syncs needs --device cuda, got {pair.device}")
    inputs = llm_inputs(pair, batch, uneven=True)
    model = pair.pmod
    cache, token = prefill_with_cache(model, inputs, is_pmod=True)
    run_layer_loop_without_syncs(model, lambda: decode_steps(model, cache, token, inputs.attention_mask, steps))
    capacity = inputs.inputs_embeds.shape[1] + steps
    static, token = prefill_with_cache(model, inputs, is_pmod=True,
                                       cache=PmodStaticCache(model.config, max_cache_len=capacity))

    def static_steps(mask=inputs.attention_mask):
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            with torch.no_grad():
                model(input_ids=token, attention_mask=padded_decode_mask(mask, 1, capacity), past_key_values=static,
                      use_cache=True, logits_to_keep=1)

    run_layer_loop_without_syncs(model, static_steps)
    return {"passed": True, "checked": [f"decode batch {batch} with uneven kept lengths, {steps} steps",
                                        f"the same on the static cache (eager), {steps} steps"]}


def check_packing_syncs(pair: ModelPair, batch: int = 3) -> dict:
    """Packed layers: an uneven batch without a cache (kept tokens packed) and a packed input (``--packing``)."""
    from benchmarks.packing import training_batch
    from pmod.packing import enable_packed_attention

    if pair.device.type != "cuda":
        raise RuntimeError(f"--check-syncs needs --device cuda, got {pair.device}")
    model = pair.pmod
    uneven = llm_inputs(pair, batch, uneven=True)
    checked = []
    for use_cache in (False, True):
        cache = new_cache(model, is_pmod=True) if use_cache else None

        def forward(cache=cache, use_cache=use_cache):
            model(**uneven.model_kwargs(True), past_key_values=cache, use_cache=use_cache, logits_to_keep=1)

        run_layer_loop_without_syncs(model, forward)
        checked.append(f"uneven batch {batch}, packed kept tokens, use_cache={use_cache}")
    data = training_batch(pair, batch, seed=0)
    saved = model.config._attn_implementation
    enable_packed_attention(model.config)
    try:
        run_layer_loop_without_syncs(model, lambda: model(**data.packed(True), use_cache=False))
    finally:
        model.config._attn_implementation = saved
    return {"passed": True, "checked": checked + [f"packed input of {batch} samples with labels"]}
