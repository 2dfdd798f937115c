"""Offline builders for tiny, randomly initialised backbones of the real classes.

No weights or tokenizers can be downloaded here, so tests, the demo and a laptop
user build the same model classes a real checkpoint uses, from a config:
a byte-level BPE trained in well under a second on a small built-in corpus, the
family's special tokens and chat template, and a PIL image processor with
explicit arguments. The result is saved as a normal model folder and loaded
back through `from_pretrained`, exactly like `Qwen/Qwen2.5-VL-7B-Instruct`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from medlvr.model.backbones import LATENT_TOKENS, get_adapter

Size = Literal["tiny", "mini", "small", "medium"]

# Words a medical VQA tokenizer should hold as whole tokens; byte-level BPE
# still encodes anything else, just in more pieces.
_CORPUS = """
What is the shape of the lesion in the upper left region? Is there a lesion in the lower right region?
yes no Yes No round square triangle cross oval bright dark small large lesion lesions region regions
upper lower left right middle center top bottom anterior posterior lateral medial superior inferior
How many lesions are there? Where is the lesion? Which lesion is larger? Which lesion is brighter?
Are the upper left and lower right lesions the same shape? Describe the lesions. Answer with the option's
letter from the given choices directly. Please answer 'yes' or 'no'. Answer the question using a single
word or phrase. Options: A. B. C. D. E. A B C D E 0 1 2 3 4 5 6 7 8 9 10 zero one two three four five six
chest radiograph x-ray xray CT MRI brain fundus histology pathology ultrasound abdomen lung liver kidney
heart spleen pancreas bowel colon bladder bone spine skull pelvis mass nodule opacity effusion fracture
pneumothorax edema hemorrhage infarct tumor cyst calcification normal abnormal contrast axial coronal
sagittal T1 T2 FLAIR modality organ plane image scan the a an of in on with is are what which where how
<answer> </answer> reasoning think step evidence because therefore so the answer is
"""


@dataclass(frozen=True)
class TinySpec:
    """Sizes of one tiny preset (text decoder and vision tower)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vocab: int


SPECS: dict[str, TinySpec] = {
    # ~0.2M parameters: unit tests, seconds.
    "tiny": TinySpec(64, 2, 4, 2, 128, 2, 32, 2, 1024),
    # ~1.2M: the laptop demo's backbone (the size that learned to see synthetic
    # lesions within minutes, docs/synthetic.md).
    "mini": TinySpec(128, 4, 4, 2, 256, 3, 64, 2, 1024),
    # a few M.
    "small": TinySpec(256, 4, 4, 2, 512, 3, 128, 4, 2048),
    # ~25M: the benchmarks' "medium" model.
    "medium": TinySpec(512, 8, 8, 4, 1024, 4, 256, 4, 4096),
}


def build_tokenizer(
    family: str, vocab_size: int = 1024, latent_tokens: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the family's special tokens, chat template and (optionally) the latent tokens."""
    adapter = get_adapter(family)
    specials = adapter.tiny_special_tokens()
    extra = [*specials["additional"], *(LATENT_TOKENS if latent_tokens else ())]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[specials["pad_token"], specials["eos_token"], *extra],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=specials["eos_token"],
        pad_token=specials["pad_token"],
        additional_special_tokens=extra,
        # named special tokens some processors read (Gemma 3: tokenizer.boi_token, .image_token ...)
        extra_special_tokens=specials.get("named", {}),
        padding_side="left",
        model_max_length=32768,
    )
    tok.chat_template = adapter.tiny_chat_template()
    return tok


def build_tiny(
    out: str | Path,
    family: str = "qwen2_5_vl",
    size: Size = "tiny",
    seed: int = 0,
    with_latent_tokens: bool = True,
) -> Path:
    """Build a randomly initialised backbone of `family` and save it as a model folder."""
    if size not in SPECS:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SPECS)}")
    adapter = get_adapter(family)
    spec = SPECS[size]
    # without latent tokens: exercises the "add them on load" path a real checkpoint takes
    tokenizer = build_tokenizer(family, spec.vocab, latent_tokens=with_latent_tokens)
    processor = adapter.build_tiny_processor(tokenizer)
    config = adapter.tiny_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = adapter.model_class(config)
    adapter.init_tiny_weights(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
