"""`medlvr data ...` commands."""

from __future__ import annotations

import json

import typer

from medlvr.cli._common import console, user_errors
from medlvr.cli._options import RANGE, Grammar, Knobs, config_options
from medlvr.data.synth import QUESTION_TYPES, SynthConfig, parse_weights

app = typer.Typer(no_args_is_help=True, help="data commands.")


def _question_types(text: str) -> dict[str, float]:
    """`attribute,relational` (equal weights) or `attribute=2,count=1`."""
    return parse_weights(text, QUESTION_TYPES, "question type")


@app.command("synth")
@config_options(SynthConfig, grammars={"distractors": RANGE, "hops": RANGE, "question_types": Grammar("NAME[=WEIGHT],...", _question_types)},
                aliases={"same_shape_distractors": ["--same-shape"]})  # fmt: skip
@user_errors
def synth(
    knobs: Knobs,
    out: str = typer.Option(
        ...,
        "--out",
        help="Output folder: images/, train/val/test/compositional/describe .jsonl, manifest.json.",
    ),
    workers: int = typer.Option(0, "--workers", help="Processes (0 = auto, up to 2)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into an --out folder that holds something else."
    ),
) -> None:
    """Generate the embedded synthetic benchmark (no download) with exact lesion ROIs; every other
    option is a field of `SynthConfig` (medlvr/data/synth.py)."""
    from medlvr.data.synth import generate
    from medlvr.rundir import claim_output

    cfg = knobs.build()
    claim_output(out, "data synth", overwrite=overwrite, mark=True)
    paths = generate(cfg, out, workers=workers or None, progress=cfg.n >= 1000)
    manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    for split, c in manifest["counts"].items():
        console.print(f"{split:>13}: {c['total']:>6} records  {paths[split]}", highlight=False)
    console.print(f"manifest: {paths['manifest']}", highlight=False)


@app.command("convert")
@user_errors
def convert(
    source: str = typer.Argument(
        ...,
        help="Benchmark: vqa-rad, slake, pathvqa, omnimedvqa, pmc-vqa, mmmu-med, medxpertqa-mm, medframeqa.",
    ),
    root: str = typer.Option(..., "--root", help="The unpacked release folder."),
    out: str = typer.Option(
        ...,
        "--out",
        help="Output JSONL file (image paths written relative to its folder when below it).",
    ),
    split: str = typer.Option(
        None, "--split", help="One split (default: all the converter knows)."
    ),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="PathVQA: read the .pkl release (unpickling executes code: only for trusted files).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out file (and its images folder)."
    ),
) -> None:
    """Convert a benchmark release to VQASample JSONL and print counts by split and answer type."""
    from collections import Counter
    from pathlib import Path

    from medlvr.data.schema import write_jsonl
    from medlvr.data.sources import EMBEDS_IMAGES
    from medlvr.data.sources import convert as run_converter
    from medlvr.rundir import claim_output, mark_output

    out_path = Path(out)
    claim_output(out_path, "data convert", file=True, inputs=[root], overwrite=overwrite)
    opts: dict[str, object] = {"allow_pickle": allow_pickle}
    if source in EMBEDS_IMAGES:  # embedded images land beside the output, never inside the release
        image_dir = out_path.parent / "images" / source
        claim_output(image_dir, "data convert", overwrite=overwrite, inputs=[root])
        opts["image_dir"] = image_dir
    samples = run_converter(source, Path(root), split, **opts)
    if source in EMBEDS_IMAGES:
        mark_output(opts["image_dir"], "data convert")  # type: ignore[arg-type]
    n = write_jsonl(samples, out_path)
    mark_output(
        out_path.parent, "data convert", [out_path]
    )  # its own output: a rerun may replace it
    counts = Counter((s.split, s.answer_type) for s in samples)
    for split_name in sorted({s for s, _ in counts}):
        per_type = "  ".join(
            f"{t}={counts[split_name, t]}"
            for t in ("closed", "open", "choice")
            if counts[split_name, t]
        )
        total = sum(c for (s, _), c in counts.items() if s == split_name)
        console.print(f"{split_name:>10}: {total:>6}  {per_type}", highlight=False, soft_wrap=True)
    console.print(f"wrote {n} samples to {out_path}", highlight=False, soft_wrap=True)


