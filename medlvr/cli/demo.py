"""`medlvr demo`: the whole method end to end on the embedded synthetic benchmark (or VQA-RAD)."""

from __future__ import annotations

import typer

from medlvr.cli._common import console, user_errors
from medlvr.cli._options import Knobs, config_options
from medlvr.recipes.demo_config import DemoConfig
from medlvr.recipes.stage0 import Stage0Config

demo_app = typer.Typer(
    help="MedLVR against honest controls on two ladders (depth and subtlety): the arms trained, scored by rung and compared, with verdicts.",
    invoke_without_command=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(demo_app, name="demo")


@demo_app.callback()
@config_options(DemoConfig, exclude=("sft_overrides", "progress"))
@user_errors
def demo(
    ctx: typer.Context,
    knobs: Knobs,
    quick: bool = typer.Option(
        False,
        "--quick",
        help="A few minutes on 2 cores: one tiny pass through everything (--budget quick).",
    ),
    full: bool = typer.Option(
        False,
        "--full",
        help="Every arm, 3 seeds, longer runs: the numbers in README (--budget full).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into an --out folder that holds files of something else."
    ),
) -> None:
    """MedLVR against honest controls on two ladders: depth (1..3 lookups in sequence) and
    subtlety (one lookup, evidence ever harder to see). Arms (a) direct, (t) text reasoning,
    (p) pause, (b) latent, (c) ROI-SFT, (d) ROI-SFT + VLPO, (e) latent curriculum (depth) and
    (r) ROI supervision without latents (subtlety); trained, scored and compared in report.md.
    Every other option is a field of `DemoConfig` (medlvr/recipes/demo_config.py)."""
    if ctx.invoked_subcommand is not None:
        return
    if quick and full:
        raise ValueError("choose one of --quick and --full")
    if (quick or full) and knobs.given("budget"):
        raise ValueError("choose one of --budget and --quick/--full")
    from medlvr.recipes.demo import run_demo

    cfg = knobs.build(**({"budget": "quick" if quick else "full"} if quick or full else {}))
    from medlvr.rundir import claim_output

    claim_output(cfg.out, "demo", overwrite=overwrite, inputs=[cfg.backbone],
                 own=lambda f: (f / "demo_config.json").is_file())  # fmt: skip
    result = run_demo(cfg, log=lambda m: console.print(f"[bold cyan]{m}[/]"))
    from rich.table import Table

    table = Table(
        title=f"MedLVR demo: test accuracy by reasoning depth (mean ± std over seeds {cfg.seeds})"
    )
    groups = list(dict.fromkeys(r["split"] for r in result.table))
    for col in ("arm", "K", *groups):
        table.add_column(col)
    for arm in dict.fromkeys(r["variant"] for r in result.table):
        cells = {
            r["split"]: f"{r['mean']:.3f} ± {r['std']:.3f}"
            for r in result.table
            if r["variant"] == arm
        }
        first = next(r for r in result.table if r["variant"] == arm)
        table.add_row(
            f"({arm}) {first['name']}", str(first["K"]), *(cells.get(g, "–") for g in groups)
        )
    console.print(table)
    console.print(f"report: {result.report}  ({result.seconds / 60:.1f} min)")


@demo_app.command("backbone")
@config_options(Stage0Config)
@user_errors
def backbone(
    knobs: Knobs,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an --out folder that holds something else."
    ),
) -> None:
    """Stage 0: pretrain the demo's tiny backbone to see the synthetic scans (dense descriptions);
    every option is a field of `Stage0Config` (medlvr/recipes/stage0.py)."""
    from medlvr.recipes.stage0 import build_stage0

    cfg = knobs.build()
    scores = build_stage0(cfg, overwrite=overwrite)
    for k, v in scores.items():
        console.print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {v}")
    console.print(f"wrote {cfg.out}")
