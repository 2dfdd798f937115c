"""What both training stages stand on: `sft.py` and `vlpo.py` are siblings over this module.

- `open_accelerator`: accelerate at the run's precision, refusing N lone copies of a launch;
- `check_data_files`: the training and validation files and the mixture weights;
- `build_model`: LatentVLM with freezing, gradient checkpointing, LoRA and the latent
  modules' trainability (each stage says which latent modules train);
- `hop_fields`: the collator's per-hop ROI indices under chain assignment;
- `Logger`: progress bar, metrics.jsonl and TensorBoard, named and formatted by the stage;
- `reduce_sums`: named per-process sums, summed over the processes in one reduction;
- `validation_accuracy`: greedy accuracy under the evaluation scorer;
- `save` and `export`: a resumable checkpoint, and the run's tail (export, result.json).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

from medlvr.config import LatentConfig, LogConfig, SFTConfig, VLPOConfig
from medlvr.data.collate import VQACollator
from medlvr.data.roi import hop_roi_indices
from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError
from medlvr.eval.metrics import score
from medlvr.model.backbones import TokenGrid
from medlvr.model.latent import LatentVLM
from medlvr.rundir import check_launch
from medlvr.train import checkpoint as ckpt
from medlvr.train import sharding
from medlvr.train.card import write_model_card
from medlvr.train.data import check_files, load_image

TrainConfig = SFTConfig | VLPOConfig


@dataclass
class TrainResult:
    """What `run_sft` and `run_vlpo` return."""

    output_dir: Path
    final_model: (
        Path  # the export: loads in LatentVLM.from_pretrained, `medlvr predict`, transformers
    )
    steps: int
    metrics: dict[
        str, Any
    ]  # the last logged training row, plus the held-out `val_*` numbers when `data.val` is set
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged row (this process)
    model: Any = None  # the trained LatentVLM in memory (LoRA merged when the export merged it); None for a finished run's no-op resume


# ---------------------------------------------------------------------------- start


def precision(name: str) -> str:
    """accelerate's mixed precision for `model.precision` (`auto`: bf16 where CUDA has it, else fp32)."""
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return name


def open_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's accelerator; refuses N lone copies that would share `output_dir`."""
    torch.set_flush_denormal(True)  # denormals made early CPU steps ~7x slower (docs/synthetic.md)
    accelerator = Accelerator(
        mixed_precision=precision(cfg.model.precision), cpu=not torch.cuda.is_available()
    )
    check_launch(accelerator.num_processes, accelerator.distributed_type)
    return accelerator


def check_data_files(cfg: TrainConfig, wanted: str) -> None:
    """The training and validation files exist and the mixture weights fit them (records load later).

    `wanted` says what data.train should hold, for the message when it is empty.
    """
    if not cfg.data.train:
        raise MedlvrError(f"data.train is empty: give one or more {wanted}")
    check_files(cfg.data.train, "training data")
    if cfg.data.val:
        check_files([cfg.data.val], "validation data")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.train):
        raise MedlvrError(
            f"data.weights has {len(cfg.data.weights)} entries for {len(cfg.data.train)} data.train files"
        )


