"""VLPO: latent log-densities, the clipped loss and KL, shared-prefix rollouts, and a short run that learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from medlvr.config import LatentConfig, VLPOConfig, load_config
from medlvr.data.collate import VQACollator
from medlvr.data.schema import read_jsonl
from medlvr.model.latent import LatentVLM, gaussian_logprob
from medlvr.train.data import load_image
from medlvr.train.losses import kl_k3, policy_loss, policy_normaliser
from medlvr.train.rollout import (
    answer_tensors,
    flat_groups,
    group_advantages,
    pad_id,
    repeat_rows,
    sample_rollouts,
    trajectory_logprobs,
    unit_mask,
)

# ---------------------------------------------------------------------------- pure functions


def test_latent_logprob_is_the_per_dimension_gaussian_density():
    """`gaussian_logprob = (sum_d log N(z_d; mu_d, sigma) + d (log sigma + log(2 pi) / 2)) / d`.

    i.e. the exact log-density of the sampled step with its constant `-d log(sigma sqrt(2 pi))`
    dropped (it cancels in ratios and in the KL's log-ratio), divided by d so one latent step
    weighs like one token.
    """
    torch.manual_seed(0)
    for d, sigma in ((8, 0.05), (64, 0.3), (3, 1.7)):
        mu = torch.randn(4, 3, d)
        z = mu + sigma * torch.randn(4, 3, d)
        exact = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)  # [4, 3]
        const = d * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
        assert torch.allclose(gaussian_logprob(z, mu, sigma), (exact + const) / d, atol=1e-5)
        # ratios are the d-th root of the exact density ratio
        mu2 = mu + 0.01
        exact_ratio = torch.distributions.Normal(mu2, sigma).log_prob(z).sum(-1) - exact
        assert torch.allclose(
            gaussian_logprob(z, mu2, sigma) - gaussian_logprob(z, mu, sigma),
            exact_ratio / d,
            atol=1e-4,
        )


def test_latent_logprob_sum_is_the_exact_density_and_its_ratio_the_true_one():
    """`latent_logprob: sum` (Monet's): the step's whole log-density, constant dropped, so the
    latent ratio is the true density ratio (the `mean` one is its d-th root)."""
    torch.manual_seed(0)
    for d, sigma in ((8, 0.05), (64, 0.3)):
        mu = torch.randn(4, 3, d)
        z = mu + sigma * torch.randn(4, 3, d)
        exact = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)
        const = d * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
        assert torch.allclose(gaussian_logprob(z, mu, sigma, "sum"), exact + const, atol=1e-4)
        assert torch.allclose(
            gaussian_logprob(z, mu, sigma, "sum"),
            d * gaussian_logprob(z, mu, sigma, "mean"),
            atol=1e-4,
        )
        mu2 = mu + 0.01
        exact_ratio = torch.distributions.Normal(mu2, sigma).log_prob(z).sum(-1) - exact
        assert torch.allclose(
            gaussian_logprob(z, mu2, sigma, "sum") - gaussian_logprob(z, mu, sigma, "sum"),
            exact_ratio,
            atol=1e-3,
        )
    with pytest.raises(ValueError, match="mean or sum"):
        gaussian_logprob(z, mu, sigma, "max")


def test_latent_units_have_their_own_clip_range():
    """The first `latent_steps` units are clipped at `[1 - latent_clip_low, 1 + latent_clip_high]`,
    the answer tokens at `[1 - clip_low, 1 + clip_high]`; the stats count each kind apart."""
    old = torch.zeros(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    lp = torch.full((2, 5), 0.1, requires_grad=True)  # ratio e^0.1 = 1.105
    per_seq, st = policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, latent_steps=2,
                              latent_clip_low=0.05, latent_clip_high=0.05)  # fmt: skip
    per_seq.sum().backward()
    # A > 0: latent units clipped at 1.05 (no gradient), tokens not (1.105 < 1.28); A < 0: nothing clipped.
    assert st["clipped"] == 2 and st["latent_clipped"] == 2 and st["latent_units"] == 4
    assert (
        (lp.grad[0, :2] == 0).all() and (lp.grad[0, 2:4] != 0).all() and (lp.grad[1, :3] != 0).all()
    )
    assert torch.allclose(per_seq[0], -(2 * 1.05 + 2 * math.exp(0.1)) * torch.ones(()))
    # Without a latent range the token range applies to every unit (the old behaviour).
    _, st = policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, latent_steps=2)
    assert st["clipped"] == 0 and st["latent_units"] == 4
    # The KL term covers the latent units too: beta * k3 on every unit of the mask.
    ref = torch.randn(2, 5)
    with_kl, st = policy_loss(lp, old, adv, mask, latent_steps=2, ref_logp=ref, beta=0.5)
    without, _ = policy_loss(lp, old, adv, mask, latent_steps=2)
    assert torch.allclose(with_kl - without, 0.5 * (kl_k3(lp, ref) * mask).sum(-1))
    assert torch.allclose(st["kl"], (kl_k3(lp, ref) * mask).sum())


def test_kl_k3_is_zero_at_equality_and_positive_otherwise():
    lp = torch.randn(5, 7)
    assert torch.equal(kl_k3(lp, lp), torch.zeros(5, 7))
    other = lp + torch.randn(5, 7) * 0.3
    k = kl_k3(lp, other)
    assert (k >= 0).all() and k.sum() > 0
    x = other - lp
    assert torch.allclose(k, torch.exp(x) - x - 1)


def test_policy_loss_clipping_aggregation_and_normalisers():
    old = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    # On-policy: ratio 1, nothing clipped, loss = -A per unit.
    lp = old.clone().requires_grad_(True)
    per_seq, st = policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.3)
    assert (
        torch.allclose(per_seq, torch.tensor([-3.0, 4.0]))
        and st["clipped"] == 0
        and st["units"] == 5
    )
    per_seq.sum().backward()
    assert torch.allclose(lp.grad, -adv[:, None] * mask)
    # Ratio e^0.5 > 1.3 with A > 0 is clipped (no gradient); with A < 0 it is not.
    lp = torch.full((2, 4), 0.5, requires_grad=True)
    per_seq, st = policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.3)
    per_seq.sum().backward()
    assert st["clipped"] == 3
    assert (lp.grad[0] == 0).all() and (lp.grad[1, :2] != 0).all()
    assert torch.allclose(per_seq[0], torch.tensor(-3 * 1.3))
    # Ratio e^-0.5 < 0.8 with A < 0 is clipped at 1 - clip_low.
    per_seq, st = policy_loss(torch.full((2, 4), -0.5), old, adv, mask, clip_low=0.2, clip_high=0.3)
    assert st["clipped"] == 2 and torch.allclose(per_seq[1], torch.tensor(2 * 2.0 * 0.8))
    # Sequence aggregation averages within a trajectory; normalisers count units or trajectories.
    per_tok, _ = policy_loss(old, old, adv, mask, aggregation="token")
    per_sq, _ = policy_loss(old, old, adv, mask, aggregation="sequence")
    assert torch.allclose(per_sq, per_tok / mask.sum(-1))
    assert policy_normaliser(mask, "token") == 5 and policy_normaliser(mask, "sequence") == 2
    # The KL term adds beta * k3 per unit.
    ref = torch.randn(2, 4)
    with_kl, st = policy_loss(old, old, adv, mask, ref_logp=ref, beta=0.5)
    assert torch.allclose(with_kl - per_tok, 0.5 * (kl_k3(old, ref) * mask).sum(-1))
    assert torch.allclose(st["kl"], (kl_k3(old, ref) * mask).sum())


def test_group_advantages_flat_groups_and_answer_tensors():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(r, 4, scale=False)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    scaled = group_advantages(r, 4, scale=True)
    assert torch.allclose(scaled[:4], adv[:4] / (r[:4].std() + 1e-4)) and (scaled[4:] == 0).all()
    assert flat_groups(r, 4).tolist() == [False, True]
    ids, mask = answer_tensors([[5, 6], [7], [], [8, 9, 10]], [1, None, 2, None], pad_id=0)
    assert ids.tolist() == [[5, 6, 1], [7, 0, 0], [2, 0, 0], [8, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 1]]
    assert repeat_rows(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]


# ---------------------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from medlvr.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth_vlpo")
    return generate(
        SynthConfig(n=120, seed=3, level=1, question_types={"presence": 1.0}, describe=False), out
    )


def _prompts(paths, n, split="train"):
    samples = read_jsonl(paths[split])[:n]
    return samples, [[load_image(p) for p in s.images] for s in samples]


@pytest.fixture(scope="module")
def vlm(tiny_dir):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(tiny_dir, LatentConfig(steps=3, projector="linear"))


def _rollouts(vlm, samples, images, seed, shared, sigma=0.1, temperature=1.0, g=4):
    col = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    gen = torch.Generator().manual_seed(seed)
    return sample_rollouts(vlm, col, samples, images, group_size=g, latent_steps=3, temperature=temperature,
                           latent_sigma=sigma, max_new_tokens=6, generator=gen, shared_prefix=shared)  # fmt: skip


def test_shared_prefix_rollouts_equal_per_sample_rollouts(vlm, synth):
    samples, images = _prompts(synth, 3)
    shared = _rollouts(vlm, samples, images, seed=7, shared=True)
    naive = _rollouts(vlm, samples, images, seed=7, shared=False)
    assert len(shared.texts) == 12
    # Same random stream, same draw order: identical sampled answers, latents equal up to float noise.
    assert shared.token_ids == naive.token_ids
    assert (shared.latents - naive.latents).abs().max() < 1e-5
    assert (shared.latent_means - naive.latent_means).abs().max() < 1e-5
    assert len(shared.visual_tokens) == 12 and all(
        torch.equal(a, b) for a, b in zip(shared.visual_tokens, naive.visual_tokens)
    )
    # The noise really is there, and rows of one group differ.
    assert (shared.latents - shared.latent_means).abs().max() > 1e-2
    assert len({tuple(t) for t in shared.token_ids[:4]}) > 1 or not torch.equal(
        shared.latents[0], shared.latents[1]
    )
    # Greedy, no latent noise: every row of a group is the prompt's single greedy trajectory.
    g1 = _rollouts(vlm, samples, images, seed=0, shared=True, sigma=0.0, temperature=1e-9)
    g2 = _rollouts(vlm, samples, images, seed=1, shared=False, sigma=0.0, temperature=1e-9)
    assert g1.token_ids == g2.token_ids
    assert (g1.latent_means - g2.latent_means).abs().max() < 1e-5


def test_recomputed_logprobs_are_those_of_the_sampled_trajectory(vlm, synth):
    samples, images = _prompts(synth, 2)
    sigma = 0.1
    ro = _rollouts(vlm, samples, images, seed=3, shared=True, sigma=sigma)
    col = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    pad = pad_id(vlm)
    batch = col(ro.samples, images=ro.images)
    batch["answer_ids"], batch["answer_mask"] = answer_tensors(ro.token_ids, ro.stop_tokens, pad)
    with torch.no_grad():
        lp = trajectory_logprobs(vlm, batch, ro.latents, temperature=1.0, latent_sigma=sigma)
    k, d = 3, vlm.hidden_size
    # The recomputed means are the rollout's; the latent units are the analytic density (see above).
    assert (lp.latent_means - ro.latent_means).abs().max() < 1e-4
    exact = torch.distributions.Normal(ro.latent_means, sigma).log_prob(ro.latents).sum(-1)
    const = d * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
    assert torch.allclose(lp.logp[:, :k], (exact + const) / d, atol=1e-4)
    assert torch.equal(
        lp.logp[:, k:] * (1 - batch["answer_mask"]), torch.zeros_like(lp.logp[:, k:])
    ), "padding is 0"
    # Teacher-forcing the greedy answer: every greedy token is the forward's argmax (no off-by-one).
    greedy = vlm.generate(col(samples, images=images), 3, max_new_tokens=6)
    b2 = col(samples, images=images)
    b2["answer_ids"], b2["answer_mask"] = answer_tensors(greedy.token_ids, greedy.stop_tokens, pad)
    with torch.no_grad():
        fwd = vlm(b2, latent_inputs=greedy.latents)
    for i, ids in enumerate(greedy.token_ids):
        assert fwd.logits[i, : len(ids)].argmax(-1).tolist() == ids


@pytest.mark.parametrize("kind", ["mean", "sum"])
def test_trajectory_latent_units_follow_the_configured_density(vlm, synth, kind):
    samples, images = _prompts(synth, 1)
    sigma = 0.1
    ro = _rollouts(vlm, samples, images, seed=3, shared=True, sigma=sigma, g=2)
    col = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    batch = col(ro.samples, images=ro.images)
    batch["answer_ids"], batch["answer_mask"] = answer_tensors(
        ro.token_ids, ro.stop_tokens, pad_id(vlm)
    )
    with torch.no_grad():
        lp = trajectory_logprobs(
            vlm, batch, ro.latents, temperature=1.0, latent_sigma=sigma, latent_logprob=kind
        )
    d = vlm.hidden_size
    exact = torch.distributions.Normal(ro.latent_means, sigma).log_prob(ro.latents).sum(-1)
    const = d * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
    assert torch.allclose(lp.logp[:, :3], (exact + const) / (d if kind == "mean" else 1), atol=1e-3)


def test_vlpo_latent_options_are_validated():
    from medlvr.config import VLPOParams
    from medlvr.errors import MedlvrError

    assert (
        VLPOParams(latent_logprob="sum", latent_clip_low=0.1, latent_clip_high=0.1).latent_logprob
        == "sum"
    )
    with pytest.raises(MedlvrError, match="latent_logprob"):
        VLPOParams(latent_logprob="max")
    with pytest.raises(MedlvrError, match="latent_clip"):
        VLPOParams(latent_clip_low=1.0)


def test_gpu_vlpo_recipe_parses_and_trains_the_latent_token_rows():
    cfg = load_config(VLPOConfig, "qwen2_5_vl_7b/vlpo")
    assert (
        cfg.model.finetune == "lora"
        and cfg.lora.train_latent_tokens
        and "embed_tokens" not in cfg.lora.modules_to_save
    )


def test_mini_batches_split_each_process_into_the_same_optimizer_steps():
    """Every process takes `mini_batches` steps; step m holds global rows m, m + M, ... under any process count."""
    from medlvr.config import VLPOParams
    from medlvr.errors import MedlvrError
    from medlvr.train.vlpo import _mini_batches

    assert _mini_batches(8, 2, 3) == [[[0, 2, 4], [6]], [[1, 3, 5], [7]]]
    one = _mini_batches(8, 2, 8)  # one process, 8 trajectories
    two = [
        _mini_batches(4, 2, 8) for _ in range(2)
    ]  # two processes, 4 each: rank r's row i is global 4r + i
    for m in range(2):
        assert one[m][0] == [4 * r + i for r in range(2) for i in two[r][m][0]]
    assert [len(parts) for parts in (_mini_batches(n, 4, 1) for n in (4, 8, 13))] == [4, 4, 4]
    with pytest.raises(MedlvrError, match="mini_batches"):
        VLPOConfig(batch_size=1, vlpo=VLPOParams(group_size=2, mini_batches=3))


def test_the_stop_token_trained_is_the_one_sampled(vlm, synth, monkeypatch):
    """A rollout that ended with a stop token other than the collator's trains that token (issue 13, item 5).

    Each prompt's first greedy token is made a stop token too, so every greedy rollout ends at
    once with its own stop; the training batch must hold that token, and one cut at the limit none.
    """
    from medlvr.train.rollout import pad_id

    samples, images = _prompts(synth, 2)
    col = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    first = [
        ids[0] for ids in vlm.generate(col(samples, images=images), 3, max_new_tokens=1).token_ids
    ]
    assert not set(first) & set(vlm.stop_ids), (
        "the first greedy tokens must not be stop tokens already"
    )
    monkeypatch.setattr(vlm, "stop_ids", sorted({*vlm.stop_ids, *first}))
    ro = _rollouts(vlm, samples, images, seed=0, shared=True, sigma=0.0, temperature=1e-9, g=2)
    assert ro.token_ids == [[], [], [], []] and ro.stopped == [True] * 4
    assert ro.stop_tokens == [first[0], first[0], first[1], first[1]]
    ids, mask = answer_tensors(ro.token_ids, ro.stop_tokens, pad_id(vlm))
    assert ids[:, 0].tolist() == ro.stop_tokens and mask.tolist() == [[1]] * 4
    # generate reports it too; a row cut at the limit has none (and trains no stop token)
    monkeypatch.setattr(vlm, "stop_ids", [-1])
    cut = vlm.generate(col(samples, images=images), 3, max_new_tokens=2)
    assert cut.stop_tokens == [None, None]
    ids, mask = answer_tensors(cut.token_ids, cut.stop_tokens, pad_id(vlm))
    assert ids.tolist() == cut.token_ids and mask.tolist() == [[1, 1]] * 2
    ro = _rollouts(vlm, samples, images, seed=0, shared=True, g=2)
    assert (
        ro.stop_tokens == [None] * 4 and ro.stopped == [False] * 4
    )  # `stopped` follows the stop tokens


def test_held_out_roi_evidence_reuses_the_rollouts_visual_tokens(vlm, synth):
    """ROI evidence reads the prompts' visual tokens: the held-out reward takes the rollouts' own, so
    the vision tower runs once per chunk of prompts, as for rewards without visual input (it ran twice)."""
    from medlvr.train.rewards import RewardSet
    from medlvr.train.vlpo import held_out_reward

    tower = dict(vlm.backbone.named_modules())["model.visual"]
    calls: list[int] = []
    val = read_jsonl(synth["val"])[:4]
    kw = dict(
        latent_steps=3,
        n_samples=2,
        temperature=1.0,
        latent_sigma=0.05,
        max_new_tokens=2,
        seed=0,
        batch_size=2,
    )
    passes, held = {}, {}
    handle = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        for name in ("format", "roi_evidence"):
            calls.clear()
            held[name] = held_out_reward(vlm, val, RewardSet({name: 1.0}), **kw)
            passes[name] = len(calls)
    finally:
        handle.remove()
    assert passes == {"format": 2, "roi_evidence": 2}  # two chunks of two prompts
    assert held["roi_evidence"]["reward"] != 0.0, "the ROI evidence must be scored"


def _cfg_overrides(tmp_path: Path, model_path: Path, synth, *extra: str) -> list[str]:
    return [
        f"model.path={model_path}", f"data.train=[{synth['train']}]", f"output_dir={tmp_path / 'run'}",
        "log.progress=false", "log.tensorboard=false", "latent.projector=norm", *extra,
    ]  # fmt: skip


def _cfg(tmp_path: Path, model_path: Path, synth, *extra: str) -> VLPOConfig:
    return load_config(
        VLPOConfig,
        "tiny/vlpo",
        _cfg_overrides(tmp_path, model_path, synth, *extra),
    )


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_first_epoch_ratio_is_one_kl_zero_then_positive(tmp_path, tiny_dir, synth, finetune):
    from medlvr.train.optim import build_optimizer
    from medlvr.train.vlpo import Reference, build_model, disable_dropout

    cfg = _cfg(tmp_path, tiny_dir, synth, f"model.finetune={finetune}", "latent.steps=2", "vlpo.beta=0.1",
               "lora.target_modules=[q_proj,v_proj,o_proj]", "optim.lr=0.05")  # fmt: skip
    torch.manual_seed(0)
    vlm = build_model(cfg, None)
    disable_dropout(vlm)
    ref = Reference(cfg, vlm)
    samples, images = _prompts(synth, 2)
    col = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    vlm.eval()
    gen = torch.Generator().manual_seed(0)
    ro = sample_rollouts(vlm, col, samples, images, group_size=4, latent_steps=2, temperature=1.0,
                         latent_sigma=0.05, max_new_tokens=4, generator=gen)  # fmt: skip
    vlm.train()
    batch = col(ro.samples, images=ro.images)
    batch["answer_ids"], batch["answer_mask"] = answer_tensors(
        ro.token_ids, ro.stop_tokens, pad_id(vlm)
    )
    mask = unit_mask(batch["answer_mask"], 2, latent_actions=True)  # [8, K + T] the policy units
    kw = dict(temperature=1.0, latent_sigma=0.05)

    def ref_logp():
        with torch.no_grad(), ref.active() as r:
            return trajectory_logprobs(r, batch, ro.latents, **kw).logp

    with torch.no_grad():
        old = trajectory_logprobs(vlm, batch, ro.latents, **kw)
    ref0 = ref_logp()
    # Policy and reference coincide at the start (LoRA's B = 0; the copy is the same checkpoint).
    assert torch.equal(kl_k3(old.logp, ref0) * mask, torch.zeros_like(old.logp))
    new = trajectory_logprobs(vlm, batch, ro.latents, **kw)
    ratio = torch.exp(new.logp - old.logp)[mask.bool()]
    assert torch.equal(ratio, torch.ones_like(ratio)), (
        "first epoch on fresh rollouts must be exactly on-policy"
    )
    adv = group_advantages(torch.arange(8.0), 4)
    per_seq, st = policy_loss(new.logp, old.logp, adv, mask, ref_logp=ref0, beta=0.1)
    assert st["clipped"] == 0
    opt = build_optimizer(vlm.named_parameters(), cfg.optim)
    (per_seq.sum() / policy_normaliser(mask, "token")).backward()
    opt.step()
    with torch.no_grad():
        after = trajectory_logprobs(vlm, batch, ro.latents, **kw)
    assert torch.equal(ref_logp(), ref0), "the reference must not move with the policy"
    kl = (kl_k3(after.logp, ref0) * mask).sum() / mask.sum()
    assert kl > 1e-6
    assert not torch.equal(after.logp, old.logp)


# ---------------------------------------------------------------------------- end to end


def test_cli_runs_vlpo_and_rejects_bad_input(tmp_path, tiny_dir, synth):
    from typer.testing import CliRunner

    from medlvr.cli import app

    runner = CliRunner()
    args = ["train", "vlpo", "--config", "tiny/vlpo", "--init", str(tiny_dir),
            f"data.train=[{synth['train']}]", f"data.val={synth['val']}", "data.val_samples=4", "max_steps=2",
            "batch_size=2", "vlpo.group_size=2", "vlpo.max_new_tokens=3", "vlpo.micro_batch_size=2", "vlpo.beta=0.05",
            "vlpo.mini_batches=2", "checkpoint.every=1", f"output_dir={tmp_path / 'run'}", "log.progress=false"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    keys = {"reward_mean", "reward_std", "accuracy", "kl", "clip_fraction", "entropy", "flat_groups", "latent_norm",
            "rollout_s", "logprob_s", "update_s", "reward/accuracy", "reward/format"}  # fmt: skip
    assert keys <= set(rows[0]) and rows[0]["kl"] == 0.0  # first rollouts: policy == reference
    assert "val_reward" in rows[-1]
    assert (tmp_path / "run" / "final" / "config.json").is_file() and (
        tmp_path / "run" / "tb"
    ).is_dir()
    assert (tmp_path / "run" / "step-0000002" / "trainer_state.json").is_file()
    bad = runner.invoke(app, args + ["vlpo.rewards.acuracy=1.0"])
    assert bad.exit_code == 2 and "unknown reward 'acuracy'" in bad.output
    bad = runner.invoke(app, args[:4] + ["--init", str(tmp_path / "missing")] + args[6:])
    assert bad.exit_code == 2 and "model.path" in bad.output
    bad = runner.invoke(app, args + ["vlpo.group_size=1"])
    assert bad.exit_code == 2 and "group_size" in bad.output


@pytest.mark.slow
def test_short_vlpo_run_raises_held_out_reward(tmp_path, tiny_dir, synth):
    """From a tiny, briefly trained SFT checkpoint, 10 seeded VLPO steps raise the mean reward on val prompts."""
    from medlvr.config import SFTConfig
    from medlvr.train.rewards import RewardSet
    from medlvr.train.sft import run_sft
    from medlvr.train.vlpo import held_out_reward, run_vlpo

    sft = load_config(SFTConfig, None, [
        f"model.path={tiny_dir}", f"data.train=[{synth['train']}]", "mode=latent", "latent.steps=2", "batch_size=16",
        "max_steps=16", "optim.lr=3e-3", f"output_dir={tmp_path / 'sft'}", "log.progress=false", "log.tensorboard=false",
    ])  # fmt: skip
    start = run_sft(sft).final_model
    val = read_jsonl(synth["val"])[:32]
    rewards = RewardSet({"accuracy": 1.0, "format": 0.2})
    kw = dict(
        latent_steps=2, n_samples=4, temperature=1.0, latent_sigma=0.02, max_new_tokens=4, seed=1
    )
    before = held_out_reward(LatentVLM.from_pretrained(start), val, rewards, **kw)
    cfg = _cfg(tmp_path, start, synth, "max_steps=10", "optim.lr=2e-3", "vlpo.max_new_tokens=4", "checkpoint.every=0",
               "data.val=\"\"", "latent.steps=2")  # fmt: skip
    result = run_vlpo(cfg)
    after = held_out_reward(LatentVLM.from_pretrained(result.final_model), val, rewards, **kw)
    assert after["reward"] > before["reward"] + 0.1, (before, after)
    assert result.history[-1]["entropy"] < result.history[0]["entropy"]


# ---------------------------------------------------------------------------- resume


def _params(vlm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in vlm.named_parameters()}


# Small enough for seconds per step: 2 prompts x 2 trajectories, 3 answer tokens, K = 2. The untrained
# tiny model answers nothing correctly, so the ROI-evidence reward (a cosine of the sampled latents)
# is what makes rewards differ within a group and the updates non-zero.
_SMALL = ("batch_size=2", "vlpo.group_size=2", "vlpo.max_new_tokens=3", "vlpo.micro_batch_size=4", "optim.lr=3e-3",
          "data.val=\"\"", "latent.steps=2", "vlpo.latent_sigma=0.05", "vlpo.rewards.roi_evidence=1.0")  # fmt: skip


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize(
    "extra",
    [
        ["model.finetune=full", "vlpo.beta=0"],
        ["model.finetune=lora", "lora.r=4", "lora.dropout=0", "vlpo.beta=0.05"],
    ],
    ids=["full", "lora-kl"],
)
def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_dir, synth, extra):
    """Rollouts are sampled, so an exact resume needs the same sampling streams: each step's
    generator is seeded from (seed, rank, step) and the checkpoint holds optimizer, scheduler
    and RNG states; the resumed run must replay steps 3-4 of the uninterrupted one."""
    from medlvr.train.vlpo import run_vlpo

    common = (*_SMALL, *extra, "max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=1")
    full = run_vlpo(_cfg(tmp_path / "full", tiny_dir, synth, *common))
    assert [r["step"] for r in full.history] == [1, 2, 3, 4]

    def kill_at_2(row):
        if row["step"] == 2:
            raise _Killed

    with pytest.raises(_Killed):
        run_vlpo(_cfg(tmp_path / "cut", tiny_dir, synth, *common), on_step=kill_at_2)
    run_dir = tmp_path / "cut" / "run"
    assert [p.name for p in run_dir.glob("step-*")] == ["step-0000002"]
    resumed = run_vlpo(_cfg(tmp_path / "cut", tiny_dir, synth, *common, "checkpoint.resume=true"))
    assert [r["step"] for r in resumed.history] == [3, 4]
    for a, b in zip(full.history[2:], resumed.history):
        for key in ("reward_mean", "reward_std", "accuracy", "loss", "entropy", "ratio_mean", "clip_fraction",
                    "latent_norm", "response_tokens", "grad_norm", "kl", "lr"):  # fmt: skip
            if a[key] is None:
                assert b[key] is None, key
            else:
                assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
    assert full.history[2]["reward_std"] > 0 or full.history[3]["reward_std"] > 0, (
        "rollouts must be sampled"
    )
    pa = _params(LatentVLM.from_pretrained(full.final_model))
    pb = _params(LatentVLM.from_pretrained(resumed.final_model))
    assert pa.keys() == pb.keys()
    assert max((pa[n] - pb[n]).abs().max().item() for n in pa) < 1e-5
    start = _params(LatentVLM.from_pretrained(tiny_dir))
    assert any(not torch.equal(start[n], pa[n]) for n in pa if n in start), (
        "training must move the weights"
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [p.name for p in run_dir.glob("step-*")] == ["step-0000004"], "keep_last=1"


def _two_hop(synth, out: Path, roi_hops: list[int]) -> Path:
    """The synthetic records with an anchor ROI (the upper-left corner) before their own: two hops."""
    from medlvr.data.schema import ROI, write_jsonl

    samples = [
        s.model_copy(update={"rois": [ROI(box=(0, 0, 24, 24)), *s.rois], "meta": {**s.meta, "hops": 2, "roi_hops": roi_hops}})
        for s in read_jsonl(synth["train"]) if len(s.rois) == 1
    ]  # fmt: skip
    write_jsonl(samples, out)
    return out


def test_roi_evidence_chain_scores_each_hop_in_training_and_held_out(
    tmp_path, tiny_dir, synth, monkeypatch
):
    """`vlpo.rewards.roi_evidence_chain` scores ROI evidence as ROI-SFT's `align.assign=chain` aligns:
    every reward context, of the rollouts and of the held-out reward, carries chain and the record's
    ROI indices per hop, and the scores are the per-hop ones (not raster chunks)."""
    import dataclasses

    from medlvr.errors import MedlvrError
    from medlvr.train import rewards
    from medlvr.train.vlpo import check_config, run_vlpo

    seen: list[tuple] = []

    def spy(sample, response, latents, context):
        seen.append((sample, latents, context))
        return rewards.roi_evidence(sample, response, latents, context)

    monkeypatch.setitem(rewards.BUILTIN, "roi_evidence_chain", spy)
    data = _two_hop(synth, tmp_path / "two_hop.jsonl", [1, 2])
    small = [o for o in _SMALL if "roi_evidence" not in o]
    run_vlpo(_cfg(tmp_path, tiny_dir, synth, *small, "vlpo.rewards.roi_evidence_chain=1.0", f"data.train=[{data}]",
                  f"data.val={data}", "data.val_samples=2", "max_steps=1", "checkpoint.every=0"))  # fmt: skip
    assert (
        len(seen) == 2 * 2 + 2 * 4
    )  # the step's 2 prompts x 2 rollouts, then 2 held-out prompts x eval_samples 4
    for sample, _z, ctx in seen:
        assert ctx.assign == "chain" and len(ctx.roi_hop_index) == 2, sample.id
        assert torch.equal(torch.cat(ctx.roi_hop_index).unique(), ctx.roi_index)
    chain = [rewards.roi_evidence(s, "", z, c) for s, z, c in seen]
    raster = [
        rewards.roi_evidence(s, "", z, dataclasses.replace(c, assign="raster")) for s, z, c in seen
    ]
    assert chain != pytest.approx(raster)
    bad = _two_hop(synth, tmp_path / "bad_hops.jsonl", [1, 3])
    with pytest.raises(MedlvrError, match=r"must lie in 1..2"):
        check_config(
            _cfg(
                tmp_path,
                tiny_dir,
                synth,
                *small,
                "vlpo.rewards.roi_evidence_chain=1.0",
                f"data.train=[{bad}]",
            )
        )


@pytest.mark.parametrize("context", ["vlpo.latent_sigma=0", "vlpo.latent_policy=false"])
def test_latents_that_are_context_are_not_policy_units(
    tmp_path, tiny_dir, synth, monkeypatch, context
):
    """With sigma = 0 or the latent policy off, the K latent steps are context: no update unit,
    in the loss's mask nor in its normaliser (issue 13, item 1: they were counted as K units of
    ratio 1, scaling token gradients by T / (T + K) and diluting clipping and KL)."""
    from medlvr.train import vlpo

    masks: dict[str, list[torch.Tensor]] = {"loss": [], "normaliser": []}
    loss, normaliser = vlpo.policy_loss, vlpo.policy_normaliser

    def loss_spy(logp, old_logp, advantages, mask, **kw):
        masks["loss"].append(mask.detach().clone())
        return loss(logp, old_logp, advantages, mask, **kw)

    def normaliser_spy(mask, aggregation):
        masks["normaliser"].append(mask.detach().clone())
        return normaliser(mask, aggregation)

    monkeypatch.setattr(vlpo, "policy_loss", loss_spy)
    monkeypatch.setattr(vlpo, "policy_normaliser", normaliser_spy)
    result = vlpo.run_vlpo(
        _cfg(
            tmp_path,
            tiny_dir,
            synth,
            *_SMALL,
            "max_steps=1",
            "checkpoint.every=0",
            "vlpo.beta=0.05",
            context,
        )
    )
    k = 2  # latent.steps in _SMALL
    assert masks["loss"] and masks["normaliser"]
    for m in masks["loss"] + masks["normaliser"]:
        assert m.shape[1] > k and not m[:, :k].any(), m
        assert m[:, k:].sum() > 0
    # Every logged per-unit mean is over answer tokens only: 4 trajectories, their sampled tokens (+ stop).
    row = result.history[0]
    units = sum(int(m[:, k:].sum()) for m in masks["loss"])
    assert (
        units == round(4 * row["response_tokens"] + 4 * row["stopped"]) * 2
    )  # 2 update epochs in the recipe


def test_resuming_a_finished_run_is_a_no_op_and_a_changed_group_size_warns(
    tmp_path, tiny_dir, synth
):
    from medlvr.train.vlpo import run_vlpo

    common = (*_SMALL, "max_steps=1", "checkpoint.every=0")
    first = run_vlpo(_cfg(tmp_path, tiny_dir, synth, *common))
    run_dir = tmp_path / "run"
    files = [run_dir / "step-0000001" / "trainer_state.json", run_dir / "final" / "model.safetensors",
             run_dir / "result.json", run_dir / "metrics.jsonl"]  # fmt: skip
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    again = run_vlpo(_cfg(tmp_path, tiny_dir, synth, *common, "checkpoint.resume=true"))
    assert again.steps == 1 and again.history == [] and again.metrics == first.metrics
    assert again.final_model == first.final_model
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before, (
        "nothing may be rewritten"
    )
    # A longer run resumed with another group size continues, but is not the interrupted run's continuation.
    with pytest.warns(UserWarning) as caught:
        longer = run_vlpo(_cfg(tmp_path, tiny_dir, synth, *common, "checkpoint.resume=true", "max_steps=2",
                               "vlpo.group_size=4"))  # fmt: skip
    said = [str(w.message) for w in caught]
    assert any("group_size changed from 2 to 4" in m for m in said), said
    assert any(
        "changed settings, applied from there on" in m and "vlpo.group_size 2 -> 4" in m
        for m in said
    ), said
    assert [r["step"] for r in longer.history] == [2]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


# ---------------------------------------------------------------------------- two processes


def _rollouts_of_ranks(world: int, per_rank: int, seed: int):
    """`sample_rollouts` for one process that draws rank r's prompts with rank r's stream.

    Each process samples its prompts from its own generator (`_rollout_seed(seed, rank,
    step)`), so a plain single process with the same global batch draws other rollouts
    than two processes do, and no aggregate of a sampled quantity could be compared. What
    the trainer guarantees is everything after the sampling: given the same trajectories,
    rewards, advantages (per group, and a group never spans processes), the globally
    normalised loss, the DDP-averaged gradients and the reduced metrics are those of one
    process on the global batch. This wrapper gives one process those same trajectories.
    """
    import itertools

    from medlvr.train import vlpo
    from medlvr.train.rollout import Rollouts

    real, calls = vlpo.sample_rollouts, itertools.count()

    def sample(vlm, collate, samples, images, *, generator, **kw):
        step = next(calls)  # one call per step (no validation in this run)
        parts = [
            real(vlm, collate, samples[r * per_rank : (r + 1) * per_rank], images[r * per_rank : (r + 1) * per_rank],
                 generator=torch.Generator(device=vlm.device).manual_seed(vlpo._rollout_seed(seed, r, step)), **kw)
            for r in range(world)
        ]  # fmt: skip
        return Rollouts(
            samples=[x for p in parts for x in p.samples], images=[x for p in parts for x in p.images],
            texts=[x for p in parts for x in p.texts], token_ids=[x for p in parts for x in p.token_ids],
            stop_tokens=[x for p in parts for x in p.stop_tokens], latents=torch.cat([p.latents for p in parts]),
            latent_means=torch.cat([p.latent_means for p in parts]), group_size=parts[0].group_size,
            visual_tokens=[x for p in parts for x in p.visual_tokens],
        )  # fmt: skip

    return sample


@pytest.mark.slow  # ~15-20 s: two spawned processes import torch and transformers
@pytest.mark.distributed
def test_two_cpu_processes_match_one_process_on_the_same_trajectories(
    tmp_path, tiny_dir, synth, monkeypatch
):
    """torchrun (gloo) x2 at 2 prompts each vs one process at 4 prompts drawing the ranks' streams.

    Ranks must hold identical parameters, and every logged aggregate (rewards, accuracy,
    loss, clipping, ratios, entropy, gradient norm) must equal the single process's.
    Tolerances as in the SFT test (float reduction order; Adam amplifies it on
    near-zero gradients): 1e-4 on metrics, 5e-4 on parameters.

    Two mini-batches per update epoch, each process holding one micro-batch of 4 trajectories:
    each process takes as many optimizer steps as the single one, on the same trajectories
    (issue 13, item 7: with mini_batches above a process's micro-batch count, two processes
    took fewer).
    """
    from safetensors.torch import load_file

    from medlvr.train import vlpo
    from tests.conftest import torchrun

    common = [*_SMALL, "max_steps=3", "vlpo.update_epochs=2", "vlpo.beta=0.05", "checkpoint.every=0",
              "vlpo.mini_batches=2"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    args = _cfg_overrides(two, tiny_dir, synth, *common)
    proc = torchrun(Path(__file__).with_name("vlpo_ddp_worker.py"), str(two), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setattr(vlpo, "sample_rollouts", _rollouts_of_ranks(world=2, per_rank=2, seed=0))
    single = vlpo.run_vlpo(_cfg(one, tiny_dir, synth, *common, "batch_size=4"))

    p0, p1 = (
        load_file(str(two / "params-rank0.safetensors")),
        load_file(str(two / "params-rank1.safetensors")),
    )
    assert all(torch.equal(p0[n], p1[n]) for n in p0), "ranks diverged"
    ref = {n: p.detach() for n, p in single.model.named_parameters()}
    start = _params(LatentVLM.from_pretrained(tiny_dir))
    moved = max((ref[n] - start[n]).abs().max().item() for n in ref if n in start)
    diff = max((p0[n] - ref[n]).abs().max().item() for n in p0)
    assert diff < 5e-4 < moved, (diff, moved)
    hist = json.loads((two / "history-rank0.json").read_text())
    assert [r["step"] for r in hist] == [r["step"] for r in single.history] == [1, 2, 3]
    assert (
        [r["optimizer_steps"] for r in hist]
        == [r["optimizer_steps"] for r in single.history]
        == [4, 8, 12]
    )
    for a, b in zip(hist, single.history):
        assert a["samples_seen"] == b["samples_seen"]
        for key in ("reward_mean", "reward_std", "accuracy", "reward/roi_evidence", "flat_groups", "loss", "clip_fraction",
                    "ratio_mean", "kl", "kl_update", "entropy", "latent_norm", "response_tokens", "stopped", "grad_norm"):  # fmt: skip
            assert abs(a[key] - b[key]) < 1e-4, (a["step"], key, a[key], b[key])
    assert any(abs(r["loss"]) > 1e-3 for r in hist) and any(
        r["clip_fraction"] > 0 or r["ratio_mean"] != 1 for r in hist
    )


def test_vlpo_checks_k_against_its_own_answer_limit_not_sft_data_settings(
    tmp_path, tiny_dir, synth
):
    """VLPO answers within vlpo.max_new_tokens; data.max_answer_tokens (an SFT setting) must not refuse the run."""
    from medlvr.errors import MedlvrError
    from medlvr.train.vlpo import run_vlpo

    result = run_vlpo(
        _cfg(tmp_path, tiny_dir, synth, *_SMALL, "max_steps=1", "data.max_answer_tokens=5000")
    )
    assert result.steps == 1
    with pytest.raises(MedlvrError, match="answer tokens need"):
        run_vlpo(
            _cfg(
                tmp_path / "long",
                tiny_dir,
                synth,
                *_SMALL,
                "max_steps=1",
                "vlpo.max_new_tokens=5000",
            )
        )
