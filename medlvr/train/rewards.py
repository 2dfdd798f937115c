"""VLPO reward functions: one small contract, the evaluation scorer as the accuracy reward.

A reward function is any callable

    fn(sample: VQASample, response: str, latents: Tensor [K, d], context: RewardContext) -> float

`latents` are the latent inputs z_k the rollout actually fed (after Gaussian
exploration), `context` carries what some rewards need beyond the text (the
sample's visual tokens and ROI indices, whether the rollout stopped, the
training step). Built-ins are registered by name (`accuracy`, `format`,
`roi_evidence`, `roi_evidence_first`, `roi_evidence_chain`); a user reward is named by
import path, `package.module:function`, in the config's `vlpo.rewards` mapping (name ->
weight). The total reward is the weighted sum; every component is also logged on its own.

`accuracy` is `medlvr.eval.metrics.accuracy_reward`, the very function the
evaluation reports, so RL optimises what is measured (as nanochat's `Task`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from medlvr.data.roi import assigned_targets
from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError
from medlvr.eval.metrics import accuracy_reward, score


@dataclass
class RewardContext:
    """What a reward may look at besides the sample, the response text and the latents."""

    stopped: bool = True
    """The rollout ended with the stop token (False: it hit `max_new_tokens`)."""
    n_tokens: int = 0
    """Answer tokens generated (stop token excluded)."""
    visual_tokens: torch.Tensor | None = None
    """[N, d] the sample's post-merger visual tokens under the rollout policy (detached), if computed."""
    roi_index: torch.Tensor | None = None
    """Indices into `visual_tokens` covered by the sample's ROIs (empty: no ROI)."""
    assign: str = "raster"
    """Which ROI tokens each latent is scored against (`align.assign` of ROI-SFT: raster, first, chain);
    the loop sets `RewardSet.assign`, named by the ROI-evidence reward."""
    roi_hop_index: list[torch.Tensor] | None = None
    """Per hop, the indices of that hop's ROIs (the collator's `roi_hop_index`), read when `assign` is chain."""
    step: int = 0
    """Optimizer step at which the rollout was sampled (for schedules in user rewards)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free room for user rewards (the loop leaves it empty)."""


class RewardFn(Protocol):
    def __call__(
        self, sample: VQASample, response: str, latents: torch.Tensor, context: RewardContext
    ) -> float: ...


def accuracy(
    sample: VQASample, response: str, latents: torch.Tensor, context: RewardContext
) -> float:
    """1.0 when the evaluation scorer marks the response correct, else 0.0 (invalid answers earn 0)."""
    return accuracy_reward(sample, response)


def format_reward(
    sample: VQASample, response: str, latents: torch.Tensor, context: RewardContext
) -> float:
    """1.0 when the answer parses under the evaluation parser and the rollout stopped by itself.

    "Parses" is `score(...).invalid is False`: the same rule that counts invalid
    answers in the report, so format and accuracy never disagree about what an
    answer is. A rollout cut off at the token limit earns 0 even if it parses.
    """
    if not context.stopped:
        return 0.0
    return 0.0 if score(sample, response).invalid else 1.0


def roi_evidence(
    sample: VQASample, response: str, latents: torch.Tensor, context: RewardContext
) -> float:
    """Mean cosine between the latents z_k and their ROI targets, in [-1, 1].

    Targets are `assigned_targets(visual_tokens, roi_index, K, context.assign, ...)`, the
    targets of ROI-SFT's alignment loss under the same `align.assign` (`first`: only z_1,
    against the mean ROI token). VLPO names the assignment with the reward (`ROI_EVIDENCE`):
    `roi_evidence` scores raster chunks (ROI-SFT's default), `roi_evidence_chain` the hops of a
    checkpoint trained with `align.assign=chain`. A sample without ROI, or a run without latent
    steps, earns 0 (no evidence to point at; the group advantage removes the constant).
    """
    k = latents.shape[0]
    if (
        k == 0
        or context.visual_tokens is None
        or context.roi_index is None
        or context.roi_index.numel() == 0
    ):
        return 0.0
    targets = assigned_targets(
        context.visual_tokens, context.roi_index, k, context.assign, context.roi_hop_index
    ).float()  # [K or 1, d]
    z = latents[: targets.shape[0]].to(targets.device).float()  # [K or 1, d]
    return float(F.cosine_similarity(z, targets, dim=-1).mean())


