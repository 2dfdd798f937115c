"""`medlvr serve`: the web demo."""

from __future__ import annotations

from pathlib import Path

import typer

from medlvr.cli._common import console, err_console, user_errors

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(app: typer.Typer) -> None:
    """Attach `medlvr serve` to the main app."""
    app.command("serve")(serve)


@user_errors
def serve(
    model: Path = typer.Option(..., "--model", help="Model folder (tiny, medlvr checkpoint or a real Qwen2.5-VL)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load a model folder whose weights are pickle only (pytorch_model.bin): unpickling runs code, so only for trusted files."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(7860, "--port", help="TCP port."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest accepted upload in MB."),
    max_latent_steps: int = typer.Option(16, "--max-latent-steps", help="Top of the latent-budget slider."),
    examples: int = typer.Option(4, "--examples", help="Synthetic examples in the gallery (0 = none)."),
) -> None:
    """Serve the web demo: upload an image, ask, see the answer, the time and the evidence maps."""
    from medlvr.app import ServeConfig

    # Arguments first: a typo fails in a second, before gradio and the model load.
    cfg = ServeConfig(host=host, port=port, max_upload_mb=max_upload_mb, max_latent_steps=max_latent_steps, examples=examples)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the web demo needs gradio: pip install 'medlvr[web]'") from None
    from medlvr.app import serve as run_serve
    from medlvr.model.latent import LatentVLM

    if host not in LOOPBACK:
        err_console.print(f"[yellow]warning:[/] binding {host}: the demo is reachable from other machines", highlight=False)
    vlm = LatentVLM.from_pretrained(model, allow_pickle=allow_pickle)
    console.print(f"MedLVR demo on http://{host}:{port} (Ctrl+C to stop)", highlight=False)
    run_serve(vlm, cfg, block=True, quiet=True)
