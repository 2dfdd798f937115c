"""Stage 0 of the laptop demo: pretrain a tiny backbone to *see* the synthetic scans.

The real method starts from a pretrained VLM. A tiny backbone trained from
scratch for minutes does not learn to see small lesions (docs/synthetic.md:
every variant sat on the language prior), so the demo's variants fine-tune from
a backbone first pretrained on the synthetic benchmark's dense description
samples: "Describe the lesions." -> every lesion's region, size, intensity and
shape; "Where is the <attributes> lesion?" -> its region; and "What is in the
<region> region?" -> the lesion there or "nothing" (region-to-content lookup, the
direction the question types need). A linear probe on the visual tokens
(`medlvr.train.probe`) adds a per-token attribute loss. These come from
train images only, which never contain a held-out (shape, region) pair, so the
compositional test stays unseen.

    medlvr demo backbone --out medlvr/assets/stage0 --seed 0

regenerates the checkpoint shipped in the package (the exact command, seed and
measured accuracies are written to `STAGE0.md` in the output folder).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlvr.config import SFTConfig, load_config
from medlvr.data.schema import VQASample

ASSET = Path(__file__).resolve().parent.parent / "assets" / "stage0"


@dataclass
class Stage0Config:
    """How the stage-0 backbone is built (the defaults are the shipped one's last leg: its
    STAGE0.md gives the `--init` it continued from)."""

    out: str = str(ASSET)
    """Output model folder."""
    seed: int = 0
    """Seeds the backbone's initialisation, the synthetic data and the data order."""
    size: str = "mini"
    """Backbone preset of `medlvr model init-tiny`."""
    n: int = 8000
    """Synthetic benchmark size; describe/ground/inspect records come from its train images (3 per image)."""
    steps: int = 700
    """Optimizer steps."""
    batch_size: int = 32
    """Samples per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (warm-up over a tenth of the steps, at most 100, then cosine to a tenth)."""
    eval_samples: int = 300
    """Test images whose describe/ground/inspect records are scored at the end."""
    init: str = ""
    """Continue from this model folder instead of a fresh random backbone (a second stage-0 leg)."""
    probe_weight: float = 4.0
    """Weight of the auxiliary token probe (`medlvr.train.probe`): every visual token of a
    describe record is classified as the attributes of the lesion covering it, or background.
    Without it (0) the answer text alone taught regions, sizes and intensities but shape
    only at 0.36 after 2,500 steps."""
    position_weight: float = 1.0
    """Weight of the probe's position head (each visual token regresses where it is)."""
    question_share: float = 0.5
    """Fraction of the training samples that are 1-hop questions of the benchmark (the rest
    are describe/ground/inspect records): a real MedLVR user starts from a VLM that already
    answers single-lookup questions, so the demo's variants spend their budget on depth."""


HOP1_QUESTION_TYPES = {"chain": 0.5, "attribute": 0.3, "presence": 0.2}
"""1-hop question types stage 0 learns: "the largest lesion" (chain, h = 1), a named
region's attribute, a named region's presence."""


def stage0_synth(n: int, seed: int):
    """The synthetic world stage 0 is pretrained on: the benchmark's defaults, 1-hop questions only."""
    from medlvr.data.synth import SynthConfig

    return SynthConfig(n=n, seed=seed, question_types=dict(HOP1_QUESTION_TYPES), hops=(1, 1))


def default_stage0() -> Path:
    """The shipped stage-0 backbone (a model folder inside the package)."""
    if not (ASSET / "config.json").is_file():
        raise FileNotFoundError(
            f"the stage-0 backbone is missing from {ASSET}; regenerate it with `medlvr demo backbone`"
        )
    return ASSET


