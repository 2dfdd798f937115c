"""`medlvr serve`: the web demo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from medlvr.cli._common import ALLOW_PICKLE, console, err_console, user_errors
from medlvr.cli._options import Knobs, config_options
from medlvr.config import ServeConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(app: typer.Typer) -> None:
    """Attach `medlvr serve` to the main app."""
    app.command("serve")(serve)


@config_options(ServeConfig)
@user_errors
def serve(
    knobs: Knobs,
    model: Path = typer.Option(
        ...,
        "--model",
        help="Model folder, stage0 (the shipped backbone) or Hub id (org/name or org/name@revision).",
    ),
    allow_pickle: bool = ALLOW_PICKLE,
) -> None:
    """Serve the web demo: upload an image, ask, see the answer, the time and the evidence maps;
    every other option is a field of `ServeConfig` (medlvr/config.py)."""
    # Arguments first: a typo fails in a second, before gradio and the model load.
    cfg = knobs.build()
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the web demo needs gradio: pip install 'medlvr[web]'") from None
    from medlvr.app import serve as run_serve
    from medlvr.model.latent import LatentVLM

    if cfg.host not in LOOPBACK:
        err_console.print(
            f"[yellow]warning:[/] binding {escape(cfg.host)}: the demo is reachable from other machines",
            highlight=False,
        )
    vlm = LatentVLM.from_pretrained(model, allow_pickle=allow_pickle)
    console.print(f"MedLVR demo on http://{cfg.host}:{cfg.port} (Ctrl+C to stop)", highlight=False)
    run_serve(vlm, cfg, block=True, quiet=True)
