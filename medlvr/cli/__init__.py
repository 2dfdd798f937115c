"""`medlvr ...`: argument parsing and dispatch only; the library never imports this."""

from __future__ import annotations

import os

import typer

from medlvr.cli import data, demo, explain, model, predict, serve, train
from medlvr.cli import eval as eval_cmd

app = typer.Typer(
    name="medlvr",
    help="Latent visual reasoning for medical VQA: build, train (ROI-SFT, VLPO), evaluate, explain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def options(
    verbose: bool = typer.Option(False, "--verbose", help="Also show transformers' own progress bars (loading and saving weights)."),
) -> None:
    # medlvr shows its own progress; a bar per load and save would drown it. The environment
    # variable (huggingface_hub's, read by transformers on import) carries the choice into
    # worker processes (the demo trains its arms in parallel processes).
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    (hf_logging.enable_progress_bar if verbose else hf_logging.disable_progress_bar)()


app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.add_typer(eval_cmd.app, name="eval")
for command in (predict, demo, explain, serve):
    command.register(app)


def main() -> None:
    app()