def build_stage0(
    cfg: Stage0Config, work: Path | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Pretrain, score description and grounding on test images, and write the model folder.

    Data, the initial model and the run go to `work` (kept), else to a temporary folder
    removed at the end (a default run writes ~150-300 MB there). `cfg.out` is replaced: it
    must be new or an earlier stage-0 model (`STAGE0.md`) unless `overwrite`.
    """
    from medlvr.rundir import claim_output

    claim_output(cfg.out, "demo backbone", overwrite=overwrite, inputs=[cfg.init, work], writes=("*",),
                 own=lambda f: (f / "STAGE0.md").is_file())  # fmt: skip
    if work is None:
        with tempfile.TemporaryDirectory(prefix="medlvr-stage0-") as tmp:
            return _build_stage0(cfg, Path(tmp))
    return _build_stage0(cfg, Path(work))


def _build_stage0(cfg: Stage0Config, tmp: Path) -> dict[str, Any]:
    from medlvr.data.synth import generate, generate_samples
    from medlvr.model.tiny import build_tiny
    from medlvr.train.sft import run_sft

    started = time.time()
    synth = stage0_synth(cfg.n, cfg.seed)
    files = generate(synth, tmp / "data", progress=True)
    init = Path(cfg.init) if cfg.init else build_tiny(tmp / "init", size=cfg.size, seed=cfg.seed)  # type: ignore[arg-type]
    sft = load_config(
        SFTConfig,
        overrides=[
            "mode=plain",
            f"seed={cfg.seed}",
            f"model.path={init}",
            f"data.train=[{files['train']},{files['describe']}]",
            f"data.weights=[{cfg.question_share},{1 - cfg.question_share}]",
            "data.max_answer_tokens=96",  # an 8-lesion description is ~70 tokens
            f"batch_size={cfg.batch_size}",
            f"max_steps={cfg.steps}",
            f"optim.lr={cfg.lr}",
            f"optim.warmup_steps={min(100, cfg.steps // 10)}",
            "optim.min_lr_ratio=0.1",
            "latent.steps=0",
            f"probe.weight={cfg.probe_weight}",
            f"probe.position_weight={cfg.position_weight}",
            "probe.question_types=[describe]",  # ground/inspect records name one lesion: their other tokens are not background
            f"output_dir={tmp / 'run'}",
            "checkpoint.overwrite=true",  # the work folder is rebuilt from scratch (data, init, run)
            "log.tensorboard=false",
        ],
    )
    result = run_sft(sft)
    held_out = _describe_eval_samples(synth, cfg.eval_samples, generate_samples, tmp / "eval")
    scores = score_stage0(result.final_model, held_out)

    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(result.final_model, out)
    scores.update(steps=cfg.steps, minutes=round((time.time() - started) / 60, 1), final_loss=result.metrics.get("loss"),
                  final_probe_token_acc=result.metrics.get("probe_acc"))  # fmt: skip
    (out / "stage0_metrics.json").write_text(json.dumps(scores, indent=2))
    (out / "STAGE0.md").write_text(_card(cfg, scores))
    return scores


def _describe_eval_samples(synth, n: int, generate_samples, folder: Path) -> list[VQASample]:
    """The 1-hop question and the describe/ground/inspect records of test images (unseen in
    stage 0), images written to `folder`."""
    from PIL import Image

    from medlvr.data.synth import stage0_samples  # built from a scene as for training

    folder.mkdir(parents=True, exist_ok=True)
    out: list[VQASample] = []
    for item in generate_samples(synth, "test", range(min(n, synth.split_counts()["test"]))):
        path = folder / f"{item.sample.id}.png"
        Image.fromarray(item.image).save(path)
        for rec in [item.sample, *stage0_samples(synth, item.scene)]:
            out.append(rec.model_copy(update={"images": [str(path)]}))
    return out


_LESION = re.compile(r"([a-z ]+):\s*(small|large)\s+(bright|dark)\s+(\w+)")


def parse_description(text: str) -> dict[str, tuple[str, str, str]]:
    """'upper left: small bright round; center: ...' -> region -> (size, intensity, shape)."""
    return {
        m.group(1).strip(): (m.group(2), m.group(3), m.group(4))
        for m in _LESION.finditer(text.lower())
    }


def score_stage0(model_dir: Path, samples: list[VQASample], batch_size: int = 32) -> dict[str, Any]:
    """Per-lesion description accuracy (region found; shape/size/intensity right) and grounding and inspection accuracy."""
    from medlvr.data.collate import VQACollator
    from medlvr.eval.metrics import score
    from medlvr.model.latent import LatentVLM

    vlm = LatentVLM.from_pretrained(model_dir)
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    lesions = found = shape = size = intensity = exact = 0
    ground_n = ground_ok = inspect_n = inspect_ok = 0
    hop1: dict[
        str, list[bool]
    ] = {}  # "chain", "attribute:size", "presence", ... -> correct per question
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        texts = vlm.generate(collate(chunk), 0, max_new_tokens=80).texts
        for s, text in zip(chunk, texts):
            if s.question_type == "ground":
                ground_n += 1
                ground_ok += score(s, text).correct
                continue
            if s.question_type == "inspect":
                inspect_n += 1
                inspect_ok += score(s, text).correct
                continue
            if s.question_type != "describe":
                attribute = s.meta.get("attribute") if s.question_type == "attribute" else None
                key = f"{s.question_type}:{attribute}" if attribute else str(s.question_type)
                hop1.setdefault(key, []).append(score(s, text).correct)
                continue
            gold, pred = parse_description(s.answer), parse_description(text)
            exact += pred == gold
            for region, (gs, gi, gsh) in gold.items():
                lesions += 1
                if region in pred:
                    found += 1
                    ps, pi, psh = pred[region]
                    shape += psh == gsh
                    size += ps == gs
                    intensity += pi == gi
    n_desc = sum(s.question_type == "describe" for s in samples)
    answered = [ok for oks in hop1.values() for ok in oks]
    return {
        "hop1_questions": len(answered),
        "hop1_acc": sum(answered) / max(len(answered), 1),
        **{f"hop1_{k.replace(':', '_')}_acc": sum(v) / len(v) for k, v in sorted(hop1.items())},
        **{f"hop1_{k.replace(':', '_')}_n": len(v) for k, v in sorted(hop1.items())},
        "describe_records": n_desc,
        "lesions": lesions,
        "region_found": found / max(lesions, 1),
        "shape_acc": shape / max(lesions, 1),
        "size_acc": size / max(lesions, 1),
        "intensity_acc": intensity / max(lesions, 1),
        "description_exact": exact / max(n_desc, 1),
        "ground_records": ground_n,
        "ground_acc": ground_ok / max(ground_n, 1),
        "inspect_records": inspect_n,
        "inspect_acc": inspect_ok / max(inspect_n, 1),
    }


def _card(cfg: Stage0Config, scores: dict[str, Any]) -> str:
    out = cfg.out if Path(cfg.out) != ASSET else "medlvr/assets/stage0"
    cmd = (
        f"medlvr demo backbone --out {out} --seed {cfg.seed} --size {cfg.size} --n {cfg.n} --steps {cfg.steps} "
        f"--batch-size {cfg.batch_size} --lr {cfg.lr} --probe-weight {cfg.probe_weight} "
        f"--position-weight {cfg.position_weight} --question-share {cfg.question_share}"
        + (f" --init {cfg.init}" if cfg.init else "")
    )
    start = (
        f"continued from `{cfg.init}`" if cfg.init else f"random initialisation, seed {cfg.seed}"
    )
    rows = "\n".join(
        f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in scores.items()
    )
    return f"""# Stage-0 backbone of the laptop demo

A `{cfg.size}` Qwen2.5-VL backbone ({start}) pretrained with `run_sft` (mode `plain`,
K = 0) on the synthetic benchmark's train images only (no held-out (shape, region) pair
appears in them): {cfg.question_share:.0%} of the samples are 1-hop questions ("What is the
intensity of the largest lesion?", a named region's attribute or presence, word answers),
the rest describe/ground/inspect records. An auxiliary linear probe (weight
{cfg.probe_weight}) classifies every visual token of a describe record as the attributes
of the lesion covering it or background, and a position head (weight {cfg.position_weight})
regresses where each visual token is; neither is part of the model.

Regenerate (CPU; Python {sys.version.split()[0]}):

    {cmd}

Scored on the 1-hop question and the describe/ground/inspect records of {cfg.eval_samples}
test images (never trained on); `hop1_*` are the 1-hop questions by question type (and attribute):

| metric | value |
|---|---|
{rows}
"""
