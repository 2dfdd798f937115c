"""The main job: MedLVR against honest controls on the depth ladder, on a laptop.

1. Data: the embedded synthetic benchmark's chain questions (1..max_hops
   lookups in sequence, word answers) or a converted real dataset (VQA-RAD).
2. The arms (`ARMS`), fine-tuned from the same stage-0 backbone (`medlvr/assets/stage0`,
   a tiny model pretrained to answer 1-hop questions), same data, budget and seeds:
   (a) direct, K = 0; (t) text reasoning; (p) pause: K learned constant inputs;
   (b) K latent steps, no ROI loss; (c) ROI-SFT with per-hop alignment; (d) (c) + VLPO;
   (e) the latent curriculum: (t)'s written chain handed to the latents one hop at a time.
   Arms train two at a time, each in a single-threaded process (both cores of a laptop).
3. Every arm scored by the evaluation harness on the test split, by hop count, with
   real and blank images; the latent budget swept for (c) and (d); the evidence maps'
   per-hop pointing measured.
4. `report.md`: accuracy by depth (mean and spread over seeds, a plot), paired tests of
   the claims, controls, inference cost and a verdict written from the numbers.

Settings were chosen on val (docs/results.md), never on test; budgets only scale sizes and steps.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medlvr.recipes.demo_arms import accuracy, prepare_data, run_arm
from medlvr.recipes.demo_config import (
    ARMS,
    BUDGETS,
    LADDERS,
    LATENT_ARMS,
    ArmResult,
    DemoConfig,
    DemoData,
)

__all__ = ["ARMS", "BUDGETS", "DemoConfig", "DemoResult", "accuracy", "prepare_data", "run_demo"]


@dataclass
class DemoResult:
    out: Path
    report: Path
    table: list[dict[str, Any]]
    seconds: float


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Data, every arm per seed (two at a time), evaluation, explanations, report; with
    `ladder=both`, the depth ladder and then the subtlety ladder, and one report of both."""
    if cfg.ladder == "both":
        return _run_both(cfg, log)
    from medlvr.recipes.stage0 import default_stage0

    started = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    backbone = Path(cfg.backbone) if cfg.backbone else default_stage0()
    log(f"[1/4] data: {cfg.dataset} ({cfg.budget} budget)")
    data = prepare_data(cfg, out / "data", progress=cfg.progress)
    jobs = [(arm, seed) for seed in cfg.seeds for arm in cfg.arm_list]
    workers = min(cfg.workers, len(jobs))
    log(
        f"[2/4] train and score {len(jobs)} arm runs ({', '.join(cfg.arm_list)} x seeds {cfg.seeds}), {workers} at a time"
    )
    results = _run_all(cfg, jobs, backbone, data, out, workers, log)

    log("[3/4] evidence maps per hop")
    explain = _explanations(cfg, data, results, out)
    log("[4/4] report")
    from medlvr.recipes.demo_report import write_demo_report

    report, table = write_demo_report(cfg, data, results, explain, out, time.time() - started)
    return DemoResult(out, report, table, time.time() - started)


def _run_both(cfg: DemoConfig, log: Callable[[str], None]) -> DemoResult:
    """Both ladders into `out/depth` and `out/subtlety`, then `out/report.md`: the two verdicts
    and accuracy tables as one story (each ladder's full report stays in its folder)."""
    from medlvr.recipes.demo_report import write_both_report

    started = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    done = {}
    for i, ladder in enumerate(LADDERS, 1):
        log(f"== ladder {i}/{len(LADDERS)}: {ladder}")
        done[ladder] = run_demo(cfg.of_ladder(ladder), log)
    seconds = time.time() - started
    report = write_both_report(cfg, {k: r.report for k, r in done.items()}, out, seconds)
    ladders = {k: json.loads((r.out / "results.json").read_text()) for k, r in done.items()}
    (out / "results.json").write_text(
        json.dumps({"ladders": ladders, "minutes": seconds / 60}, indent=2)
    )
    table = [{**row, "ladder": k} for k, r in done.items() for row in r.table]
    return DemoResult(out, report, table, seconds)


Results = dict[str, dict[int, ArmResult]]


