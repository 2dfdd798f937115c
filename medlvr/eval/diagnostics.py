"""Diagnostics of the latent chain: is it the reader or the producer that fails?

Three measurements, each a function of a `LatentVLM` and questions with per-hop ROIs
(`meta.roi_hops`, e.g. the synthetic chain questions):

- **Latent sources** (`LATENT_SOURCES`, `medlvr eval --latents`): answer with the latent
  inputs replaced. `gold` feeds every step the per-hop ROI target the ROI alignment trains it
  towards (`align.assign=chain`: `medlvr.data.roi.assigned_targets`); `gold-prefix` feeds gold
  to the steps of the hops before the last and lets the model produce the last hop's steps
  itself; `shuffled-gold` feeds gold pooled from the question's own image at *another*
  question's boxes (a reader that reads its latents drops to chance there). A reader that
  answers from gold latents and not from its own says the producer fails.
- **Next-hop pointing under teacher forcing** (`next_hop_pointing`): given the gold latents of
  hops 1..j-1, do the model's own latent states for hop j peak on hop j's ROI? (The peak of
  the cosine between the state `proj(h_{k-1})` and the visual tokens, as the similarity
  evidence map of `medlvr.explain`; a seeded random map is the floor.)
- **Linear probes of the latent states** (`latent_probes`): a logistic regression fitted on
  one set of questions and scored on another, decoding the region of each hop's ROI (a cell
  of an n x n grid over the image, from the mean of the states chain alignment assigns to
  that hop) and the answer (from the last latent state), by question depth.

`latent_diagnostics` runs the last two for one model (what the demo reports per latent arm).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medlvr.data.collate import VQACollator
from medlvr.data.roi import assigned_targets, hop_of_steps, hop_roi_indices, roi_hops
from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError
from medlvr.model.backbones import TokenGrid

LatentSource = Literal["own", "gold", "gold-prefix", "shuffled-gold"]
LATENT_SOURCES: tuple[str, ...] = get_args(LatentSource)

__all__ = [
    "LATENT_SOURCES",
    "LatentSource",
    "LatentSourcePredictor",
    "box_region",
    "check_source",
    "fit_probe",
    "given_latents",
    "gold_donors",
    "latent_diagnostics",
    "latent_probes",
    "latent_states",
    "n_hops",
    "next_hop_pointing",
]


def check_source(source: str) -> str:
    if source not in LATENT_SOURCES:
        raise MedlvrError(f"latents must be one of {', '.join(LATENT_SOURCES)}, got {source!r}")
    return source


def n_hops(sample: VQASample) -> int:
    """The number of hops of a question (`meta.hops`; 1 without multi-hop metadata)."""
    hops = roi_hops(sample)
    return max(hops) + 1 if hops else 1


def gold_donors(samples: Sequence[VQASample], seed: int = 0) -> dict[str, str]:
    """Question id -> the question whose boxes its `shuffled-gold` latents are pooled at.

    Questions with ROIs are grouped by their number of hops (so the donor's boxes split over
    the K steps as the question's own would) and permuted with a seeded generator; a
    question left with itself, or with a donor of the same boxes, takes its neighbour's.
    Depends only on the seed and the set of questions.
    """
    rng = np.random.default_rng(seed)
    groups: dict[int, list[VQASample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.id):
        if s.rois:
            groups[n_hops(s)].append(s)
    donors: dict[str, str] = {}
    for h in sorted(groups):
        group = groups[h]
        n = len(group)
        perm = rng.permutation(n)
        for i, s in enumerate(group):
            j = int(perm[i])
            if n > 1 and _boxes(group[j]) == _boxes(s):
                j = next(
                    (t % n for t in range(i + 1, i + n) if _boxes(group[t % n]) != _boxes(s)), j
                )
            donors[s.id] = group[j].id
    return donors


def _boxes(s: VQASample) -> list[tuple[int, tuple[float, ...]]]:
    return [(r.image, tuple(r.box)) for r in s.rois]


def _hop_index(
    sample: VQASample, grids: list[TokenGrid], sizes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    return hop_roi_indices(sample, grids, sizes) if grids else []


def _collator(vlm: Any, reasoning: str = "latent") -> VQACollator:
    return VQACollator(
        vlm.processor,
        vlm.adapter,
        reasoning=reasoning,  # type: ignore[arg-type]
        with_answers=False,
        with_rois=False,
        sample_fields={"roi_hop_index": _hop_index},
    )


def given_latents(
    visual: Sequence[torch.Tensor],
    hop_index: Sequence[Sequence[torch.Tensor]],
    hops: Sequence[int],
    k: int,
    source: str,
    before_hop: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Latent inputs `[B, K, d]` and the steps they replace `[B, K]` for a latent source (None: own).

    `visual[i]` are sample i's visual tokens, `hop_index[i]` the token indices of each hop's ROIs
    (the donor's boxes for `shuffled-gold`), `hops[i]` its number of hops. `gold` and
    `shuffled-gold` replace every step, `gold-prefix` the steps of the hops before the last;
    `before_hop[i]` (0-based) replaces instead the steps of hops before that one. A sample
    without ROI tokens keeps its own latents.
    """
    check_source(source)
    if source == "own" and before_hop is None:
        return None
    d = visual[0].shape[-1]
    inputs = torch.zeros(len(visual), k, d, dtype=visual[0].dtype, device=visual[0].device)
    mask = torch.zeros(len(visual), k, dtype=torch.bool)
    for i, (vis, idx) in enumerate(zip(visual, hop_index)):
        if not idx or any(t.numel() == 0 for t in idx) or k == 0:
            continue
        every = torch.cat(list(idx)).unique()
        inputs[i] = assigned_targets(vis, every, k, "chain", list(idx)).to(inputs.dtype)
        steps = torch.tensor(hop_of_steps(k, len(idx)))
        if before_hop is not None:
            mask[i] = steps < before_hop[i]
        elif source == "gold-prefix":
            mask[i] = steps < hops[i] - 1
        else:
            mask[i] = True
    return inputs, mask


class LatentSourcePredictor:
    """A `LatentVLM` as a harness `Predictor` answering with the latent inputs of a latent source.

    `samples` are all the questions of the run (the `shuffled-gold` donors are drawn among
    them with `seed`, so they never depend on batching).
    """

    def __init__(
        self,
        vlm: Any,
        source: str,
        samples: Sequence[VQASample],
        max_new_tokens: int,
        seed: int = 0,
    ):
        self.vlm, self.source = vlm, check_source(source)
        self.max_new_tokens = max_new_tokens
        self.by_id = {s.id: s for s in samples}
        self.donors = gold_donors(samples, seed) if source == "shuffled-gold" else {}
        self.collate = _collator(vlm)

    def __call__(
        self,
        samples: Sequence[VQASample],
        images: Sequence[Sequence[Image.Image]],
        latent_steps: int,
    ) -> list[Any]:
        from medlvr.eval.harness import Generated

        batch = self.collate(list(samples), images=[list(imgs) for imgs in images])
        given = None
        if latent_steps > 0 and self.source != "own":
            hop_index = batch["roi_hop_index"]
            if self.source == "shuffled-gold":
                hop_index = [
                    _donor_index(self.by_id.get(self.donors.get(s.id, s.id), s), imgs, self.vlm)
                    for s, imgs in zip(samples, images)
                ]
            visual = self.vlm.visual_tokens(batch)
            given = given_latents(
                visual, hop_index, [n_hops(s) for s in samples], latent_steps, self.source
            )
        with torch.inference_mode():
            out = self.vlm.generate(
                batch,
                latent_steps,
                max_new_tokens=self.max_new_tokens,
                latent_inputs=None if given is None else given[0],
                latent_given=None if given is None else given[1],
            )
        return [Generated(text, len(ids)) for text, ids in zip(out.texts, out.token_ids)]


def _donor_index(donor: VQASample, images: Sequence[Image.Image], vlm: Any) -> list[torch.Tensor]:
    """The donor's per-hop boxes as token indices of this question's images (none where they do not fit)."""
    sizes = [im.size for im in images]
    grids = [vlm.adapter.token_grid(vlm.processor, w, h) for w, h in sizes]
    try:
        return hop_roi_indices(donor, grids, sizes)
    except MedlvrError:
        return []


# ---------------------------------------------------------------------------- running the chain


def _batches(
    samples: Sequence[VQASample],
    images: Sequence[Sequence[Image.Image]] | None,
    batch_size: int,
    loader: Callable[[str], Image.Image] | None,
):
    if images is not None and len(images) != len(samples):
        raise MedlvrError(f"{len(samples)} samples but {len(images)} image lists")
    read: Callable[[str], Image.Image] = loader or _default_loader()
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        imgs = [
            [im.convert("RGB") for im in images[start + i]]
            if images is not None
            else [read(p).convert("RGB") for p in s.images]
            for i, s in enumerate(chunk)
        ]
        yield chunk, imgs


def _default_loader() -> Callable[[str], Image.Image]:
    from medlvr.data.images import load_image

    return load_image


def _with_rois(samples: Sequence[VQASample]) -> list[VQASample]:
    kept = [s for s in samples if s.rois and s.images]
    if not kept:
        raise MedlvrError("latent diagnostics need questions with images and ROIs")
    return kept


def _cells(grids: Sequence[TokenGrid], values: torch.Tensor) -> torch.Tensor:
    """`[..., N]` visual tokens -> `[..., M]` image cells (`TokenGrid.raster`, images concatenated)."""
    out, i = [], 0
    for g in grids:
        out.append(g.raster(values[..., i : i + g.n_tokens]).flatten(-2))
        i += g.n_tokens
    return torch.cat(out, -1)


def _hop_cover(
    sample: VQASample, grids: Sequence[TokenGrid], sizes: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Per hop `[M]` bool: the cells its ROIs cover (the pointing game's targets, as in `medlvr.explain`)."""
    from medlvr.explain import _hop_boxes, sample_coverage

    hop_of = roi_hops(sample) or [0] * len(sample.rois)
    return [
        sample_coverage(sample, grids, sizes, _hop_boxes(hop_of, j)) > 0
        for j in range(max(hop_of) + 1)
    ]


@torch.no_grad()
def next_hop_pointing(
    vlm: Any,
    samples: Sequence[VQASample],
    latent_steps: int | None = None,
    *,
    images: Sequence[Sequence[Image.Image]] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    image_loader: Callable[[str], Image.Image] | None = None,
) -> dict[str, Any]:
    """Given gold latents for hops 1..j-1, does the model's own state for hop j peak on hop j's ROI?

    For every question of h >= 2 hops and every hop j = 2..h: the steps chain alignment gives
    hops before j are fed their gold targets, the rest run on the model's own states; each
    step of hop j (`hop_of_steps`) counts a hit when the peak of its cosine to the visual tokens
    lies on a cell of hop j's ROI. Beside it per hop: a seeded random map's hit rate (the
    floor), the share of peaks on the previous hop's ROI (the chain not moving on), and with
    no gold prefix at all (the model's own chain, as `medlvr eval --explain-metrics` measures).
    """
    k = vlm.resolve_steps(latent_steps)
    if k < 1:
        raise MedlvrError(f"next-hop pointing needs latent steps >= 1, got {k}")
    deep = [s for s in _with_rois(samples) if n_hops(s) >= 2]
    if images is not None:
        by_id = {s.id: im for s, im in zip(samples, images)}
        images = [by_id[s.id] for s in deep]
    if not deep:
        raise MedlvrError("next-hop pointing needs questions of 2 or more hops (meta.roi_hops)")
    gen = torch.Generator().manual_seed(seed)
    collate = _collator(vlm)
    tally: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for chunk, imgs in _batches(deep, images, batch_size, image_loader):
        batch = collate(chunk, images=imgs)
        visual = vlm.visual_tokens(batch)
        geo = [_geometry(vlm, im) for im in imgs]
        covers = [_hop_cover(s, g, z) for s, (g, z) in zip(chunk, geo)]
        hops = [n_hops(s) for s in chunk]
        own = vlm.generate(batch, k, max_new_tokens=1).latent_means  # no prefix: the own chain
        for j in range(1, max(hops)):  # 0-based hop j after a gold prefix of hops 0..j-1
            given = given_latents(visual, batch["roi_hop_index"], hops, k, "own", [j] * len(chunk))
            assert given is not None
            gold = vlm.generate(
                batch, k, max_new_tokens=1, latent_inputs=given[0], latent_given=given[1]
            ).latent_means
            for i in (i for i, h in enumerate(hops) if h > j):
                steps = [t for t, h in enumerate(hop_of_steps(k, hops[i])) if h == j]
                if not steps:
                    continue
                grids, t = geo[i][0], tally[j + 1]
                for name, means in (("gold_prefix", gold), ("own_prefix", own)):
                    peaks = _peaks(grids, means[i, steps], visual[i])
                    t[name].extend(covers[i][j][peaks].float().tolist())
                    if name == "gold_prefix":
                        t["previous_hop"].extend(covers[i][j - 1][peaks].float().tolist())
                rand = _cells(grids, torch.rand(len(steps), visual[i].shape[0], generator=gen))
                t["random"].extend(covers[i][j][rand.argmax(-1)].float().tolist())
                t["questions"].append(1.0)

    def mean(xs: list[float]) -> float | None:
        return float(np.mean(xs)) if xs else None

    return {
        "latent_steps": k,
        "questions": len(deep),
        "by_hop": {
            str(j): {
                "pointing": mean(t["gold_prefix"]),
                "random": mean(t["random"]),
                "previous_hop": mean(t["previous_hop"]),
                "own_prefix": mean(t["own_prefix"]),
                "steps": len(t["gold_prefix"]),
                "questions": len(t["questions"]),
            }
            for j, t in sorted(tally.items())
        },
    }


def _peaks(grids: Sequence[TokenGrid], states: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """`[s]` the image cell where each state's cosine to the visual tokens peaks."""
    cos = F.normalize(states.float(), dim=-1) @ F.normalize(visual.float(), dim=-1).T  # [s, N]
    return _cells(grids, cos).argmax(-1)


def _geometry(vlm: Any, images: Sequence[Image.Image]):
    sizes = [im.size for im in images]
    return [vlm.adapter.token_grid(vlm.processor, w, h) for w, h in sizes], sizes


@torch.no_grad()
def latent_states(
    vlm: Any,
    samples: Sequence[VQASample],
    latent_steps: int | None = None,
    *,
    images: Sequence[Sequence[Image.Image]] | None = None,
    batch_size: int = 16,
    source: str = "own",
    image_loader: Callable[[str], Image.Image] | None = None,
) -> torch.Tensor:
    """`[n, K, d]` the latent states `proj(h_{k-1})` of each question's chain (float32, CPU)."""
    k = vlm.resolve_steps(latent_steps)
    collate = _collator(vlm)
    out = []
    for chunk, imgs in _batches(samples, images, batch_size, image_loader):
        batch = collate(chunk, images=imgs)
        given = None
        if source != "own":
            given = given_latents(
                vlm.visual_tokens(batch),
                batch["roi_hop_index"],
                [n_hops(s) for s in chunk],
                k,
                source,
            )
        gen = vlm.generate(
            batch,
            k,
            max_new_tokens=1,
            latent_inputs=None if given is None else given[0],
            latent_given=None if given is None else given[1],
        )
        out.append(gen.latent_means.float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------- linear probes


def box_region(box: Sequence[float], width: int, height: int, grid: int = 3) -> int:
    """The cell (row-major, 0..grid^2-1) of an n x n grid over the image holding the box's centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = min(int(cx / width * grid), grid - 1)
    row = min(int(cy / height * grid), grid - 1)
    return row * grid + col


def fit_probe(
    x: torch.Tensor, y: Sequence[Any], *, l2: float = 1e-3, iters: int = 200
) -> Callable[[torch.Tensor], list[Any]]:
    """A multinomial logistic regression on standardised features `x [n, f]` (L-BFGS), as a predictor."""
    classes = sorted(set(y), key=str)
    if len(classes) < 2:
        only = classes[0]
        return lambda z: [only] * len(z)
    index = {c: i for i, c in enumerate(classes)}
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    t = torch.tensor([index[c] for c in y])
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        max_iter=iters,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, t) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_, b_ = w.detach(), b.detach()
    return lambda z: [classes[i] for i in (((z - mu) / sd) @ w_ + b_).argmax(-1).tolist()]


def _probe(
    fit: list[tuple[torch.Tensor, Any, int]], score: list[tuple[torch.Tensor, Any, int]]
) -> dict[str, Any]:
    """Fit on `fit` (feature, label, group), score on `score`: accuracy per group and the majority floor."""
    if not fit or not score:
        return {"accuracy": None, "chance": None, "n": len(score), "by_hops": {}}
    predict = fit_probe(torch.stack([f for f, _, _ in fit]), [y for _, y, _ in fit])
    pred = predict(torch.stack([f for f, _, _ in score]))
    majority = Counter(y for _, y, _ in fit).most_common(1)[0][0]
    groups: dict[int, list[tuple[bool, bool]]] = defaultdict(list)
    for (_, y, g), p in zip(score, pred):
        groups[g].append((p == y, majority == y))
    every = [v for vs in groups.values() for v in vs]
    return {
        "accuracy": float(np.mean([a for a, _ in every])),
        "chance": float(np.mean([c for _, c in every])),
        "n": len(score),
        "by_hops": {
            str(g): {
                "accuracy": float(np.mean([a for a, _ in v])),
                "chance": float(np.mean([c for _, c in v])),
                "n": len(v),
            }
            for g, v in sorted(groups.items())
        },
    }


def _rows(
    samples: Sequence[VQASample],
    states: torch.Tensor,
    images_size: Callable[[VQASample], tuple[int, int]],
    grid: int,
) -> tuple[list[tuple[torch.Tensor, Any, int]], dict[int, list[tuple[torch.Tensor, Any, int]]]]:
    """Answer rows (last state, answer, hops) and per-hop region rows (hop's mean state, cell, hops)."""
    k = states.shape[1]
    answer, region = [], defaultdict(list)
    for s, z in zip(samples, states):
        h = n_hops(s)
        answer.append((z[-1], s.answer.strip().lower(), h))
        hop_of = roi_hops(s) or [0] * len(s.rois)
        steps = hop_of_steps(k, h)
        w, ht = images_size(s)
        for j in range(h):
            mine = [t for t, hj in enumerate(steps) if hj == j]
            box = next((r.box for r, hj in zip(s.rois, hop_of) if hj == j), None)
            if mine and box is not None:
                region[j + 1].append((z[mine].mean(0), box_region(box, w, ht, grid), h))
    return answer, region


def latent_probes(
    vlm: Any,
    fit: Sequence[VQASample],
    score: Sequence[VQASample],
    latent_steps: int | None = None,
    *,
    grid: int = 3,
    batch_size: int = 16,
    image_loader: Callable[[str], Image.Image] | None = None,
) -> dict[str, Any]:
    """Linear probes of the latent states, fitted on `fit` and scored on `score` (two splits).

    `answer`: the answer (its text) from the last latent state, by question depth;
    `region`: per hop j, the grid cell of hop j's ROI (an n x n grid, `grid`) from the mean of
    the states chain alignment assigns to hop j. Each beside the majority class of `fit` (chance).
    """
    k = vlm.resolve_steps(latent_steps)
    if k < 1:
        raise MedlvrError(f"latent probes need latent steps >= 1, got {k}")
    fit, score = _with_rois(fit), _with_rois(score)
    sizes: dict[str, tuple[int, int]] = {}
    read: Callable[[str], Image.Image] = image_loader or _default_loader()

    def load(path: str) -> Image.Image:
        im = read(path)
        sizes[path] = im.size
        return im

    def size_of(s: VQASample) -> tuple[int, int]:
        return sizes[s.images[0]]

    rows = [
        _rows(
            part,
            latent_states(vlm, part, k, batch_size=batch_size, image_loader=load),
            size_of,
            grid,
        )
        for part in (fit, score)
    ]
    (fa, fr), (sa, sr) = rows
    return {
        "latent_steps": k,
        "fit": len(fit),
        "scored": len(score),
        "grid": grid,
        "answer": _probe(fa, sa),
        "region": {str(j): _probe(fr.get(j, []), sr.get(j, [])) for j in sorted(set(fr) | set(sr))},
    }


def latent_diagnostics(
    vlm: Any,
    fit: Sequence[VQASample],
    score: Sequence[VQASample],
    latent_steps: int | None = None,
    *,
    batch_size: int = 16,
    seed: int = 0,
    image_loader: Callable[[str], Image.Image] | None = None,
) -> dict[str, Any]:
    """The producer's gates for one model: next-hop pointing with a gold prefix on `score`, and
    the latent probes fitted on `fit` and scored on `score` (what the demo reports per latent arm)."""
    deep = any(len(set(roi_hops(s) or [])) >= 2 for s in score)
    return {
        # One-hop questions (the subtlety ladder) have no next hop: nothing to point at.
        "next_hop_pointing": next_hop_pointing(
            vlm, score, latent_steps, batch_size=batch_size, seed=seed, image_loader=image_loader
        )
        if deep
        else {"latent_steps": vlm.resolve_steps(latent_steps), "questions": 0, "by_hop": {}},
        "probes": latent_probes(
            vlm, fit, score, latent_steps, batch_size=batch_size, image_loader=image_loader
        ),
    }
