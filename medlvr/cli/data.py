"""`medlvr data ...` commands."""

from __future__ import annotations

import json

import typer

from medlvr.cli._common import console, user_errors

app = typer.Typer(no_args_is_help=True, help="data commands.")


@app.command("synth")
def synth(
    out: str = typer.Option(..., "--out", help="Output folder: images/, train/val/test/compositional/describe .jsonl, manifest.json."),
    n: int = typer.Option(1000, "--n", help="Question records over the four splits."),
    seed: int = typer.Option(0, "--seed", help="Root seed; the same seed gives byte-identical output."),
    level: int = typer.Option(3, "--level", help="Curriculum level 1-5 (1 = one lesion per image)."),
    image_size: int = typer.Option(168, "--image-size", help="Image side in pixels, a multiple of 28."),
    grid: int = typer.Option(3, "--grid", help="Regions per side (3 = nine named regions)."),
    families: str = typer.Option("", "--families", help="Question families, e.g. 'attribute,relational' or 'attribute=2,count=1' (default: all the level allows)."),
    modalities: str = typer.Option("", "--modalities", help="Modality styles, e.g. 'chest_xray,ct' (default: all)."),
    distractors: str = typer.Option("", "--distractors", help="Distractor lesions 'LO-HI' (default: from --level)."),
    same_shape: float = typer.Option(0.25, "--same-shape", help="Probability that a distractor shares the queried lesion's shape."),
    small_size: float = typer.Option(0.6, "--small-size", help="Small lesion extent in 28-px token cells."),
    large_size: float = typer.Option(1.2, "--large-size", help="Large lesion extent in 28-px token cells."),
    contrast: float = typer.Option(0.3, "--contrast", help="Lesion grey-level offset (fraction of full scale)."),
    texture: float = typer.Option(0.5, "--texture", help="Probability that a lesion is mottled."),
    held_per_region: int = typer.Option(1, "--held-per-region", help="Shapes held out per region for the compositional split (0 = none)."),
    describe: bool = typer.Option(True, "--describe/--no-describe", help="Write describe.jsonl (stage-0 describe/ground records)."),
    workers: int = typer.Option(0, "--workers", help="Processes (0 = auto, up to 2)."),
) -> None:
    """Generate the embedded synthetic benchmark (no download) with exact lesion ROIs."""
    _synth(**locals())


@user_errors
def _synth(out: str, families: str, modalities: str, distractors: str, same_shape: float, workers: int, **knobs: object) -> None:
    from medlvr.data.synth import FAMILIES, SynthConfig, generate, parse_weights
    from medlvr.data.synth_render import MODALITIES

    if distractors:
        lo, sep, hi = distractors.partition("-")
        if not (lo.strip().isdigit() and (not sep or hi.strip().isdigit())):
            raise ValueError(f"--distractors must look like 'LO-HI' or 'N', got {distractors!r}")
        knobs["distractors"] = (int(lo), int(hi if sep else lo))
    if families:
        knobs["families"] = parse_weights(families, FAMILIES, "question family")
    if modalities:
        knobs["modalities"] = tuple(parse_weights(modalities, tuple(MODALITIES), "modality"))
    cfg = SynthConfig(same_shape_distractors=same_shape, **knobs)  # type: ignore[arg-type]
    paths = generate(cfg, out, workers=workers or None, progress=cfg.n >= 1000)
    manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    for split, c in manifest["counts"].items():
        console.print(f"{split:>13}: {c['total']:>6} records  {paths[split]}", highlight=False)
    console.print(f"manifest: {paths['manifest']}", highlight=False)


@app.command("convert")
@user_errors
def convert(
    source: str = typer.Argument(..., help="Benchmark: vqa-rad, slake, pathvqa, omnimedvqa, pmc-vqa, mmmu-med, medxpertqa-mm, medframeqa."),
    root: str = typer.Option(..., "--root", help="The unpacked release folder."),
    out: str = typer.Option(..., "--out", help="Output JSONL file (image paths written relative to its folder when below it)."),
    split: str = typer.Option(None, "--split", help="One split (default: all the converter knows)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="PathVQA: read the .pkl release (unpickling executes code: only for trusted files)."),
) -> None:
    """Convert a benchmark release to VQASample JSONL and print counts by split and answer type."""
    from collections import Counter
    from pathlib import Path

    from medlvr.data.schema import write_jsonl
    from medlvr.data.sources import EMBEDS_IMAGES
    from medlvr.data.sources import convert as run_converter

    out_path = Path(out)
    opts: dict[str, object] = {"allow_pickle": allow_pickle}
    if source in EMBEDS_IMAGES:  # embedded images land beside the output, never inside the release
        opts["image_dir"] = out_path.parent / "images" / source
    samples = run_converter(source, Path(root), split, **opts)
    n = write_jsonl(samples, out_path)
    counts = Counter((s.split, s.answer_type) for s in samples)
    for split_name in sorted({s for s, _ in counts}):
        per_type = "  ".join(f"{t}={counts[split_name, t]}" for t in ("closed", "open", "choice") if counts[split_name, t])
        total = sum(c for (s, _), c in counts.items() if s == split_name)
        console.print(f"{split_name:>10}: {total:>6}  {per_type}", highlight=False, soft_wrap=True)
    console.print(f"wrote {n} samples to {out_path}", highlight=False, soft_wrap=True)


@app.command("validate")
@user_errors
def validate(
    file: str = typer.Argument(..., help="A VQASample JSONL file."),
    images: bool = typer.Option(True, "--images/--no-images", help="Check that every image exists and decodes."),
) -> None:
    """List every problem of a JSONL file with its line number; exit code 1 if there are any."""
    from medlvr.data.validate import validate_file

    problems = validate_file(file, check_images=images, decode_images=images)
    for problem in problems:
        console.print(str(problem), highlight=False, soft_wrap=True)
    if problems:
        console.print(f"{len(problems)} problem(s) in {file}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    console.print(f"{file}: no problems", highlight=False, soft_wrap=True)


@app.command("inspect")
@user_errors
def inspect(
    file: str = typer.Argument(..., help="A VQASample JSONL file."),
    png: str = typer.Option("", help="Where to draw a few samples with their ROI boxes (default: FILE.png)."),
    n: int = typer.Option(6, help="Samples drawn."),
) -> None:
    """Counts by dataset, split, type and modality, ROI coverage, and a PNG of a few samples with their boxes."""
    from pathlib import Path

    from medlvr.data.inspect import dataset_stats, render_samples
    from medlvr.data.schema import read_jsonl

    samples = read_jsonl(file)
    stats = dataset_stats(samples)
    console.print(f"[bold]{file}[/]: {stats['n']} samples, {stats['with_roi']} with ROIs "
                  f"({stats['roi_coverage']:.1%}, {stats['rois_per_sample']:.2f} boxes each)", highlight=False, soft_wrap=True)
    for key in ("dataset", "split", "answer_type", "question_type", "modality", "images_per_sample"):
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(stats[key].items(), key=lambda kv: (-kv[1], str(kv[0]))))
        console.print(f"  {key:>18}  {counts}", highlight=False, soft_wrap=True)
    if n > 0 and samples:
        out = render_samples(samples, Path(png or f"{file}.png"), n)
        console.print(f"drew {min(n, len(samples))} samples to {out}", soft_wrap=True)
