"""`medlvr eval ...`: evaluate a model (`medlvr eval --model ... --data ...`), `compare` two runs, rebuild a `report`."""

from __future__ import annotations

import math
from collections.abc import Container
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from medlvr.cli._common import ALLOW_PICKLE, console, user_errors


def _spread_data(args: list[str], stop: Container[str] = ()) -> tuple[list[str], int]:
    """`--data A B` -> `--data A --data B`, up to the next option or a word in `stop`; returns
    the rewritten words and how many of `args` they cover (they end before a `stop` word)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in stop and out[-1:] != ["--data"]:
            break
        out.append(arg)
        if arg == "--data":
            if i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
            while i + 1 < len(args) and not args[i + 1].startswith("-") and args[i + 1] not in stop:
                out += ["--data", args[i + 1]]
                i += 1
        i += 1
    return out, i


class _EvalGroup(TyperGroup):
    """`--data A.jsonl B.jsonl` takes every following word up to the next option, as the docs show.

    click options take one value each; the words after `--data` are rewritten
    into repeated `--data X` before parsing (a subcommand name ends the list), for
    `medlvr eval` and for `medlvr eval rescore`.
    """

    # Any: typer >= 0.2x passes its vendored click's Context, older typer click's own.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        out, n = _spread_data(args, self.commands)
        rest = args[n:]
        if rest[:1] == ["rescore"]:
            rest = rest[:1] + _spread_data(rest[1:])[0]
        return super().parse_args(ctx, out + rest)


app = typer.Typer(
    cls=_EvalGroup,
    help="Evaluate a model on medical VQA JSONL files; compare runs; rebuild reports.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@app.callback(invoke_without_command=True)
@user_errors
def eval_run(
    ctx: typer.Context,
    model: Path | None = typer.Option(
        None,
        "--model",
        help="Model folder, stage0 (the shipped backbone) or Hub id (org/name or org/name@revision).",
    ),
    allow_pickle: bool = ALLOW_PICKLE,
    data: list[Path] = typer.Option(
        [], "--data", help="Test JSONL file(s): --data A.jsonl B.jsonl."
    ),
    reasoning: str = typer.Option(
        "direct",
        "--reasoning",
        help="How the model reasons before answering: direct (K=0), latent (K latent steps) or "
        "cot (written reasoning, K=0).",
    ),
    latent_steps: str | None = typer.Option(
        None,
        "--latent-steps",
        help="K, or a sweep like 0,2,4,8 (reasoning latent; default: the model's K).",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Run folder: predictions.jsonl, summary.json, report.md, plots."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions per generate call."),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="Answer token limit (default 32; 256 with reasoning cot)."
    ),
    limit: int | None = typer.Option(
        None, "--limit", help="Only the first N questions (over all files, in order)."
    ),
    explain_metrics: bool = typer.Option(
        False,
        "--explain-metrics",
        help="Also score the evidence maps (pointing game, ROI mass, random floor) on questions with ROIs, per K >= 1.",
    ),
    image_control: str = typer.Option(
        "none",
        "--image-control",
        help="Image condition(s), comma-separated, each a full pass like each K: none (the real images), "
        "blank (each image replaced by one of the same size and mode, every pixel grey 128), shuffled "
        "(the images of another question: a fixed derangement among questions with the same image count), "
        "question-only (no image, no image placeholder in the prompt). "
        "E.g. none,blank,shuffled,question-only; the report shows image dependence = real minus blank.",
    ),
    control_seed: int = typer.Option(
        0,
        "--control-seed",
        help="Seed of the shuffled permutation (a resumed run must keep its seed).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into an --out folder that holds files of something else."
    ),
    latents: str = typer.Option(
        "own",
        "--latents",
        help="Latent inputs (reasoning latent): own (the model's), gold (each hop's pooled ROI tokens, the "
        "chain alignment's targets), gold-prefix (gold for the hops before the last, own for the last), "
        "shuffled-gold (gold pooled at another question's boxes).",
    ),
    probes: list[Path] = typer.Option(
        [],
        "--probes",
        help="JSONL file(s) to fit linear probes of the latent states on (region per hop, answer by depth), "
        "scored on --data: probes.json.",
    ),
) -> None:
    """Answer every question, score it with the one scorer, and write the run's reports.

    Rerunning with the same --out resumes: finished (question, K, image condition) rows are skipped,
    so adding a K or an --image-control condition computes only the new rows.
    Under torchrun / accelerate launch every rank takes a strided slice; rank 0 merges.
    """
    if ctx.invoked_subcommand is not None:
        return
    if model is None and not data and out is None:
        console.print(ctx.get_help())
        raise typer.Exit(code=0)
    missing = [
        name
        for name, v in (("--model", model), ("--data", data or None), ("--out", out))
        if v is None
    ]
    if missing:
        raise ValueError(f"medlvr eval needs {', '.join(missing)}")
    assert out is not None  # else in `missing`

    import torch

    from medlvr.cli.train import stop_exit
    from medlvr.eval.harness import evaluate, parse_latent_steps, parse_reasoning

    _init_distributed()
    with stop_exit():  # SIGTERM/SIGINT: the finished rows are on disk; one line, exit 128 + signal
        result = evaluate(
            data,
            out,
            model=model,
            reasoning=parse_reasoning(reasoning),
            latent_steps=parse_latent_steps(latent_steps),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            limit=limit,
            explain=explain_metrics,
            image_control=image_control,
            control_seed=control_seed,
            allow_pickle=allow_pickle,
            overwrite=overwrite,
            latents=latents,
            probes=probes or None,
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if result.summary is None:
        return
    o = result.summary["overall"]
    console.print(
        f"{result.n_new} new rows ({result.n_skipped} already done), {result.samples_per_s:.2f} samples/s; "
        f"errors {o['n_errors']}, invalid {o['n_invalid']}",
        highlight=False,
    )
    _print_summary(result.summary)
    if "explain" in result.summary:
        from medlvr.explain import format_metrics

        for m in result.summary["explain"].values():
            console.print(format_metrics(m), highlight=False)
    console.print(f"report: {result.report['report']}", highlight=False)  # type: ignore[index]


def _init_distributed() -> None:
    """Join the process group when launched by torchrun / accelerate launch (gloo on CPU, nccl on GPU)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        from medlvr.rundir import check_launch

        state = (
            PartialState()
        )  # reads RANK/WORLD_SIZE/MASTER_ADDR and initialises torch.distributed
        check_launch(state.num_processes, state.distributed_type)


