"""VLPO rewards: the evaluation scorer as accuracy, format, ROI evidence, user rewards by import path."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from medlvr.data.roi import pool_targets
from medlvr.data.schema import ROI, VQASample
from medlvr.errors import MedlvrError
from medlvr.eval.metrics import accuracy_reward
from medlvr.train.rewards import (
    RewardContext,
    RewardSet,
    accuracy,
    format_reward,
    resolve_reward,
    roi_evidence,
)


def _yes_no(answer="yes"):
    return VQASample(
        id="q1",
        dataset="t",
        split="train",
        images=["x.png"],
        question="Is there a lesion?",
        answer=answer,
        answer_type="closed",
        rois=[ROI(box=(0, 0, 28, 28))],
    )


def _choice():
    return VQASample(
        id="q2",
        dataset="t",
        split="train",
        images=["x.png"],
        question="What shape?",
        options={"A": "round", "B": "square"},
        answer="square",
        answer_letter="B",
        answer_type="choice",
    )


CASES = [
    (_yes_no("yes"), "yes"),
    (_yes_no("yes"), "No."),
    (_yes_no("no"), "no"),
    (_yes_no("no"), "maybe"),
    (_choice(), "B"),
    (_choice(), "A"),
    (_choice(), "square"),
    (_choice(), "A and B"),
    (_choice(), ""),
]


@pytest.mark.parametrize("sample,response", CASES)
def test_accuracy_is_the_evaluation_scorer(sample, response):
    z = torch.zeros(2, 4)
    assert accuracy(sample, response, z, RewardContext()) == accuracy_reward(sample, response)


def test_accuracy_and_format_values():
    z, ctx = torch.zeros(0, 4), RewardContext()
    s = _yes_no("yes")
    assert accuracy(s, "yes", z, ctx) == 1.0 and accuracy(s, "no", z, ctx) == 0.0
    assert format_reward(s, "no", z, ctx) == 1.0  # wrong but well-formed
    assert format_reward(s, "the moon", z, ctx) == 0.0  # unparseable for a yes/no question
    assert format_reward(s, "yes", z, RewardContext(stopped=False)) == 0.0  # cut at the token limit
    c = _choice()
    assert format_reward(c, "A", z, ctx) == 1.0 and format_reward(c, "A and B", z, ctx) == 0.0


def test_roi_evidence_is_the_cosine_to_pooled_roi_targets():
    torch.manual_seed(0)
    vis = torch.randn(36, 8)
    idx = torch.tensor([0, 1, 6, 7])
    targets = pool_targets(vis, idx, 2)
    ctx = RewardContext(visual_tokens=vis, roi_index=idx)
    s = _yes_no()
    assert roi_evidence(s, "yes", targets * 3.0, ctx) == pytest.approx(1.0, abs=1e-6)  # scale-free
    assert roi_evidence(s, "yes", -targets, ctx) == pytest.approx(-1.0, abs=1e-6)
    z = torch.randn(2, 8)
    expected = torch.nn.functional.cosine_similarity(z, targets, dim=-1).mean().item()
    assert roi_evidence(s, "yes", z, ctx) == pytest.approx(expected, abs=1e-6)
    # No ROI, no latent steps, or no visual tokens: no evidence to point at.
    assert (
        roi_evidence(
            s,
            "yes",
            z,
            RewardContext(visual_tokens=vis, roi_index=torch.zeros(0, dtype=torch.long)),
        )
        == 0.0
    )
    assert roi_evidence(s, "yes", torch.zeros(0, 8), ctx) == 0.0
    assert roi_evidence(s, "yes", z, RewardContext()) == 0.0


def test_reward_set_weights_components_and_user_rewards_by_import_path(monkeypatch):
    mod = types.ModuleType("my_rewards_mod")

    def brevity(sample, response, latents, context):
        return -0.1 * context.n_tokens

    mod.brevity = brevity
    monkeypatch.setitem(sys.modules, "my_rewards_mod", mod)
    rs = RewardSet(
        {"accuracy": 1.0, "format": 0.5, "roi_evidence": 0.0, "my_rewards_mod:brevity": 2.0}
    )
    assert set(rs.fns) == {"accuracy", "format", "my_rewards_mod:brevity"}  # zero weight dropped
    assert not rs.needs_visual
    s = _yes_no("yes")
    ctxs = [
        RewardContext(n_tokens=1),
        RewardContext(n_tokens=3),
        RewardContext(n_tokens=2, stopped=False),
    ]
    total, parts = rs([s, s, s], ["yes", "no", "yes"], torch.zeros(3, 2, 4), ctxs)
    assert parts["accuracy"].tolist() == [1.0, 0.0, 1.0]
    assert parts["format"].tolist() == [1.0, 1.0, 0.0]
    assert torch.allclose(parts["my_rewards_mod:brevity"], torch.tensor([-0.1, -0.3, -0.2]))
    assert torch.allclose(total, torch.tensor([1.5 - 0.2, 0.5 - 0.6, 1.0 - 0.4]))
    assert RewardSet({"roi_evidence": 1.0}).needs_visual


def test_the_roi_evidence_name_gives_the_assignment_of_every_context():
    """VLPO has no `align` group: `roi_evidence`, `roi_evidence_first` and `roi_evidence_chain` name
    ROI-SFT's `align.assign` the evidence is scored under (`RewardSet.assign`); one per run."""
    assert RewardSet({"accuracy": 1.0}).assign == "raster"
    assert RewardSet({"accuracy": 1.0, "roi_evidence": 0.1}).assign == "raster"
    assert RewardSet({"roi_evidence_first": 0.1}).assign == "first"
    chain = RewardSet(
        {"accuracy": 1.0, "roi_evidence_chain": 0.1, "roi_evidence": 0.0}
    )  # zero weight: not active
    assert (
        chain.assign == "chain"
        and chain.needs_visual
        and chain.fns["roi_evidence_chain"] is roi_evidence
    )
    with pytest.raises(
        MedlvrError, match="under chain and raster: keep one of roi_evidence, roi_evidence_chain"
    ):
        RewardSet({"roi_evidence": 0.1, "roi_evidence_chain": 0.1})


def test_bad_rewards_fail_clearly(monkeypatch):
    with pytest.raises(MedlvrError, match="unknown reward 'acuracy'"):
        resolve_reward("acuracy")
    with pytest.raises(MedlvrError, match="cannot import"):
        resolve_reward("no_such_module_xyz:fn")
    with pytest.raises(MedlvrError, match="has no attribute"):
        resolve_reward("medlvr.train.rewards:nope")
    with pytest.raises(MedlvrError, match="non-zero weight"):
        RewardSet({"accuracy": 0.0})
    mod = types.ModuleType("bad_rewards_mod")
    mod.nan = lambda *a: float("nan")
    mod.text = lambda *a: "one"
    monkeypatch.setitem(sys.modules, "bad_rewards_mod", mod)
    s = _yes_no()
    with pytest.raises(MedlvrError, match="returned nan"):
        RewardSet({"bad_rewards_mod:nan": 1.0})(
            [s], ["yes"], torch.zeros(1, 0, 4), [RewardContext()]
        )
    with pytest.raises(MedlvrError, match="expected a float"):
        RewardSet({"bad_rewards_mod:text": 1.0})(
            [s], ["yes"], torch.zeros(1, 0, 4), [RewardContext()]
        )
