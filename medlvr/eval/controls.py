"""Grounding controls: what a model answers when its images are blanked, swapped or removed.

A control changes only the images a question is shown; prompt, scoring and
everything else stay as in the real run. The conditions (`IMAGE_CONTROLS`):

- `none`: the real images.
- `blank`: each image replaced by an image of the same size and PIL mode,
  every pixel grey 128 (the mid value of 8-bit channels: (128, 128, 128) in
  RGB). Same size, so the prompt holds as many visual tokens as with the
  real image; only the content is gone.
- `shuffled`: every question gets the images of another question, a fixed
  derangement for a fixed seed (`shuffle_donors`). Questions are permuted
  within groups of equal image count, so a multi-image question keeps its
  image count.
- `question-only`: no image at all: the prompt is built without image
  placeholders (the question's image list is emptied before collation).

Image dependence = accuracy with real images minus accuracy with blank images,
on the same questions. A model that keeps its accuracy on blank images answers
from the question's wording and the dataset's answer priors, not from the
image: RL-tuned medical VLMs keep most of their VQA-RAD accuracy this way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from medlvr.data.schema import VQASample

__all__ = [
    "IMAGE_CONTROLS",
    "REAL",
    "GREY",
    "condition_of",
    "order_conditions",
    "blank_like",
    "shuffle_donors",
    "kept_own",
]

REAL = "none"
IMAGE_CONTROLS: tuple[str, ...] = (REAL, "blank", "shuffled", "question-only")
GREY = 128
"""The fill value of a blank image, in every channel."""


def condition_of(row: Mapping[str, Any]) -> str:
    """The image condition of a prediction row (rows written before controls existed are `none`)."""
    return str(row.get("image_control") or REAL)


def order_conditions(conditions: Iterable[str]) -> list[str]:
    """Known conditions in `IMAGE_CONTROLS` order, then any other name sorted."""
    seen = set(conditions)
    return [c for c in IMAGE_CONTROLS if c in seen] + sorted(seen - set(IMAGE_CONTROLS))


def blank_like(image: Image.Image) -> Image.Image:
    """An image of the same size and mode as `image`, every channel `GREY`."""
    bands = len(image.getbands())
    return Image.new(image.mode, image.size, GREY if bands == 1 else (GREY,) * bands)


def shuffle_donors(samples: Iterable[VQASample], seed: int = 0) -> dict[str, str]:
    """Question id -> id of the question whose images it is shown under `shuffled`.

    Questions are sorted by id and grouped by image count (questions without
    images are left out); each group is permuted with `numpy.random.default_rng(seed)`,
    then every question that still shares an image path with its donor swaps
    donors with another question of its group for which the swap leaves both
    free of their own images (datasets ask several questions about one image,
    so a plain permutation of questions is not enough). The result depends only
    on the seed and the set of questions, never on their order, batching or
    sharding. Where no such swap exists (a group of one, or one image behind
    most of a group's questions) the question keeps an own image: `kept_own`
    counts those.
    """
    rng = np.random.default_rng(seed)
    groups: dict[int, list[VQASample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.id):
        if s.images:
            groups[len(s.images)].append(s)
    donors: dict[str, str] = {}
    for count in sorted(groups):
        group = groups[count]
        paths = [frozenset(s.images) for s in group]
        n = len(group)
        perm = rng.permutation(n)  # question i is shown the images of question perm[i]
        for i in range(n):
            if not paths[perm[i]] & paths[i]:
                continue
            start = int(rng.integers(n))
            for j in (int((start + t) % n) for t in range(n)):
                # After the swap i holds perm[j] and j holds perm[i]: both must be free of their own images.
                if not paths[perm[j]] & paths[i] and not paths[perm[i]] & paths[j]:
                    perm[i], perm[j] = perm[j], perm[i]
                    break
        donors.update({group[i].id: group[int(perm[i])].id for i in range(n)})
    return donors


def kept_own(samples: Iterable[VQASample], donors: Mapping[str, str]) -> list[str]:
    """Ids of the questions that share an image with their donor (a derangement was impossible for them)."""
    by_id = {s.id: s for s in samples}
    return [sid for sid, d in donors.items() if set(by_id[sid].images) & set(by_id[d].images)]