@app.command("report")
@user_errors
def report_cmd(
    run: Path = typer.Argument(..., help="Run folder holding predictions.jsonl."),
    title: str | None = typer.Option(None, "--title", help="Heading of report.md."),
) -> None:
    """Rebuild summary.json, report.md and the plots of a run from its predictions.jsonl."""
    from medlvr.eval.report import write_report
    from medlvr.rundir import run_folder

    if not run.is_dir():
        raise ValueError(f"run folder not found: {run}")
    with run_folder(run, "run folder"):  # not while an evaluation writes it
        written = write_report(run, title=title)
    _print_summary(written["data"])
    console.print(
        f"wrote {written['summary']}, {written['report']} and {len(written['plots'])} plot(s)",
        highlight=False,
    )


@app.command("rescore")
@user_errors
def rescore_cmd(
    file: Path = typer.Argument(..., help="Another kit's per-question predictions."),
    fmt: str = typer.Option(
        ...,
        "--format",
        help="lmms-eval (its --log_samples JSONL), medevalkit (its results JSON) or jsonl "
        "(a JSONL or CSV of id, question, answer, prediction).",
    ),
    data: list[Path] = typer.Option(
        [],
        "--data",
        help="medlvr's converted records the predictions were made on (--data A.jsonl "
        "B.jsonl): question kinds and options come from them.",
    ),
    out: Path = typer.Option(..., "--out", help="Run folder to write (as medlvr eval writes)."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="Dataset name of rows without --data (default: the file's name)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into an --out folder that holds other files."
    ),
    title: str | None = typer.Option(None, "--title", help="Heading of report.md."),
) -> None:
    """Score another kit's predictions with medlvr's judge, beside the kits' own rules."""
    from medlvr.eval.rescore import rescore

    written = rescore(file, fmt, out, data=data, dataset=dataset, overwrite=overwrite, title=title)
    _print_summary(written["data"])
    _print_kits(written["data"])
    matched = ", ".join(f"{n} {how}" for how, n in written["matched"].items())
    console.print(
        f"{written['n']} predictions ({matched}); wrote {written['report']}", highlight=False
    )


def _print_kits(summary: dict[str, Any]) -> None:
    from medlvr.eval.kit_rules import rule_table

    if not summary.get("kit_rules"):
        return
    table = Table(title="The same predictions under other kits' rules (%)")
    for col in ("rule", "n", "acc", "closed", "open", "crashes"):
        table.add_column(col, justify="left" if col == "rule" else "right")
    for name, m in rule_table(summary).items():
        table.add_row(name, str(m["n"]), _pct(m["accuracy"]), _pct(m["closed_accuracy"]),
                      _pct(m["open_score"]), str(m["n_crash"]))  # fmt: skip
    console.print(table)