def _run_all(cfg: DemoConfig, jobs: list[tuple[str, int]], backbone: Path, data: DemoData, out: Path,
             workers: int, log: Callable[[str], None]) -> Results:  # fmt: skip
    """Every (arm, seed), `workers` at a time; (d) of a seed waits for (c) of that seed."""
    results: Results = {arm: {} for arm in cfg.arm_list}

    def done(r: ArmResult) -> None:
        results[r.arm][r.seed] = r
        log(f"      ({r.arm}) {ARMS[r.arm]}, seed {r.seed}: trained in {r.train_seconds / 60:.1f} min, "
            f"{cfg.split} accuracy {accuracy(r.rows[cfg.split], cfg.latent_steps_of(r.arm)).get('all', float('nan')):.3f}")  # fmt: skip

    if workers <= 1:
        for arm, seed in jobs:
            done(run_arm(cfg, arm, seed, backbone, data, out))
        return results

    # Single-threaded workers: two one-thread processes beat one two-thread process on 2
    # cores, which slowed several-fold whenever anything else ran.
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, _Progress(cfg.progress, log) as bar:
        steps = manager.Queue()
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_single_thread) as pool:
            waiting = list(jobs)
            running: dict[Future, tuple[str, int]] = {}

            def launch() -> None:
                for job in list(waiting):
                    if len(running) >= workers:
                        return
                    arm, seed = job
                    if arm == "d" and seed not in results.get("c", {}):
                        continue  # VLPO starts from (c) of the same seed
                    waiting.remove(job)
                    total = cfg.spec.vlpo_steps if arm == "d" else cfg.spec.sft_steps
                    bar.add(job, f"({arm}) seed {seed}", total)
                    running[pool.submit(_worker, cfg, arm, seed, backbone, data, out, steps)] = job

            launch()
            while running:
                finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                bar.drain(steps)
                for fut in finished:
                    job = running.pop(fut)
                    bar.finish(job)
                    done(fut.result())  # a worker's exception surfaces here, with its traceback
                launch()
    return results


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _worker(
    cfg: DemoConfig, arm: str, seed: int, backbone: Path, data: DemoData, out: Path, steps: Any
) -> ArmResult:
    return run_arm(
        cfg,
        arm,
        seed,
        backbone,
        data,
        out,
        on_step=lambda row: steps.put(((arm, seed), row["step"], row.get("loss"))),
    )


class _Progress:
    """One bar per running arm, fed with the step numbers the workers report, and a line per
    arm at every quarter of its steps (step, loss, time left), which shows where no bar can
    (a log file, `make demo` piped through `tee`)."""

    def __init__(self, enabled: bool, log: Callable[[str], None] = print):
        self.enabled, self.log = enabled, log
        self.tasks: dict[tuple[str, int], Any] = {}
        self.plan: dict[
            tuple[str, int], tuple[str, int, float, int]
        ] = {}  # label, total, start, quarters said

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.stop()

    def add(self, job: tuple[str, int], label: str, total: int) -> None:
        self.plan[job] = (label, total, time.time(), 0)
        if self.enabled:
            self.tasks[job] = self.progress.add_task(f"train {label}", total=total)

    def drain(self, steps: Any) -> None:
        while True:
            try:
                job, step, loss = steps.get_nowait()
            except queue.Empty:
                return
            if self.enabled and job in self.tasks:
                self.progress.update(self.tasks[job], completed=step)
            self._say(job, step, loss)

    def _say(self, job: tuple[str, int], step: int, loss: float | None) -> None:
        if job not in self.plan:
            return
        label, total, start, said = self.plan[job]
        quarter = 4 * step // max(total, 1)
        if quarter <= said or step >= total:
            return
        self.plan[job] = (label, total, start, quarter)
        left = (time.time() - start) / step * (total - step)
        text = f"      train {label}: step {step}/{total}" + (
            f", loss {loss:.3f}" if loss is not None else ""
        )
        text += f", ~{left / 60:.1f} min left"
        if self.enabled:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            self.log(text)

    def finish(self, job: tuple[str, int]) -> None:
        if self.enabled and job in self.tasks:
            self.progress.remove_task(self.tasks.pop(job))


def _explanations(cfg: DemoConfig, data: DemoData, results: Results, out: Path) -> dict[str, Any]:
    """Per-hop and per-step pointing of the latent arms' evidence maps, their latent diagnostics
    (first seed), and explanation images of (c)."""
    if not data.has_rois:
        return {}
    from medlvr.data.images import load_image
    from medlvr.data.schema import read_jsonl
    from medlvr.eval.diagnostics import latent_diagnostics
    from medlvr.explain import explain, explain_metrics
    from medlvr.model.latent import LatentVLM

    seed = cfg.seeds[0]
    samples = [s for s in data.tests[cfg.split] if s.rois][: cfg.spec.explain_samples]
    # The probes are fitted on training questions the arms saw, and scored on the scored split.
    fit = [s for s in read_jsonl(data.train) if s.rois][: max(cfg.spec.explain_samples, 16)]
    found: dict[str, Any] = {"metrics": {}, "images": [], "diagnostics": {}}
    for arm in (a for a in cfg.arm_list if a in LATENT_ARMS):
        vlm = LatentVLM.from_pretrained(results[arm][seed].model)
        found["metrics"][arm] = explain_metrics(vlm, samples, cfg.latent_steps, seed=seed)
        # The producer's gates (docs/results.md section 11): next-hop pointing after a gold
        # prefix (multi-hop questions) and what linear probes read from the latent states.
        found["diagnostics"][arm] = latent_diagnostics(
            vlm, fit, samples, cfg.latent_steps, seed=seed
        )
        if arm == "c":
            deepest = sorted(samples, key=lambda s: -int(s.meta.get("hops", 1)))[:3]
            for s in deepest:
                ex = explain(vlm, [load_image(p) for p in s.images], s.question, s.options or None,
                             latent_steps=cfg.latent_steps, max_new_tokens=8)  # fmt: skip
                png, _ = ex.save(out / "explain" / f"{s.id}.png")
                found["images"].append(png)
    return found
