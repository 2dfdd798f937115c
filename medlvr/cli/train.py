"""`medlvr train ...` commands: parse, load the typed config, call the library."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from medlvr.cli._common import console, err_console, user_errors

app = typer.Typer(no_args_is_help=True, help="train commands.")


@app.command("sft", context_settings={"allow_extra_args": False})
@user_errors
def sft(
    config: Path | None = typer.Option(
        None, "--config", help="YAML file or shipped recipe (e.g. tiny/sft; see `medlvr recipes`)."
    ),
    overrides: list[str] = typer.Argument(
        None, help="Dotted overrides, e.g. mode=latent latent.steps=8 optim.lr=1e-4."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the newest checkpoint in output_dir."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete the run in output_dir and start over."
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the resolved config and exit."
    ),
) -> None:
    """Stage 1: ROI-supervised fine-tuning (modes plain, latent, roi, teacher_forced). Multi-process: torchrun or accelerate launch."""
    from omegaconf import OmegaConf

    from medlvr.config import SFTConfig, load_config

    cfg = load_config(SFTConfig, config, [*(overrides or []), *_run_choice(resume, overwrite)])
    if print_config:
        console.print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), highlight=False)
        return
    from medlvr.train.checkpoint import claim_run_dir
    from medlvr.train.sft import run_sft

    claim_run_dir(cfg, config)  # never onto the recipe (run_sft checks the rest)

    with stop_exit():
        result = run_sft(cfg)
    _print_done(result, ("loss", "ce", "align", "val_accuracy"))


@app.command("vlpo", context_settings={"allow_extra_args": False})
@user_errors
def vlpo(
    config: Path | None = typer.Option(
        None, "--config", help="YAML file or shipped recipe (e.g. tiny/vlpo; see `medlvr recipes`)."
    ),
    init: Path | None = typer.Option(
        None,
        "--init",
        help="Starting model (the SFT export, e.g. runs/sft/final, or a Hub id, org/name or org/name@revision); sets model.path.",
    ),
    overrides: list[str] = typer.Argument(
        None, help="Dotted overrides, e.g. vlpo.group_size=8 vlpo.beta=0.04."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the newest checkpoint in output_dir."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete the run in output_dir and start over."
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the resolved config and exit."
    ),
) -> None:
    """Stage 2: VLPO, group-relative policy optimisation over latent steps and answers. Multi-process: torchrun or accelerate launch."""
    from omegaconf import OmegaConf

    from medlvr.config import VLPOConfig, load_config

    cfg = load_config(VLPOConfig, config, [*(overrides or []), *([f"model.path={init}"] if init else []),
                                            *_run_choice(resume, overwrite)])  # fmt: skip
    if print_config:
        console.print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), highlight=False)
        return
    from medlvr.train.checkpoint import claim_run_dir
    from medlvr.train.vlpo import run_vlpo

    claim_run_dir(cfg, config)  # never onto the recipe (run_vlpo checks the rest)

    with stop_exit():
        result = run_vlpo(cfg)
    _print_done(result, ("reward_mean", "accuracy", "val_reward", "val_accuracy"))


@contextlib.contextmanager
def stop_exit() -> Iterator[None]:
    """A run stopped by SIGTERM/SIGINT (checkpoint saved): one line, exit code 128 + the signal."""
    from medlvr.stop import Stopped

    try:
        yield
    except Stopped as err:
        err_console.print(str(err), highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(code=128 + err.signum) from None


def _run_choice(resume: bool, overwrite: bool) -> list[str]:
    """`--resume` / `--overwrite` as overrides (the config checks that they are not both set)."""
    return [
        *(["checkpoint.resume=true"] if resume else []),
        *(["checkpoint.overwrite=true"] if overwrite else []),
    ]


def _print_done(result: Any, keys: tuple[str, ...]) -> None:
    """The last lines of a training command: steps, the final values of `keys`, the export."""
    shown = {k: v for k, v in result.metrics.items() if k in keys and v is not None}
    console.print(
        f"done: {result.steps} steps, " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()),
        highlight=False,
    )
    console.print(f"model: {result.final_model}", highlight=False)
