"""Training step on LLaVA-mix-like batches: right-padded vs packed, dense vs p-MoD, with tokens computed.

One batch of ``batch`` samples drawn from :mod:`benchmarks.lengths` (text-only chats, short VQA turns, long
conversations; AnyRes vision tokens for LLaVA-NeXT presets) is fed as LLM embeddings in each layout:

* ``padded``: right-padded ``[B, L_max]``, as LLaVA trains; p-MoD layers keep the padded compact layout;
* ``padded input, packed p-MoD layers``: the same batch, p-MoD layers run their kept tokens packed (what a
  padded batch without a cache does now);
* ``packed``: one ``[1, sum L]`` row (``--packing``), every layer free of padding.

Tokens computed are counted at every decoder layer's MLP input; real tokens are what the packed layout computes
(the tests check that it is exactly the kept tokens). The padded and packed losses of one model are the same
number (reported as a check).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from benchmarks.lengths import SampleLength, draw_samples, padding_share
from benchmarks.models import TEXT_BEFORE_IMAGE, ModelPair, llm_inputs
from benchmarks.suite import prefill_with_cache
from benchmarks.timing import measure
from llava.constants import IGNORE_INDEX
from llava.train.sampler import modality_grouped_indices
from pmod.hf_compat import set_activation_checkpointing
from pmod.packing import PACKING_KWARG, PackedSequences, enable_packed_attention
from pmod.routing import TokenCounts

MAX_LENGTH = 2048
LAYOUTS = ("padded", "padded input, packed p-MoD layers", "packed")


@dataclass(frozen=True)
class PackingRow:
    model: str
    layout: str
    ms: float
    ratio_to_dense_padded: float | None
    tokens_computed: int  # summed over decoder layers
    real_tokens: int
    loss: float
    loss_diff: float  # |loss - the same model's padded loss|: the layouts compute the same loss

    @property
    def padding_share(self) -> float:
        return 1 - self.real_tokens / self.tokens_computed

    def as_dict(self) -> dict:
        return {**asdict(self), "padding_share": self.padding_share}


@dataclass
class TrainingBatch:
    samples: list[SampleLength]
    embeds: list[torch.Tensor]  # per sample [L, D]
    targets: list[torch.Tensor]  # per sample [L] bool
    labels: list[torch.Tensor]  # per sample [L], the first label ignored (a packed row needs it; same loss)

    @property
    def counts(self) -> TokenCounts:
        return TokenCounts(tuple(s.n_vision for s in self.samples), tuple(s.total for s in self.samples))

    def padded(self, is_pmod: bool) -> dict:
        width, batch = max(s.total for s in self.samples), len(self.samples)
        first = self.embeds[0]
        embeds = first.new_zeros(batch, width, first.shape[-1])
        mask = torch.zeros(batch, width, dtype=torch.bool, device=first.device)
        targets = torch.zeros_like(mask)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long, device=first.device)
        for row, sample in enumerate(self.samples):
            n = sample.total
            embeds[row, :n], mask[row, :n] = self.embeds[row], True
            targets[row, :n], labels[row, :n] = self.targets[row], self.labels[row]
        kwargs = {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}
        if is_pmod:
            kwargs.update(mod_target_mask=targets, token_counts=self.counts)
        return kwargs

    def packed(self, is_pmod: bool) -> dict:
        device = self.embeds[0].device
        sequences = PackedSequences.from_lengths([s.total for s in self.samples], device)
        kwargs = {"inputs_embeds": torch.cat(self.embeds)[None],
                  "attention_mask": torch.ones(1, sequences.total, dtype=torch.bool, device=device),
                  "position_ids": sequences.position_ids(device), "labels": torch.cat(self.labels)[None],
                  PACKING_KWARG: sequences}
        if is_pmod:
            kwargs.update(mod_target_mask=torch.cat(self.targets)[None], token_counts=self.counts)
        return kwargs


def training_batch(pair: ModelPair, batch: int, seed: int) -> TrainingBatch:
    preset = pair.preset
    samples = draw_samples(batch, preset.n_vision, preset.anyres, seed=seed, max_length=MAX_LENGTH)
    generator = torch.Generator().manual_seed(seed)
    embeds, targets, labels = [], [], []
    for sample in samples:
        n = sample.total
        embeds.append((torch.randn(n, preset.llm.hidden_size, generator=generator) * 0.02).to(pair.device, pair.dtype))
        start = min(TEXT_BEFORE_IMAGE, sample.n_text)
        target = torch.zeros(n, dtype=torch.bool)
        target[start:start + sample.n_vision] = True
        label = torch.randint(3, preset.llm.vocab_size, (n,), generator=generator)
        label[target] = IGNORE_INDEX
        label[0] = IGNORE_INDEX
        targets.append(target.to(pair.device))
        labels.append(label.to(pair.device))
    return TrainingBatch(samples, embeds, targets, labels)


def _count_tokens(model):
    """Hooks on every decoder layer's MLP input; returns (handles, counter list)."""
    counted = [0]

    def hook(module, args):
        counted[0] += args[0].shape[0] * args[0].shape[1]

    handles = [module.register_forward_pre_hook(hook) for name, module in model.named_modules()
               if name.endswith(".mlp") and ".layers." in name]
    return handles, counted