def build_model(
    cfg: TrainConfig,
    latent: LatentConfig,
    resume_dir: Path | None,
    *,
    answer_tokens: int,
    train_projector: bool,
    train_pause: bool,
) -> LatentVLM:
    """LatentVLM in fp32 with freezing, LoRA and checkpointing applied; weights from `resume_dir` if given.

    `latent` is the run's latent set-up with its final K, `answer_tokens` the stage's answer
    token limit (checked with K against the model's positions); `train_projector` and `train_pause`
    say whether the latent projector and the pause inputs train (where the model has them):
    a parameter that trains but is unused would also break DDP's gradient reduction.
    """
    if sharding.configured(cfg):  # the trained weights come from the checkpoint's shards
        resume_dir = None
    full_resume = resume_dir is not None and cfg.model.finetune == "full"
    src: str | Path = (
        resume_dir / "model" if full_resume and resume_dir is not None else cfg.model.path
    )
    # Trained weights stay fp32 (master copies; autocast computes in bf16). A LoRA run keeps
    # the frozen base in bf16 when autocasting to bf16 anyway: half the weight memory.
    lora_bf16 = cfg.model.finetune == "lora" and precision(cfg.model.precision) == "bf16"
    vlm = LatentVLM.from_pretrained(
        src,
        latent,
        dtype=torch.bfloat16 if lora_bf16 else torch.float32,
        allow_pickle=cfg.model.allow_pickle,
    )
    vlm.check_length(0, latent.steps, answer_tokens)  # a K the model cannot hold, before any file
    frozen = {g for g, on in (("vision", cfg.model.freeze_vision), ("merger", cfg.model.freeze_merger),
                              ("language", cfg.model.freeze_language)) if on}  # fmt: skip
    for name, p in vlm.backbone.named_parameters():
        p.requires_grad_(vlm.adapter.parameter_group(name) not in frozen)
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing: no need for inputs that require grad (LoRA, frozen embeddings).
        enable = getattr(vlm.backbone, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            vlm.backbone.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    if cfg.model.finetune == "lora":
        _add_lora(vlm, cfg, resume_dir)
    vlm.projector.float()  # trainable: fp32 master weights (peft keeps adapters in fp32 too)
    for p in vlm.projector.parameters():
        p.requires_grad_(train_projector)
    if vlm.pause is not None:
        vlm.pause.float().requires_grad_(train_pause)
    vlm.train()
    return vlm


def _add_lora(vlm: LatentVLM, cfg: TrainConfig, resume_dir: Path | None) -> None:
    from peft import LoraConfig as PeftLoraConfig  # only LoRA runs need peft imported
    from peft import get_peft_model

    # The latent tokens' rows train through peft's trainable tokens: 3 rows, not the whole embedding.
    latent_rows = (
        [vlm.latent_start_id, vlm.latent_pad_id, vlm.latent_end_id]
        if cfg.lora.train_latent_tokens
        else None
    )
    peft_cfg = PeftLoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), modules_to_save=list(cfg.lora.modules_to_save) or None,
        trainable_token_indices=latent_rows,
    )  # fmt: skip
    try:
        with warnings.catch_warnings():
            # Not ours: peft's PeftModel.__init__ (0.21) reads `model.is_gradient_checkpointing`,
            # which transformers 5.24 deprecated in favour of `is_activation_checkpointing`.
            warnings.filterwarnings(
                "ignore",
                "`is_gradient_checkpointing` is deprecated",
                FutureWarning,
                r"transformers\.modeling_utils",
            )
            # A PeftModel forwards the model's attributes; peft does not type it as the model.
            vlm.backbone = get_peft_model(vlm.backbone, peft_cfg)  # type: ignore[assignment]
    except ValueError as err:
        raise MedlvrError(f"LoRA: {err}") from None
    if resume_dir is not None:
        ckpt.load_adapter_files(vlm, resume_dir)


def hop_fields(
    chain: bool,
) -> dict[str, Callable[[VQASample, list[TokenGrid], list[tuple[int, int]]], Any]]:
    """The collator's `sample_fields` for chain assignment (`align.assign=chain`), else none.

    `roi_hop_index`: each sample's ROI token indices per hop (`hop_roi_indices`; none without an image).
    """
    return {"roi_hop_index": _hop_index} if chain else {}