@app.command("compare")
@user_errors
def compare_cmd(
    run_a: Path = typer.Argument(..., help="Baseline run folder (A)."),
    run_b: Path = typer.Argument(..., help="Candidate run folder (B)."),
    out: Path | None = typer.Option(
        None, "--out", help="Also write compare.json and compare.md here."
    ),
    n_boot: int = typer.Option(
        10_000, "--n-boot", help="Bootstrap resamples for the CI of the delta."
    ),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into an --out folder that holds something else."
    ),
) -> None:
    """B against A: metrics side by side with deltas, per-question wins and losses, McNemar and bootstrap CI."""
    from medlvr.eval.report import compare, pair_label

    if out is not None:
        from medlvr.rundir import claim_output

        claim_output(out, "eval compare", overwrite=overwrite,
                     own=lambda f: (f / "compare.json").is_file() or (f / "run.json").is_file())  # fmt: skip
    c = compare(run_a, run_b, out_dir=out, n_boot=n_boot, seed=seed)
    m = c["metrics"]
    table = Table(title=f"B = {run_b}  vs  A = {run_a}  (in %)")
    for col in ("scope", "metric", "A", "B", "delta"):
        table.add_column(col, justify="left" if col in ("scope", "metric") else "right")
    scopes = [("all", m["overall"])] + [
        (f"dataset {k}", v) for k, v in m.get("by_dataset", {}).items()
    ]
    scopes += [(f"K={k}", v) for k, v in m.get("by_latent_steps", {}).items()]
    scopes += [(f"images={k}", v) for k, v in m.get("by_image_control", {}).items()]
    for name, metrics in scopes:
        for key in (
            "accuracy",
            "closed_accuracy",
            "choice_accuracy",
            "open_accuracy",
            "open_token_f1",
            "invalid_rate",
        ):
            v = metrics[key]
            if v["a"] is None and v["b"] is None:
                continue
            table.add_row(name, key, _pct(v["a"]), _pct(v["b"]), _pct(v["delta"], signed=True))
    console.print(table)
    tests = Table(
        title=f"Paired on {c['matched_on']}: {c['paired']['n']} questions "
        f"({c['only_a']} only in A, {c['only_b']} only in B)"
    )
    for col in (
        "scope",
        "n",
        "acc A",
        "acc B",
        "delta",
        "B wins",
        "B losses",
        "McNemar p",
        "CI of delta",
    ):
        tests.add_column(col, justify="left" if col == "scope" else "right")
    scopes = [("all", c["paired"])] + list(c["paired_by_dataset"].items())
    scopes += [(f"images={k}", v) for k, v in c["paired_by_image_control"].items()]
    for name, p in scopes:
        ci = "–" if p["ci"] is None else f"[{_pct(p['ci'][0], True)}, {_pct(p['ci'][1], True)}]"
        tests.add_row(
            name,
            str(p["n"]),
            _pct(p["acc_a"]),
            _pct(p["acc_b"]),
            _pct(p["delta"], True),
            str(p["wins"]),
            str(p["losses"]),
            f"{p['mcnemar_p']:.4g}",
            ci,
        )
    console.print(tests)
    dep = c["image_dependence"]
    if dep["a"] is not None or dep["b"] is not None:
        console.print(
            f"image dependence (real − blank, points): A {_pct(dep['a'], True)}, B {_pct(dep['b'], True)}, "
            f"B − A {_pct(dep['delta'], True)}",
            highlight=False,
        )
    for label, items in (("B wins", c["won"]), ("B losses", c["lost"])):
        shown = ", ".join(pair_label(x) for x in items[:20])
        more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
        console.print(f"{label} ({len(items)}): {shown}{more}", highlight=False)
    if out is not None:
        console.print(f"wrote {out / 'compare.json'} and {out / 'compare.md'}", highlight=False)


def _pct(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _print_summary(summary: dict[str, Any]) -> None:
    main = summary.get("image_control_main")
    table = Table(title="Accuracy (%)" + (f", images={main}" if main else ""))
    for col in (
        "scope",
        "n",
        "acc",
        "closed",
        "choice",
        "open",
        "open EM",
        "tok F1",
        "invalid",
        "errors",
    ):
        table.add_column(col, justify="left" if col == "scope" else "right")
    scopes = [("all", summary["overall"])] + [
        (f"dataset {k}", v) for k, v in summary["by_dataset"].items()
    ]
    scopes += [(f"K={k}", v) for k, v in summary.get("by_latent_steps", {}).items()]
    scopes += [(f"hops={k}", v) for k, v in summary.get("by_hops", {}).items()]
    for name, m in scopes:
        table.add_row(
            name,
            str(m["n"]),
            _pct(m["accuracy"]),
            _pct(m["closed_accuracy"]),
            _pct(m["choice_accuracy"]),
            _pct(m["open_accuracy"]),
            _pct(m["open_exact_match"]),
            _pct(m["open_token_f1"]),
            _pct(m["invalid_rate"]),
            str(m["n_errors"]),
        )
    console.print(table)
    if not main:
        return
    controls = Table(
        title="Image controls (%; Δ real = real − control, on the questions both answered)"
    )
    for col in ("images", "n", "acc", "closed", "choice", "open EM", "invalid", "Δ real"):
        controls.add_column(
            col, justify="left" if col == "images" else "right", no_wrap=col == "images"
        )
    gaps = summary.get("real_minus_control", {})
    for name, m in summary["by_image_control"].items():
        controls.add_row(
            name,
            str(m["n"]),
            _pct(m["accuracy"]),
            _pct(m["closed_accuracy"]),
            _pct(m["choice_accuracy"]),
            _pct(m["open_exact_match"]),
            _pct(m["invalid_rate"]),
            _pct(gaps.get(name, {}).get("delta"), signed=True),
        )
    console.print(controls)
    dep = summary.get("image_dependence")
    if dep and dep["overall"]["n"]:
        o = dep["overall"]
        console.print(
            f"image dependence (real − blank): {_pct(o['delta'], True)} points "
            f"(real {_pct(o['real'])}, blank {_pct(o['control'])}, n={o['n']})",
            highlight=False,
        )