@app.command("ground")
@user_errors
def ground(
    source: str = typer.Argument(
        ...,
        help="A release preset (nih-cxr14, vindr-cxr, ms-cxr, kvasir-seg, slake-ground) or a generic input (coco, csv, masks, nifti).",
    ),
    out: str = typer.Option(
        ...,
        "--out",
        help="Output folder: one JSONL per split (train.jsonl, val.jsonl, test.jsonl); NIfTI slices go to its images/.",
    ),
    root: str = typer.Option(None, "--root", help="Presets: the unpacked release folder."),
    annotations: list[str] = typer.Option(
        [],
        "--annotations",
        help="coco, csv: an annotation file, [SPLIT=]FILE (repeatable; SPLIT is its official split).",
    ),
    images: str = typer.Option(
        None,
        "--images",
        help="coco, csv, masks, nifti: the image folder; ms-cxr: the MIMIC-CXR-JPG folder holding files/ (default --root).",
    ),
    masks: str = typer.Option(
        None, "--masks", help="masks, nifti: the folder of label maps or label volumes."
    ),
    columns: str = typer.Option(
        None,
        "--columns",
        help="csv: 'image=COL,label=COL,x0=..,y0=..,x1=..,y1=..' or x,y,w,h; optional phrase, group, split, width, height, reader; COL may be #N (N-th column).",
    ),
    image_suffix: str = typer.Option(
        None,
        "--image-suffix",
        help="csv: appended to the image column to name the file (e.g. .png).",
    ),
    labels: str = typer.Option(
        None, "--labels", help="masks, nifti: mask values and names, '1=liver,2=liver tumour'."
    ),
    group_field: str = typer.Option(
        None, "--group-field", help="coco: image field holding the patient id (the split unit)."
    ),
    phrase_field: str = typer.Option(
        None, "--phrase-field", help="coco: annotation field holding a phrase (phrase grounding)."
    ),
    min_iou: float = typer.Option(
        None,
        "--min-iou",
        help="csv with a reader column, vindr-cxr: IoU for boxes of different readers to be one finding (default 0.4).",
    ),
    min_readers: int = typer.Option(
        None,
        "--min-readers",
        help="csv with a reader column, vindr-cxr: readers a finding needs to be kept (default 2).",
    ),
    min_area: int = typer.Option(
        None,
        "--min-area",
        help="masks, nifti, kvasir-seg, slake-ground: smallest connected component kept, in pixels.",
    ),
    threshold: int = typer.Option(
        None, "--threshold", help="masks: binarise grey masks at this level (JPEG masks)."
    ),
    mask_suffix: str = typer.Option(
        None,
        "--mask-suffix",
        help="masks, nifti: stripped from a mask's name to find its image (e.g. _mask).",
    ),
    axis: int = typer.Option(None, "--axis", help="nifti: slicing axis 0, 1 or 2 (default 2)."),
    slice_step: int = typer.Option(
        None, "--slice-step", help="nifti: keep every N-th labelled slice (default 1)."
    ),
    empty_slices: int = typer.Option(
        None,
        "--empty-slices",
        help="nifti: label-free slices per volume kept as negatives (default 0).",
    ),
    regions: str = typer.Option(
        None,
        "--regions",
        help="kvasir-seg, slake-ground: regions from the release's 'boxes' (default) or its 'masks'.",
    ),
    split: str = typer.Option(
        None, "--split", help="vindr-cxr: one official split (default: all)."
    ),
    dataset: str = typer.Option(
        None, "--dataset", help="Dataset name of the samples (default: the source)."
    ),
    question_types: str = typer.Option(
        None,
        "--question-types",
        help="Question types, e.g. 'presence,location,count,size,grounding' (default: all).",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the split, the negatives and option order."
    ),
    fractions: str = typer.Option(
        None,
        "--fractions",
        help="Split of patients/images without an official split (default 'train=0.8,val=0.1,test=0.1').",
    ),
    val_fraction: float = typer.Option(
        None,
        "--val-fraction",
        help="Move this fraction of train patients/images to val (releases without a val split).",
    ),
    sides: str = typer.Option(
        None,
        "--sides",
        help="Left/right in answers: 'image' (viewer) or 'patient' (radiological convention).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into an --out folder that holds something else."
    ),
) -> None:
    """Build grounded VQA (presence, location, count, size, phrase grounding) with exact ROIs from boxes or masks."""
    opts = {k: v for k, v in locals().items()
            if k not in ("source", "out", "overwrite") and v not in (None, [])}  # fmt: skip
    from pathlib import Path

    from medlvr.data.ground import GENERIC
    from medlvr.data.ground import ground as build
    from medlvr.data.ground.split import parse_fractions
    from medlvr.data.schema import write_jsonl

    if question_types:
        opts["question_types"] = tuple(f.strip() for f in question_types.split(",") if f.strip())
    if fractions:
        opts["fractions"] = parse_fractions(fractions)
    if source == "nifti":
        opts["export_dir"] = str(Path(out) / "images")
    if source in GENERIC:
        opts["annotations"] = list(annotations)
    from medlvr.rundir import claim_output, mark_output

    claim_output(out, "data ground", overwrite=overwrite, writes=("*.jsonl", "images"),
                 inputs=[root, images, masks, *annotations])  # fmt: skip
    result = build(source, **opts)
    mark_output(out, "data ground")
    for line in result.summary():
        console.print(line, highlight=False, soft_wrap=True)
    for split_name in sorted({s.split for s in result.samples}):
        path = Path(out) / f"{split_name}.jsonl"
        n = write_jsonl([s for s in result.samples if s.split == split_name], path)
        console.print(f"wrote {n} samples to {path}", highlight=False, soft_wrap=True)


