"""`medlvr ...`: argument parsing and dispatch only; the library never imports this."""

from __future__ import annotations

import os
import sys

import typer

from medlvr.cli import data, demo, explain, model, predict, recipes, serve, train
from medlvr.cli import eval as eval_cmd

app = typer.Typer(
    name="medlvr",
    help="Latent visual reasoning for medical VQA: build, train (ROI-SFT, VLPO), evaluate, explain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from medlvr import __version__

        print(f"medlvr {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_print_version,
        help="Print medlvr's version and exit.",
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        help="Also show transformers' own progress bars (loading and saving weights).",
    ),
    image_root: list[str] = typer.Option(
        [],
        "--image-root",
        help="A folder data files may name images in besides their own (repeat; also MEDLVR_IMAGE_ROOTS).",
    ),
) -> None:
    # medlvr shows its own progress; a bar per load and save would drown it. huggingface_hub's
    # variable, read by transformers when it is imported (after this: commands import it lazily),
    # sets its bars on or off here and in worker processes (the demo trains arms in parallel).
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if verbose else "1"
    from medlvr.data.schema import allow_image_roots

    # Data files are untrusted: their images stay in their own folder unless allowed here.
    allow_image_roots(*image_root, replace=True)
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:  # imported already (e.g. the CLI called from Python): switch it too
        (hf_logging.enable_progress_bar if verbose else hf_logging.disable_progress_bar)()


app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.add_typer(eval_cmd.app, name="eval")
for command in (predict, demo, explain, serve, recipes):
    command.register(app)


def main() -> None:
    app()
