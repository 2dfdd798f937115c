"""What a demo run is: its arms, budgets and typed configuration (shared by the runner and the report)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError

Budget = Literal["quick", "default", "full"]

ARMS = {
    "a": "direct (K=0)",
    "t": "text reasoning",
    "p": "pause (constant inputs)",
    "b": "latent, no ROI loss",
    "c": "ROI-SFT (per-hop alignment)",
    "d": "ROI-SFT + VLPO",
    "e": "latent curriculum (Coconut)",
    "r": "ROI supervision, no latents",
}
"""The arms, same data, budget and seeds. (t) writes the evidence chain before the answer
("largest lesion: center; below it: lower middle; answer: dark"); (p) has the same K extra
positions as (b)-(d) but a learned constant input at each instead of the fed-back state
(the pause-token control); (c) aligns latent step group k with the ROI of hop k; (e) starts
from (t)'s written chain and hands one written hop at a time to K / hops latent steps
(`SFTConfig.replace_reasoning`), so at the end it answers after K latent steps like (b);
(r) answers directly (K = 0) with the same ROI alignment applied to the state the answer is
read from (`mode=roi_direct`): if (c) beats (a) but not (r), the gain is ROI supervision's,
not latent reasoning's."""

Ladder = Literal["depth", "subtlety", "both"]
LADDERS = ("depth", "subtlety")
LADDER_KEY = {"depth": "hops", "subtlety": "rung"}
"""The record field (`meta`) each ladder's rungs are read from."""

LATENT_ARMS = "pbcde"
"""Arms that run K latent steps."""

WRITTEN_ARMS = "te"
"""Arms trained on the written evidence chain (synthetic chain questions only)."""


@dataclass(frozen=True)
class BudgetSpec:
    """What a budget preset scales: data size, steps, evaluation size, arms and seeds."""

    n: int
    """Synthetic benchmark size (all splits)."""
    sft_steps: int
    vlpo_steps: int
    batch_size: int
    eval_test: int
    """Test questions scored (0 = all)."""
    sweep: tuple[int, ...]
    """K values swept at inference for (c) and (d)."""
    explain_samples: int
    """Test questions whose evidence maps are scored per hop."""
    arms: str
    """Arms of the depth ladder."""
    subtlety_arms: str
    """Arms of the subtlety ladder."""
    seeds: tuple[int, ...]


BUDGETS: dict[str, BudgetSpec] = {
    "quick": BudgetSpec(n=400, sft_steps=6, vlpo_steps=2, batch_size=8, eval_test=24, sweep=(0, 4),
                        explain_samples=8, arms="atpbcde", subtlety_arms="atpbcdr", seeds=(1,)),
    # The default and --full train every arm alike (400 steps of 32, about 2.7 epochs of the
    # 4,800 training questions). The default tells one story in three arms per ladder: depth,
    # where written reasoning pays and latents do not; subtlety, whether latent steps beat the
    # same ROI supervision without them. --full runs every arm, three seeds, the full K sweep.
    "default": BudgetSpec(n=6000, sft_steps=400, vlpo_steps=15, batch_size=32, eval_test=0, sweep=(0, 6),
                          explain_samples=96, arms="atc", subtlety_arms="arc", seeds=(1,)),
    "full": BudgetSpec(n=6000, sft_steps=400, vlpo_steps=15, batch_size=32, eval_test=0, sweep=(0, 2, 4, 6, 8),
                       explain_samples=200, arms="atpbcde", subtlety_arms="atpbcdr", seeds=(1, 2, 3)),
}  # fmt: skip


