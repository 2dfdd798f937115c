"""Sharded training with FSDP2 (`model.sharding=fsdp2`) on two CPU processes over gloo.

One 2-process SFT run (mode=roi, K=4, a checkpoint every step) is shared by the tests of
equivalence, checkpoint format and export; the resume tests kill one of its ranks in a
copy of that run. Tolerances as in the DDP tests (tests/test_sft.py): the sharded and the
single-process runs differ only in float reduction order, which Adam turns into updates of
up to lr on near-zero gradients; measured: losses ~1e-6, parameters ~3e-5 apart.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medlvr.config import SFTConfig, load_config
from medlvr.model.latent import LatentVLM
from medlvr.train.sft import run_sft
from tests import test_sft
from tests.conftest import torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("fsdp_worker.py")
synth = test_sft.synth  # the fixture: 84-px images (3x3 visual tokens), questions with ROIs
LOSS_TOL, PARAM_TOL = 1e-4, 5e-4
STEPS = 4


def sft_overrides(tiny_dir: Path, synth: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={tiny_dir}", f"data.train=[{synth / 'train.jsonl'}]", f"output_dir={out}",
        "mode=roi", "latent.steps=4", f"max_steps={STEPS}", "optim.lr=3e-3", "optim.warmup_steps=1",
        "log.every=1", "log.progress=false", "log.tensorboard=false", "seed=0", "checkpoint.every=1",
        f"checkpoint.keep_last={STEPS}", "model.sharding=fsdp2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sharded_sft(tiny_dir, synth, tmp_path_factory) -> Path:
    """2 processes x batch 2, full fine-tuning; the worker also answers 3 test questions with
    the sharded model, as `medlvr predict` would."""
    out = tmp_path_factory.mktemp("fsdp_sft")
    from medlvr.data.schema import read_jsonl

    questions = [
        {"image": str(s.images[0]), "question": s.question}
        for s in read_jsonl(synth / "test.jsonl")[:3]
    ]
    (out / "questions.json").write_text(json.dumps(questions))
    proc = torchrun(WORKER, "sft", str(out), *sft_overrides(tiny_dir, synth, out / "run", "batch_size=2"),
                    env={"MEDLVR_TEST_ANSWERS": str(out / "questions.json")})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.xdist_group("fsdp_sft")  # one worker runs the shared 2-process run once
def test_two_sharded_processes_match_one_process_with_the_same_global_batch(
    sharded_sft, tiny_dir, synth, tmp_path
):
    """SFT, mode=roi, K=4: FSDP2 x2 at batch 2 vs one process at batch 4; every trained
    parameter (decoder layers, vision blocks, embeddings with the latent token rows, the
    latent projector) is a shard on each process."""
    single = run_sft(
        load_config(
            SFTConfig, None, sft_overrides(tiny_dir, synth, tmp_path / "run", "batch_size=4")
        )
    )
    two = load_file(str(sharded_sft / "params.safetensors"))
    ref = single.model.state_dict()
    assert set(two) == set(ref)
    diff = max((two[n] - ref[n]).abs().max().item() for n in two)
    assert diff < PARAM_TOL, diff
    start = LatentVLM.from_pretrained(tiny_dir).state_dict()
    moved = max((ref[n] - start[n]).abs().max().item() for n in ref)
    assert moved > 10 * PARAM_TOL  # the runs trained
    hist = json.loads((sharded_sft / "history-rank0.json").read_text())
    assert (
        [r["step"] for r in hist]
        == [r["step"] for r in single.history]
        == list(range(1, STEPS + 1))
    )
    for a, b in zip(hist, single.history):
        for key in ("ce", "align", "grad_norm"):
            assert abs(a[key] - b[key]) < LOSS_TOL * max(1.0, abs(b[key])), (
                a["step"],
                key,
                a[key],
                b[key],
            )

    shards = [json.loads((sharded_sft / f"shards-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["sharded"] for s in shards)
    assert set(shards[0]["local"]) == {n for n, _ in single.model.named_parameters()}
    for name, full in ((n, ref[n]) for n in shards[0]["local"]):
        local = [s["local"][name] for s in shards]
        assert None not in local, f"{name} is not sharded"
        assert local[0][0] + local[1][0] == full.shape[0] and local[0][1:] == list(
            full.shape[1:]
        ), name
    for part in ("language_model.layers.1.", "visual.blocks.1.", "embed_tokens", "projector.scale"):
        assert any(part in n for n in ref), part


@pytest.mark.xdist_group("fsdp_sft")  # one worker runs the shared 2-process run once
def test_a_sharded_checkpoint_is_safetensors_shards_and_json(sharded_sft):
    """Each process writes its own shards (torch.distributed.checkpoint's safetensors writer,
    offsets in the header); nothing is pickled, nothing gathered."""
    step = sharded_sft / "run" / f"step-{STEPS:07d}"
    files = sorted(str(f.relative_to(step)) for f in step.rglob("*") if f.is_file())
    assert files == [
        "config.yaml", "rng-rank0.json", "rng-rank0.safetensors", "rng-rank1.json", "rng-rank1.safetensors",
        "scheduler.json", "sharded/shard-00001-model-00001-of-00001.safetensors",
        "sharded/shard-00002-model-00001-of-00001.safetensors", "trainer_state.json",
    ]  # fmt: skip
    assert "pickle_files" not in json.loads((step / "trainer_state.json").read_text())
    shard_rows = {}
    for r in (1, 2):
        with safe_open(step / f"sharded/shard-0000{r}-model-00001-of-00001.safetensors", "pt") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            shard_rows[r] = {
                k: (offsets[k]["saved_offsets"][:1], f.get_slice(k).get_shape()[:1])
                for k in f.keys()  # noqa: SIM118 (safetensors' handle)
            }
    name = "model/backbone.model.language_model.layers.0.mlp.up_proj.weight"
    (o1, n1), (o2, n2) = shard_rows[1][name], shard_rows[2][name]
    assert (o1, o2) == ([0], n1) and n1 == n2  # two halves of the rows
    assert any(k.startswith("optim/") and k.endswith("exp_avg_sq") for k in shard_rows[2])


@pytest.mark.xdist_group("fsdp_sft")  # one worker runs the shared 2-process run once
def test_the_export_of_a_sharded_run_answers_as_the_sharded_model(sharded_sft):
    """`final/` is an ordinary model folder (gathered safetensors); `medlvr predict` in one
    process gives the answers the trained sharded model gave."""
    from typer.testing import CliRunner

    from medlvr.cli import app

    final = sharded_sft / "run" / "final"
    assert (final / "model.safetensors").is_file() and not [
        f for f in final.rglob("*") if f.suffix in (".bin", ".pt", ".pkl", ".distcp")
    ]
    from tests.fsdp_worker import answers

    questions = json.loads((sharded_sft / "questions.json").read_text())
    sharded = json.loads((sharded_sft / "answers-rank0.json").read_text())
    assert sharded == json.loads((sharded_sft / "answers-rank1.json").read_text())
    for q, expected in zip(questions, sharded["texts"]):
        res = CliRunner().invoke(app, ["predict", "--model", str(final), "--image", q["image"],
                                       "--question", q["question"], "--max-new-tokens", "8"])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert f"answer: {expected}\n" in res.output, (res.output, expected)
    alone = answers(LatentVLM.from_pretrained(final), sharded_sft / "questions.json")
    assert alone["texts"] == sharded["texts"] and alone["forced"] == sharded["forced"]
    latents = torch.tensor(
        alone["latents"]
    )  # [questions, K, d]: these vary with the image and the weights
    assert (latents[0] - latents[1]).abs().max() > 1e-3
    assert torch.allclose(latents, torch.tensor(sharded["latents"]), atol=1e-6)
    exported = LatentVLM.from_pretrained(final).state_dict()
    trained = load_file(str(sharded_sft / "params.safetensors"))
    assert set(exported) == set(trained) and all(
        torch.equal(exported[n], trained[n]) for n in trained
    )


@pytest.mark.xdist_group("fsdp_sft")  # one worker runs the shared 2-process run once
@pytest.mark.slow  # ~45 s: two launches
def test_resume_after_killing_one_rank_gives_the_uninterrupted_weights(
    sharded_sft, tiny_dir, synth, tmp_path
):
    """Rank 1 is killed (SIGKILL) after step 2; `--resume` on 2 processes ends with the
    uninterrupted run's weights exactly, and on 1 process (batch 4: the same global batch,
    the shards re-split on load) within the equivalence tolerance."""
    run = tmp_path / "run"
    args = sft_overrides(tiny_dir, synth, run, "batch_size=2")
    killed = torchrun(WORKER, "sft", str(tmp_path), *args, env={"MEDLVR_TEST_KILL": "2:1"})
    assert killed.returncode != 0 and not (run / "final").exists()
    assert sorted(p.name for p in run.glob("step-*")) == ["step-0000001", "step-0000002"]
    shutil.copytree(run, tmp_path / "copy")

    resumed = torchrun(WORKER, "sft", str(tmp_path), *args, "checkpoint.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = load_file(str(sharded_sft / "params.safetensors"))
    after = load_file(str(tmp_path / "params.safetensors"))
    assert all(torch.equal(after[n], uninterrupted[n]) for n in uninterrupted)
    assert [r["step"] for r in json.loads((tmp_path / "history-rank0.json").read_text())] == [3, 4]

    with pytest.warns(UserWarning, match="batch_size 2 -> 4"):  # the global batch stays 4
        one = run_sft(load_config(SFTConfig, None, sft_overrides(
            tiny_dir, synth, tmp_path / "copy", "batch_size=4", "checkpoint.resume=true")))  # fmt: skip
    assert [r["step"] for r in one.history] == [3, 4]
    ref = one.model.state_dict()
    diff = max((uninterrupted[n] - ref[n]).abs().max().item() for n in uninterrupted)
    assert diff < PARAM_TOL, diff


@pytest.mark.xdist_group("fsdp_sft")  # one worker runs the shared 2-process run once
def test_sharding_is_fixed_on_resume(sharded_sft, tiny_dir, synth, tmp_path):
    """A sharded checkpoint holds no model folder or optimizer files: resuming it unsharded is refused in one line."""
    from medlvr.errors import MedlvrError

    shutil.copytree(
        sharded_sft / "run", tmp_path / "run", ignore=shutil.ignore_patterns("final", "result.json")
    )
    args = [
        a
        for a in sft_overrides(tiny_dir, synth, tmp_path / "run", "batch_size=4")
        if a != "model.sharding=fsdp2"
    ]
    with pytest.raises(MedlvrError, match=r"cannot resume .* model.sharding 'fsdp2' -> 'none'"):
        run_sft(load_config(SFTConfig, None, [*args, "checkpoint.resume=true"]))


# ---------------------------------------------------------------------------- VLPO


@pytest.mark.slow  # ~30 s: a 2-process launch
def test_vlpo_two_sharded_processes_match_one_process_on_the_same_trajectories(
    tiny_dir, tmp_path, monkeypatch
):
    """VLPO with LoRA (adapters, the latent token rows, the projector) and a KL reference
    (the adapter disabled): FSDP2 x2 at 2 prompts each vs one process at 4 prompts drawing the
    ranks' rollout streams (tests/test_vlpo.py explains the stream wrapper). Rollouts run on
    the gathered model, so the processes may stop their answers at different lengths."""
    from medlvr.config import VLPOConfig
    from medlvr.data.synth import SynthConfig, generate
    from medlvr.train import vlpo
    from tests.test_vlpo import _SMALL, _cfg_overrides, _rollouts_of_ranks

    synth = generate(SynthConfig(n=120, seed=3, level=1, question_types={"presence": 1.0}, describe=False),
                     tmp_path / "synth")  # fmt: skip
    common = [*_SMALL, "max_steps=2", "vlpo.update_epochs=2", "vlpo.beta=0.05", "checkpoint.every=0",
              "vlpo.mini_batches=2", "model.finetune=lora", "vlpo.max_new_tokens=4", "checkpoint.merge_lora=false"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    proc = torchrun(WORKER, "vlpo", str(two), *_cfg_overrides(two, tiny_dir, synth, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setattr(vlpo, "sample_rollouts", _rollouts_of_ranks(world=2, per_rank=2, seed=0))
    recipe = "tiny/vlpo"  # the shipped recipe
    single = vlpo.run_vlpo(load_config(VLPOConfig, recipe, _cfg_overrides(
        one, tiny_dir, synth, *common, "batch_size=4", "model.sharding=fsdp2")))  # fmt: skip

    shards = json.loads((two / "shards-rank1.json").read_text())
    assert shards["sharded"] and any(
        "lora_A" in n and local for n, local in shards["local"].items()
    )
    two_params = load_file(str(two / "params.safetensors"))
    ref = single.model.state_dict()
    trained = [n for n, p in single.model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens" in n for n in trained) and any("projector" in n for n in trained)
    diff = max((two_params[n] - ref[n]).abs().max().item() for n in trained)
    moved = max(ref[n].abs().max().item() for n in trained if "lora_B" in n)  # lora_B starts at 0
    assert diff < PARAM_TOL < moved, (diff, moved)
    hist = json.loads((two / "history-rank0.json").read_text())
    assert [r["step"] for r in hist] == [r["step"] for r in single.history] == [1, 2]
    for a, b in zip(hist, single.history):
        assert (
            a["samples_seen"] == b["samples_seen"] and a["optimizer_steps"] == b["optimizer_steps"]
        )
        for key in ("reward_mean", "accuracy", "loss", "clip_fraction", "ratio_mean", "kl", "entropy", "latent_norm",
                    "response_tokens", "grad_norm"):  # fmt: skip
            assert abs(a[key] - b[key]) < LOSS_TOL, (a["step"], key, a[key], b[key])
    assert any(r["kl"] > 0 for r in hist[1:]) and any(abs(r["loss"]) > 1e-3 for r in hist)


# ---------------------------------------------------------------------------- every backbone family

OTHER_FAMILIES = ("qwen2_vl", "qwen3_vl", "gemma3", "smolvlm")


@pytest.mark.slow  # ~40 s: four runs in one launch
def test_every_family_shards_its_decoder_layers_and_vision_blocks(tiny_factory, synth, tmp_path):
    """Each family's `shard_layers` (medlvr/model/backbones.py) are FSDP units: 2 sharded steps
    (mode=roi, K=2) match one process, and every trained parameter is split over the processes."""
    from medlvr.model.backbones import get_adapter

    dirs = [tiny_factory(family=f) for f in OTHER_FAMILIES]
    common = ["mode=roi", "latent.steps=2", "max_steps=2", f"data.train=[{synth / 'train.jsonl'}]", "optim.lr=3e-3",
              "log.every=1", "log.progress=false", "log.tensorboard=false", "seed=0", "model.sharding=fsdp2"]  # fmt: skip
    proc = torchrun(WORKER, "sft", str(tmp_path), *common, "batch_size=2",
                    env={"MEDLVR_TEST_MODELS": ",".join(map(str, dirs))})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, (family, model) in enumerate(zip(OTHER_FAMILIES, dirs)):
        single = run_sft(load_config(SFTConfig, None, [*common, "batch_size=4", f"model.path={model}",
                                                      f"output_dir={tmp_path / family}"]))  # fmt: skip
        ref = single.model.state_dict()
        two = load_file(str(tmp_path / str(i) / "params.safetensors"))
        diff = max((two[n] - ref[n]).abs().max().item() for n in ref)
        assert diff < PARAM_TOL, (family, diff)
        local = [
            json.loads((tmp_path / str(i) / f"shards-rank{r}.json").read_text())["local"]
            for r in (0, 1)
        ]
        assert all(
            local[0][n] is not None and local[0][n][0] + local[1][n][0] == ref[n].shape[0]
            for n in local[0]
        )
        for path in get_adapter(
            family
        ).shard_layers:  # decoder layers and vision blocks, with their shards
            assert any(f".{path}.1." in f".{n}" for n in local[0]), (family, path)