@app.command("validate")
@user_errors
def validate(
    file: str = typer.Argument(..., help="A VQASample JSONL file."),
    images: bool = typer.Option(
        True, "--images/--no-images", help="Check that every image exists and decodes."
    ),
) -> None:
    """List every problem of a JSONL file with its line number; exit code 1 if there are any."""
    from medlvr.data.validate import validate_file

    problems = validate_file(file, check_images=images, decode_images=images)
    for problem in problems:
        console.print(str(problem), highlight=False, markup=False, soft_wrap=True)
    if problems:
        console.print(
            f"{len(problems)} problem(s) in {file}", highlight=False, markup=False, soft_wrap=True
        )
        raise typer.Exit(code=1)
    console.print(f"{file}: no problems", highlight=False, markup=False, soft_wrap=True)


@app.command("inspect")
@user_errors
def inspect(
    files: list[str] = typer.Argument(
        ..., help="One or more VQASample JSONL files (e.g. the parts of a training mixture)."
    ),
    png: str = typer.Option(
        "", help="Where to draw a few samples with their ROI boxes (default: FIRST_FILE.png)."
    ),
    n: int = typer.Option(6, help="Samples drawn."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing PNG."),
) -> None:
    """Counts by dataset, split, type and modality, ROI coverage per source, and a PNG of a few samples with their boxes."""
    from pathlib import Path

    from medlvr.data.inspect import dataset_stats, render_samples, roi_coverage
    from medlvr.data.schema import read_jsonl
    from medlvr.rundir import claim_output, mark_output

    per_file = {file: read_jsonl(file) for file in files}
    figure = Path(png or f"{files[0]}.png")
    if n > 0:
        claim_output(figure, "data inspect", file=True, inputs=files, overwrite=overwrite,
                     flag="--png")  # fmt: skip
    samples = [s for part in per_file.values() for s in part]
    stats = dataset_stats(samples)
    name = files[0] if len(files) == 1 else f"{len(files)} files"
    console.print(
        f"[bold]{name}[/]: {stats['n']} samples, {stats['with_roi']} with ROIs "
        f"({stats['roi_coverage']:.1%}, {stats['rois_per_sample']:.2f} boxes each)",
        highlight=False,
        soft_wrap=True,
    )
    for key in (
        "dataset",
        "split",
        "answer_type",
        "question_type",
        "modality",
        "images_per_sample",
    ):
        counts = ", ".join(
            f"{k}: {v}" for k, v in sorted(stats[key].items(), key=lambda kv: (-kv[1], str(kv[0])))
        )
        console.print(f"  {key:>18}  {counts}", highlight=False, soft_wrap=True)
    console.print("ROI coverage per source:", highlight=False)
    for c in roi_coverage(per_file):
        console.print(f"  {c.source}: {c.with_roi}/{c.n} samples with ROIs ({c.fraction:.1%}, {c.boxes_per_sample:.2f} boxes each)",
                      highlight=False, soft_wrap=True)  # fmt: skip
    if n > 0 and samples:
        out = render_samples(samples, figure, n)
        mark_output(out.parent, "data inspect", [out])
        console.print(f"drew {min(n, len(samples))} samples to {out}", soft_wrap=True)