@dataclass
class DemoConfig:
    """One demo run."""

    out: str = "runs/demo"
    """Output folder: data, runs per arm and seed, report.md, plots."""
    budget: Budget = "default"
    """quick (a test's minute), default (~10 min on 2 CPU cores), full (3 seeds, every arm; longer)."""
    seeds: list[int] = field(default_factory=list)
    """Training seeds; every arm trains once per seed on the same data (empty = the budget's)."""
    arms: str = ""
    """Arms to run, letters of atpbcde: (a) direct, (t) text reasoning, (p) pause, (b) latent,
    (c) ROI-SFT, (d) (c) + VLPO, (e) latent curriculum (empty = the budget's; (d) needs (c))."""
    dataset: Literal["synth", "vqa-rad"] = "synth"
    """The embedded synthetic benchmark (chain questions), or VQA-RAD converted from `data_root`."""
    data_root: str = ""
    """Release folder of a real dataset (VQA-RAD: the folder with `VQA_RAD Dataset Public.json`)."""
    backbone: str = ""
    """Starting model folder (empty = the shipped stage-0 backbone)."""
    ladder: Ladder = "both"
    """Which ladder: `depth` (chain questions of 1..max_hops lookups in sequence), `subtlety`
    (one lookup, evidence ever harder to see: smaller, fainter lesions in more noise, rungs
    0..subtlety_rungs-1 of `medlvr.data.synth.SUBTLETY_RUNGS`), or `both`, one after the
    other into `out/depth` and `out/subtlety` (the synthetic benchmark only)."""
    subtlety_rungs: int = 8
    """Rungs of the subtlety ladder (the easiest `subtlety_rungs` of SUBTLETY_RUNGS)."""
    max_hops: int = 3
    """Deepest chain of the synthetic benchmark (questions of 1..max_hops hops, uniformly)."""
    sft_steps: int = 0
    """Fine-tuning steps of every SFT arm (0 = the budget's: 400 by default); (e)'s stages split them."""
    latent_steps: int = 6
    """K of the latent arms: (p), (b), (c), (d), (e); with chain alignment and in (e)'s curriculum
    K / hops steps per hop."""
    projector: str = "norm"
    """Latent projector of the latent arms (see `LatentConfig.projector`)."""
    align_weight: float = 0.5
    """lambda of ROI-SFT."""
    align_kind: str = "infonce"
    """Alignment loss of ROI-SFT."""
    align_assign: str = "chain"
    """Which ROI each latent step of (c) is aligned to (`AlignConfig.assign`)."""
    lr: float = 5e-4
    """Peak learning rate of the SFT arms (warmup a tenth of the steps, cosine to a tenth)."""
    freeze_vision: bool = False
    """Freeze the vision tower while fine-tuning the arms."""
    data_seed: int = 0
    """Seed of the synthetic benchmark itself."""
    split: Literal["test", "val"] = "test"
    """Split the arms are scored on: `val` to choose settings (benchmarks/ablation_val.py), `test` to report once."""
    sft_overrides: list[str] = field(default_factory=list)
    """Extra `key=value` overrides for the ROI-SFT run of (c) (ablations, e.g. `align.assign=raster`)."""
    workers: int = 2
    """Arms trained at once, each in its own single-threaded process (2 uses both cores of a laptop;
    1 runs everything in this process)."""
    resume: bool = False
    """Reuse the arm runs an interrupted run of the same settings finished (each arm's
    `arm_result.json`); the others are trained afresh."""
    progress: bool = True
    """Show progress bars (one per running arm)."""

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise MedlvrError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if self.dataset not in ("synth", "vqa-rad"):
            raise MedlvrError(f"dataset must be synth or vqa-rad, got {self.dataset!r}")
        if self.dataset == "vqa-rad" and not self.data_root:
            raise MedlvrError("--dataset vqa-rad needs --data-root (the release folder)")
        if self.latent_steps < 1:
            raise MedlvrError(
                f"latent_steps must be >= 1 for the latent arms, got {self.latent_steps}"
            )
        if not 1 <= self.max_hops <= 4:
            raise MedlvrError(f"max_hops must be 1-4, got {self.max_hops}")
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise MedlvrError(
                f"unknown arm(s) {', '.join(unknown)}; choose letters of {''.join(ARMS)}"
            )
        if "d" in self.arm_list and "c" not in self.arm_list:
            raise MedlvrError("arm d (VLPO) starts from arm c: add c")
        if self.ladder not in (*LADDERS, "both"):
            raise MedlvrError(f"ladder must be depth, subtlety or both, got {self.ladder!r}")
        if self.ladder != "depth" and self.dataset != "synth":
            raise MedlvrError(
                f"the {self.ladder} ladder needs the synthetic benchmark; use --ladder depth with {self.dataset}"
            )
        from medlvr.data.synth import SUBTLETY_RUNGS

        if not 2 <= self.subtlety_rungs <= len(SUBTLETY_RUNGS):
            raise MedlvrError(
                f"subtlety_rungs must be 2-{len(SUBTLETY_RUNGS)}, got {self.subtlety_rungs}"
            )
        if self.split not in ("test", "val"):
            raise MedlvrError(f"split must be test or val, got {self.split!r}")
        if self.workers < 1:
            raise MedlvrError(f"workers must be >= 1, got {self.workers}")
        if self.sft_steps < 0:
            raise MedlvrError(f"sft_steps must be >= 0 (0 = the budget's), got {self.sft_steps}")
        self.seeds = list(self.seeds or self.spec.seeds)

    @property
    def spec(self) -> BudgetSpec:
        """The budget preset, with `sft_steps` if set."""
        return dataclasses.replace(
            BUDGETS[self.budget], sft_steps=self.sft_steps or BUDGETS[self.budget].sft_steps
        )

    @property
    def arm_list(self) -> list[str]:
        """The arms of this run in `ARMS` order; (t) and (e) only where records have a written
        chain, (e) (one written hop per stage) on the depth ladder, (r) on the subtlety ladder."""
        chosen = self.arms or (
            self.spec.subtlety_arms if self.ladder == "subtlety" else self.spec.arms
        )
        skip = "r" if self.ladder == "depth" else "e" if self.ladder == "subtlety" else ""
        return [
            a for a in ARMS
            if a in chosen and a not in skip and not (a in WRITTEN_ARMS and self.dataset != "synth")
        ]  # fmt: skip

    def of_ladder(self, ladder: str) -> DemoConfig:
        """This run restricted to one ladder, into its own folder under `out` when running both."""
        out = str(Path(self.out) / ladder) if self.ladder == "both" else self.out
        return dataclasses.replace(self, ladder=ladder, out=out)  # type: ignore[arg-type]

    @property
    def ladder_key(self) -> str:
        """The record field (`meta`) this ladder's rungs are read from: hops or rung."""
        return LADDER_KEY.get(self.ladder, "hops")

    def latent_steps_of(self, arm: str) -> int:
        """The latent budget an arm trains and is scored at."""
        return self.latent_steps if arm in LATENT_ARMS else 0

    def curriculum(self) -> list[int]:
        """(e)'s K per stage: stage s has handed s hops to the latents, as many steps as chain
        alignment gives those hops (`medlvr.data.roi.hop_of_steps`)."""
        from medlvr.data.roi import hop_of_steps

        steps = hop_of_steps(self.latent_steps, self.max_hops)
        return [sum(hop < s for hop in steps) for s in range(self.max_hops + 1)]


@dataclass
class DemoData:
    train: Path
    val: Path
    tests: dict[str, list[VQASample]]
    """Split name -> questions scored."""
    has_rois: bool
    train_reasoning: Path | None = None
    """Training records with the evidence chain written before the answer (arm t)."""
    notes: list[str] = field(default_factory=list)


@dataclass
class ArmResult:
    """One arm, one seed: its exported model, training history and scored rows."""

    arm: str
    seed: int
    model: str
    history: list[dict[str, Any]]
    rows: dict[str, list[dict[str, Any]]]
    """Split -> prediction rows (every K scored, real images)."""
    controls: list[dict[str, Any]]
    """Rows of the scored split at the arm's K under the grounding controls (`image_control`:
    blank = every image mean-grey, question-only = no image)."""
    latent_steps: list[int]
    """Every K the arm was scored at (its own, plus the sweep for (c) and (d))."""
    train_seconds: float
