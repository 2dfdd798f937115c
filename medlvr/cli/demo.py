"""`medlvr demo`: the whole method end to end on the embedded synthetic benchmark (or VQA-RAD)."""

from __future__ import annotations

from pathlib import Path

import typer

from medlvr.cli._common import console, user_errors

demo_app = typer.Typer(
    help="Run MedLVR end to end: four variants trained and evaluated, with an honest report.",
    invoke_without_command=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(demo_app, name="demo")


@demo_app.callback()
@user_errors
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), help="Output folder (data, runs, report.md, plots)."),
    quick: bool = typer.Option(False, "--quick", help="About a minute: one tiny pass through everything."),
    full: bool = typer.Option(False, "--full", help="Every arm, 3 seeds, longer runs: the numbers in README."),
    seeds: str = typer.Option("", help="Training seeds, e.g. 1,2,3 (default: the budget's; --full: 1,2,3)."),
    arms: str = typer.Option("", help="Arms to run, e.g. atpbcd (default: the budget's; see report.md)."),
    dataset: str = typer.Option("synth", help="synth (embedded, default) or vqa-rad."),
    data_root: Path | None = typer.Option(None, help="Release folder of a real dataset (e.g. ../shared/datasets/vqa-rad)."),
    backbone: Path | None = typer.Option(None, help="Starting model folder (default: the shipped stage-0 backbone)."),
    latent_steps: int = typer.Option(6, help="K of the latent arms."),
    max_hops: int = typer.Option(3, help="Deepest chain of the synthetic questions (1-4)."),
    workers: int = typer.Option(2, help="Arms trained at once, one single-threaded process each."),
) -> None:
    """MedLVR against honest controls on the depth ladder: (a) direct, (t) text reasoning, (p) pause,
    (b) latent, (c) ROI-SFT, (d) ROI-SFT + VLPO; trained, scored and compared in report.md."""
    if ctx.invoked_subcommand is not None:
        return
    if quick and full:
        raise ValueError("choose one of --quick and --full")
    from medlvr.recipes.demo import DemoConfig, run_demo

    budget = "quick" if quick else "full" if full else "default"
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be integers separated by commas, got {seeds!r}") from None
    cfg = DemoConfig(
        out=str(out), budget=budget, seeds=seed_list, arms=arms, dataset=dataset,  # type: ignore[arg-type]
        data_root=str(data_root or ""), backbone=str(backbone or ""), latent_steps=latent_steps,
        max_hops=max_hops, workers=workers,
    )
    seed_list = cfg.seeds
    result = run_demo(cfg, log=lambda m: console.print(f"[bold cyan]{m}[/]"))
    from rich.table import Table

    table = Table(title=f"MedLVR demo: test accuracy by reasoning depth (mean ± std over seeds {seed_list})")
    groups = list(dict.fromkeys(r["split"] for r in result.table))
    for col in ("arm", "K", *groups):
        table.add_column(col)
    for arm in dict.fromkeys(r["variant"] for r in result.table):
        cells = {r["split"]: f"{r['mean']:.3f} ± {r['std']:.3f}" for r in result.table if r["variant"] == arm}
        first = next(r for r in result.table if r["variant"] == arm)
        table.add_row(f"({arm}) {first['name']}", str(first["K"]), *(cells.get(g, "–") for g in groups))
    console.print(table)
    console.print(f"report: {result.report}  ({result.seconds / 60:.1f} min)")


@demo_app.command("backbone")
@user_errors
def backbone(
    out: Path = typer.Option(Path("medlvr/assets/stage0"), help="Output model folder."),
    seed: int = typer.Option(0, help="Seed of the initialisation, the data and the data order."),
    size: str = typer.Option("mini", help="Backbone preset (see `medlvr model init-tiny`)."),
    n: int = typer.Option(8000, help="Synthetic benchmark size (describe records come from its train images)."),
    steps: int = typer.Option(700, help="Optimizer steps."),
    batch_size: int = typer.Option(32, help="Batch size."),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
    eval_samples: int = typer.Option(300, help="Test images whose descriptions are scored."),
    init: Path | None = typer.Option(None, help="Continue from this model folder (a second stage-0 leg)."),
    probe_weight: float = typer.Option(4.0, help="Weight of the auxiliary per-token attribute probe (0 = off)."),
    position_weight: float = typer.Option(1.0, help="Weight of the probe's per-token position head (0 = off)."),
    question_share: float = typer.Option(0.5, help="Fraction of samples that are 1-hop questions (the rest describe/ground/inspect)."),
) -> None:
    """Stage 0: pretrain the demo's tiny backbone to see the synthetic scans (dense descriptions)."""
    from medlvr.recipes.stage0 import Stage0Config, build_stage0

    scores = build_stage0(Stage0Config(
        out=str(out), seed=seed, size=size, n=n, steps=steps, batch_size=batch_size, lr=lr, eval_samples=eval_samples,
        init=str(init or ""), probe_weight=probe_weight, position_weight=position_weight, question_share=question_share,
    ))  # fmt: skip
    for k, v in scores.items():
        console.print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {v}")
    console.print(f"wrote {out}")
