"""VLPO rollouts: G trajectories per prompt on a shared prefix, and their log-probabilities.

A trajectory is `[prompt] <|latent_start|> z_1 .. z_K <|latent_end|> answer <stop>`
with `z_k ~ N(mu_k, sigma^2 I)`, `mu_k = proj(h_{k-1})`, and answer tokens sampled at
temperature T. `LatentVLM.generate(..., group_size=G)` prefills each prompt once and
repeats its KV cache G times (rows `b*G .. b*G+G-1` belong to prompt b).

Sampling order (documented so shared-prefix and per-sample rollouts are comparable):
every latent step draws one `[B*G, d]` standard-normal block from the generator, then
every answer step one `torch.multinomial` over `[B*G, V]`, all from one generator. A
per-sample rollout of the same prompts repeated G times (`group_size=1` on the
G-times-repeated batch) therefore consumes exactly the same random numbers in the
same order; only the prefill differs (once per prompt instead of G times).

Once a trajectory is finished its inputs are all known, so one parallel forward
(`vlm(batch_repeated, latent_inputs=z)`) recomputes every log-probability at once:
answer tokens under `softmax(logits / T)` (the distribution they were sampled from)
and latent steps under `gaussian_logprob(z, mu, sigma, vlpo.latent_logprob)` with mu
recomputed by the current policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from medlvr.data.collate import VQACollator
from medlvr.data.schema import VQASample
from medlvr.model.latent import LatentVLM, gaussian_logprob


@dataclass
class Rollouts:
    """N = B*G finished trajectories (row i belongs to prompt i // G)."""

    samples: list[VQASample]  # [N] the prompt's sample, repeated G times
    images: list[list[Image.Image]]  # [N] the prompt's images, repeated G times (same objects)
    texts: list[str]  # [N] decoded answers
    token_ids: list[list[int]]  # [N] answer tokens, stop token excluded
    stop_tokens: list[
        int | None
    ]  # [N] the stop token that ended the rollout (sampled: trained); None at the token limit
    latents: torch.Tensor  # [N, K, d] sampled latent inputs z_k
    latent_means: torch.Tensor  # [N, K, d] the means they were sampled around (rollout policy)
    group_size: int
    timings: dict[str, float] = field(default_factory=dict)
    visual_tokens: list[torch.Tensor] = field(
        default_factory=list
    )  # [N] the prompt's [n_i, d] from the prefill (detached)

    @property
    def stopped(self) -> list[bool]:
        """`[N]` the rollout ended with a stop token (not the token limit)."""
        return [t is not None for t in self.stop_tokens]


def repeat_rows(items: Sequence[Any], g: int) -> list[Any]:
    """`[a, b] -> [a, a, b, b]` for g = 2: the row order of `generate(..., group_size=g)`."""
    return [x for x in items for _ in range(g)]


@torch.no_grad()
def sample_rollouts(
    vlm: LatentVLM,
    collator: VQACollator,
    samples: Sequence[VQASample],
    images: Sequence[Sequence[Image.Image]],
    *,
    group_size: int,
    latent_steps: int,
    temperature: float,
    latent_sigma: float,
    max_new_tokens: int,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    shared_prefix: bool = True,
) -> Rollouts:
    """G sampled trajectories per prompt.

    `shared_prefix=False` is the naive reference: the batch is built from every prompt
    repeated G times and prefilled G times (same random stream, see the module docstring).
    """
    g = group_size
    per_row = (
        (lambda items: repeat_rows(items, g)) if shared_prefix else list
    )  # generate's rows -> the N rows
    if shared_prefix:
        batch = collator(list(samples), images=[list(i) for i in images])
        out = vlm.generate(
            batch,
            latent_steps,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            latent_sigma=latent_sigma,
            group_size=g,
            generator=generator,
        )
    else:
        batch = collator(repeat_rows(samples, g), images=repeat_rows([list(i) for i in images], g))
        out = vlm.generate(
            batch,
            latent_steps,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            latent_sigma=latent_sigma,
            group_size=1,
            generator=generator,
        )
    return Rollouts(
        samples=repeat_rows(samples, g),
        images=repeat_rows([list(i) for i in images], g),
        texts=list(out.texts),
        token_ids=[list(t) for t in out.token_ids],
        stop_tokens=list(out.stop_tokens),
        latents=out.latents,
        latent_means=out.latent_means,
        group_size=g,
        timings=dict(out.timings),
        visual_tokens=per_row(out.visual_tokens),
    )


def answer_tensors(
    token_ids: Sequence[Sequence[int]], stop_tokens: Sequence[int | None], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled responses -> `answer_ids [N, T]`, `answer_mask [N, T]` for the training forward.

    Each row's own stop token (`stop_tokens`, the one `generate` sampled, e.g. `<|endoftext|>`
    rather than the chat turn's `<|im_end|>`) is appended where the rollout stopped: its
    probability is part of the trajectory's. A rollout cut at the limit (None) has none.
    Right-padded with `pad_id` (masked out). Every row keeps at least one position, so an
    empty, unstopped row is all padding.
    """
    rows = [
        list(ids) + ([stop] if stop is not None else [])
        for ids, stop in zip(token_ids, stop_tokens)
    ]
    t = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
    return ids, mask


def pad_id(vlm: LatentVLM) -> int:
    """The id that pads answer rows (masked out): the tokenizer's, else the first stop id."""
    pad = vlm.tokenizer.pad_token_id
    return int(pad if pad is not None else vlm.stop_ids[0])


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages `[N]`: reward minus its group's mean, divided by the group's std if `scale`.

    `rewards [N]` with N = B*G in `generate`'s row order. The std is the unbiased one
    (as in GRPO's reference implementation); `eps` keeps an all-equal group at 0.
    """
    r = rewards.float().view(-1, group_size)  # [B, G]
    adv = r - r.mean(-1, keepdim=True)
    if scale and group_size > 1:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def flat_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[B]` bool: the group's rewards are all equal (zero advantage, no learning signal)."""
    r = rewards.float().view(-1, group_size)
    return (r.max(-1).values - r.min(-1).values).abs() < 1e-8


def latents_are_actions(latent_steps: int, latent_policy: bool, latent_sigma: float) -> bool:
    """Whether the latent steps are policy actions (trained; in the ratio, clipping and KL).

    Not when there are none, when the latent policy is off, or when sigma = 0 (the
    latents are then deterministic context): only the answer tokens are actions.
    """
    return latent_steps > 0 and latent_policy and latent_sigma > 0


def unit_mask(answer_mask: torch.Tensor, latent_steps: int, latent_actions: bool) -> torch.Tensor:
    """The policy units of trajectories, `[N, K + T]`: K latent steps (all or none), then the answer tokens.

    The one mask of the update: the loss, its normaliser and every per-unit statistic use it.
    """
    lat = answer_mask.new_full((answer_mask.shape[0], latent_steps), int(latent_actions))
    return torch.cat([lat, answer_mask], 1)


@dataclass
class TrajectoryLogprobs:
    """Log-probabilities of N finished trajectories under one policy."""

    logp: torch.Tensor  # [N, K + T] latent steps (Gaussian, per dimension or summed; 0 as context), answer tokens (0 on padding)
    entropy: torch.Tensor  # [N, T] answer-token entropy under softmax(logits / T) (detached)
    latent_means: torch.Tensor  # [N, K, d] mu_k recomputed under this policy
    visual_tokens: list[torch.Tensor]  # per row [n_i, d] (from the same pass)


def trajectory_logprobs(
    model: Any,
    batch: dict[str, Any],
    latents: torch.Tensor,
    *,
    temperature: float,
    latent_sigma: float,
    latent_policy: bool = True,
    latent_logprob: str = "mean",
) -> TrajectoryLogprobs:
    """One parallel forward over finished trajectories: every unit's log-probability.

    `model` is the `LatentVLM` (or its DDP wrapper); `batch` holds the prompts and the
    `answer_ids`/`answer_mask` built by `answer_tensors`; `latents [N, K, d]` are the
    sampled z, whose log-densities are `latent_logprob` (`mean` or `sum`, see
    `gaussian_logprob`). With `latent_policy=False` (or sigma = 0) the latent steps are
    context, not actions: their units are 0. Which units are actions is `unit_mask`.
    """
    out = model(batch, latent_inputs=latents)
    answer = batch["answer_ids"].to(out.logits.device)
    amask = batch["answer_mask"].to(out.logits.device)
    scaled = out.logits.float() / max(temperature, 1e-6)  # [N, T, V]
    logp_all = torch.log_softmax(scaled, -1)
    tok = logp_all.gather(-1, answer.unsqueeze(-1)).squeeze(-1) * amask  # [N, T]
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1) * amask  # [N, T]
    k = latents.shape[1]
    if latents_are_actions(k, latent_policy, latent_sigma):
        lat = gaussian_logprob(
            latents.to(out.latent_means.device), out.latent_means, latent_sigma, latent_logprob
        )  # [N, K]
    else:
        lat = tok.new_zeros(tok.shape[0], k)
    return TrajectoryLogprobs(
        logp=torch.cat([lat, tok], 1),
        entropy=entropy,
        latent_means=out.latent_means,
        visual_tokens=out.visual_tokens,
    )


__all__ = [
    "Rollouts",
    "TrajectoryLogprobs",
    "sample_rollouts",
    "answer_tensors",
    "pad_id",
    "group_advantages",
    "flat_groups",
    "repeat_rows",
    "trajectory_logprobs",
    "latents_are_actions",
    "unit_mask",
]
