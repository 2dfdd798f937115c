"""`medlvr predict`: answer one question about one or more images."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from medlvr.cli._common import ALLOW_PICKLE, console, user_errors


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


@user_errors
def predict(
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
        None, "--latent-steps", help="K latent steps (default: the model's)."
    ),
    max_new_tokens: int = typer.Option(32, help="Answer token limit."),
) -> None:
    """Answer a question about medical images, with K latent steps before the answer."""
    if latent_steps is not None and latent_steps < 0:
        raise ValueError(f"--latent-steps must be >= 0, got {latent_steps}")
    if not image:
        raise ValueError("an image question needs at least one --image")
    from medlvr.data.images import load_image
    from medlvr.inference import answer_one, parse_options

    options = parse_options(option)
    from medlvr.model.latent import LatentVLM

    images = [load_image(p) for p in image]  # unreadable paths fail here, before loading the model
    vlm = LatentVLM.from_pretrained(model, allow_pickle=allow_pickle)
    result = answer_one(
        vlm, images, question, options, latent_steps=latent_steps, max_new_tokens=max_new_tokens
    )
    console.print(f"[bold]answer:[/] {escape(result.text)}", highlight=False)
    console.print(
        f"latent steps: {result.latent_steps}   time: {result.seconds * 1000:.1f} ms",
        highlight=False,
    )
