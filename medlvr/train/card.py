"""The model card of an exported model: `README.md` with the Hub's card metadata.

Uploading the export folder (`hf upload org/name runs/sft/final`) is then one step: the card
says what the model was fine-tuned from (`base_model`), on which datasets, with which latent
settings (K, projector, latent input) and how (stage, mode, steps, final metrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medlvr.config import LatentConfig, SFTConfig, VLPOConfig
from medlvr.model.files import HUB_ID, is_hub_id

CARD_FILE = "README.md"


def base_model(path: str) -> str | None:
    """The Hub id a run started from: `model.path` itself, or the card's `base_model` of a local export."""
    if is_hub_id(path):
        match = HUB_ID.match(path)
        return match["repo"] if match else None
    card = Path(path) / CARD_FILE
    if card.is_file():
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data.to_dict().get("base_model")
    return None


def record_datasets(files: list[str]) -> dict[str, int]:
    """Records per `dataset` name over the training JSONL files."""
    counts: dict[str, int] = {}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    name = str(json.loads(line).get("dataset", "unknown"))
                    counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def model_card(
    cfg: SFTConfig | VLPOConfig, latent: LatentConfig, steps: int, metrics: dict[str, Any]
) -> str:
    """The card's text: YAML metadata (huggingface_hub's `ModelCardData`), then what, how and usage."""
    from huggingface_hub import ModelCard, ModelCardData

    from medlvr import __version__

    stage = f"stage 1 (SFT, mode `{cfg.mode}`)" if isinstance(cfg, SFTConfig) else "stage 2 (VLPO)"
    base = base_model(cfg.model.path)
    datasets = record_datasets(list(cfg.data.train))
    how = {
        "stage": "sft" if isinstance(cfg, SFTConfig) else "vlpo",
        **({"mode": cfg.mode} if isinstance(cfg, SFTConfig) else {}),
        "started_from": cfg.model.path,
        "finetune": cfg.model.finetune,
        "steps": steps,
        "seed": cfg.seed,
        "medlvr_version": __version__,
    }
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    data = ModelCardData(
        base_model=base,
        datasets=list(datasets) or None,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["medlvr", "latent-reasoning", "medical", "visual-question-answering"],
        medlvr={"latent": vars(latent).copy(), "training": how, "metrics": shown},
    )
    origin = f"`{base}`" if base else f"`{cfg.model.path}`"
    lines = [
        f"# {Path(cfg.output_dir).name}",
        "",
        f"A vision-language model fine-tuned from {origin} with medlvr {__version__}: {stage}, "
        f"{cfg.model.finetune} fine-tuning, {steps} optimizer steps, seed {cfg.seed}.",
        "",
        f"**Latent steps.** It answers after K = {latent.steps} continuous latent steps "
        f"(projector `{latent.projector}`, latent input `{latent.input}`), recorded in "
        "`medlvr_latent.json`; K = 0 answers directly.",
        "",
        "**Training data** (records per dataset): "
        + (", ".join(f"{k} {v:,}" for k, v in datasets.items()) or "none recorded")
        + ".",
        "",
        "**Final metrics:** "
        + (", ".join(f"{k} {v}" for k, v in shown.items()) or "none recorded")
        + ".",
        "",
        "## Use",
        "",
        "```bash",
        "medlvr predict --model FOLDER_OR_HUB_ID --image scan.png --question 'Is there a lesion?'",
        "```",
        "",
        "```python",
        "from medlvr import LatentVLM, answer_one, load_image",
        "",
        'vlm = LatentVLM.from_pretrained("FOLDER_OR_HUB_ID")',
        'print(answer_one(vlm, [load_image("scan.png")], "Is there a lesion?").text)',
        "```",
        "",
        "The folder also loads in plain transformers (the latent steps then need medlvr)."
        if cfg.model.finetune == "full" or cfg.checkpoint.merge_lora
        else "The folder holds the LoRA adapter only (`adapter/`): apply it to the base model with peft.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_model_card(
    folder: str | Path,
    cfg: SFTConfig | VLPOConfig,
    latent: LatentConfig,
    steps: int,
    metrics: dict[str, Any],
) -> Path:
    """`folder/README.md`, the card of the export in `folder`."""
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(cfg, latent, steps, metrics), encoding="utf-8")
    return path


__all__ = ["CARD_FILE", "base_model", "model_card", "record_datasets", "write_model_card"]