def training_layouts(pair: ModelPair, warmup: int, repeats: int, batch: int, seed: int = 0) -> dict:
    """Time fwd+bwd (gradient checkpointing) per model and layout on one drawn batch."""
    data = training_batch(pair, batch, seed)
    llm = pair.pmod.get_model()
    configs = (pair.dense.config, pair.pmod.config)
    saved = [config._attn_implementation for config in configs]
    rows = []
    try:
        for config in configs:
            enable_packed_attention(config)
        for name, model in (("dense", pair.dense), ("p-MoD", pair.pmod)):
            is_pmod = model is pair.pmod
            model.train()
            set_activation_checkpointing(model, True)
            for layout in LAYOUTS:
                if layout == LAYOUTS[1] and not is_pmod:
                    continue
                kwargs = data.packed(is_pmod) if layout == "packed" else data.padded(is_pmod)
                llm.pack_kept_tokens = layout != "padded"

                def step(model=model, kwargs=kwargs):
                    model.zero_grad(set_to_none=True)
                    out = model(**kwargs, use_cache=False)
                    out.loss.backward()
                    return out.loss

                handles, counted = _count_tokens(model)
                with torch.no_grad():
                    loss = float(model(**kwargs, use_cache=False).loss)
                for handle in handles:
                    handle.remove()
                ms = measure(step, pair.device, warmup, repeats).median_s * 1e3
                rows.append([name, layout, ms, counted[0], loss])
            model.zero_grad(set_to_none=True)
            set_activation_checkpointing(model, False)
            model.eval()
    finally:
        llm.pack_kept_tokens = True
        for config, implementation in zip(configs, saved):
            config._attn_implementation = implementation
    real = {name: tokens for name, layout, _, tokens, _ in rows if layout == "packed"}
    padded_loss = {name: loss for name, layout, _, _, loss in rows if layout == "padded"}
    dense_padded = rows[0][2]
    lengths = [s.total for s in data.samples]
    return {
        "batch": batch,
        "lengths": lengths,
        "vision_tokens": [s.n_vision for s in data.samples],
        "rows": [PackingRow(name, layout, ms, ms / dense_padded, tokens, real[name], loss,
                            abs(loss - padded_loss[name])).as_dict()
                 for name, layout, ms, tokens, loss in rows],
        "padding_share": distribution_padding(pair, batch),
    }


def prefill_layouts(pair: ModelPair, warmup: int, repeats: int, batch: int) -> dict:
    """A generation prefill (filling the cache) of a left-padded batch whose rows carry different numbers of
    vision tokens (batched evaluation's case): dense, and p-MoD with its kept tokens padded or packed."""
    inputs = llm_inputs(pair, batch, uneven=True)
    llm = pair.pmod.get_model()
    rows = []
    try:
        for layout, model, packed in (("dense", pair.dense, True), ("p-MoD, padded kept tokens", pair.pmod, False),
                                      ("p-MoD, packed kept tokens", pair.pmod, True)):
            llm.pack_kept_tokens = packed

            def run(model=model):
                prefill_with_cache(model, inputs, is_pmod=model is pair.pmod)

            rows.append({"layout": layout, "ms": measure(run, pair.device, warmup, repeats).median_s * 1e3})
    finally:
        llm.pack_kept_tokens = True
    for row in rows:
        row["ratio_to_dense"] = row["ms"] / rows[0]["ms"]
    return {"batch": batch, "vision_tokens": list(inputs.counts.n_target), "rows": rows}


def distribution_padding(pair: ModelPair, batch: int, megabatches: int = 50, world_size: int = 8) -> dict:
    """Mean padding share of right-padded batches from the mix: random batches, and the per-rank batches LLaVA's
    ``--group_by_modality_length`` sampler forms on ``world_size`` ranks."""
    preset = pair.preset
    samples = draw_samples(megabatches * world_size * batch, preset.n_vision, preset.anyres, seed=1000,
                           max_length=MAX_LENGTH)
    lengths = [s.total for s in samples]
    signed = [s.total if s.n_vision else -s.total for s in samples]
    grouped = modality_grouped_indices(signed, batch, world_size, torch.Generator().manual_seed(0))

    def mean_share(order):
        return statistics.fmean(padding_share([lengths[i] for i in order[k:k + batch]])
                                for k in range(0, len(order) - batch + 1, batch))

    return {"random": mean_share(list(range(len(lengths)))), "modality_length_grouped": mean_share(grouped),
            "world_size": world_size}
