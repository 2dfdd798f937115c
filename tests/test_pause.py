"""The pause-token control (`latent.input=pause`): learned constant latent inputs on tiny real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medlvr.config import LatentConfig, SFTConfig, VLPOConfig, load_config
from medlvr.data.collate import VQACollator
from medlvr.errors import MedlvrError
from medlvr.model.latent import PAUSE_FILE, LatentVLM
from tests.conftest import Killed, kill_at, random_image
from tests.test_latent import _batch, _samples
from tests.test_sft import base_overrides


def _pair(path: Path, steps: int = 3) -> tuple[LatentVLM, LatentVLM]:
    """The same weights with fed-back (`hidden`) and constant (`pause`) latent inputs."""
    torch.manual_seed(0)
    hidden = LatentVLM.from_pretrained(path, LatentConfig(steps=steps, projector="norm"))
    pause = LatentVLM.from_pretrained(
        path, LatentConfig(steps=steps, projector="norm", input="pause")
    )
    return hidden, pause


@pytest.fixture(scope="module")
def pair(tiny_dir):
    return _pair(tiny_dir)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from medlvr.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth84_pause")
    generate(SynthConfig(n=60, seed=0, image_size=84, grid=2, level=2, large_size=1.0, small_size=0.5,
                         question_types={"presence": 1, "attribute": 1}), out)  # fmt: skip
    return out


def test_pause_output_differs_from_hidden_and_its_inputs_ignore_the_prompt(pair):
    hidden, pause = pair
    assert pause.pause is not None and hidden.pause is None
    one = _batch(pause)
    # other questions in each row, other images
    two = VQACollator(pause.processor, pause.adapter)(
        _samples()[::-1], images=[[random_image(84, 84, seed=5)], [random_image(112, 56, seed=6)]]
    )
    with torch.no_grad():
        h, p = hidden(one, latent_steps=3), pause(one, latent_steps=3)
        p2 = pause(two, latent_steps=3)
        g1, g2 = pause.generate(one, 3, max_new_tokens=2), pause.generate(two, 3, max_new_tokens=2)
    assert (h.logits - p.logits).abs().max() > 1e-3 and (h.latents - p.latents).abs().max() > 1e-3
    # the inputs: one learned row per step, the same for every row of every batch
    expected = pause.pause.weight[None].expand(2, -1, -1)
    for z in (p.latents, p2.latents, g1.latents, g2.latents):
        assert torch.equal(z, expected)
    # the states read at the latent positions (what the alignment trains) do depend on the prompt
    assert (p.latent_means[0] - p.latent_means[1]).abs().max() > 1e-3
    assert (p.latent_means - p2.latent_means).abs().max() > 1e-3


def test_pause_inputs_start_at_token_scale_and_extra_steps_reuse_the_last(pair):
    _, pause = pair
    w = pause.pause.weight
    assert w.shape == (3, pause.hidden_size) and not torch.equal(w[0], w[1])
    assert torch.allclose(w.pow(2).mean(-1).sqrt(), torch.full((3,), pause._embed_rms()), rtol=1e-4)
    with torch.no_grad():
        out = pause.generate(_batch(pause, with_answers=False), 5, max_new_tokens=2)
    assert torch.equal(out.latents[:, 3], out.latents[:, 2]) and torch.equal(
        out.latents[:, 4], out.latents[:, 2]
    )


def test_k0_is_unaffected_by_pause(pair):
    hidden, pause = pair
    batch = _batch(hidden)
    with torch.no_grad():
        gh = hidden.generate(batch, 0, max_new_tokens=6)
        gp = pause.generate(batch, 0, max_new_tokens=6)
        fh, fp = hidden(batch, latent_steps=0), pause(batch, latent_steps=0)
    assert gh.token_ids == gp.token_ids and gp.latents.shape == (2, 0, pause.hidden_size)
    assert torch.equal(fh.logits, fp.logits)


def test_pause_cached_parallel_and_recompute_paths_agree(pair):
    _, pause = pair
    batch = _batch(pause)
    with torch.no_grad():
        cached = pause(batch, latent_steps=3)
        full = pause(batch, latent_inputs=cached.latents)
        gen = pause.generate(batch, 3, max_new_tokens=2)
    assert (cached.logits - full.logits).abs().max() < 1e-4
    assert (cached.latent_means - full.latent_means).abs().max() < 1e-4
    assert (gen.latent_means - cached.latent_means).abs().max() < 1e-5
    pause.train()
    pause.backbone.activation_checkpointing_enable()
    try:
        pause.zero_grad()
        recomputed = pause(batch, latent_steps=3)
        recomputed.loss.backward()
    finally:
        pause.backbone.activation_checkpointing_disable()
        pause.eval()
    assert abs(cached.loss.item() - recomputed.loss.item()) < 1e-5
    assert pause.pause.weight.grad is not None and pause.pause.weight.grad.abs().sum() > 0
    pause.zero_grad()


def test_pause_save_load_round_trip_is_exact(tiny_dir, tmp_path):
    _, pause = _pair(tiny_dir)
    batch = _batch(pause, with_answers=False)
    with torch.no_grad():
        pause.pause.weight.add_(0.05 * torch.randn_like(pause.pause.weight))
        before = pause.generate(batch, 3, max_new_tokens=6)
    pause.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / PAUSE_FILE).is_file()
    torch.manual_seed(
        123
    )  # a fresh initialisation would differ: the weights must come from the file
    again = LatentVLM.from_pretrained(tmp_path / "m")
    assert again.latent == pause.latent and again.latent.input == "pause"
    after = again.generate(batch, 3, max_new_tokens=6)
    assert after.token_ids == before.token_ids and torch.equal(after.latents, before.latents)
    # more steps than saved: the extra rows start as the last saved one (the run-time rule)
    longer = LatentVLM.from_pretrained(
        tmp_path / "m", LatentConfig(steps=5, projector="norm", input="pause")
    )
    assert torch.equal(longer.pause.weight[:3], pause.pause.weight) and torch.equal(
        longer.pause.weight[4], pause.pause.weight[2]
    )
    # loaded as hidden, the pause inputs are not used
    assert (
        LatentVLM.from_pretrained(tmp_path / "m", LatentConfig(steps=3, projector="norm")).pause
        is None
    )


def test_pause_refuses_latent_exploration_teacher_forcing_and_vlpo(pair, tiny_dir, tmp_path):
    from medlvr.train.vlpo import check_config

    _, pause = pair
    with pytest.raises(MedlvrError, match=r"latent.input=pause"):
        pause.generate(_batch(pause, with_answers=False), 3, latent_sigma=0.05)
    with pytest.raises(MedlvrError, match=r"latent.input=pause"):
        load_config(SFTConfig, None, ["mode=teacher_forced", "latent.input=pause"])
    with pytest.raises(MedlvrError, match=r"latent.input"):
        LatentConfig(input="echo")
    pause.save_pretrained(tmp_path / "m")
    for path, extra in (
        (tiny_dir, ["latent.input=pause"]),
        (tmp_path / "m", []),
    ):  # by config, or by the checkpoint
        cfg = load_config(
            VLPOConfig,
            None,
            [f"model.path={path}", "latent.projector=norm", "data.train=[x.jsonl]", *extra],
        )
        with pytest.raises(MedlvrError, match=r"start VLPO from a latent.input=hidden checkpoint"):
            check_config(cfg)


def test_sft_in_pause_mode_trains_the_pause_inputs(tiny_dir, synth, tmp_path):
    from medlvr.train.optim import build_optimizer
    from medlvr.train.sft import build_model, run_sft

    cfg = load_config(SFTConfig, None, [*base_overrides(tiny_dir, synth, tmp_path / "run"), "mode=roi", "latent.input=pause",
                                        "optim.projector_lr=0.01", "max_steps=4"])  # fmt: skip
    torch.manual_seed(cfg.seed)  # run_sft seeds the same way before building the model
    start = build_model(cfg, None)
    init = start.pause.weight.detach().clone()
    groups = build_optimizer(start.named_parameters(), cfg.optim).param_groups
    assert any(
        g["lr"] == 0.01 and any(p is start.pause.weight for p in g["params"]) for g in groups
    )
    result = run_sft(cfg)
    trained = result.model.pause.weight.detach()
    assert trained.shape == init.shape and (trained - init).abs().max() > 1e-4
    ce = [r["ce"] for r in result.history]
    al = [r["align"] for r in result.history]
    assert len(set(ce)) == len(ce) and all(a is not None for a in al)
    again = LatentVLM.from_pretrained(result.final_model)
    assert again.latent.input == "pause" and torch.equal(again.pause.weight, trained)
    # without the ROI loss nothing reads the projector in pause mode: it is frozen (DDP needs no unused parameters)
    latent_only = build_model(load_config(SFTConfig, None, [*base_overrides(tiny_dir, synth, tmp_path / "l"), "mode=latent",
                                                              "latent.input=pause"]), None)  # fmt: skip
    assert latent_only.pause.weight.requires_grad and not any(
        p.requires_grad for p in latent_only.projector.parameters()
    )


def test_cli_trains_the_pause_control(tiny_dir, synth, tmp_path):
    from typer.testing import CliRunner

    from medlvr.cli import app

    args = [
        "train",
        "sft",
        *base_overrides(tiny_dir, synth, tmp_path / "run"),
        "mode=latent",
        "max_steps=2",
        "latent.input=pause",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "done: 2 steps" in res.output and (tmp_path / "run" / "final" / PAUSE_FILE).is_file()
    assert LatentVLM.from_pretrained(tmp_path / "run" / "final").latent.input == "pause"


def test_pause_run_resumes_exactly_and_gathered_states_save_the_pause_inputs(
    tiny_dir, synth, tmp_path
):
    from medlvr.train.sft import run_sft

    def cfg(out: Path, *extra: str) -> SFTConfig:
        common = [
            "mode=roi",
            "latent.input=pause",
            "max_steps=4",
            "checkpoint.every=2",
            "checkpoint.keep_last=1",
        ]
        return load_config(
            SFTConfig, None, [*base_overrides(tiny_dir, synth, out), *common, *extra]
        )

    full = run_sft(cfg(tmp_path / "full"))
    with pytest.raises(Killed):
        run_sft(cfg(tmp_path / "cut"), on_step=kill_at(2))
    resumed = run_sft(cfg(tmp_path / "cut", "checkpoint.resume=true"))
    assert [r["step"] for r in resumed.history] == [3, 4]
    assert (full.model.pause.weight - resumed.model.pause.weight).abs().max() < 1e-6
    # FSDP/ZeRO-3 export path: the latent files written from a gathered state dict
    vlm = resumed.model
    vlm.save_latent_files(tmp_path, state_dict={k: v.clone() for k, v in vlm.state_dict().items()})
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / PAUSE_FILE))["weight"], vlm.pause.weight.detach())