def _hop_index(
    sample: VQASample, grids: list[TokenGrid], sizes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    return hop_roi_indices(sample, grids, sizes) if grids else []


# ---------------------------------------------------------------------------- during the run


def reduce_sums(accelerator: Accelerator, sums: Mapping[str, float]) -> dict[str, float]:
    """Named per-process sums (float64), summed over the processes."""
    if accelerator.num_processes == 1:
        return dict(sums)
    total = accelerator.reduce(
        torch.tensor(list(sums.values()), dtype=torch.float64, device=accelerator.device), "sum"
    )
    return dict(zip(sums, total.cpu().tolist()))


@torch.no_grad()
def validation_accuracy(
    vlm: Any,
    samples: Sequence[VQASample],
    *,
    latent_steps: int,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    accelerator: Any = None,
) -> float:
    """Accuracy of greedy answers under the evaluation scorer (`medlvr.eval.metrics.score`).

    With an accelerator the samples are sharded over processes and the counts summed.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(samples)[rank::world]
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    was_training = vlm.training
    vlm.eval()
    correct = 0
    with sharding.gathered(vlm):  # once: processes may hold different numbers of chunks
        for i in range(0, len(mine), batch_size):
            chunk = mine[i : i + batch_size]
            batch = collate(chunk, images=[[load_image(p) for p in s.images] for s in chunk])
            with accelerator.autocast() if accelerator is not None else nullcontext():
                out = vlm.generate(batch, latent_steps, max_new_tokens=max_new_tokens)
            correct += sum(score(s, text).correct for s, text in zip(chunk, out.texts))
    vlm.train(was_training)
    counts = torch.tensor([correct, len(mine)], dtype=torch.float64, device=vlm.device)
    if accelerator is not None and world > 1:
        counts = accelerator.reduce(counts, "sum")
    return float(counts[0] / counts[1].clamp_min(1))


class Logger:
    """Progress bar (rich), metrics.jsonl and TensorBoard, on the main process only.

    `label` names the bar; `info(row)` is its metrics line (each stage writes its own).
    """

    def __init__(self, accelerator: Accelerator, out_dir: Path, log: LogConfig, *, label: str,
                 info: Callable[[dict[str, Any]], str], resume_step: int):  # fmt: skip
        self.main = accelerator.is_main_process
        self.log, self.label, self.info = log, label, info
        self.path = out_dir / "metrics.jsonl"
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.tb = None
        if not self.main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if (
            resume_step and self.path.is_file()
        ):  # drop rows a crashed run wrote after its last checkpoint
            rows = [
                r
                for r in self.path.read_text().splitlines()
                if r.strip() and json.loads(r).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(r + "\n" for r in rows))
        elif not resume_step:
            self.path.write_text("")
        if log.tensorboard:
            try:
                from torch.utils.tensorboard import (
                    SummaryWriter,
                )  # the tensorboard package is optional
            except ImportError:
                warnings.warn(
                    "tensorboard is not installed: metrics go to metrics.jsonl only", stacklevel=2
                )
            else:
                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step or None)

    def start(self, total: int, done: int) -> None:
        if not (self.main and self.log.progress):
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
        )  # fmt: skip
        self.task = self.bar.add_task("train", total=total, completed=done, info="")
        self.bar.start()

    def advance(self, row: dict[str, Any]) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=row["step"], info=self.info(row))

    def write(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({**row, "time": time.time()}) + "\n")
        if self.tb is not None:
            for key, val in row.items():
                if (
                    isinstance(val, (int, float))
                    and not isinstance(val, bool)
                    and key != "step"
                    and np.isfinite(val)
                ):
                    self.tb.add_scalar(
                        f"train/{key}" if key != "val_accuracy" else "val/accuracy",
                        val,
                        row["step"],
                    )
            self.tb.flush()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def close(self) -> None:
        self.stop()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------- checkpoints and the tail


def save(cfg: TrainConfig, accelerator: Accelerator, model: Any, vlm: LatentVLM, optimizer: Any, scheduler: Any, *,
         step: int, trainer_state: dict[str, Any], extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:  # fmt: skip
    """A resumable checkpoint at `step` (`trainer_state`: the data position and what resuming checks)."""
    ckpt.save_checkpoint(
        accelerator, model, vlm, optimizer, scheduler, output_dir=Path(cfg.output_dir), step=step,
        trainer_state=trainer_state, config=cfg, lora=cfg.model.finetune == "lora",
        save_optimizer=cfg.checkpoint.save_optimizer, keep_last=cfg.checkpoint.keep_last, extra=extra,
        sharded_state=sharding.state_of(cfg, vlm, optimizer),
    )  # fmt: skip


def export(
    cfg: TrainConfig,
    accelerator: Accelerator,
    vlm: LatentVLM,
    log: Logger,
    step: int,
    metrics: dict[str, Any],
) -> Path:
    """The run's tail: `output_dir/final` with its model card and `result.json` (main process), then the logger closes.

    Goes last: merging LoRA changes the model in place (a sharded model is gathered into a copy).
    """
    out_dir = Path(cfg.output_dir)
    final = out_dir / "final"
    plain = sharding.plain_copy(vlm, accelerator.is_main_process)  # every process takes part
    if accelerator.is_main_process:
        ckpt.export_final(
            plain, final, lora=cfg.model.finetune == "lora", merge_lora=cfg.checkpoint.merge_lora
        )
        write_model_card(final, cfg, vlm.latent, step, metrics)  # README.md: ready to upload
        (out_dir / "result.json").write_text(
            json.dumps({"steps": step, "metrics": metrics, "final_model": str(final)}, indent=2)
        )
    accelerator.wait_for_everyone()
    log.close()
    return final


__all__ = [
    "TrainResult",
    "precision",
    "open_accelerator",
    "check_data_files",
    "build_model",
    "hop_fields",
    "reduce_sums",
    "validation_accuracy",
    "Logger",
    "save",
    "export",
]
