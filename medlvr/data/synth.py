"""The embedded synthetic benchmark: medical-looking scans with lesions at known places.

It is the demo's default dataset, so every feature (ROI supervision included)
runs with no download. Every record is a `VQASample` whose `rois` are the exact
pixel boxes of the evidence its answer depends on.

Geometry is sized for a Qwen2.5-VL image processor: `image_size` is a multiple
of 28 so `smart_resize` keeps it as is, and one visual token covers a 28x28
cell (168 px -> a 6x6 grid of 36 tokens). The image is divided into a grid of
named regions (3x3 by default: "upper left" ... "lower right"); each region
holds at most one lesion (shape, size, intensity, texture), so "the lesion in
the center region" is always well defined.

Question types (`question_type`):

- `presence`    "Is there a lesion in the upper left region?" -> yes/no (closed)
- `attribute`   "What is the shape of the lesion in the center region?" (choice)
- `location`    "Where is the triangular lesion?" (choice of regions)
- `comparison`  "Which lesion is larger: the one in X or the one in Y?" (choice)
- `count`       "How many lesions are there?" -> a digit string (open)
- `relational`  two hops: "What shape is the lesion to the right of the brightest
                lesion?" (choice), "Are the lesions in the X and Y regions the
                same shape?" (closed)
- `describe` / `ground` / `inspect` (stage-0 pretraining, `describe.jsonl`):
  "Describe the lesions." -> "upper left: small bright round; center: large dark
  cross" in raster order; "Where is the small bright triangular lesion?" ->
  "center"; "What is in the center region?" -> "large dark cross" (or "nothing").

Splits: `train`, `val`, `test` and `compositional`. A Latin-square set of
(shape, region) pairs is held out: no lesion of a held pair appears in any
train/val/test/describe image, and in every compositional image the queried
(primary) lesion has a held pair (no presence questions there: they do not
depend on the shape). Every sample draws from its own
`numpy.random.default_rng([seed, split, index, stream])` substreams, so the same
seed gives byte-identical files and changing `n` or the split sizes never
changes the other samples.

Files written by `generate(cfg, out_dir)`:

    images/{split}-{index:06d}.png   8-bit grey (mode L), image_size x image_size
    train.jsonl val.jsonl test.jsonl compositional.jsonl
                                     one VQASample per line, id "synth-{split}-{index:06d}"
    describe.jsonl                   stage 0: "synth-describe-train-...", "synth-ground-train-..."
                                     and "synth-inspect-train-..." per train image (split "describe")
    manifest.json                    config, counts by split / question type / lesion count,
                                     regions, shapes, held pairs

Record fields: `question_type` (above); `answer_type` closed (yes/no), choice
(letters A-D shuffled per sample, `answer` = gold option text) or open (count,
describe, ground); `rois` = evidence boxes `[x0, y0, x1, y1]` in pixel edges
labelled "lesion" (or "region" for a presence "no"), in reasoning order (anchor
before target); `modality` = style name; `meta` = {level, n_lesions,
target (index into lesions of the primary lesion, or null), held_pair, lesions:
[{region, shape, size, intensity, texture, box, center, extent}] in raster
order, plus the question type's variant / attribute / descriptor / anchor / direction}.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from medlvr.data.prompts import REASONING_SEPARATOR
from medlvr.data.schema import LETTERS, ROI, VQASample, write_jsonl
from medlvr.data.synth_render import (
    MODALITIES,
    SHAPES,
    TOKEN_PX,
    background,
    lesion_geometry,
    paint_lesion,
    to_uint8,
)

DATASET = "synth"
QUESTION_TYPES = ("presence", "attribute", "location", "comparison", "count", "relational", "chain")
STAGE0_QUESTION_TYPES = ("describe", "ground", "inspect")
SPLITS = ("train", "val", "test", "compositional")
SIZES = ("small", "large")
INTENSITIES = ("bright", "dark")
TEXTURES = ("smooth", "mottled")
SHAPE_ADJECTIVE = {
    "round": "round",
    "square": "square",
    "triangle": "triangular",
    "cross": "cross-shaped",
}

REGION_NAMES = {
    2: ("upper left", "upper right", "lower left", "lower right"),
    3: (
        "upper left", "upper middle", "upper right",
        "middle left", "center", "middle right",
        "lower left", "lower middle", "lower right",
    ),
}  # fmt: skip

LEVEL_DISTRACTORS = {1: (0, 0), 2: (1, 2), 3: (1, 3), 4: (2, 5), 5: (3, 8)}
"""Curriculum level -> inclusive range of distractor lesions (lesions besides the primary one)."""

DEFAULT_MIX = {
    "presence": 0.1,
    "attribute": 0.15,
    "location": 0.1,
    "comparison": 0.1,
    "count": 0.05,
    "relational": 0.1,
    "chain": 0.4,
}
DEFAULT_SPLITS = {"train": 0.7, "val": 0.1, "test": 0.1, "compositional": 0.1}
MIN_LESIONS = {
    "presence": 1,
    "attribute": 1,
    "location": 1,
    "comparison": 2,
    "count": 1,
    "relational": 2,
    "chain": 2,
}
"""Lesions a question type needs in the image (comparisons and relations need two; a chain image
sets its own lesion count, see `_chain`, whatever the level)."""
MAX_HOPS = 4
"""Deepest chain: an anchor and three steps fill a self-avoiding path of four of the nine regions."""
_CHAIN_ANCHORS = {"largest": ("large", "small"), "smallest": ("small", "large")}
"""Chain anchor -> (its size, every other lesion's size): the anchor is the one lesion of its size."""

SUBTLETY_RUNGS: tuple[tuple[float, float, float], ...] = (
    (1.00, 0.300, 0.020),
    (0.95, 0.240, 0.025),
    (0.90, 0.200, 0.030),
    (0.85, 0.160, 0.035),
    (0.80, 0.130, 0.040),
    (0.75, 0.100, 0.050),
    (0.65, 0.070, 0.060),
    (0.55, 0.040, 0.080),
)
"""The subtlety ladder (`SynthConfig.subtlety`), easiest rung first: (lesion scale, contrast, noise).
The scale multiplies both lesion sizes (so a lesion covers less of the image and more visual
tokens compete with it), the contrast is the lesion's offset from its surrounding tissue and
the noise the pixel noise's standard deviation, all in fractions of full scale. Calibrated on
val (docs/results.md): a first, coarser table fell from the easiest rung to chance within four
rungs, so the steps are finer where the fine-tuned backbone loses the lesion."""

_SPLIT_CODE = {"train": 1, "val": 2, "test": 3, "compositional": 4}
_MARGIN_PX = 2  # a lesion keeps this far from its region's border
_MAX_LESIONS = (
    9  # distinct (size, intensity, shape) descriptors stay available under every constraint
)
_DIRECTIONS = {  # name -> (d_row, d_col) from the anchor to the asked lesion, and the phrase
    "right": ((0, 1), "to the right of"),
    "left": ((0, -1), "to the left of"),
    "above": ((-1, 0), "above"),
    "below": ((1, 0), "below"),
}
_SUPERLATIVES = {  # anchor kind -> (attribute, anchor value, everyone else's value)
    "brightest": ("intensity", "bright", "dark"),
    "darkest": ("intensity", "dark", "bright"),
    "largest": ("size", "large", "small"),
    "smallest": ("size", "small", "large"),
}


@dataclass
class SynthConfig:
    """Knobs of the synthetic benchmark; validated in `__post_init__`."""

    n: int = 1000
    """Question records over the four splits together (describe.jsonl comes on top)."""
    seed: int = 0
    """Root seed: the same seed gives byte-identical JSONL files and images."""
    image_size: int = 168
    """Side of the square images in pixels; a multiple of 28 (one visual token per 28x28 cell)."""
    grid: int = 3
    """Regions per side: 3 gives the nine named regions "upper left" ... "lower right"."""
    level: int = 3
    """Curriculum level 1-5: 1 = a single lesion, higher levels add distractors (see LEVEL_DISTRACTORS)."""
    distractors: tuple[int, int] | None = None
    """Inclusive range of distractor lesions besides the primary one; None derives it from `level`."""
    small_size: float = 0.8
    """Extent of a small lesion in token cells (0.8 x 28 px ~ 22 px)."""
    large_size: float = 1.6
    """Extent of a large lesion in token cells (1.6 x 28 px ~ 45 px); must fit in a region.
    The tiny stage-0 backbone reads shape at 0.59 on 1.6-cell lesions and at chance on
    1-cell ones (docs/synthetic.md), hence `shape_questions`."""
    shape_questions: Literal["large", "all", "none"] = "large"
    """Which lesions `attribute` questions may ask the shape of: only `large` ones (the
    calibrated default: shape is not read below ~1.5 token cells), `all`, or `none`."""
    answers: Literal["words", "letters"] = "words"
    """How attribute, location, comparison and relational questions are answered: `words`
    (open questions, gold = the word, e.g. "bright", "upper left") or `letters` (multiple
    choice, options shuffled onto A-D). The tiny backbone reads intensity at a named region
    at 0.97 with word answers but does not learn to map it to a shuffled letter in 600 steps
    (docs/synthetic.md, section 3): letters add a hop of their own."""
    hops: tuple[int, int] = (1, 3)
    """Inclusive range of chain depths h (drawn uniformly): 1 = "the largest lesion", each
    further hop a step to an adjacent region ("the lesion below the largest lesion"); at most 4."""
    subtlety: tuple[int, int] | None = None
    """Inclusive range of subtlety rungs (indices into `SUBTLETY_RUNGS`, drawn uniformly per
    record, `meta.rung`): each rung sets the lesions' scale, contrast and the pixel noise of its
    image, in place of `small_size`/`large_size`, `contrast` and `noise`. None = no ladder.
    Under a ladder "bright" and "dark" are relative to a lesion's surrounding tissue, so
    questions that compare lesions (comparison, relational) are not asked."""
    attributes: tuple[str, ...] = ("size", "intensity", "shape", "texture")
    """Attributes `attribute` questions may ask (shape and texture further gated by
    `shape_questions` and `texture`)."""
    contrast: float = 0.3
    """Lesion offset from the local background (fraction of full scale, jittered +-10%)."""
    window: float = 0.4
    """Grey-level range of the background, centred on 0.5; needs 0.9 * contrast > window / 2."""
    noise: float = 0.02
    """Standard deviation of the pixel noise added last (fraction of full scale)."""
    texture: float = 0.0
    """Probability that a lesion is mottled rather than smooth; texture questions need 0 < texture < 1
    (0 = every lesion smooth, no texture questions: the calibrated default)."""
    background_texture: float = 1.0
    """Amplitude of the procedural background texture (0 = flat anatomy)."""
    anatomy_blend: float = 0.3
    """Weight of the pydicom test-file anatomy layer blended into the CT and MRI styles."""
    anatomy_variants: int = 64
    """Distinct anatomy drawings per modality, cached and mirrored (texture and noise stay per image); 0 = draw every image afresh (slower)."""
    same_shape_distractors: float = 0.25
    """Probability that a distractor takes the primary lesion's shape (harder: shape alone no longer identifies it)."""
    modalities: tuple[str, ...] = tuple(MODALITIES)
    """Modality styles drawn uniformly: chest_xray, brain_mri, ct, fundus, histology."""
    question_types: dict[str, float] | None = None
    """Question type -> weight; None derives DEFAULT_MIX restricted to the types the level allows."""
    splits: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    """Split -> fraction of `n`; val/test/compositional are floored, train takes the rest."""
    held_per_region: int = 1
    """Shapes held out per region for the compositional split (0-3; 0 = no compositional split)."""
    describe: bool = True
    """Also write describe.jsonl: one describe, one ground and one inspect record per train image."""

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"synth config: {msg}")

        if self.n <= 0:
            raise bad(f"n must be positive, got {self.n}")
        if self.image_size <= 0 or self.image_size % TOKEN_PX:
            raise bad(
                f"image_size must be a positive multiple of {TOKEN_PX} (one visual token per {TOKEN_PX} px), got {self.image_size}"
            )
        if self.grid < 2:
            raise bad(f"grid must be at least 2, got {self.grid}")
        if self.level not in LEVEL_DISTRACTORS:
            raise bad(f"level must be one of {sorted(LEVEL_DISTRACTORS)}, got {self.level}")
        if self.distractors is not None:
            lo, hi = (int(v) for v in self.distractors)
            if not 0 <= lo <= hi:
                raise bad(
                    f"distractors must be a range (lo, hi) with 0 <= lo <= hi, got {self.distractors}"
                )
            self.distractors = (lo, hi)
        if self.distractor_range[1] + 1 > min(self.grid**2, _MAX_LESIONS):
            raise bad(
                f"at most {min(self.grid**2, _MAX_LESIONS) - 1} distractors fit, got {self.distractor_range}"
            )
        if not 0 < self.small_size < self.large_size:
            raise bad(f"need 0 < small_size < large_size, got {self.small_size}, {self.large_size}")
        region = self.image_size // self.grid
        if self.large_size * TOKEN_PX * 1.1 + 2 * _MARGIN_PX > region:
            raise bad(
                f"a large lesion ({self.large_size} x {TOKEN_PX} px) does not fit in a {region}-px region; "
                "lower large_size or grid, or raise image_size"
            )
        if not 0 < self.contrast <= 0.5:
            raise bad(f"contrast must be in (0, 0.5], got {self.contrast}")
        if not 0 < self.window < 1 or 0.9 * self.contrast <= self.window / 2:
            raise bad(
                f"need 0 < window < 1 and 0.9 * contrast > window / 2 (bright above dark everywhere), got contrast {self.contrast}, window {self.window}"
            )
        for name in ("noise", "texture", "same_shape_distractors", "anatomy_blend"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.anatomy_variants < 0:
            raise bad(f"anatomy_variants must be >= 0, got {self.anatomy_variants}")
        if self.background_texture < 0:
            raise bad(f"background_texture must be >= 0, got {self.background_texture}")
        self.modalities = tuple(self.modalities)
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or unknown:
            raise bad(
                f"unknown or no modalities {unknown}; expected some of {', '.join(MODALITIES)}"
            )
        if self.question_types is not None:
            unknown = [f for f in self.question_types if f not in QUESTION_TYPES]
            if unknown:
                raise bad(
                    f"unknown question type {', '.join(map(repr, unknown))}; expected some of {', '.join(QUESTION_TYPES)}"
                )
            if (
                any(w < 0 for w in self.question_types.values())
                or sum(self.question_types.values()) <= 0
            ):
                raise bad(
                    f"question-type weights must be >= 0 and not all 0, got {self.question_types}"
                )
            most = self.distractor_range[1] + 1
            for qtype, w in self.question_types.items():
                if w > 0 and MIN_LESIONS[qtype] > most:
                    raise bad(
                        f"question type {qtype!r} needs {MIN_LESIONS[qtype]} lesions but level {self.level} / distractors {self.distractor_range} allow at most {most}"
                    )
        unknown = [s for s in self.splits if s not in SPLITS]
        if (
            unknown
            or any(v < 0 for v in self.splits.values())
            or abs(sum(self.splits.values()) - 1) > 1e-6
        ):
            raise bad(
                f"splits must map some of {', '.join(SPLITS)} to fractions >= 0 summing to 1, got {self.splits}"
            )
        lo, hi = (int(v) for v in self.hops)
        if not 1 <= lo <= hi <= MAX_HOPS:
            raise bad(
                f"hops must be a range (lo, hi) with 1 <= lo <= hi <= {MAX_HOPS}, got {self.hops}"
            )
        self.hops = (lo, hi)
        if self.subtlety is not None:
            lo, hi = (int(v) for v in self.subtlety)
            if not 0 <= lo <= hi < len(SUBTLETY_RUNGS):
                raise bad(
                    f"subtlety must be a range (lo, hi) with 0 <= lo <= hi <= {len(SUBTLETY_RUNGS) - 1}, got {self.subtlety}"
                )
            self.subtlety = (lo, hi)
            comparing = [q for q in ("comparison", "relational") if self.question_mix.get(q)]
            if comparing:
                raise bad(
                    f"a subtlety ladder has no {' or '.join(comparing)} questions (intensity is relative to the lesion's surroundings); set question_types"
                )
        self.attributes = tuple(self.attributes)
        if not self.attributes or not set(self.attributes) <= {
            "size",
            "intensity",
            "shape",
            "texture",
        }:
            raise bad(
                f"attributes must be some of size, intensity, shape, texture, got {self.attributes}"
            )
        if self.grid != 3 and self.question_mix.get("chain"):
            raise bad(f"chain questions are laid out on the 3x3 grid, got grid {self.grid}")
        if self.answers not in ("words", "letters"):
            raise bad(f"answers must be words or letters, got {self.answers!r}")
        if self.shape_questions not in ("large", "all", "none"):
            raise bad(f"shape_questions must be large, all or none, got {self.shape_questions!r}")
        if not 0 <= self.held_per_region < len(SHAPES):
            raise bad(
                f"held_per_region must be in [0, {len(SHAPES) - 1}], got {self.held_per_region}"
            )

    @property
    def distractor_range(self) -> tuple[int, int]:
        """Inclusive range of distractor lesions: `distractors`, or the level's default capped by the grid."""
        if self.distractors is not None:
            return self.distractors
        lo, hi = LEVEL_DISTRACTORS[self.level]
        cap = min(self.grid**2, _MAX_LESIONS) - 1
        return (min(lo, cap), min(hi, cap))

    @property
    def question_mix(self) -> dict[str, float]:
        """Normalised question-type weights (zero weights dropped)."""
        if self.question_types is None:
            most = self.distractor_range[1] + 1
            mix = {
                f: w
                for f, w in DEFAULT_MIX.items()
                if MIN_LESIONS[f] <= most and (f != "chain" or self.grid == 3)
            }
        else:
            mix = {f: w for f, w in self.question_types.items() if w > 0}
        total = sum(mix.values())
        return {f: w / total for f, w in mix.items()}

    def split_counts(self) -> dict[str, int]:
        """Exact records per split: floors for val/test/compositional, the rest to train."""
        counts = {
            s: int(np.floor(self.n * self.splits.get(s, 0.0) + 1e-9))
            for s in SPLITS
            if s != "train"
        }
        if self.held_per_region == 0:
            counts["compositional"] = 0
        counts = {"train": self.n - sum(counts.values()), **counts}
        return counts

    def region_names(self) -> tuple[str, ...]:
        """Names of the grid regions in raster order."""
        if self.grid in REGION_NAMES:
            return REGION_NAMES[self.grid]
        return tuple(
            f"row {r + 1} column {c + 1}" for r in range(self.grid) for c in range(self.grid)
        )

    def region_box(self, region: int) -> tuple[int, int, int, int]:
        """`[x0, y0, x1, y1]` of a region in pixel edges."""
        r, c = divmod(region, self.grid)
        edges = [round(i * self.image_size / self.grid) for i in range(self.grid + 1)]
        return (edges[c], edges[r], edges[c + 1], edges[r + 1])

    def held_pairs(self) -> list[tuple[str, int]]:
        """Held-out (shape, region) pairs: shape index (row + col + j) mod 4, a Latin square.

        Every row and column of the grid holds out different shapes, so every
        shape and every region still appears in training.
        """
        pairs: list[tuple[str, int]] = []
        for region in range(self.grid**2):
            r, c = divmod(region, self.grid)
            pairs.extend(
                (SHAPES[(r + c + j) % len(SHAPES)], region) for j in range(self.held_per_region)
            )
        return pairs


@dataclass(frozen=True)
class Lesion:
    """One lesion of a scene with its exact geometry."""

    shape: str
    size: str
    intensity: str
    texture: str
    region: int
    cx: float
    cy: float
    extent: float
    """Outline span in pixels."""
    contrast: float
    """Magnitude of the grey-level offset (the sign comes from `intensity`)."""
    box: tuple[int, int, int, int]
    """Tight `[x0, y0, x1, y1]` of the lesion's pixels, in pixel edges."""

    def words(self, keys: Sequence[str] = ("size", "intensity", "shape")) -> str:
        """`"small bright triangular"`: the attributes in `keys`, shape as an adjective."""
        out = []
        for key in ("size", "intensity", "texture", "shape"):
            if key in keys:
                out.append(SHAPE_ADJECTIVE[self.shape] if key == "shape" else getattr(self, key))
        return " ".join(out)

    def to_meta(self, names: Sequence[str]) -> dict[str, Any]:
        return {
            "region": names[self.region],
            "shape": self.shape,
            "size": self.size,
            "intensity": self.intensity,
            "texture": self.texture,
            "box": list(self.box),
            "center": [round(self.cx, 2), round(self.cy, 2)],
            "extent": round(self.extent, 2),
        }


@dataclass(frozen=True)
class Scene:
    """What one image shows: modality and lesions (raster order of regions); `target` is the primary lesion."""

    split: str
    index: int
    modality: str
    lesions: tuple[Lesion, ...]
    target: int | None
    rung: int | None = None
    """Subtlety rung of the image (`SUBTLETY_RUNGS`), None outside a ladder."""

    def at(self, region: int) -> Lesion | None:
        return next((les for les in self.lesions if les.region == region), None)


@dataclass
class SynthItem:
    """One generated record with its scene and (optionally) its rendered pixels."""

    sample: VQASample
    scene: Scene
    image: np.ndarray | None = None
    """[image_size, image_size] uint8 grey levels, or None when not rendered."""


# --------------------------------------------------------------------------- scene sampling


class _SceneBuilder:
    """Places lesions one at a time under the split's held-pair rule and the question type's constraints."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator, split: str, index: int):
        self.cfg, self.rng, self.split = cfg, rng, split
        self.held = set(cfg.held_pairs())
        self.lesions: list[Lesion] = []
        self.blocked: set[int] = set()
        self.banned_shapes: set[str] = set()
        self.defaults: dict[
            str, str
        ] = {}  # attribute -> value forced on lesions that do not set it
        # A subtlety rung rescales every lesion and sets its contrast (own stream: the scenes of
        # a run without a ladder are unchanged).
        self.rung = rung_of(cfg, split, index)
        self.scale, self.contrast = (
            (1.0, cfg.contrast) if self.rung is None else SUBTLETY_RUNGS[self.rung][:2]
        )

    def occupied(self) -> set[int]:
        return {les.region for les in self.lesions}

    def free_regions(self) -> list[int]:
        busy = self.occupied() | self.blocked
        return [r for r in range(self.cfg.grid**2) if r not in busy]

    def add(
        self,
        *,
        shapes: Iterable[str] | None = None,
        region: int | None = None,
        size: str | None = None,
        intensity: str | None = None,
        held: bool = False,
        prefer_shape: str | None = None,
        unique: bool = True,
    ) -> Lesion | None:
        """Add a lesion satisfying the constraints; None when none fits.

        `unique` keeps every (size, intensity, shape) descriptor once per image, so a
        lesion can be named by its attributes; chain images name lesions by place instead.
        """
        size = size or self.defaults.get("size")
        intensity = intensity or self.defaults.get("intensity")
        shapes = [s for s in (SHAPES if shapes is None else shapes) if s not in self.banned_shapes]
        free = self.free_regions()
        regions = free if region is None else [region] if region in free else []
        used = {(les.size, les.intensity, les.shape) for les in self.lesions}
        cands = [
            (sh, rg, sz, it)
            for sh in shapes
            for rg in regions
            for sz in ([size] if size else SIZES)
            for it in ([intensity] if intensity else INTENSITIES)
            if ((sh, rg) in self.held) == held and (not unique or (sz, it, sh) not in used)
        ]
        if not cands:
            return None
        present = sorted({c[0] for c in cands}, key=SHAPES.index)
        if (
            prefer_shape is not None
            and prefer_shape in present
            and (len(present) == 1 or self.rng.random() < self.cfg.same_shape_distractors)
        ):
            shape = prefer_shape
        else:
            others = [s for s in present if s != prefer_shape] or present
            shape = others[int(self.rng.integers(len(others)))]
        cands = [c for c in cands if c[0] == shape]
        shape, region, size, intensity = cands[int(self.rng.integers(len(cands)))]
        texture = "mottled" if self.rng.random() < self.cfg.texture else "smooth"
        base = self.cfg.large_size if size == "large" else self.cfg.small_size
        extent = self.scale * base * TOKEN_PX * float(self.rng.uniform(0.9, 1.1))
        x0, y0, x1, y1 = self.cfg.region_box(region)
        pad = extent / 2 + _MARGIN_PX
        cx = float(self.rng.uniform(x0 + pad, x1 - pad))
        cy = float(self.rng.uniform(y0 + pad, y1 - pad))
        contrast = self.contrast * float(self.rng.uniform(0.9, 1.1))
        geom = lesion_geometry(shape, cx, cy, extent, self.cfg.image_size)
        lesion = Lesion(shape, size, intensity, texture, region, cx, cy, extent, contrast, geom.box)
        self.lesions.append(lesion)
        return lesion

    def place(self, **constraints: Any) -> Lesion:
        """`add` where the scene leaves room by construction (a near-empty image)."""
        lesion = self.add(**constraints)
        if lesion is None:  # pragma: no cover - every region admits several shapes
            raise RuntimeError(f"no lesion fits {constraints}")
        return lesion

    def fill(self, n: int, prefer_shape: str | None) -> None:
        """Add distractors until the image holds `n` lesions (fewer when the constraints run out)."""
        while len(self.lesions) < n:
            if self.add(prefer_shape=prefer_shape) is None:
                break

    def scene(self, modality: str, index: int, primary: Lesion | None) -> Scene:
        ordered = tuple(sorted(self.lesions, key=lambda les: les.region))
        target = None if primary is None else ordered.index(primary)
        return Scene(self.split, index, modality, ordered, target, self.rung)


def _rng(cfg: SynthConfig, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _SPLIT_CODE.get(split, 9), index, stream])


def rung_of(cfg: SynthConfig, split: str, index: int) -> int | None:
    """The subtlety rung of record `index` of `split` (its own rng stream), None without a ladder."""
    if cfg.subtlety is None:
        return None
    lo, hi = cfg.subtlety
    return int(_rng(cfg, split, index, 5).integers(lo, hi + 1))


def _choice(
    rng: np.random.Generator, texts: Sequence[str], gold: str
) -> tuple[dict[str, str], str]:
    """Options shuffled deterministically onto letters A, B, ...; returns (options, gold letter)."""
    order = rng.permutation(len(texts))
    options = {LETTERS[i]: texts[j] for i, j in enumerate(order)}
    letter = next(k for k, v in options.items() if v == gold)
    return options, letter


def _ask(
    cfg: SynthConfig,
    rng: np.random.Generator,
    text: str,
    texts: Sequence[str],
    gold: str,
    rois: list[ROI],
) -> _Question:
    """A question over a closed set of answers: a word answer (open), or a choice of letters (`cfg.answers`).

    The options are shuffled in both cases, so the rng stream, and with it every
    scene, is the same whichever way the answers are written.
    """
    options, letter = _choice(rng, texts, gold)
    if cfg.answers == "words":
        return _Question(text, gold, "open", rois)
    return _Question(text, gold, "choice", rois, options, letter)


def _lesion_roi(les: Lesion) -> ROI:
    return ROI(box=les.box, label="lesion")


def _described_roi(les: Lesion) -> ROI:
    """Stage-0 ROIs carry the lesion's attributes (`"small bright round"`), for the token probe."""
    return ROI(box=les.box, label=f"{les.size} {les.intensity} {les.shape}")


@dataclass
class _Question:
    text: str
    answer: str
    answer_type: str
    rois: list[ROI]
    options: dict[str, str] = field(default_factory=dict)
    letter: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _build(cfg: SynthConfig, split: str, index: int) -> tuple[Scene, str, _Question]:
    """Sample the scene and question of record `index` of `split` (a pure function of its arguments)."""
    rng = _rng(cfg, split, index, 0)
    mix = cfg.question_mix
    comp = split == "compositional"
    if comp and len(mix) > 1 and "presence" in mix:
        # Whether a region holds *a* lesion does not depend on its shape, so a held
        # (shape, region) pair tests nothing there (and only "yes" could apply).
        mix = {f: w for f, w in mix.items() if f != "presence"}
        mix = {f: w / sum(mix.values()) for f, w in mix.items()}
    qtype = list(mix)[int(rng.choice(len(mix), p=list(mix.values())))]
    modality = cfg.modalities[int(rng.integers(len(cfg.modalities)))]
    lo, hi = cfg.distractor_range
    cells = cfg.grid**2
    n = min(max(int(rng.integers(lo, hi + 1)) + 1, MIN_LESIONS[qtype]), cells)
    b = _SceneBuilder(cfg, rng, split, index)
    names = cfg.region_names()

    def in_region(les: Lesion) -> str:
        return f"the {names[les.region]} region"

    primary: Lesion | None

    if qtype == "presence":
        yes = comp or rng.random() < 0.5
        if not yes:
            n = min(n, cells - 1)
        primary = b.place(held=comp)
        b.fill(n, primary.shape)
        if yes:
            q = _Question(
                f"Is there a lesion in {in_region(primary)}?",
                "yes",
                "closed",
                [_lesion_roi(primary)],
            )
        else:
            empty = [r for r in range(cells) if r not in b.occupied()]
            region = empty[int(rng.integers(len(empty)))]
            box = ROI(box=cfg.region_box(region), label="region")
            q = _Question(
                f"Is there a lesion in the {names[region]} region?", "no", "closed", [box]
            )
            q.meta["region"] = names[region]
            primary = None
    elif qtype == "attribute":
        primary = b.place(held=comp)
        b.fill(n, primary.shape)
        attrs: list[str] = [a for a in ("size", "intensity") if a in cfg.attributes]
        if "shape" in cfg.attributes and (
            cfg.shape_questions == "all"
            or (cfg.shape_questions == "large" and primary.size == "large")
        ):
            attrs.append("shape")
        if "texture" in cfg.attributes and 0 < cfg.texture < 1:
            attrs.append("texture")
        if not attrs:
            raise ValueError(
                f"synth config: no attribute of {cfg.attributes} can be asked of this lesion; add size or intensity"
            )
        attr = attrs[int(rng.integers(len(attrs)))]
        values = {"shape": SHAPES, "size": SIZES, "intensity": INTENSITIES, "texture": TEXTURES}[
            attr
        ]
        q = _ask(
            cfg,
            rng,
            f"What is the {attr} of the lesion in {in_region(primary)}?",
            values,
            getattr(primary, attr),
            [_lesion_roi(primary)],
        )
        q.meta["attribute"] = attr
    elif qtype == "location":
        primary = b.place(held=comp)
        b.fill(n, primary.shape)
        for keys in (
            ("shape",),
            ("size", "shape"),
            ("intensity", "shape"),
            ("size", "intensity", "shape"),
        ):
            if sum(les.words(keys) == primary.words(keys) for les in b.lesions) == 1:
                break
        gold = names[primary.region]
        others = [names[les.region] for les in b.lesions if les is not primary]
        free = [names[r] for r in range(cells) if r not in b.occupied()]
        others = [others[i] for i in rng.permutation(len(others))] + [
            free[i] for i in rng.permutation(len(free))
        ]
        q = _ask(
            cfg,
            rng,
            f"Where is the {primary.words(keys)} lesion?",
            [gold, *others[:3]],
            gold,
            [_lesion_roi(primary)],
        )
        q.meta["descriptor"] = list(keys)
    elif qtype == "comparison":
        attr = ("size", "intensity")[int(rng.integers(2))]
        primary = b.place(held=comp)
        opposite = {
            "size": dict(zip(SIZES, SIZES[::-1])),
            "intensity": dict(zip(INTENSITIES, INTENSITIES[::-1])),
        }[attr]
        partner = b.place(**{attr: opposite[getattr(primary, attr)]})
        b.fill(n, primary.shape)
        word = {"size": ("larger", "smaller"), "intensity": ("brighter", "darker")}[attr][
            int(rng.integers(2))
        ]
        winner_value = {
            "larger": "large",
            "smaller": "small",
            "brighter": "bright",
            "darker": "dark",
        }[word]
        winner = primary if getattr(primary, attr) == winner_value else partner
        first, second = (primary, partner) if rng.random() < 0.5 else (partner, primary)
        text = f"Which lesion is {word}: the one in {in_region(first)} or the one in {in_region(second)}?"
        q = _ask(
            cfg,
            rng,
            text,
            [names[first.region], names[second.region]],
            names[winner.region],
            [_lesion_roi(first), _lesion_roi(second)],
        )
        q.meta["attribute"] = attr
    elif qtype == "count":
        primary = b.place(held=comp)
        b.fill(n, primary.shape)
        rois = [_lesion_roi(les) for les in sorted(b.lesions, key=lambda les: les.region)]
        q = _Question("How many lesions are there?", str(len(b.lesions)), "open", rois)
    elif qtype == "relational":
        primary, q = _relational(cfg, rng, b, n, comp, names)
    elif qtype == "chain":
        primary, q = _chain(cfg, rng, b, comp, names)
    else:  # pragma: no cover - guarded by SynthConfig
        raise ValueError(f"unknown question type {qtype!r}")
    if cfg.subtlety is not None and qtype in ("presence", "attribute", "chain"):
        # The evidence written out before the answer, for the text-reasoning arm of the
        # subtlety ladder: where the lesion is and what it looks like ("center: small bright lesion").
        q.meta["reasoning"] = _evidence_text(q, primary, names)
    # Reasoning depth of every record: lookups in sequence, each ROI tagged with its hop.
    two_hop = q.meta.get("variant") == "neighbor"
    q.meta.setdefault("hops", 2 if two_hop else 1)
    q.meta.setdefault("roi_hops", [1, 2] if two_hop else [1] * len(q.rois))
    return b.scene(modality, index, primary), qtype, q


def _evidence_text(q: _Question, lesion: Lesion | None, names: Sequence[str]) -> str:
    """One lookup's evidence as text: "center: small bright lesion", "largest lesion: center, large
    dark lesion" (anchored), or "upper left: nothing" (a presence "no")."""
    if lesion is None:
        return f"{q.meta['region']}: nothing"
    looks = f"{lesion.size} {lesion.intensity} lesion"
    if "anchor" in q.meta:
        return f"{q.meta['anchor']} lesion: {names[lesion.region]}, {looks}"
    return f"{names[lesion.region]}: {looks}"


def _chain(
    cfg: SynthConfig, rng: np.random.Generator, b: _SceneBuilder, comp: bool, names: Sequence[str]
) -> tuple[Lesion, _Question]:
    """h lookups in sequence: "What is the intensity of the lesion below the largest lesion?" (h = 2).

    Hop 1 finds the anchor, the one lesion of its size ("largest" / "smallest"); hop i > 1
    steps from the previous lesion to the adjacent region in a direction; the answer is the
    intensity of the last lesion. Images hold 6 or 8 lesions (8 when h = 4) on the 3x3 grid.
    No hop can be skipped by a shortcut:
    - the chain's intensities are independent fair coins, so the question alone, the anchor
      and every intermediate lesion say nothing about the answer;
    - the distractors take whatever intensities make the image exactly half bright, so the
      image's majority is always a tie. (The price: given the chain, a distractor is
      slightly more likely to differ from the answer; only a model that already followed the
      chain knows which lesions are distractors.)
    `meta`: hops, roi_hops (1..h, the ROIs are the chain in reasoning order), anchor,
    directions, chain (region names) and `reasoning`, the chain written out for text-reasoning
    training ("largest lesion: center; below it: lower middle").
    """
    g = cfg.grid
    h = int(rng.integers(cfg.hops[0], cfg.hops[1] + 1))
    kind = tuple(_CHAIN_ANCHORS)[int(rng.integers(len(_CHAIN_ANCHORS)))]
    anchor_size, other_size = _CHAIN_ANCHORS[kind]
    n = (
        8 if 2 * h > 6 else (6, 8)[int(rng.integers(2))]
    )  # distractors can balance any chain: h <= n / 2
    path = _chain_path(rng, g, h)
    chain_intensity = [INTENSITIES[int(rng.integers(2))] for _ in range(h)]
    bright = n // 2 - chain_intensity.count("bright")
    spare = [INTENSITIES[0]] * bright + [INTENSITIES[1]] * (n - h - bright)
    spare = [spare[i] for i in rng.permutation(len(spare))]
    chain = []
    for i, (region, _) in enumerate(path):
        size = anchor_size if i == 0 else other_size
        chain.append(
            _add_named(
                b, region=region, size=size, intensity=chain_intensity[i], held=comp and i == h - 1
            )
        )
    free = b.free_regions()
    for region, intensity in zip((free[i] for i in rng.permutation(len(free))), spare):
        _add_named(b, region=region, size=other_size, intensity=intensity)
    placed = [les for les in chain if les is not None]
    if len(placed) != h or len(b.lesions) != n:  # pragma: no cover - every region admits 3 shapes
        raise RuntimeError("chain scene did not fit")
    target = placed[-1]
    subject, steps = f"the {kind} lesion", [f"{kind} lesion: {names[path[0][0]]}"]
    for region, direction in path[1:]:
        assert direction is not None  # only the path's first region has none
        phrase = _DIRECTIONS[direction][1]
        subject = f"the lesion {phrase} {subject}"
        steps.append(f"{phrase} it: {names[region]}")
    q = _Question(
        f"What is the intensity of {subject}?",
        target.intensity,
        "open",
        [_lesion_roi(les) for les in placed],
    )
    q.meta.update(
        attribute="intensity", hops=h, roi_hops=list(range(1, h + 1)), anchor=kind,
        directions=[d for _, d in path[1:]], chain=[names[r] for r, _ in path], reasoning=REASONING_SEPARATOR.join(steps),
    )  # fmt: skip
    return target, q


def _add_named(b: _SceneBuilder, **constraints: Any) -> Lesion | None:
    """A lesion with a descriptor of its own where one is left (stage 0's "Where is the <attributes>
    lesion?" needs it), else one that repeats a descriptor: chain questions name lesions by place."""
    return b.add(**constraints) or b.add(**constraints, unique=False)


def _chain_path(rng: np.random.Generator, g: int, h: int) -> list[tuple[int, str | None]]:
    """A self-avoiding path of h regions: [(region, direction from the previous one)], the first direction None."""
    while True:
        path: list[tuple[int, str | None]] = [(int(rng.integers(g * g)), None)]
        for _ in range(h - 1):
            r, c = divmod(path[-1][0], g)
            seen = {p for p, _ in path}
            moves = [
                (name, (r + dr) * g + c + dc)
                for name, ((dr, dc), _) in _DIRECTIONS.items()
                if 0 <= r + dr < g and 0 <= c + dc < g and (r + dr) * g + c + dc not in seen
            ]
            if not moves:
                break
            name, region = moves[int(rng.integers(len(moves)))]
            path.append((region, name))
        if len(path) == h:
            return path


def _relational(
    cfg: SynthConfig,
    rng: np.random.Generator,
    b: _SceneBuilder,
    n: int,
    comp: bool,
    names: Sequence[str],
) -> tuple[Lesion, _Question]:
    g = cfg.grid
    if rng.random() < 0.4:  # "Are the lesions in X and Y the same shape?"
        primary = b.place(held=comp)
        same = rng.random() < 0.5
        shapes = [primary.shape] if same else [s for s in SHAPES if s != primary.shape]
        partner = b.place(shapes=shapes)
        b.fill(n, primary.shape)
        first, second = sorted((primary, partner), key=lambda les: les.region)
        text = f"Are the lesions in the {names[first.region]} and {names[second.region]} regions the same shape?"
        q = _Question(
            text, "yes" if same else "no", "closed", [_lesion_roi(first), _lesion_roi(second)]
        )
        q.meta["variant"] = "same_shape"
        return primary, q

    # Two hops: find the anchor by a unique property, step to its neighbour, read the shape.
    kind = ("brightest", "darkest", "largest", "smallest", "shape")[int(rng.integers(5))]
    if kind != "shape":
        attr, _, rest = _SUPERLATIVES[kind]
        b.defaults[attr] = rest
    primary = b.place(held=comp)
    r, c = divmod(primary.region, g)
    directions = [
        d for d, ((dr, dc), _) in _DIRECTIONS.items() if 0 <= r - dr < g and 0 <= c - dc < g
    ]
    directions = [directions[i] for i in rng.permutation(len(directions))]
    # When held pairs leave no neighbour a shape of its own, fall back to the
    # superlative the target's attributes already allow.
    kinds = (
        [kind]
        if kind != "shape"
        else [kind, "darkest" if primary.intensity == "bright" else "brightest"]
    )
    anchor = None
    for kind in kinds:
        if kind != "shape":
            attr, mine, rest = _SUPERLATIVES[kind]
            b.defaults[attr] = rest
        for direction in directions:
            (dr, dc), phrase = _DIRECTIONS[direction]
            anchor_region = (r - dr) * g + (c - dc)
            if kind == "shape":
                anchor = b.add(
                    region=anchor_region, shapes=[s for s in SHAPES if s != primary.shape]
                )
            else:
                superlative: dict[str, Any] = {attr: mine}
                anchor = b.add(region=anchor_region, **superlative)
            if anchor is not None:
                break
        if anchor is not None:
            break
    if anchor is None:  # pragma: no cover - a superlative anchor fits any free neighbour
        raise RuntimeError("no anchor fits beside the relational target")
    if kind == "shape":
        b.banned_shapes.add(anchor.shape)  # the anchor stays the only lesion of its shape
    # Keep the cells beyond the target empty, so "to the right of" has one reading.
    rr, cc = r + dr, c + dc
    while 0 <= rr < g and 0 <= cc < g:
        b.blocked.add(rr * g + cc)
        rr, cc = rr + dr, cc + dc
    b.fill(n, primary.shape)
    anchor_words = SHAPE_ADJECTIVE[anchor.shape] if kind == "shape" else kind
    text = f"What shape is the lesion {phrase} the {anchor_words} lesion?"
    q = _ask(cfg, rng, text, SHAPES, primary.shape, [_lesion_roi(anchor), _lesion_roi(primary)])
    q.meta.update(variant="neighbor", anchor=kind, direction=direction)
    return primary, q


# --------------------------------------------------------------------------- records and pixels


def image_name(split: str, index: int) -> str:
    """Image path relative to the output folder."""
    return f"images/{split}-{index:06d}.png"


def _meta(cfg: SynthConfig, scene: Scene, q: _Question) -> dict[str, Any]:
    names = cfg.region_names()
    held = set(cfg.held_pairs())
    target = None if scene.target is None else scene.lesions[scene.target]
    ladder = {} if scene.rung is None else {"rung": scene.rung}
    return {
        **q.meta,
        **ladder,
        "level": cfg.level,
        "n_lesions": len(scene.lesions),
        "target": scene.target,
        "held_pair": target is not None and (target.shape, target.region) in held,
        "lesions": [les.to_meta(names) for les in scene.lesions],
    }


def make_sample(cfg: SynthConfig, split: str, index: int) -> tuple[VQASample, Scene]:
    """Record `index` of `split` and its scene, without rendering pixels."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    scene, qtype, q = _build(cfg, split, index)
    sample = VQASample(
        id=f"{DATASET}-{split}-{index:06d}",
        dataset=DATASET,
        split=split,
        images=[image_name(split, index)],
        question=q.text,
        options=q.options,
        answer=q.answer,
        answer_letter=q.letter,
        answer_type=q.answer_type,  # type: ignore[arg-type]
        rois=q.rois,
        modality=scene.modality,
        organ=MODALITIES[scene.modality],
        question_type=qtype,
        meta=_meta(cfg, scene, q),
    )
    return sample, scene


def stage0_samples(cfg: SynthConfig, scene: Scene) -> list[VQASample]:
    """The stage-0 `describe`, `ground` and `inspect` records of a (train) scene, sharing its image."""
    names = cfg.region_names()
    rng = _rng(cfg, scene.split, scene.index, 2)
    common: dict[str, Any] = dict(
        dataset=DATASET, split="describe", images=[image_name(scene.split, scene.index)],
        modality=scene.modality, organ=MODALITIES[scene.modality],
    )  # fmt: skip
    meta = {
        "level": cfg.level,
        "n_lesions": len(scene.lesions),
        "lesions": [les.to_meta(names) for les in scene.lesions],
    }
    answer = "; ".join(
        f"{names[les.region]}: {les.size} {les.intensity} {les.shape}" for les in scene.lesions
    )
    describe = VQASample(
        id=f"{DATASET}-describe-{scene.split}-{scene.index:06d}",
        question="Describe the lesions.",
        answer=answer,
        answer_type="open",
        rois=[_described_roi(les) for les in scene.lesions],
        question_type="describe",
        meta={**meta, "target": None},
        **common,
    )
    # Ask for a lesion whose (size, intensity, shape) is its own: all of them in most scenes,
    # some in the crowded chain scenes (none left in 0 of 2,000 tried; then there is no ground record).
    words = Counter(les.words() for les in scene.lesions)
    named = [i for i, les in enumerate(scene.lesions) if words[les.words()] == 1]
    k = named[int(rng.integers(len(named)))] if named else 0
    les = scene.lesions[k]
    ground = VQASample(
        id=f"{DATASET}-ground-{scene.split}-{scene.index:06d}",
        question=f"Where is the {les.words()} lesion?",
        answer=names[les.region],
        answer_type="open",
        rois=[_described_roi(les)],
        question_type="ground",
        meta={**meta, "target": k},
        **common,
    )
    # Region -> content, the direction of lookup the question types need ("Is there a
    # lesion in the upper left?"): half the time a lesion's region, else an empty one.
    occupied = {les.region: i for i, les in enumerate(scene.lesions)}
    empty = [r for r in range(len(names)) if r not in occupied]
    if empty and rng.random() < 0.5:
        region = int(rng.choice(empty))
        answer, rois, target = "nothing", [ROI(box=cfg.region_box(region), label="region")], None
    else:
        target = int(rng.integers(len(scene.lesions)))
        les = scene.lesions[target]
        region, answer, rois = (
            les.region,
            f"{les.size} {les.intensity} {les.shape}",
            [_described_roi(les)],
        )
    inspect = VQASample(
        id=f"{DATASET}-inspect-{scene.split}-{scene.index:06d}",
        question=f"What is in the {names[region]} region?",
        answer=answer,
        answer_type="open",
        rois=rois,
        question_type="inspect",
        meta={**meta, "target": target},
        **common,
    )
    return [describe, ground, inspect] if named else [describe, inspect]


def render(cfg: SynthConfig, scene: Scene, *, lesions: bool = True) -> np.ndarray:
    """The scene's pixels: [image_size, image_size] uint8. `lesions=False` gives the same image without lesions."""
    rng = _rng(cfg, scene.split, scene.index, 1)
    img = background(
        rng, scene.modality, cfg.image_size,
        window=cfg.window, texture=cfg.background_texture, anatomy_blend=cfg.anatomy_blend,
        variants=cfg.anatomy_variants,
    )  # fmt: skip
    paint_rng = _rng(cfg, scene.split, scene.index, 3)
    for les in scene.lesions:
        geom = lesion_geometry(les.shape, les.cx, les.cy, les.extent, cfg.image_size)
        sign = 1.0 if les.intensity == "bright" else -1.0
        if lesions:
            paint_lesion(img, geom, sign * les.contrast, les.texture == "mottled", paint_rng)
    noise = cfg.noise if scene.rung is None else SUBTLETY_RUNGS[scene.rung][2]
    if noise > 0:
        img += noise * _rng(cfg, scene.split, scene.index, 4).standard_normal(
            img.shape, dtype=np.float32
        )
    return to_uint8(img)


def generate_samples(
    cfg: SynthConfig,
    split: str = "train",
    indices: Iterable[int] | None = None,
    *,
    render_images: bool = True,
) -> list[SynthItem]:
    """Records of `split` (all of them, or `indices`) in memory, with their scenes and pixels."""
    if indices is None:
        indices = range(cfg.split_counts()[split] if split in SPLITS else 0)
    items = []
    for i in indices:
        sample, scene = make_sample(cfg, split, i)
        items.append(SynthItem(sample, scene, render(cfg, scene) if render_images else None))
    return items


def _chunk(args: tuple[SynthConfig, str, str, int, int]) -> tuple[list[VQASample], list[VQASample]]:
    """Worker: render and save images `start..stop` of `split`; return its records and stage-0 records."""
    cfg, out_dir, split, start, stop = args
    records, stage0 = [], []
    for i in range(start, stop):
        sample, scene = make_sample(cfg, split, i)
        Image.fromarray(render(cfg, scene)).save(
            Path(out_dir) / image_name(split, i), compress_level=1
        )
        records.append(sample)
        if split == "train" and cfg.describe:
            stage0.extend(stage0_samples(cfg, scene))
    return records, stage0


def generate(
    cfg: SynthConfig,
    out_dir: str | Path,
    *,
    workers: int | None = None,
    progress: bool = False,
    chunk: int = 250,
) -> dict[str, Path]:
    """Write `images/*.png`, one JSONL per split, `describe.jsonl` and `manifest.json` under `out_dir`.

    Returns name -> path for each file written (`train` ... `compositional`,
    `describe` when enabled, `manifest`, and the `images` folder). `workers`
    defaults to up to 2 processes for large runs; the output does not depend on it.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = cfg.split_counts()
    jobs = [
        (cfg, str(out), s, a, min(a + chunk, k))
        for s, k in counts.items()
        for a in range(0, k, chunk)
    ]
    if workers is None:
        workers = 1 if cfg.n < 1000 else max(1, min(2, os.cpu_count() or 1))
    records: dict[str, list[VQASample]] = {s: [] for s in counts}
    stage0: list[VQASample] = []

    def collect(results: Iterable[tuple[list[VQASample], list[VQASample]]], advance: Any) -> None:
        for (_, _, split, a, b), (recs, st0) in zip(jobs, results, strict=True):
            records[split].extend(recs)
            stage0.extend(st0)
            advance(b - a)

    def run(advance: Any) -> None:
        if workers <= 1 or len(jobs) <= 1:
            collect(map(_chunk, jobs), advance)
        else:
            ctx = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            )
            with ctx.Pool(workers) as pool:
                collect(pool.imap(_chunk, jobs), advance)

    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        ) as bar:
            task = bar.add_task("images", total=cfg.n)
            run(lambda k: bar.advance(task, k))
    else:
        run(lambda k: None)

    paths: dict[str, Path] = {}
    for split in SPLITS:
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(records[split], paths[split])
    if cfg.describe:
        paths["describe"] = out / "describe.jsonl"
        write_jsonl(stage0, paths["describe"])
    manifest = build_manifest(cfg, records, stage0)
    paths["manifest"] = out / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    paths["images"] = out / "images"
    return paths


def build_manifest(
    cfg: SynthConfig, records: dict[str, list[VQASample]], stage0: list[VQASample]
) -> dict[str, Any]:
    """Config, counts by split and question type, lesion-count histogram, held pairs and regions."""
    names = cfg.region_names()
    counts: dict[str, Any] = {}
    for split, recs in [*records.items(), ("describe", stage0)]:
        if split == "describe" and not cfg.describe:
            continue
        counts[split] = {
            "total": len(recs),
            "by_question_type": dict(sorted(Counter(r.question_type for r in recs).items())),
            "by_n_lesions": {
                str(k): v for k, v in sorted(Counter(r.meta["n_lesions"] for r in recs).items())
            },
        }
    return {
        "dataset": DATASET,
        "config": asdict(cfg),
        "token_px": TOKEN_PX,
        "regions": list(names),
        "shapes": list(SHAPES),
        "held_pairs": [{"shape": s, "region": names[r]} for s, r in cfg.held_pairs()],
        "counts": counts,
    }


def parse_weights(text: str, known: Sequence[str], what: str) -> dict[str, float]:
    """`"a,b"` (equal weights) or `"a=2,b=1"` -> {name: weight}; unknown names are a clear error."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; expected some of {', '.join(known)}")
        try:
            out[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(
                f"bad weight {weight!r} for {what} {name!r}: expected a number"
            ) from None
    if not out:
        raise ValueError(f"no {what} given")
    return out
