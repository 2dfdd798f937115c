"""ROI-SFT trainer on the tiny real model and the synthetic benchmark (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medlvr.config import SFTConfig, load_config
from medlvr.data.schema import read_jsonl, write_jsonl
from medlvr.errors import MedlvrError
from medlvr.train.sft import run_sft
from tests.conftest import Killed, kill_at


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """Small synthetic benchmark: 84-px images (3x3 visual tokens), 2x2 regions, presence and shape questions."""
    from medlvr.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth84")
    cfg = SynthConfig(n=120, seed=0, image_size=84, grid=2, level=2, large_size=1.0, small_size=0.5,
                      question_types={"presence": 1, "attribute": 1})  # fmt: skip
    generate(cfg, out)
    return out


def make_cfg(tiny_dir: Path, synth: Path, out: Path, *overrides: str) -> SFTConfig:
    return load_config(SFTConfig, None, base_overrides(tiny_dir, synth, out) + list(overrides))


def base_overrides(tiny_dir: Path, synth: Path, out: Path) -> list[str]:
    return [
        f"model.path={tiny_dir}", f"data.train=[{synth / 'train.jsonl'}]", f"output_dir={out}",
        "batch_size=4", "max_steps=4", "optim.lr=3e-3", "optim.warmup_steps=1", "log.every=1",
        "log.progress=false", "log.tensorboard=false", "latent.steps=2", "seed=0",
    ]  # fmt: skip


def params(vlm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in vlm.named_parameters()}


# ---------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nope=1", "Key 'nope' not in"),
        ("optim.lr=fast", "optim.lr"),
        ("latent.steps=-1", "latent.steps must be >= 0"),
        ("mode=rocket", "mode"),
        ("data.train=[/no/such/file.jsonl]", "training data file not found"),
        ("model.path=/no/such/model", "model.path is not a folder"),
        ("mode=latent latent.steps=0", "needs latent.steps >= 1"),
        ("align.weight=0", "align.weight=0"),
    ],
)
def test_bad_configuration_fails_before_any_compute(tiny_dir, synth, tmp_path, override, message):
    out = tmp_path / "run"
    with pytest.raises(MedlvrError, match=message):
        run_sft(make_cfg(tiny_dir, synth, out, *override.split()))
    assert not out.exists(), "nothing may be written before the configuration is checked"


def test_lambda_without_roi_data_fails(tiny_dir, synth, tmp_path):
    samples = [s.model_copy(update={"rois": []}) for s in read_jsonl(synth / "train.jsonl")]
    write_jsonl(samples, synth / "no_roi.jsonl")
    cfg = make_cfg(
        tiny_dir, synth, tmp_path / "run", f"data.train=[{synth / 'no_roi.jsonl'}]", "mode=roi"
    )
    with pytest.raises(MedlvrError, match="no training record has ROIs"):
        run_sft(cfg)
    run_sft(
        make_cfg(
            tiny_dir,
            synth,
            tmp_path / "ok",
            f"data.train=[{synth / 'no_roi.jsonl'}]",
            "mode=latent",
            "max_steps=1",
        )
    )


@pytest.mark.parametrize("mode", ["roi", "teacher_forced"])
def test_roi_loss_is_normalised_by_the_samples_that_contribute(tiny_dir, synth, tmp_path, mode):
    """An ROI over the whole image leaves InfoNCE no negatives: that sample's term is 0 whatever the
    latents. Giving a sample such an ROI instead of none must change nothing: not the logged
    alignment loss, not the trained weights (issue 13, item 8: it was counted in the normaliser)."""
    from PIL import Image

    from medlvr.data.schema import ROI

    samples = read_jsonl(synth / "train.jsonl")
    first = next(s for s in samples if s.rois)
    other = next(s for s in samples if s.id != first.id)
    w, h = Image.open(synth / other.images[0]).size
    runs = {}
    for name, rois in (("none", []), ("whole", [ROI(box=(0, 0, w, h))])):
        write_jsonl([first, other.model_copy(update={"rois": rois})], tmp_path / f"{name}.jsonl")
        result = run_sft(make_cfg(tiny_dir, synth, tmp_path / name, f"data.train=[{tmp_path / f'{name}.jsonl'}]",
                                  f"mode={mode}", "align.kind=infonce", "batch_size=2", "max_steps=1"))  # fmt: skip
        runs[name] = result
    assert runs["none"].metrics["align"] > 0
    assert runs["whole"].metrics["align"] == pytest.approx(runs["none"].metrics["align"], rel=1e-6)
    if (
        mode == "roi"
    ):  # (teacher forcing feeds a sample's ROI targets as its latents: the CE differs too)
        a, b = params(runs["none"].model), params(runs["whole"].model)
        assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6


def test_alignment_mask_counts_samples_with_a_signal():
    from medlvr.train.losses import alignment_mask

    roi = [torch.zeros(0, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([0, 1, 2])]
    assert alignment_mask(roi, [3, 3, 3], "infonce").tolist() == [
        False,
        True,
        False,
    ]  # no negatives: no signal
    assert alignment_mask(roi, [3, 3, 3], "cosine").tolist() == [False, True, True]
    assert alignment_mask(roi, [3, 3, 3], "mse").tolist() == [False, True, True]


def test_the_alignment_mask_is_computed_once_per_micro_batch(
    tiny_dir, synth, tmp_path, monkeypatch
):
    """R, the step's normaliser, and each micro-batch's alignment loss read one mask per micro-batch."""
    from medlvr.train import sft

    calls: list[int] = []
    real = sft.alignment_mask

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "alignment_mask", spy)
    result = run_sft(
        make_cfg(tiny_dir, synth, tmp_path / "run", "mode=roi", "grad_accum=2", "max_steps=2")
    )
    assert len(calls) == 2 * 2 and all(r["align"] is not None for r in result.history)


def _two_hop(synth: Path, name: str, roi_hops: list[int]) -> Path:
    """The synthetic records with an anchor ROI (the upper-left quarter) before their own: two hops."""
    from medlvr.data.schema import ROI

    samples = [
        s.model_copy(update={"rois": [ROI(box=(0, 0, 42, 42)), *s.rois], "meta": {**s.meta, "hops": 2, "roi_hops": roi_hops}})
        for s in read_jsonl(synth / "train.jsonl") if len(s.rois) == 1
    ]  # fmt: skip
    write_jsonl(samples, synth / name)
    return synth / name


def test_chain_alignment_trains_on_multi_hop_records(tiny_dir, synth, tmp_path):
    from medlvr.data.collate import VQACollator
    from medlvr.model.latent import LatentVLM
    from medlvr.train.sft import _sample_fields

    data = _two_hop(synth, "two_hop.jsonl", [1, 2])
    vlm = LatentVLM.from_pretrained(tiny_dir)
    sample = read_jsonl(data)[0]
    cfg = make_cfg(tiny_dir, synth, tmp_path / "run", f"data.train=[{data}]", "mode=roi", "align.assign=chain",
                   "latent.steps=3", "max_steps=2")  # fmt: skip
    batch = VQACollator(vlm.processor, vlm.adapter, sample_fields=_sample_fields(cfg, []))([sample])
    hops = batch["roi_hop_index"][0]
    assert len(hops) == 2 and torch.equal(torch.cat(hops).unique(), batch["roi_index"][0])
    result = run_sft(cfg)
    assert all(r["align"] is not None and r["align"] == r["align"] for r in result.history)
    bad = _two_hop(synth, "bad_hops.jsonl", [1, 3])
    with pytest.raises(MedlvrError, match=r"must lie in 1..2"):
        run_sft(
            make_cfg(
                tiny_dir,
                synth,
                tmp_path / "bad",
                f"data.train=[{bad}]",
                "mode=roi",
                "align.assign=chain",
            )
        )
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_roi_sft_lowers_both_losses_and_beats_the_untrained_model(tiny_dir, synth, tmp_path):
    from medlvr.config import LatentConfig
    from medlvr.model.latent import LatentVLM
    from medlvr.train.sft import validation_accuracy

    val = read_jsonl(synth / "val.jsonl")
    untrained = LatentVLM.from_pretrained(tiny_dir, LatentConfig(steps=2))
    acc0 = validation_accuracy(untrained, val, latent_steps=2)
    cfg = make_cfg(tiny_dir, synth, tmp_path / "run", "mode=roi", "align.kind=infonce", "max_steps=30", "batch_size=8",
                   f"data.val={synth / 'val.jsonl'}", "checkpoint.every=0")  # fmt: skip
    result = run_sft(cfg)
    ce = [r["ce"] for r in result.history if "ce" in r]
    al = [r["align"] for r in result.history if r.get("align") is not None]
    assert len(ce) == 30 and len(al) == 30
    assert sum(ce[-5:]) / 5 < 0.6 * sum(ce[:5]) / 5, ce
    assert sum(al[-5:]) / 5 < sum(al[:5]) / 5 - 0.05, al
    assert result.metrics["val_accuracy"] > acc0, (acc0, result.metrics["val_accuracy"])
    # the run leaves metrics, a resumable checkpoint and a loadable export behind
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1].get("final") and rows[-1]["val_accuracy"] == result.metrics["val_accuracy"]
    reloaded = LatentVLM.from_pretrained(result.final_model)
    assert reloaded.latent.steps == 2


@pytest.mark.parametrize(
    "overrides",
    [
        ["mode=plain"],
        ["mode=latent", "latent.projector=mlp"],
        ["mode=teacher_forced", "align.kind=cosine"],
        ["mode=roi", "align.kind=mse", "align.assign=first", "curriculum=[1,2]"],
        [
            "mode=roi",
            "model.gradient_checkpointing=true",
            "grad_accum=2",
            "batch_size=2",
            "model.freeze_vision=true",
        ],
    ],
    ids=["plain", "latent-mlp", "teacher-forced", "roi-curriculum", "roi-ckpt-accum-frozen"],
)
def test_every_mode_trains_a_few_steps(tiny_dir, synth, tmp_path, overrides):
    from medlvr.model.latent import LatentVLM

    torch.manual_seed(0)
    before = params(LatentVLM.from_pretrained(tiny_dir))
    result = run_sft(make_cfg(tiny_dir, synth, tmp_path / "run", "max_steps=2", *overrides))
    after = params(result.model)
    assert all(torch.isfinite(torch.tensor(r["ce"])) for r in result.history)
    changed = {n for n in before if n in after and not torch.equal(before[n], after[n])}
    assert changed
    if "model.freeze_vision=true" in overrides:
        assert not any(".visual." in n and "merger" not in n for n in changed)
    k = result.history[-1]["latent_steps"]
    assert k == {"plain": 0}.get(overrides[0].split("=")[1], 2)


def test_roi_direct_aligns_the_answer_position_without_latent_steps(tiny_dir, synth, tmp_path):
    """The ROI control without latents: K = 0, and the alignment term trains the state the
    answer is read from (it falls), while the exported model answers with no latent steps."""
    from medlvr.model.latent import LatentVLM

    cfg = make_cfg(tiny_dir, synth, tmp_path / "run", "mode=roi_direct", "latent.steps=0", "latent.projector=norm",
                   "max_steps=20", "batch_size=8", "checkpoint.every=0")  # fmt: skip
    result = run_sft(cfg)
    al = [r["align"] for r in result.history if r.get("align") is not None]
    assert len(al) == 20 and all(r["latent_steps"] == 0 for r in result.history)
    assert sum(al[-5:]) / 5 < sum(al[:5]) / 5 - 0.05, al
    assert LatentVLM.from_pretrained(result.final_model).latent.steps == 0
    with pytest.raises(MedlvrError, match="roi_direct answers with no latent steps"):
        make_cfg(tiny_dir, synth, tmp_path / "bad", "mode=roi_direct", "latent.steps=2")


# ---------------------------------------------------------------------------- resume


def test_kill_and_resume_matches_an_uninterrupted_run(tiny_dir, synth, tmp_path):
    common = ("mode=roi", "max_steps=6", "checkpoint.every=3", "checkpoint.keep_last=1")
    full = run_sft(make_cfg(tiny_dir, synth, tmp_path / "full", *common))
    with pytest.raises(Killed):
        run_sft(make_cfg(tiny_dir, synth, tmp_path / "cut", *common), on_step=kill_at(3))
    assert [p.name for p in (tmp_path / "cut").glob("step-*")] == ["step-0000003"]
    resumed = run_sft(
        make_cfg(tiny_dir, synth, tmp_path / "cut", *common, "checkpoint.resume=true")
    )
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    for a, b in zip(full.history[3:], resumed.history):
        assert a["step"] == b["step"]
        assert abs(a["ce"] - b["ce"]) < 1e-5 and abs(a["align"] - b["align"]) < 1e-5
    pa, pb = params(full.model), params(resumed.model)
    assert max((pa[n] - pb[n]).abs().max().item() for n in pa) < 1e-5
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in (tmp_path / "cut").glob("step-*")] == ["step-0000006"], "keep_last=1"
    # Resuming the finished run again changes nothing: same result, no file rewritten.
    files = [f for f in (tmp_path / "cut").rglob("*") if f.is_file()]
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    again = run_sft(make_cfg(tiny_dir, synth, tmp_path / "cut", *common, "checkpoint.resume=true"))
    assert (
        again.steps == 6
        and again.metrics == json.loads((tmp_path / "cut" / "result.json").read_text())["metrics"]
    )
    assert again.metrics["ce"] == pytest.approx(resumed.metrics["ce"])
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before


# ---------------------------------------------------------------------------- LoRA


def test_lora_changes_only_adapters_and_the_merged_export_matches(tiny_dir, synth, tmp_path):
    from transformers import AutoModelForImageTextToText

    from medlvr.data.collate import VQACollator
    from medlvr.model.latent import LatentVLM
    from medlvr.train.checkpoint import export_final
    from medlvr.train.data import load_image

    torch.manual_seed(0)
    base = params(LatentVLM.from_pretrained(tiny_dir))
    cfg = make_cfg(tiny_dir, synth, tmp_path / "run", "mode=roi", "model.finetune=lora", "lora.r=4", "lora.dropout=0",
                   "checkpoint.merge_lora=false", "max_steps=3")  # fmt: skip
    result = run_sft(cfg)
    vlm = result.model
    assert (result.final_model / "adapter" / "adapter_model.safetensors").is_file()
    after = params(vlm)
    lora_names = [n for n in after if "lora_" in n]
    assert lora_names and any(
        not torch.equal(after[n], torch.zeros_like(after[n])) for n in lora_names if "lora_B" in n
    )
    # The latent special tokens' rows train through peft's trainable tokens (issue 13, item 3), not the whole embedding.
    deltas = [n for n in after if "trainable_tokens_delta" in n]
    assert len(deltas) == 1 and after[deltas[0]].shape == (3, vlm.hidden_size)
    assert after[deltas[0]].abs().sum(-1)[[0, 2]].gt(0).all(), (
        "<|latent_start|> and <|latent_end|> rows must learn"
    )
    for name, value in after.items():
        if "lora_" in name or "trainable_tokens_delta" in name or name.startswith("projector."):
            continue
        plain = name.replace("backbone.base_model.model.", "backbone.").replace(".base_layer", "")
        plain = plain.replace(".token_adapter", "")
        assert torch.equal(value, base[plain]), f"{name} changed"

    samples = read_jsonl(synth / "val.jsonl")[:3]
    batch = VQACollator(vlm.processor, vlm.adapter)(
        samples, images=[[load_image(p) for p in s.images] for s in samples]
    )
    vlm.eval()
    with torch.no_grad():
        adapter_logits = vlm(batch, latent_steps=2).logits
    merged_dir = export_final(vlm, tmp_path / "merged", lora=True, merge_lora=True)
    merged = LatentVLM.from_pretrained(merged_dir)
    with torch.no_grad():
        merged_logits = merged(batch, latent_steps=2).logits
    assert (adapter_logits - merged_logits).abs().max() < 1e-5
    plain_tf = AutoModelForImageTextToText.from_pretrained(str(merged_dir))  # plain transformers
    assert type(plain_tf).__name__ == "Qwen2_5_VLForConditionalGeneration"


# ---------------------------------------------------------------------------- two processes


@pytest.mark.distributed
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tiny_dir, synth, tmp_path):
    """torchrun (gloo) x2 at batch 2 vs one process at batch 4: same samples per step.

    Tolerance: 1e-4 on every logged loss, 5e-4 on every parameter. Float reduction order
    is the only difference (the loss is a global sum, see medlvr.train.sft), but Adam
    divides by sqrt(v), which turns ~1e-9 noise on near-zero gradients into updates of up
    to lr; measured: losses agree to ~1e-6, parameters to ~5e-5.
    """
    from safetensors.torch import load_file

    from tests.conftest import torchrun

    worker = Path(__file__).with_name("sft_ddp_worker.py")
    common = ["mode=roi", "max_steps=3"]
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    proc = torchrun(
        worker, str(two), *base_overrides(tiny_dir, synth, two / "run"), *common, "batch_size=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = run_sft(make_cfg(tiny_dir, synth, one / "run", *common, "batch_size=4"))

    p0, p1 = (
        load_file(str(two / "params-rank0.safetensors")),
        load_file(str(two / "params-rank1.safetensors")),
    )
    assert all(torch.equal(p0[n], p1[n]) for n in p0), "ranks diverged"
    ref = {n: p.detach() for n, p in single.model.named_parameters()}
    diff = max((p0[n] - ref[n]).abs().max().item() for n in p0)
    assert diff < 5e-4, diff  # the parameters themselves move ~1e-2 over these steps
    hist = json.loads((two / "history-rank0.json").read_text())
    assert [r["step"] for r in hist] == [r["step"] for r in single.history] == [1, 2, 3]
    for a, b in zip(hist, single.history):
        assert abs(a["ce"] - b["ce"]) < 1e-4 and abs(a["align"] - b["align"]) < 1e-4


# ---------------------------------------------------------------------------- command line and recipes


def test_cli_trains_resumes_and_reports_user_errors(tiny_dir, synth, tmp_path):
    from typer.testing import CliRunner

    from medlvr.cli import app

    runner = CliRunner()
    args = [
        "train",
        "sft",
        *base_overrides(tiny_dir, synth, tmp_path / "run"),
        "mode=latent",
        "max_steps=2",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "done: 2 steps" in res.output and (tmp_path / "run" / "final" / "config.json").is_file()
    res = runner.invoke(app, [*args, "--resume"])  # a finished run resumes to a no-op
    assert res.exit_code == 0 and "done: 2 steps" in res.output
    res = runner.invoke(app, ["train", "sft", "batch_size=two"])
    assert res.exit_code == 2 and "batch_size" in res.output


@pytest.mark.parametrize(
    "recipe",
    ["tiny", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_8b", "medgemma_4b", "smolvlm2_2b"],
)
def test_recipes_parse(recipe):
    cfg = load_config(SFTConfig, f"{recipe}/sft")  # a shipped recipe, by name
    assert (
        cfg.mode == "roi" and cfg.align.kind == "infonce" and not Path(cfg.model.path).is_absolute()
    )
    if (
        cfg.model.finetune == "lora"
    ):  # the latent tokens' rows train through peft's trainable tokens, not embed_tokens
        assert cfg.lora.train_latent_tokens and "embed_tokens" not in cfg.lora.modules_to_save


def test_embed_tokens_in_modules_to_save_and_trainable_latent_rows_exclude_each_other():
    from medlvr.config import LoraConfig

    with pytest.raises(MedlvrError, match="train_latent_tokens=false"):
        LoraConfig(modules_to_save=["embed_tokens"])
    assert LoraConfig(
        modules_to_save=["embed_tokens"], train_latent_tokens=False
    ).modules_to_save == ["embed_tokens"]


# ---------------------------------------------------------------------------- the reasoning curriculum


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> Path:
    """Two-hop chain questions with their written reasoning (`meta.reasoning`), 112-px images."""
    from medlvr.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("chains112")
    generate(SynthConfig(n=60, seed=0, image_size=112, large_size=1.0, small_size=0.5, question_types={"chain": 1.0}, hops=(2, 2),
                         describe=False), out)  # fmt: skip
    return out


def _recording_targets(monkeypatch) -> list[list[str]]:
    """Patch the trainer's collator to record each micro-batch's answer texts, in the order they are built."""
    from medlvr.data.collate import VQACollator
    from medlvr.train import sft

    seen: list[list[str]] = []

    class Recording(VQACollator):
        def __call__(self, samples, images=None):
            seen.append([s.answer for s in samples])
            return super().__call__(samples, images)

    monkeypatch.setattr(sft, "VQACollator", Recording)
    return seen


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mode=latent", "replace_reasoning=true"], "give a curriculum"),
        (["mode=roi", "replace_reasoning=true", "curriculum=[0,2]"], "mode=latent"),
        (["mode=latent", "curriculum=[0,2]"], ">= 0 with replace_reasoning"),
    ],
)
def test_reasoning_curriculum_settings_are_checked(tiny_dir, chains, tmp_path, overrides, message):
    with pytest.raises(MedlvrError, match=message):
        make_cfg(tiny_dir, chains, tmp_path / "run", *overrides)


def test_reasoning_curriculum_needs_records_with_written_reasoning(tiny_dir, synth, tmp_path):
    with pytest.raises(MedlvrError, match="no training record has them"):
        run_sft(
            make_cfg(
                tiny_dir,
                synth,
                tmp_path / "run",
                "mode=latent",
                "replace_reasoning=true",
                "curriculum=[0,2]",
            )
        )


def test_reasoning_curriculum_hands_written_steps_to_the_latents_one_stage_at_a_time(
    tiny_dir, chains, tmp_path, monkeypatch
):
    seen = _recording_targets(monkeypatch)
    common = ("mode=latent", "replace_reasoning=true", "curriculum=[0,2,4]", "max_steps=6", "data.max_answer_tokens=48",
              "checkpoint.every=3", "checkpoint.keep_last=1")  # fmt: skip
    full = run_sft(make_cfg(tiny_dir, chains, tmp_path / "full", *common))
    assert [r["latent_steps"] for r in full.history] == [0, 0, 2, 2, 4, 4]
    written = [[answer.count("; ") for answer in batch] for batch in seen]
    assert (
        written == [[2] * 4] * 2 + [[1] * 4] * 2 + [[0] * 4] * 2
    )  # hops written before "answer: X": 2, 1, 0
    records = {s.id: s for s in read_jsonl(chains / "train.jsonl")}
    golds = {r.answer for r in records.values()}
    assert all(a.startswith("answer: ") and a.removeprefix("answer: ") in golds for a in seen[-1])
    # Resumed mid-run, the curriculum picks up at the stage of the step it resumes from.
    seen.clear()
    with pytest.raises(Killed):
        run_sft(make_cfg(tiny_dir, chains, tmp_path / "cut", *common), on_step=kill_at(3))
    seen.clear()
    resumed = run_sft(
        make_cfg(tiny_dir, chains, tmp_path / "cut", *common, "checkpoint.resume=true")
    )
    assert [r["latent_steps"] for r in resumed.history] == [2, 4, 4]
    assert [[a.count("; ") for a in batch] for batch in seen] == [[1] * 4, [0] * 4, [0] * 4]
    for a, b in zip(full.history[3:], resumed.history):
        assert abs(a["ce"] - b["ce"]) < 1e-5
