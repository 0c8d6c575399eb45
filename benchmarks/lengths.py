"""Sample lengths like LLaVA's instruction mixes (LLaVA-1.5's 665K, LLaVA-NeXT's 779K), for packing benchmarks.

No data set can be downloaded here, so the mix is built from what is published about it, not measured from the
JSON. Sources and shares are LLaVA-1.5's (Liu et al., "Improved Baselines with Visual Instruction Tuning",
Table 7): LLaVA-Instruct 158K, ShareGPT 40K (text only), VQAv2 83K, GQA 72K, OKVQA 9K, OCR-VQA 80K, A-OKVQA 66K,
TextCaps 22K, RefCOCO 48K, Visual Genome 86K. LLaVA-1.5 merges the short-answer questions of one image into one
multi-turn conversation, so those samples are tens to a few hundred tokens; ShareGPT chats are long (to the
2048-token limit). The text-token ranges below are our estimates for a Llama tokenizer, per source family;
each sample draws its length uniformly in its range. Vision tokens: 576 per LLaVA-1.5 image; a LLaVA-NeXT
AnyRes image gives 1176 to 2928 tokens depending on its aspect ratio (base tile + unpadded grid + newlines), so
``anyres`` draws uniformly in 0.4x to 1.0x of the preset's vision tokens. The 779K mix adds longer documents
and OCR samples; with the same families it differs mainly in its vision tokens, which is what ``anyres`` models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    samples_k: int  # thousands of samples in the 665K mix
    text_tokens: tuple[int, int]  # inclusive range
    has_image: bool = True


LLAVA_665K = (
    Source("LLaVA-Instruct (conversation, detail, reasoning)", 158, (150, 700)),
    Source("ShareGPT (text only)", 40, (300, 1900), has_image=False),
    Source("VQAv2 / GQA / OKVQA / A-OKVQA (merged turns)", 230, (40, 320)),
    Source("OCR-VQA (merged turns)", 80, (50, 220)),
    Source("TextCaps", 22, (40, 90)),
    Source("RefCOCO / Visual Genome (region turns)", 134, (100, 450)),
)
ANYRES_SPREAD = (0.4, 1.0)  # 1176 / 2928 of LLaVA-NeXT's largest image


@dataclass(frozen=True)
class SampleLength:
    n_text: int
    n_vision: int

    @property
    def total(self) -> int:
        return self.n_text + self.n_vision


def draw_samples(count: int, n_vision: int, anyres: bool, seed: int = 0, max_length: int | None = None,
                 mix: tuple[Source, ...] = LLAVA_665K) -> list[SampleLength]:
    """``count`` samples from the mix, by its source shares; ``n_vision``: the preset's tokens per image (the
    largest, for ``anyres``). Samples longer than ``max_length`` are truncated, text first, as training does."""
    rng = random.Random(seed)
    sources = rng.choices(mix, weights=[source.samples_k for source in mix], k=count)
    samples = []
    for source in sources:
        n_text = rng.randint(*source.text_tokens)
        vision = 0
        if source.has_image:
            vision = round(n_vision * rng.uniform(*ANYRES_SPREAD)) if anyres else n_vision
        if max_length is not None and n_text + vision > max_length:
            n_text = max(max_length - vision, 1)
        samples.append(SampleLength(n_text, vision))
    return samples


def padding_share(lengths: list[int]) -> float:
    """Share of a right-padded batch that is padding."""
    return 1 - sum(lengths) / (len(lengths) * max(lengths))
