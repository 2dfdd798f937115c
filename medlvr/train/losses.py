"""Training losses as pure functions of tensors (no model, no config objects).

ROI alignment (stage 1) lives here; the VLPO engineer adds `policy_loss` (PPO-clipped
ratio over answer tokens and latent steps) and `kl_k3` next to it.

Conventions: `latents [B, K, d]` are the model's latent states (in the language
model's input space, like the visual tokens), `targets [B, K, d]` the pooled ROI
tokens, `mask [B]` marks the samples aligned (`alignment_mask`). Every function returns the
loss *per sample* `[B]` (zero where masked out), so the caller chooses the normaliser:
the SFT loop divides by the number of samples `alignment_mask` counts in the whole
optimizer step, which makes one process and several processes (any sharding) give the
same gradient.
Targets are always detached here: the alignment moves the latents, never the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import torch
import torch.nn.functional as F

from medlvr.config import PolicyAggregation

ALIGN_KINDS = ("cosine", "mse", "infonce")


def cosine_alignment(
    latents: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """`1 - cos(z_k, t_k)`, averaged over the K steps: `[B]`, zero where `mask` is False."""
    cos = F.cosine_similarity(latents.float(), targets.detach().float(), dim=-1, eps=1e-6)  # [B, K]
    return (1.0 - cos).mean(-1) * mask.to(cos.dtype)


def mse_alignment(latents: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per dimension, averaged over the K steps: `[B]`, zero where masked."""
    err = (latents.float() - targets.detach().float()).pow(2).mean(-1)  # [B, K]
    return err.mean(-1) * mask.to(err.dtype)


def infonce_alignment(
    latents: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    negatives: torch.Tensor,
    negatives_mask: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """InfoNCE: each latent must pick its ROI target out of the image's other visual tokens.

    `negatives [B, N, d]` are the sample's non-ROI visual tokens (padded; `negatives_mask
    [B, N]` marks real ones, or `[B, K, N]` the ones of each step: `align.negatives=other_hops`). Logits are cosine similarities over `temperature`; the
    positive sits at index 0. Distractor lesions are among the negatives, so, unlike
    plain cosine, the loss cannot be met by the direction every visual token shares
    or by "any lesion" (docs/synthetic.md). Returns `[B]`, zero where masked.
    """
    z = F.normalize(latents.float(), dim=-1, eps=1e-6)  # [B, K, d]
    pos = F.normalize(targets.detach().float(), dim=-1, eps=1e-6)  # [B, K, d]
    neg = F.normalize(negatives.detach().float(), dim=-1, eps=1e-6)  # [B, N, d]
    pos_logit = (z * pos).sum(-1, keepdim=True)  # [B, K, 1]
    neg_logit = torch.einsum("bkd,bnd->bkn", z, neg)  # [B, K, N]
    step_mask = negatives_mask if negatives_mask.dim() == 3 else negatives_mask[:, None, :]
    neg_logit = neg_logit.masked_fill(~step_mask.bool(), float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], -1) / temperature  # [B, K, 1 + N]
    nll = -torch.log_softmax(logits, -1)[..., 0]  # [B, K]
    return nll.mean(-1) * mask.to(nll.dtype)


