"""`medlvr explain`: answer a question and show where each latent step points."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from medlvr.cli._common import ALLOW_PICKLE, console, user_errors


def register(app: typer.Typer) -> None:
    """Attach `medlvr explain` to the main app."""
    app.command("explain")(explain)


@user_errors
def explain(
    model: Path = typer.Option(
        ...,
        "--model",
        help="Model folder, stage0 (the shipped backbone) or Hub id (org/name or org/name@revision).",
    ),
    allow_pickle: bool = ALLOW_PICKLE,
    image: list[Path] = typer.Option(
        [], "--image", help="Image file (PNG, JPEG, DICOM, NIfTI); repeat for several."
    ),
    question: str = typer.Option(..., "--question", help="The question."),
    option: list[str] = typer.Option(
        [], "--option", help="A choice, as A=text (or A. text, A) text); repeat for each option."
    ),
    latent_steps: int | None = typer.Option(
        None, "--latent-steps", help="K latent steps (default: the model's; at least 1)."
    ),
    out: Path = typer.Option(
        Path("explanation.png"), "--out", help="The figure (PNG); the regions JSON goes beside it."
    ),
    temperature: float = typer.Option(0.1, help="Softmax temperature of the similarity maps."),
    centre: bool = typer.Option(
        False, "--centre/--no-centre", help="Subtract the mean visual token before the cosine."
    ),
    layer: list[int] = typer.Option(
        [], "--layer", help="Decoder layer whose attention is averaged (repeat; default all)."
    ),
    top_k: int = typer.Option(5, help="Token cells listed per image in the JSON."),
    max_new_tokens: int = typer.Option(32, help="Answer token limit."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out figure and its JSON."
    ),
) -> None:
    """Evidence maps of the latent steps: cosine to the visual tokens and attention to the image."""
    if latent_steps is not None and latent_steps < 1:
        raise ValueError(
            f"--latent-steps must be >= 1 to have something to explain, got {latent_steps}"
        )
    if not image:
        raise ValueError("explain needs at least one --image")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the figure's file name")
    from medlvr.rundir import claim_output, mark_output

    claim_output(out, "explain", file=True, writes=[out.with_suffix(".json").name],
                 inputs=[*image, model], overwrite=overwrite)  # fmt: skip
    from medlvr.inference import parse_options

    options = parse_options(option)

    from medlvr.data.images import load_image
    from medlvr.explain import ExplainConfig
    from medlvr.explain import explain as run_explain
    from medlvr.model.latent import LatentVLM
    from medlvr.rundir import writable_folder

    cfg = ExplainConfig(
        temperature=temperature, centre=centre, layers=tuple(layer) or None, top_k=top_k
    )
    images = [load_image(p) for p in image]  # unreadable paths fail here, before loading the model
    writable_folder(out.parent, "folder of --out")  # and an unwritable --out
    vlm = LatentVLM.from_pretrained(model, allow_pickle=allow_pickle)
    ex = run_explain(
        vlm,
        images,
        question,
        options,
        latent_steps=latent_steps,
        max_new_tokens=max_new_tokens,
        config=cfg,
    )
    png, js = ex.save(out)
    mark_output(out.parent, "explain", [png, js])  # its own output: a rerun may replace it
    console.print(f"[bold]answer:[/] {escape(ex.answer)}", highlight=False)
    console.print(
        f"latent steps: {ex.latent_steps}   time: {ex.seconds * 1000:.1f} ms", highlight=False
    )
    for entry in ex.regions()["images"]:
        top = entry["similarity"]["aggregate"][0]
        console.print(
            f"image {entry['image'] + 1}: similarity peak at cell {top['cell']} box {top['box']} (score {top['score']:.3f})",
            highlight=False,
        )
    console.print(f"wrote {png} and {js}", highlight=False)
