"""Checks that matter for grounded data: boxes inside images, ROIs that reach visual tokens, no leaked answers.

- `roi_problems`: every ROI lies inside its image (as `load_image` reads it) and maps to at least
  one visual token of a backbone's grid.
- `question_only_baseline`: a bag-of-words naive Bayes that sees only the question and its
  options, trained on one split and scored on another, per question type, next to the
  type's prior (always the most frequent training answer). A template that leaks its answer
  lets the baseline beat the prior; grounded questions must not.
- `medlvr.data.ground.split.split_leaks`: no patient or image in two splits.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medlvr.data.ground.annotations import image_size
from medlvr.data.schema import VQASample

if TYPE_CHECKING:
    from medlvr.model.backbones import TokenGrid


def roi_problems(
    samples: Sequence[VQASample], token_grid: Callable[[int, int], TokenGrid] | None = None
) -> list[str]:
    """One line per ROI outside its image or (given `token_grid(width, height) -> TokenGrid`) reaching no token."""
    from medlvr.data.roi import box_to_tokens

    sizes: dict[str, tuple[int, int]] = {}
    problems = []
    for s in samples:
        for roi in s.rois:
            path = s.images[roi.image]
            if path not in sizes:
                sizes[path] = image_size(path)
            w, h = sizes[path]
            x0, y0, x1, y1 = roi.box
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                problems.append(f"{s.id}: box {list(roi.box)} is not inside its {w}x{h} image")
            elif token_grid is not None and not box_to_tokens(roi.box, token_grid(w, h), w, h):
                problems.append(f"{s.id}: box {list(roi.box)} reaches no visual token")
    return problems


@dataclass
class BaselineScore:
    """Question-only accuracy of one question type against its prior."""

    question_type: str
    n: int
    accuracy: float
    prior: float


def question_only_baseline(
    train: Sequence[VQASample], test: Sequence[VQASample]
) -> dict[str, BaselineScore]:
    """Per question type: accuracy of a naive Bayes over the words of question + options, and of the prior."""
    out = {}
    question_types = sorted({s.question_type or "-" for s in test})
    for qtype in question_types:
        tr = [s for s in train if (s.question_type or "-") == qtype]
        te = [s for s in test if (s.question_type or "-") == qtype]
        if not tr or not te:
            continue
        model = _NaiveBayes([_words(s) for s in tr], [s.gold for s in tr])
        prior = Counter(s.gold for s in tr).most_common(1)[0][0]
        accuracy = sum(model.predict(_words(s)) == s.gold for s in te) / len(te)
        out[qtype] = BaselineScore(
            qtype, len(te), accuracy, sum(s.gold == prior for s in te) / len(te)
        )
    return out


def _words(s: VQASample) -> list[str]:
    text = s.question + " " + " ".join(f"{k} {v}" for k, v in sorted(s.options.items()))
    return re.findall(r"[a-z0-9]+", text.lower())


class _NaiveBayes:
    """Multinomial naive Bayes with add-one smoothing; ties go to the more frequent class."""

    def __init__(self, docs: Sequence[list[str]], labels: Sequence[str]):
        self.prior = Counter(labels)
        self.counts: dict[str, Counter] = defaultdict(Counter)
        for words, label in zip(docs, labels):
            self.counts[label].update(words)
        self.vocab = {w for c in self.counts.values() for w in c}
        self.totals = {label: sum(c.values()) for label, c in self.counts.items()}

    def predict(self, words: list[str]) -> str:
        n = sum(self.prior.values())
        v = len(self.vocab) + 1

        def score(label: str) -> tuple[float, int]:
            logp = math.log(self.prior[label] / n)
            logp += sum(
                math.log((self.counts[label][w] + 1) / (self.totals[label] + v))
                for w in words
                if w in self.vocab
            )
            return logp, self.prior[label]

        return max(sorted(self.prior), key=score)