def alignment_loss(
    kind: str,
    latents: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    negatives: torch.Tensor | None = None,
    negatives_mask: torch.Tensor | None = None,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Per-sample alignment loss `[B]` of the given kind (`cosine`, `mse`, `infonce`)."""
    if latents.shape != targets.shape:
        raise ValueError(
            f"latents {tuple(latents.shape)} and targets {tuple(targets.shape)} differ"
        )
    if kind == "cosine":
        return cosine_alignment(latents, targets, mask)
    if kind == "mse":
        return mse_alignment(latents, targets, mask)
    if kind == "infonce":
        if negatives is None or negatives_mask is None:
            raise ValueError("infonce needs negatives and negatives_mask")
        return infonce_alignment(latents, targets, mask, negatives, negatives_mask, temperature)
    raise ValueError(f"unknown alignment kind {kind!r}; expected one of {', '.join(ALIGN_KINDS)}")


def alignment_mask(
    roi_index: Sequence[torch.Tensor], n_tokens: Sequence[int], kind: str
) -> torch.Tensor:
    """`[B]` bool: the samples whose alignment term carries a signal, the ones its normaliser counts.

    A sample counts when its ROI covers some of its `n_tokens` visual tokens (`roi_index` may be
    empty: no ROI, or an ROI on no image) and, for InfoNCE, not all of them: without negatives
    the softmax has one entry and the loss is 0 whatever the latents.
    """
    counts = [int(idx.numel()) for idx in roi_index]
    return torch.tensor(
        [c > 0 and (kind != "infonce" or c < n) for c, n in zip(counts, n_tokens)], dtype=torch.bool
    )


def pad_tokens(
    tokens: Sequence[torch.Tensor], d: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-sample token sets `[N_i, d]` into `[B, max N, d]` with a `[B, max N]` mask."""
    n = max((int(t.shape[0]) for t in tokens), default=0)
    n = max(n, 1)  # keep a column so shapes stay valid when every set is empty
    out = torch.zeros(len(tokens), n, d, device=device, dtype=torch.float32)
    m = torch.zeros(len(tokens), n, dtype=torch.bool, device=device)
    for i, t in enumerate(tokens):
        if t.shape[0]:
            out[i, : t.shape[0]] = t.float()
            m[i, : t.shape[0]] = True
    return out, m


def sample_mean_ce(token_logprobs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Answer cross-entropy per sample `[B]`: the mean over that sample's answer tokens.

    Averaging per sample first (not over all tokens of the batch) makes a sum over any
    split of a batch equal the sum over the whole batch, so DDP shards and gradient
    accumulation give exactly the single-process gradient.
    """
    n = answer_mask.sum(-1).clamp_min(1).to(token_logprobs.dtype)
    return -(token_logprobs * answer_mask).sum(-1) / n


__all__ = [
    "ALIGN_KINDS",
    "alignment_loss",
    "alignment_mask",
    "cosine_alignment",
    "mse_alignment",
    "infonce_alignment",
    "pad_tokens",
    "sample_mean_ce",
    "kl_k3",
    "policy_loss",
    "policy_normaliser",
]


# ---------------------------------------------------------------------------- VLPO (stage 2)
# A trajectory's policy "units" are its K latent steps followed by its T answer tokens:
# `logp [N, K + T]` holds the latent log-densities (`gaussian_logprob`, per dimension or
# summed: `vlpo.latent_logprob`) and the answer-token log-probabilities side by side,
# `mask [N, K + T]` marks the units that are actions (`rollout.unit_mask`).


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || ref) per unit (Schulman, "Approximating KL divergence", 2020).

    With `x = ref_logp - logp`: `exp(x) - x - 1`, unbiased under samples from pi, >= 0,
    and 0 exactly where the two log-probabilities agree. For latent steps it is applied to
    whichever log-density `vlpo.latent_logprob` chose: the per-dimension one (the geometric-
    mean density ratio of one latent dimension) or the step's whole density. `x` is clamped
    to [-20, 20] so a far-off reference cannot overflow `exp`.
    """
    x = (ref_logp.float() - logp.float()).clamp(-20.0, 20.0)
    return torch.exp(x) - x - 1.0


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    latent_steps: int = 0,
    latent_clip_low: float | None = None,
    latent_clip_high: float | None = None,
    aggregation: PolicyAggregation = "token",
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped surrogate over latent steps and answer tokens, plus beta x k3 KL: per sequence `[N]`.

    `logp, old_logp, mask [N, U]`, `advantages [N]` (one per trajectory, shared by its units).
    The ratio `exp(logp - old_logp)` is clipped to `[1 - clip_low, 1 + clip_high]` (separate
    epsilons as in DAPO's clip-higher); the first `latent_steps` units (latent steps, whose
    ratio is a density ratio on another scale) to `[1 - latent_clip_low, 1 + latent_clip_high]`
    (None: the token range). Per unit: `-min(r A, clip(r) A) + beta * k3`.

    Returns per-sequence values whose *sum* the caller divides by a normaliser computed
    over the whole optimizer step (all micro-batches and processes, `policy_normaliser`):
    - `token`: the sum over the sequence's units (normaliser: the step's unit count), so
      every latent step and token weighs the same (DAPO's token-level loss);
    - `sequence`: the mean over the sequence's units (normaliser: the step's trajectory
      count), GRPO's original per-sample mean.
    This keeps gradient accumulation and any sharding equal to the single-batch loss.
    Stats (detached, sums over real units, for the caller to reduce): `clipped`, `kl`, `ratio`,
    `units`, and the latent units' share: `latent_clipped`, `latent_units`.
    """
    if aggregation not in get_args(PolicyAggregation):
        raise ValueError(f"unknown aggregation {aggregation!r}; expected token or sequence")
    if not (logp.shape == old_logp.shape == mask.shape):
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} differ"
        )
    m = mask.to(torch.float32)
    adv = advantages.float()[:, None]  # [N, 1]
    ratio = torch.exp(logp.float() - old_logp.float().detach())  # [N, U]
    low = ratio.new_full(ratio.shape[1:], 1.0 - clip_low)  # [U] per-unit bounds
    high = ratio.new_full(ratio.shape[1:], 1.0 + clip_high)
    low[:latent_steps] = 1.0 - (clip_low if latent_clip_low is None else latent_clip_low)
    high[:latent_steps] = 1.0 + (clip_high if latent_clip_high is None else latent_clip_high)
    clipped_ratio = torch.clamp(ratio, min=low, max=high)
    unit = -torch.minimum(
        ratio * adv, clipped_ratio * adv
    )  # [N, U]; the clipped branch has no gradient
    kl = torch.zeros_like(unit)
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp.detach())
        if beta:
            unit = unit + beta * kl
    per_seq = (unit * m).sum(-1)  # [N]
    if aggregation == "sequence":
        per_seq = per_seq / m.sum(-1).clamp_min(1.0)
    # A unit counts as clipped when the clipped branch won the min (its gradient is zero).
    clipped = ((clipped_ratio * adv < ratio * adv).detach() & mask.bool()).float()  # [N, U]
    stats = {
        "clipped": clipped.sum().detach(),
        "kl": (kl.detach() * m).sum(),
        "ratio": (ratio.detach() * m).sum(),
        "units": m.sum(),
        "latent_clipped": clipped[:, :latent_steps].sum(),
        "latent_units": m[:, :latent_steps].sum(),
    }
    return per_seq, stats


def policy_normaliser(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """This batch's share of the normaliser for `policy_loss`: its unit count or its trajectory count."""
    if aggregation == "token":
        return mask.to(torch.float32).sum()
    return torch.tensor(float(mask.shape[0]))
