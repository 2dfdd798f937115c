"""What is in JSONL files: counts by dataset, type, modality, ROI coverage per source; a few samples drawn with their boxes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlvr.data.schema import VQASample


def dataset_stats(samples: Sequence[VQASample]) -> dict[str, Any]:
    """Counts per dataset, split, answer type, question type and modality; ROI coverage."""
    with_roi = [s for s in samples if s.rois]
    return {
        "n": len(samples),
        "dataset": Counter(s.dataset for s in samples),
        "split": Counter(s.split for s in samples),
        "answer_type": Counter(s.answer_type for s in samples),
        "question_type": Counter(s.question_type or "-" for s in samples),
        "modality": Counter(s.modality or "-" for s in samples),
        "images_per_sample": Counter(len(s.images) for s in samples),
        "with_roi": len(with_roi),
        "roi_coverage": len(with_roi) / len(samples) if samples else 0.0,
        "rois_per_sample": (sum(len(s.rois) for s in with_roi) / len(with_roi))
        if with_roi
        else 0.0,
    }


@dataclass
class Coverage:
    """How much of one source carries ROI supervision."""

    source: str
    n: int
    with_roi: int
    boxes: int

    @property
    def fraction(self) -> float:
        return self.with_roi / self.n if self.n else 0.0

    @property
    def boxes_per_sample(self) -> float:
        """Mean boxes per sample that has any."""
        return self.boxes / self.with_roi if self.with_roi else 0.0


def roi_coverage(files: Mapping[str, Sequence[VQASample]]) -> list[Coverage]:
    """ROI coverage per source: every file, and every dataset inside a file that mixes several."""
    out = []
    for name, samples in files.items():
        datasets = sorted({s.dataset for s in samples})
        parts = [(name, samples)] + (
            [(f"{name} [{d}]", [s for s in samples if s.dataset == d]) for d in datasets]
            if len(datasets) > 1
            else []
        )
        for label, part in parts:
            out.append(
                Coverage(
                    label,
                    len(part),
                    sum(bool(s.rois) for s in part),
                    sum(len(s.rois) for s in part),
                )
            )
    return out


def render_samples(samples: Sequence[VQASample], out: Path, n: int = 6, loader=None) -> Path:
    """A PNG grid of the first `n` samples' first images, ROI boxes drawn, question and answer as titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if loader is None:
        from medlvr.data.images import load_image as loader
    chosen = [s for s in samples if s.images][:n]
    if not chosen:
        raise ValueError("no sample with an image to render")
    cols = min(3, len(chosen))
    rows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, chosen):
        ax.imshow(loader(s.images[0]))
        for roi in s.rois:
            if roi.image == 0:
                x0, y0, x1, y1 = roi.box
                ax.add_patch(
                    Rectangle(
                        (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.5
                    )
                )
        gold = f"{s.answer_letter}. {s.answer}" if s.answer_letter else s.answer
        ax.set_title(f"{_wrap(s.question)}\n-> {gold}", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _wrap(text: str, width: int = 48) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines[:3])
