"""Where each latent step points: evidence maps over the image, and how faithful they are.

Two maps per latent step k, over every visual token of a sample (all its images,
prompt order, each image in raster order of its token grid, or view by view for a
tiled image):

- **similarity**: cosine between the latent state `proj(h_{k-1})` (LM input space) and each
  post-merger visual token (the same space), turned into a distribution with a
  softmax at temperature `ExplainConfig.temperature` (0.1, the InfoNCE
  temperature the ROI alignment uses, so the map is the distribution that loss
  trains);
- **attention**: attention from the position of `z_k` to the image-token
  positions, averaged over heads and the chosen decoder layers, renormalised over
  the image tokens. It comes from the generation itself
  (`LatentVLM.generate(..., output_attentions=True)`: the latent steps run under the
  eager attention implementation, set through the model's public
  `set_attn_implementation` and restored afterwards), so the prompt runs once.

Faithfulness (`explain_metrics`) against ROI boxes: the pointing game (Zhang et
al., "Top-down neural attention by excitation backprop", ECCV 2016: a hit when
the map's peak lies in an annotated region; here the peak token cell must overlap
an ROI box) and the share of map mass inside the boxes (the mass of the
nearest-upsampled map that falls inside the boxes, pixel-exact). A seeded random
map and the uniform-map expectation are reported beside them as the floor; on
the synthetic benchmark also the rate at which the peak hits *any* lesion, since
a map that finds lesions but not the queried one should not count as pointing
(see docs/synthetic.md).

Figures, regions and metrics work on each image's cells (`TokenGrid.raster`): the
token grid itself for one-grid families; for a tiled image (SmolVLM: tiles plus a
global view) the tiles' combined grid, each global-view cell's value spread evenly
over the tile cells under it, so a step's map still sums to 1 and a peak or a mass
is one over image locations rather than over views.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medlvr.data.collate import VQACollator
from medlvr.data.roi import hop_of_steps, roi_hops
from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError
from medlvr.inference import answer_one
from medlvr.model.backbones import TokenGrid
from medlvr.model.latent import GenerationOutput, LatentVLM

MapKind = Literal["similarity", "attention"]
KINDS: tuple[MapKind, ...] = ("similarity", "attention")


@dataclass
class ExplainConfig:
    """How evidence maps are computed and summarised."""

    temperature: float = 0.1
    """Softmax temperature turning cosines into a similarity distribution (0.1 = the InfoNCE alignment's)."""
    centre: bool = False
    """Subtract the sample's mean visual token from the tokens and the latent before the cosine.
    Raw cosines share one direction common to all visual tokens (docs/synthetic.md); centring removes it."""
    layers: tuple[int, ...] | None = None
    """Decoder layers whose attention is averaged (negative counts from the top); None = all layers."""
    top_k: int = 5
    """Token cells listed per image in the regions JSON."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise MedlvrError(f"explain temperature must be > 0, got {self.temperature}")
        if self.top_k < 1:
            raise MedlvrError(f"explain top_k must be >= 1, got {self.top_k}")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
            if not self.layers:
                raise MedlvrError("explain layers: give at least one layer, or None for all")


@dataclass
class SampleMaps:
    """Evidence maps of one sample: K steps over its N visual tokens (all images, prompt order)."""

    grids: list[TokenGrid]  # one per image
    sizes: list[tuple[int, int]]  # (width, height) of each image in original pixels
    cosine: torch.Tensor  # [K, N] raw cosine between proj(h_{k-1}) and each visual token
    similarity: torch.Tensor  # [K, N] softmax(cosine / T): each row sums to 1
    attention: (
        torch.Tensor
    )  # [K, N] latent -> image-token attention, renormalised: each row sums to 1
    attention_to_image: (
        torch.Tensor
    )  # [K] share of the latent's attention that goes to image tokens at all
    recompute_gap: float  # max |proj(h_{k-1}) - z_k|: 0 when the fed inputs are the latent states (latent.input=hidden)

    @property
    def steps(self) -> int:
        return int(self.similarity.shape[0])

    def get(self, kind: MapKind) -> torch.Tensor:
        """`[K, N]` maps of one kind."""
        if kind not in KINDS:
            raise MedlvrError(f"unknown map kind {kind!r}; expected one of {', '.join(KINDS)}")
        return getattr(self, kind)

    def aggregate(self, kind: MapKind) -> torch.Tensor:
        """`[N]` mean of the K step maps (a distribution, as each step is)."""
        return self.get(kind).mean(0)

    def per_image(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Split `[..., N]` into one `[..., rows, cols]` map per image on its cells (`TokenGrid.raster`)."""
        total = sum(g.n_tokens for g in self.grids)
        if total != values.shape[-1]:
            raise MedlvrError(
                f"maps have {values.shape[-1]} tokens but the token grids hold {total}"
            )
        out, i = [], 0
        for g in self.grids:
            out.append(g.raster(values[..., i : i + g.n_tokens]))
            i += g.n_tokens
        return out

    def cells(self, values: torch.Tensor) -> torch.Tensor:
        """`[..., N]` tokens -> `[..., M]`: every image's cells, images concatenated (M = N for one-grid images)."""
        return torch.cat([m.flatten(-2) for m in self.per_image(values)], -1)


# ---------------------------------------------------------------------------- computing maps


def _grids(
    vlm: LatentVLM, images: Sequence[Image.Image]
) -> tuple[list[TokenGrid], list[tuple[int, int]]]:
    sizes = [im.size for im in images]
    return [vlm.adapter.token_grid(vlm.processor, w, h) for w, h in sizes], sizes


@torch.no_grad()
def compute_maps(
    vlm: LatentVLM,
    batch: dict[str, Any],
    output: GenerationOutput,
    images: Sequence[Sequence[Image.Image]],
    config: ExplainConfig | None = None,
) -> list[SampleMaps]:
    """Maps of every sample in a (left-padded, prompt-only) batch from its generation.

    `output` is `vlm.generate(batch, K, output_attentions=True)`: the latent states
    `proj(h_{k-1})`, the visual tokens and the latent steps' attention rows all come
    from the one latent sequence `LatentVLM` runs.
    """
    cfg = config or ExplainConfig()
    b, latent_steps = output.latents.shape[:2]
    if latent_steps == 0:
        raise MedlvrError(
            "there is nothing to explain with 0 latent steps: use --latent-steps >= 1"
        )
    if output.latent_attentions is None:
        raise MedlvrError(
            "evidence maps need the latent steps' attentions: generate with output_attentions=True"
        )
    if not output.visual_tokens or not any(v.shape[0] for v in output.visual_tokens):
        raise MedlvrError("the sample has no image to explain")
    n_layers = output.latent_attentions.shape[0]
    layers = range(n_layers) if cfg.layers is None else cfg.layers
    try:
        picked = [output.latent_attentions[i] for i in layers]  # [B, K, P + K] each
    except IndexError:
        raise MedlvrError(
            f"explain layers {cfg.layers} out of range for {n_layers} decoder layers"
        ) from None
    att = torch.stack(picked).mean(0)  # [B, K, P + K]
    ids = batch[
        "input_ids"
    ]  # [B, L]: the prompt before <|latent_start|> (column L, never an image token)
    L = ids.shape[1]
    is_img = (ids == vlm.image_token_id).to(att.device)  # [B, L]
    # The latent states the ROI loss trains: proj(h_{k-1}). They are the fed z_k themselves
    # with `latent.input=hidden` (gap 0); with `pause` the fed inputs are constants.
    mus = output.latent_means  # [B, K, d]
    gap = (mus.float() - output.latents.float()).abs().amax(dim=(1, 2))  # [B]

    out_maps = []
    for row in range(b):
        feats = output.visual_tokens[row].float()  # [N, d]
        zf = mus[row].float()  # [K, d]
        if cfg.centre:
            mean = feats.mean(0, keepdim=True)
            feats, zf = feats - mean, zf - mean
        cos = F.normalize(zf, dim=-1) @ F.normalize(feats, dim=-1).T  # [K, N]
        img_att = att[row][:, :L][
            :, is_img[row]
        ]  # [K, N]: image positions in prompt order = visual token order
        share = img_att.sum(-1)  # [K]
        grids, sizes = _grids(vlm, images[row])
        out_maps.append(
            SampleMaps(
                grids=grids,
                sizes=sizes,
                cosine=cos.cpu(),
                similarity=torch.softmax(cos / cfg.temperature, -1).cpu(),
                attention=(img_att / share.clamp_min(1e-12)[:, None]).cpu(),
                attention_to_image=share.cpu(),
                recompute_gap=float(gap[row]),
            )
        )
    return out_maps


# ---------------------------------------------------------------------------- one question


@dataclass
class Explanation:
    """One answered question with its evidence maps."""

    question: str
    answer: str
    latent_steps: int
    seconds: float  # generation time (prefill + latent steps + decoding)
    images: list[Image.Image]
    maps: SampleMaps
    config: ExplainConfig = field(default_factory=ExplainConfig)

    def regions(self) -> dict[str, Any]:
        """The JSON summary: per image and map kind, the top cells of the aggregate and of each step."""
        per_image: list[dict[str, Any]] = []
        kinds = {
            kind: self.maps.per_image(self.maps.get(kind)) for kind in KINDS
        }  # [K, rows, cols] per image
        for i, (grid, (w, h)) in enumerate(zip(self.maps.grids, self.maps.sizes)):
            entry: dict[str, Any] = {"image": i, "size": [w, h], "grid": [grid.rows, grid.cols]}
            for kind, maps in kinds.items():
                steps = maps[i]  # [K, rows, cols]
                entry[kind] = {
                    "mass": round(
                        float(steps.mean(0).sum()), 6
                    ),  # share of the sample's map on this image
                    "aggregate": top_regions(steps.mean(0), grid, self.config.top_k),
                    "steps": [top_regions(s, grid, self.config.top_k) for s in steps],
                }
            per_image.append(entry)
        return {
            "question": self.question,
            "answer": self.answer,
            "latent_steps": self.latent_steps,
            "seconds": round(self.seconds, 4),
            "attention_to_image": [round(float(v), 6) for v in self.maps.attention_to_image],
            "images": per_image,
        }

    def figure(self):
        return render_figure(self)

    def save(self, png: str | Path, json_path: str | Path | None = None) -> tuple[Path, Path]:
        """Write the PNG figure and the regions JSON (default: beside the PNG, `.json`)."""
        png = Path(png)
        png.parent.mkdir(parents=True, exist_ok=True)
        fig = self.figure()
        fig.savefig(png, dpi=100)
        jpath = Path(json_path) if json_path is not None else png.with_suffix(".json")
        jpath.write_text(json.dumps(self.regions(), indent=2) + "\n", encoding="utf-8")
        return png, jpath


def explain(
    vlm: LatentVLM,
    images: Sequence[Image.Image],
    question: str,
    options: dict[str, str] | None = None,
    *,
    latent_steps: int | None = None,
    max_new_tokens: int = 32,
    config: ExplainConfig | None = None,
) -> Explanation:
    """Answer one question with K latent steps and compute where each step points (one generation)."""

    cfg = config or ExplainConfig()
    images = [im.convert("RGB") for im in images]
    if not images:
        raise MedlvrError("explanations need at least one image")
    k = vlm.resolve_steps(latent_steps)
    if k < 1:
        raise MedlvrError(
            f"there is nothing to explain with {k} latent steps: use --latent-steps >= 1"
        )
    ans = answer_one(
        vlm,
        images,
        question,
        options,
        latent_steps=k,
        max_new_tokens=max_new_tokens,
        output_attentions=True,
    )
    maps = compute_maps(vlm, ans.batch, ans.output, [images], cfg)[0]
    return Explanation(question, ans.text, k, ans.seconds, images, maps, cfg)


def top_regions(values: torch.Tensor, grid: TokenGrid, k: int) -> list[dict[str, Any]]:
    """The `k` highest cells of a `[rows, cols]` map: cell (row, col), box in original pixels, score."""
    flat = values.reshape(-1)
    k = min(k, flat.numel())
    scores, idx = flat.topk(k)
    out = []
    for s, i in zip(scores.tolist(), idx.tolist()):
        r, c = divmod(i, grid.cols)
        box = [c * grid.cell_w, r * grid.cell_h, (c + 1) * grid.cell_w, (r + 1) * grid.cell_h]
        out.append({"cell": [r, c], "box": [round(v, 2) for v in box], "score": round(s, 6)})
    return out


def upsample(values: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """A `[rows, cols]` map brought to `size = (width, height)` pixels: `[height, width]` array."""
    w, h = size
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    up = F.interpolate(values.float()[None, None], size=(h, w), mode=mode, **kw)
    return up[0, 0].numpy()


def render_figure(ex: Explanation):
    """A matplotlib figure (Agg, no pyplot state): per image and map kind, the image, each step's map and their mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = ex.maps.steps
    n_img = len(ex.images)
    cols = k + 2
    rows = n_img * len(KINDS)
    fig = Figure(figsize=(1.9 * cols, 2.1 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    per_kind = {kind: ex.maps.per_image(ex.maps.get(kind)) for kind in KINDS}
    for ki, kind in enumerate(KINDS):
        for i, image in enumerate(ex.images):
            r = ki * n_img + i
            steps = per_kind[kind][i]  # [K, rows, cols]
            panels = [None, *steps, steps.mean(0)]
            titles = (
                [f"image {i + 1}" if n_img > 1 else "image"]
                + [f"{kind[:3]} z{j + 1}" for j in range(k)]
                + [f"{kind} mean"]
            )
            for c, (panel, title) in enumerate(zip(panels, titles)):
                ax = axes[r][c]
                ax.imshow(image, cmap="gray")
                if panel is not None:
                    heat = upsample(panel, image.size)
                    span = float(heat.max() - heat.min())
                    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
                    ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
                    title += f"\nmass {float(panel.sum()):.2f}" if n_img > 1 else ""
                ax.set_title(title, fontsize=8)
                ax.set_axis_off()
    fig.suptitle(
        f"Q: {_short(ex.question)}\nA: {_short(ex.answer)}   (K={ex.latent_steps}, {ex.seconds * 1000:.0f} ms)",
        fontsize=9,
    )
    return fig


def figure_image(ex: Explanation) -> Image.Image:
    """The figure as a PIL image (for the web demo)."""
    fig = render_figure(ex)
    canvas = fig.canvas
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------------------- faithfulness


def roi_coverage(
    grid: TokenGrid, size: tuple[int, int], boxes: Sequence[Sequence[float]]
) -> torch.Tensor:
    """`[rows, cols]`: fraction of each grid cell's pixels inside the union of `boxes` (original pixels).

    A pixel belongs to the cell its centre falls in and is inside a box when its
    centre is, so the mass of a nearest-upsampled map inside the boxes is exactly
    `sum(map * coverage)`.
    """
    w, h = size
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    inside = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    row = np.minimum((ys / grid.cell_h).astype(int), grid.rows - 1)
    col = np.minimum((xs / grid.cell_w).astype(int), grid.cols - 1)
    cell = (row[:, None] * grid.cols + col[None, :]).ravel()
    hits = np.bincount(cell, weights=inside.ravel().astype(float), minlength=grid.rows * grid.cols)
    total = np.bincount(cell, minlength=grid.rows * grid.cols).clip(min=1)
    return torch.from_numpy(hits / total).float().reshape(grid.rows, grid.cols)


def normalise(values: torch.Tensor) -> torch.Tensor:
    """A non-negative map scaled to sum to 1 (a uniform map if it is all zero)."""
    values = values.float().clamp_min(0)
    total = values.sum()
    return values / total if total > 0 else torch.full_like(values, 1.0 / values.numel())


def roi_mass(values: torch.Tensor, coverage: torch.Tensor) -> float:
    """Share of a map's mass inside the ROIs (`coverage` from `roi_coverage`, same shape)."""
    return float((normalise(values) * coverage.float()).sum())


def pointing_hit(values: torch.Tensor, coverage: torch.Tensor) -> bool:
    """Pointing game: does the map's peak cell overlap an ROI box? (first maximum on ties)."""
    return bool(coverage.reshape(-1)[int(values.reshape(-1).argmax())] > 0)


def sample_coverage(
    sample: VQASample,
    grids: Sequence[TokenGrid],
    sizes: Sequence[tuple[int, int]],
    boxes_of: Callable[[VQASample, int], list] | None = None,
) -> torch.Tensor:
    """`[M]` ROI coverage of all of a sample's cells (`SampleMaps.cells` order; its visual tokens for one-grid images)."""
    parts = []
    for i, (g, s) in enumerate(zip(grids, sizes)):
        boxes = (
            boxes_of(sample, i)
            if boxes_of is not None
            else [r.box for r in sample.rois if r.image == i]
        )
        parts.append(roi_coverage(g, s, boxes).reshape(-1))
    return torch.cat(parts)


def _hop_boxes(hop_of: Sequence[int], hop: int) -> Callable[[VQASample, int], list]:
    """The boxes of one hop's ROIs on an image (`sample_coverage`'s `boxes_of`)."""
    return lambda sample, image: [
        r.box for r, h in zip(sample.rois, hop_of) if h == hop and r.image == image
    ]


def _lesion_boxes(sample: VQASample, image: int) -> list:
    """Every lesion of a synthetic scene (its meta), for the any-lesion pointing reference."""
    return [les["box"] for les in sample.meta.get("lesions", []) if image == 0 and "box" in les]


def explain_metrics(
    vlm: LatentVLM,
    samples: Sequence[VQASample],
    latent_steps: int | None = None,
    *,
    images: Sequence[Sequence[Image.Image]] | None = None,
    batch_size: int = 8,
    config: ExplainConfig | None = None,
    seed: int = 0,
    image_loader: Callable[[str], Image.Image] | None = None,
) -> dict[str, Any]:
    """Faithfulness of the evidence maps on samples with ROIs: pointing game and ROI mass.

    For each map kind (`similarity`, `attention`): the aggregate map's pointing
    hit rate and ROI mass, and the same per latent step; beside them `random` (a
    seeded random map per sample) and `chance` (the expectation of a uniformly
    random peak / a uniform map). On synthetic scenes (lesion boxes in `meta`),
    `any_lesion_pointing` is the rate at which the peak hits some lesion, queried
    or not. Samples without ROIs or images are skipped and counted.

    `images` (one list per sample) skips loading from the samples' paths.
    """
    cfg = config or ExplainConfig()
    k = vlm.resolve_steps(latent_steps)
    if k < 1:
        raise MedlvrError(f"explanation metrics need latent steps >= 1, got {k}")
    if images is not None and len(images) != len(samples):
        raise MedlvrError(f"{len(samples)} samples but {len(images)} image lists")
    if batch_size < 1:
        raise MedlvrError(f"batch_size must be >= 1, got {batch_size}")
    pairs = [(s, None if images is None else images[i]) for i, s in enumerate(samples)]
    kept = [(s, im) for s, im in pairs if s.rois and (s.images or im)]
    if not kept:
        raise MedlvrError(
            "no sample has both an image and an ROI: explanation metrics need ROI annotations"
        )
    if image_loader is None:
        from medlvr.data.images import load_image

        image_loader = load_image
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    gen = torch.Generator().manual_seed(seed)

    names = [*KINDS, "random"]
    hits: dict[str, list[float]] = {n: [] for n in names}
    mass: dict[str, list[float]] = {n: [] for n in names}
    step_hits: dict[str, list[list[float]]] = {n: [] for n in KINDS}
    step_mass: dict[str, list[list[float]]] = {n: [] for n in KINDS}
    any_hits: dict[str, list[float]] = {n: [] for n in names}
    chance_hit, chance_mass, gaps, to_image = [], [], [], []
    # Per-hop pointing (multi-hop records): does step k peak on the ROI of the hop it is
    # assigned to under chain alignment, against a random map and against the other hops?
    hop_hits: dict[str, list[float]] = {n: [] for n in names}
    hop_other: list[float] = []
    by_hop: dict[
        int, dict[str, list[float]]
    ] = {}  # hop j -> similarity / random hits of the steps assigned to it
    for start in range(0, len(kept), batch_size):
        chunk = kept[start : start + batch_size]
        imgs = [
            [
                im.convert("RGB")
                for im in (given if given is not None else [image_loader(p) for p in s.images])
            ]
            for s, given in chunk
        ]
        batch = collate([s for s, _ in chunk], images=imgs)
        out = vlm.generate(
            batch, k, max_new_tokens=1, output_attentions=True
        )  # the chain does not depend on the answer
        for (sample, _), sm in zip(chunk, compute_maps(vlm, batch, out, imgs, cfg)):
            cov = sample_coverage(sample, sm.grids, sm.sizes)  # [M] cells
            lesions = (
                sample_coverage(sample, sm.grids, sm.sizes, _lesion_boxes)
                if sample.meta.get("lesions")
                else None
            )
            maps: dict[str, torch.Tensor] = {
                kind: sm.cells(sm.aggregate(kind)) for kind in KINDS
            }  # [M] each
            # A random map over the tokens, placed on the cells as the model's maps are.
            maps["random"] = sm.cells(normalise(torch.rand(sm.similarity.shape[-1], generator=gen)))
            for name, m in maps.items():
                hits[name].append(float(pointing_hit(m, cov)))
                mass[name].append(roi_mass(m, cov))
                if lesions is not None:
                    any_hits[name].append(float(pointing_hit(m, lesions)))
            for kind in KINDS:
                steps = sm.cells(sm.get(kind))  # [K, M]
                step_hits[kind].append([float(pointing_hit(s, cov)) for s in steps])
                step_mass[kind].append([roi_mass(s, cov) for s in steps])
            hop_of = roi_hops(sample)
            if hop_of is not None and max(hop_of) > 0:
                n_hops = max(hop_of) + 1
                hop_cov = [
                    sample_coverage(sample, sm.grids, sm.sizes, _hop_boxes(hop_of, j))
                    for j in range(n_hops)
                ]
                step_maps: dict[str, torch.Tensor] = {
                    kind: sm.cells(sm.get(kind)) for kind in KINDS
                }  # [K, M] each
                step_maps["random"] = sm.cells(
                    normalise(torch.rand(k, sm.similarity.shape[-1], generator=gen))
                )
                for step, j in enumerate(hop_of_steps(k, n_hops)):
                    for name, m in step_maps.items():
                        hop_hits[name].append(float(pointing_hit(m[step], hop_cov[j])))
                        if name in ("similarity", "random"):
                            by_hop.setdefault(j + 1, {"similarity": [], "random": []})[name].append(
                                hop_hits[name][-1]
                            )
                    others = [c for i, c in enumerate(hop_cov) if i != j]
                    hop_other.append(
                        float(any(pointing_hit(step_maps["similarity"][step], c) for c in others))
                    )
            chance_hit.append(float((cov > 0).float().mean()))
            chance_mass.append(float(cov.mean()))
            gaps.append(sm.recompute_gap)
            to_image.append(float(sm.attention_to_image.mean()))

    def mean(xs: Sequence[float]) -> float | None:
        return float(np.mean(xs)) if len(xs) else None

    result: dict[str, Any] = {
        "n": len(kept),
        "skipped_no_roi": len(samples) - len(kept),
        "latent_steps": k,
        "config": {
            "temperature": cfg.temperature,
            "centre": cfg.centre,
            "layers": None if cfg.layers is None else list(cfg.layers),
        },
        "chance": {"pointing": mean(chance_hit), "roi_mass": mean(chance_mass)},
        "attention_to_image": mean(to_image),
        "max_recompute_gap": max(gaps),
    }
    if hop_other:
        result["hop_pointing"] = {name: mean(v) for name, v in hop_hits.items()}
        result["hop_pointing"]["similarity_other_hops"] = mean(hop_other)
        result["hop_pointing"]["steps"] = len(hop_other)
        result["hop_pointing"]["by_hop"] = {
            str(j): {
                "similarity": mean(v["similarity"]),
                "random": mean(v["random"]),
                "steps": len(v["similarity"]),
            }
            for j, v in sorted(by_hop.items())
        }
    for name in names:
        entry: dict[str, Any] = {"pointing": mean(hits[name]), "roi_mass": mean(mass[name])}
        if any_hits[name]:
            entry["any_lesion_pointing"] = mean(any_hits[name])
        if name in KINDS:
            entry["per_step"] = {
                "pointing": np.mean(step_hits[name], 0).tolist(),
                "roi_mass": np.mean(step_mass[name], 0).tolist(),
            }
        result[name] = entry
    return result


def format_metrics(m: dict[str, Any]) -> str:
    """A small plain-text table of `explain_metrics` output (for the CLI and reports)."""
    lines = [
        f"evidence maps, K={m['latent_steps']}, n={m['n']} (skipped without ROI: {m['skipped_no_roi']})"
    ]
    lines.append(f"{'map':<12}{'pointing':>10}{'ROI mass':>10}")
    for name in (*KINDS, "random", "chance"):
        e = m[name]
        lines.append(f"{name:<12}{e['pointing']:>10.3f}{e['roi_mass']:>10.3f}")
    return "\n".join(lines)


__all__ = [
    "ExplainConfig",
    "SampleMaps",
    "Explanation",
    "compute_maps",
    "explain",
    "explain_metrics",
    "format_metrics",
    "roi_coverage",
    "roi_mass",
    "pointing_hit",
    "normalise",
    "top_regions",
    "upsample",
    "render_figure",
    "figure_image",
]