ROI_EVIDENCE = {
    "roi_evidence": "raster",
    "roi_evidence_first": "first",
    "roi_evidence_chain": "chain",
}
"""The names of `roi_evidence` and the `align.assign` each scores under (`RewardSet.assign`)."""

BUILTIN: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "format": format_reward,
    **dict.fromkeys(ROI_EVIDENCE, roi_evidence),
}
"""Rewards available by name; anything else is an import path `module:function`."""

NEEDS_VISUAL = set(ROI_EVIDENCE)
"""Built-ins that need the visual tokens in the context (the loop computes them only then)."""


def resolve_reward(name: str) -> RewardFn:
    """A built-in by name, or a callable by import path `package.module:function`."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise MedlvrError(
            f"unknown reward {name!r}: use one of {', '.join(BUILTIN)} or an import path module:function"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise MedlvrError(f"reward {name!r}: cannot import {module_name!r} ({err})") from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise MedlvrError(f"reward {name!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise MedlvrError(f"reward {name!r} is not callable")
    return fn


class RewardSet:
    """Weighted rewards: `total = sum_i w_i * r_i`, with every component kept for logging."""

    def __init__(self, weights: Mapping[str, float]):
        active = {n: float(w) for n, w in weights.items() if float(w) != 0.0}
        if not active:
            raise MedlvrError("vlpo.rewards has no reward with a non-zero weight")
        self.weights = active
        self.fns: dict[str, RewardFn] = {n: resolve_reward(n) for n in active}
        assigns = sorted({ROI_EVIDENCE[n] for n in active if n in ROI_EVIDENCE})
        if len(assigns) > 1:
            raise MedlvrError(
                f"vlpo.rewards scores ROI evidence under {' and '.join(assigns)}: keep one of "
                f"{', '.join(n for n in ROI_EVIDENCE if n in active)}"
            )
        self.assign = (
            assigns[0] if assigns else "raster"
        )  # every context's `assign`: the ROI-evidence reward's

    @property
    def needs_visual(self) -> bool:
        """Whether the loop must put visual tokens and ROI indices into the contexts."""
        return any(
            n in NEEDS_VISUAL or getattr(self.fns[n], "needs_visual", False) for n in self.fns
        )

    def __call__(
        self,
        samples: Sequence[VQASample],
        responses: Sequence[str],
        latents: torch.Tensor,
        contexts: Sequence[RewardContext],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards for N trajectories: total `[N]` and each component `[N]` (unweighted).

        `latents` is `[N, K, d]`; row i is scored against `samples[i]`.
        """
        n = len(samples)
        if not (len(responses) == len(contexts) == latents.shape[0] == n):
            raise MedlvrError(
                f"reward inputs disagree: {n} samples, {len(responses)} responses, {latents.shape[0]} latents, {len(contexts)} contexts"
            )
        parts: dict[str, torch.Tensor] = {}
        for name, fn in self.fns.items():
            vals = []
            for s, r, z, c in zip(samples, responses, latents, contexts):
                v = fn(s, r, z, c)
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    raise MedlvrError(
                        f"reward {name!r} returned {type(v).__name__}, expected a float"
                    ) from None
                if v != v or v in (float("inf"), float("-inf")):
                    raise MedlvrError(f"reward {name!r} returned {v} for sample {s.id}")
                vals.append(v)
            parts[name] = torch.tensor(vals, dtype=torch.float32)
        total = sum(self.weights[k] * v for k, v in parts.items())
        return total, parts  # type: ignore[return-value]


__all__ = [
    "RewardContext",
    "RewardFn",
    "RewardSet",
    "accuracy",
    "format_reward",
    "roi_evidence",
    "resolve_reward",
    "BUILTIN",
    "ROI_EVIDENCE",
]
