"""Reports of an evaluation run, and the paired comparison of two runs.

A run directory holds `predictions.jsonl` (one scored row per question and
latent budget, see `medlvr.eval.metrics.prediction_row`). `write_report`
adds `summary.json` (from `metrics.summarize`), `report.md` (tables) and PNG
plots under `plots/`. `compare` puts two runs side by side and tests the
accuracy difference on the questions both answered:

- exact McNemar test: under H0 a discordant pair (one run right, the other
  wrong) is equally likely either way, so the number of B-only wins among the
  n discordant pairs is Binomial(n, 1/2); two-sided p-value from
  `scipy.stats.binomtest` (the exact form recommended for small counts);
- paired bootstrap CI of acc(B) - acc(A): pairs are resampled with
  replacement. Each pair is a win (+1), a loss (-1) or a tie (0), so a
  resample is exactly a multinomial draw of those three counts; this is the
  same bootstrap, in O(n_boot) memory. Seeded, so reports are reproducible.

Runs with image controls (`medlvr.eval.controls`) report every condition
beside the real one and the image dependence (real minus blank); runs whose
questions carry `meta["hops"]` report accuracy by hop count, with a plot of
one line per (condition, K).

Plots use matplotlib's object API on an Agg canvas (no pyplot global state,
no display needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import binomtest

from medlvr.errors import MedlvrError
from medlvr.eval.controls import GREY, IMAGE_CONTROLS, REAL, condition_of, order_conditions
from medlvr.eval.kit_rules import rule_table
from medlvr.eval.metrics import ensure_scored, summarize

__all__ = [
    "PREDICTIONS_FILE",
    "SUMMARY_FILE",
    "REPORT_FILE",
    "PLOTS_DIR",
    "read_predictions",
    "write_report",
    "compare",
    "mcnemar_exact",
    "paired_bootstrap_ci",
]

PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
EXPLAIN_FILE = "explain.json"
"""Evidence-map metrics per K (`medlvr eval --explain-metrics`), merged into the summary under `explain`."""

# Columns of every metrics table: (summary key, header, kind).
_COLUMNS = [
    ("n", "n", "int"),
    ("accuracy", "acc", "pct"),
    ("closed_accuracy", "closed acc", "pct"),
    ("choice_accuracy", "choice acc", "pct"),
    ("open_accuracy", "open acc", "pct"),
    ("open_exact_match", "open EM", "pct"),
    ("open_token_recall", "tok recall", "pct"),
    ("open_token_f1", "tok F1", "pct"),
    ("invalid_rate", "invalid", "pct"),
    ("n_errors", "errors", "int"),
    ("latency_p50", "p50 s", "sec"),
    ("latency_p95", "p95 s", "sec"),
    ("mean_tokens", "tokens", "num"),
]
_SECTIONS = [
    ("by_dataset", "dataset"),
    ("by_modality", "modality"),
    ("by_question_type", "question type"),
    ("by_answer_type", "answer type"),
    ("by_content_type", "content type"),
    ("by_hops", "hops"),
    ("by_latent_steps", "latent steps K"),
]
_CONTROL_LEGEND = (
    f"none = the real images; blank = each image replaced by one of the same size and mode, "
    f"every pixel grey {GREY}; shuffled = the images of another question (a fixed derangement, "
    "`control_seed` in run.json); question-only = no image and no image placeholder in the prompt."
)


# --------------------------------------------------------------------------- I/O


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a predictions JSONL file (a run directory or the file itself).

    Fails with a `MedlvrError` naming the file and line on malformed JSON. Rows without
    `correct` (written by hand or another tool) are scored again from their own fields, or
    refused in one line (`medlvr.eval.metrics.ensure_scored`): never read as wrong.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PREDICTIONS_FILE
    if not path.is_file():
        raise MedlvrError(f"predictions not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise MedlvrError(f"{path}:{lineno}: malformed JSON: {err.msg}") from None
            if not isinstance(row, dict) or "id" not in row:
                raise MedlvrError(
                    f"{path}:{lineno}: a prediction row must be an object with an `id`"
                )
            rows.append(row)
    return ensure_scored(rows, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- markdown


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if kind == "int":
        return str(int(value))
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "sec":
        return f"{value:.3f}"
    return f"{value:.1f}"


def _table(
    groups: Mapping[str, Mapping[str, Any]],
    label: str,
    extra: tuple[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """A metrics table, one row per group; `extra` = (header, group -> cell) adds a last column."""
    head = [label] + [h for _, h, _ in _COLUMNS] + ([extra[0]] if extra else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in groups.items():
        cells = [str(name).replace("|", "\\|")] + [_fmt(m.get(k), kind) for k, _, kind in _COLUMNS]
        cells += [extra[1].get(name, "–")] if extra else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _points(v: Any) -> str:
    """A difference of accuracies, in signed percentage points."""
    return "–" if v is None else f"{100 * v:+.1f}"


def _gap_cell(gap: Mapping[str, Any] | None) -> str:
    return "–" if not gap or gap.get("delta") is None else f"{_points(gap['delta'])} (n={gap['n']})"


def _controls_markdown(summary: Mapping[str, Any]) -> list[str]:
    """The grounding-control section: every condition beside the real one, and the image dependence."""
    conds = summary["by_image_control"]
    gaps = summary.get("real_minus_control", {})
    out = [
        "## Grounding controls",
        "",
        _CONTROL_LEGEND,
        f"The tables above are over the `{summary['image_control_main']}` rows; "
        "`real − control` is the accuracy with real images minus under the control, in points, "
        "on the (question, K) both answered.",
        "",
    ]
    dep = summary.get("image_dependence")
    if dep and dep["overall"]["n"]:
        o = dep["overall"]
        out += [
            f"**Image dependence (real − blank): {_points(o['delta'])} points** "
            f"(real {_fmt(o['real'], 'pct')}, blank {_fmt(o['control'], 'pct')}, n={o['n']}).",
            "",
        ]
    out += _table(
        conds, "images", ("real − control", {c: _gap_cell(g) for c, g in gaps.items()})
    ) + [""]
    per_k = summary.get("by_image_control_latent_steps", {})
    if any(len(v) > 1 for v in per_k.values()):
        cells = {f"{c}, K={k}": m for c, by_k in per_k.items() for k, m in by_k.items()}
        out += ["### By image condition and K", ""] + _table(cells, "images, K") + [""]
    if dep:
        scopes = {
            **{f"dataset {d}": g for d, g in dep["by_dataset"].items()},
            **{f"K={k}": g for k, g in dep["by_latent_steps"].items()},
        }
        if (
            len(scopes) > 2
        ):  # more than the one dataset and the one K, which repeat the overall line
            out += [
                "### Image dependence by dataset and K",
                "",
                "| scope | n | real | blank | real − blank |",
                "|---|---|---|---|---|",
            ]
            out += [
                f"| {name} | {g['n']} | {_fmt(g['real'], 'pct')} | {_fmt(g['control'], 'pct')} | "
                f"{_points(g['delta'])} |"
                for name, g in scopes.items()
            ]
            out.append("")
    return out


def _hop_series(summary: Mapping[str, Any]) -> dict[str, dict[str, Mapping[str, Any]]]:
    """Accuracy-by-hops curves, one per (condition, K), labelled by what varies (label -> hops -> metrics)."""
    curves = summary.get("by_image_control_latent_steps_hops", {})
    n_conds, n_ks = len(curves), len({k for by_k in curves.values() for k in by_k})
    series = {}
    for c, by_k in curves.items():
        for k, by_hops in by_k.items():
            parts = ([c] if n_conds > 1 else []) + ([f"K={k}"] if n_ks > 1 else [])
            series[", ".join(parts) or "all"] = {h: m for h, m in by_hops.items() if h != "unknown"}
    return series


def _hops_markdown(summary: Mapping[str, Any]) -> list[str]:
    series = _hop_series(summary)
    if len(series) < 2:
        return []  # the single curve is the "By hops" table
    hops = list(dict.fromkeys(h for curve in series.values() for h in curve))
    out = [
        "## Accuracy by hops, per condition and K",
        "",
        "Accuracy in % (n).",
        "",
        "| hops | " + " | ".join(series) + " |",
        "|---|" + "---|" * len(series),
    ]
    for h in hops:
        cells = [
            f"{_fmt(curve[h]['accuracy'], 'pct')} ({curve[h]['n']})" if h in curve else "–"
            for curve in series.values()
        ]
        out.append(f"| {h} | " + " | ".join(cells) + " |")
    return out + [""]


def _kits_markdown(summary: Mapping[str, Any]) -> list[str]:
    """medlvr's accuracy beside the common kits' rules on the same predictions (a rescored run)."""
    if not summary.get("kit_rules"):
        return []
    out = [
        "## The same predictions under other kits' rules",
        "",
        (
            "medlvr's judge beside medlvr's implementation of each kit's documented rule "
            "(docs/scoring.md). Closed = closed and multiple-choice questions; open = accuracy, or "
            "mean word recall for llava-med; crashes = rows on which the kit would stop (scored 0 "
            "here)."
        ),
        "",
        "| rule | n | acc | closed | open | crashes |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rule_table(summary).items():
        out.append(
            f"| {name} | {m['n']} | {_fmt(m['accuracy'], 'pct')} | {_fmt(m['closed_accuracy'], 'pct')} | "
            f"{_fmt(m['open_score'], 'pct')} | {m['n_crash']} |"
        )
    return out + [""]


def _markdown(
    summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], title: str, plots: Sequence[Path]
) -> str:
    out = [f"# {title}", ""]
    out += [
        "Accuracies and rates in %. Invalid = unparseable answer (scored wrong); errors = rows whose "
        "image or generation failed (scored wrong, not invalid). Token recall/F1 on open questions.",
        "",
    ]
    out += ["## Overall", ""] + _table({"all": summary["overall"]}, "scope") + [""]
    macro = summary.get("dataset_macro_accuracy")
    if macro is not None:
        out += [f"Mean accuracy over datasets (unweighted): {100 * macro:.1f}", ""]
    for key, label in _SECTIONS:
        if summary.get(key):
            out += [f"## By {label}", ""] + _table(summary[key], label) + [""]
    out += _hops_markdown(summary)
    out += _kits_markdown(summary)
    if summary.get("by_image_control"):
        out += _controls_markdown(summary)
    if summary.get("explain"):
        out += [
            "## Evidence maps on questions with ROIs",
            "",
            "Pointing game (peak inside an ROI) and ROI mass (share of the map inside the ROIs), in %; "
            "`random` is a seeded random map, `chance` the expectation of a uniform one.",
            "",
            "| K | n | map | pointing | ROI mass |",
            "|---|---|---|---|---|",
        ]
        for k, m in summary["explain"].items():
            for name in ("similarity", "attention", "random", "chance"):
                if isinstance(m.get(name), Mapping):
                    out.append(
                        f"| {k} | {m.get('n', '')} | {name} | {_fmt(m[name].get('pointing'), 'pct')} | "
                        f"{_fmt(m[name].get('roi_mass'), 'pct')} |"
                    )
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{p.stem}]({PLOTS_DIR}/{p.name})" for p in plots] + [""]
    invalid = [r for r in rows if r.get("invalid") and not r.get("error")]
    errors = [r for r in rows if r.get("error")]
    if invalid:
        out += [
            f"## Invalid answers (first {min(10, len(invalid))} of {len(invalid)})",
            "",
            "| id | K | rule | response |",
            "|---|---|---|---|",
        ]
        for r in invalid[:10]:
            resp = " ".join(str(r.get("response", "")).split())
            resp = (resp[:117] + "...") if len(resp) > 120 else resp
            where = f"{r.get('latent_steps', '')}" + (
                "" if condition_of(r) == REAL else f" ({condition_of(r)})"
            )
            out.append(
                f"| {r['id']} | {where} | {r.get('parse_how', '')} | {resp.replace('|', chr(92) + '|')} |"
            )
        out.append("")
    if errors:
        out += [
            f"## Errors (first {min(10, len(errors))} of {len(errors)})",
            "",
            "| id | error |",
            "|---|---|",
        ]
        out += [
            f"| {r['id']} | {str(r['error']).replace('|', chr(92) + '|')} |" for r in errors[:10]
        ]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- plots


def _bar_plot(groups: Mapping[str, Mapping[str, Any]], title: str, path: Path) -> Path:
    names = [n for n, m in groups.items() if m.get("accuracy") is not None]
    acc = [100 * groups[n]["accuracy"] for n in names]
    fig = Figure(figsize=(max(4.0, 0.6 * len(names) + 2), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(names)), acc, color="#4c72b0")
    for bar, n in zip(bars, names):
        ax.annotate(
            f"n={groups[n]['n']}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(
        range(len(names)), names, rotation=30 if len(names) > 3 else 0, ha="right", fontsize=8
    )
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _k_plot(summary: Mapping[str, Any], path: Path) -> Path:
    by_k = summary["by_latent_steps"]
    latent_steps = [k for k in by_k if k != "unknown"]
    x = [float(k) for k in latent_steps]
    fig = Figure(figsize=(5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(
        x,
        [100 * (by_k[k]["accuracy"] or 0.0) for k in latent_steps],
        marker="o",
        linewidth=2,
        label="all",
    )
    per_ds = summary.get("by_latent_steps_dataset", {})
    datasets = sorted({d for k in latent_steps for d in per_ds.get(k, {})})
    if len(datasets) > 1:
        for d in datasets:
            pts = [
                (float(k), per_ds[k][d]["accuracy"])
                for k in latent_steps
                if d in per_ds.get(k, {}) and per_ds[k][d]["accuracy"] is not None
            ]
            ax.plot(
                [p[0] for p in pts], [100 * p[1] for p in pts], marker=".", linestyle="--", label=d
            )
    ax.set_xticks(x, latent_steps)
    return _save_lines(fig, ax, "latent budget K", "Accuracy against the latent budget", path)


def _save_lines(fig: Figure, ax: Any, xlabel: str, title: str, path: Path) -> Path:
    """Label, legend and save an accuracy line plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _hops_plot(summary: Mapping[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    hops: set[int] = set()
    for label, curve in _hop_series(summary).items():
        pts = sorted((int(h), m["accuracy"]) for h, m in curve.items() if m["accuracy"] is not None)
        hops.update(h for h, _ in pts)
        control = (
            label.split(",")[0] in IMAGE_CONTROLS[1:]
        )  # the controls dashed, the real images solid
        ax.plot(
            [h for h, _ in pts],
            [100 * a for _, a in pts],
            marker="o",
            linestyle="--" if control else "-",
            label=label,
        )
    ax.set_xticks(sorted(hops))
    ax.set_ylim(0, 105)
    return _save_lines(fig, ax, "hops", "Accuracy against reasoning depth", path)


def _plots(summary: Mapping[str, Any], plot_dir: Path) -> list[Path]:
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        _bar_plot(
            summary["by_dataset"], "Accuracy per dataset", plot_dir / "accuracy_by_dataset.png"
        ),
        _bar_plot(
            summary["by_question_type"],
            "Accuracy per question type",
            plot_dir / "accuracy_by_question_type.png",
        ),
    ]
    if len([k for k in summary.get("by_latent_steps", {}) if k != "unknown"]) > 1:
        paths.append(_k_plot(summary, plot_dir / "accuracy_by_latent_steps.png"))
    if any(_hop_series(summary).values()):
        paths.append(_hops_plot(summary, plot_dir / "accuracy_by_hops.png"))
    return paths


# --------------------------------------------------------------------------- report


def write_report(
    run_dir: str | Path,
    rows: Iterable[Mapping[str, Any]] | None = None,
    *,
    title: str | None = None,
) -> dict[str, Any]:
    """Write `summary.json`, `report.md` and `plots/*.png` into `run_dir`.

    `rows` defaults to the run's `predictions.jsonl`. Returns
    `{"summary": Path, "report": Path, "plots": [Path, ...], "data": summary dict}`.
    The latent-budget plot is drawn only when the rows hold several K, the
    hops plot only when some row has hops.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = read_predictions(run_dir) if rows is None else list(rows)
    summary = summarize(rows)
    if (run_dir / EXPLAIN_FILE).is_file():
        summary["explain"] = json.loads((run_dir / EXPLAIN_FILE).read_text(encoding="utf-8"))
    summary_path = run_dir / SUMMARY_FILE
    _write_text(summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    plots = _plots(summary, run_dir / PLOTS_DIR)
    report_path = run_dir / REPORT_FILE
    _write_text(
        report_path, _markdown(summary, rows, title or f"Evaluation: {run_dir.name}", plots)
    )
    return {"summary": summary_path, "report": report_path, "plots": plots, "data": summary}


# --------------------------------------------------------------------------- comparison


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return float(binomtest(wins, n, 0.5, alternative="two-sided").pvalue)


def paired_bootstrap_ci(
    a_correct: Sequence[bool],
    b_correct: Sequence[bool],
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(b) - mean(a) over paired questions (see the module docstring)."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results differ in length: {a.shape} vs {b.shape}")
    n = len(a)
    if n == 0:
        return (math.nan, math.nan)
    counts = np.array([np.sum(b & ~a), np.sum(a & ~b), np.sum(a == b)])  # wins, losses, ties
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=n_boot)  # [n_boot, 3]
    diffs = (draws[:, 0] - draws[:, 1]) / n  # [n_boot]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    return float(low), float(high)


PairKey = tuple[str, Any, Any]
"""(id, K or None, image condition or None): None where the runs are paired across that field."""


def _index(
    rows: Sequence[Mapping[str, Any]], by_k: bool, by_c: bool
) -> dict[PairKey, Mapping[str, Any]]:
    # A resumed run may repeat a question: the last row wins (it is the most recent answer).
    return {
        (
            str(r["id"]),
            r.get("latent_steps") if by_k else None,
            condition_of(r) if by_c else None,
        ): r
        for r in rows
    }


def _paired_on(a: set[Any], b: set[Any]) -> bool:
    """Pair on a field unless each run holds one value of it and they differ (K=0 run against a K=4 run)."""
    return not (a != b and len(a) == 1 and len(b) == 1)


def _ok(row: Mapping[str, Any]) -> bool:
    return bool(row.get("correct")) and not row.get("error")


def _side_by_side(sa: Mapping[str, Any], sb: Mapping[str, Any]) -> dict[str, Any]:
    def pair(ma: Mapping[str, Any] | None, mb: Mapping[str, Any] | None) -> dict[str, Any]:
        out = {}
        for key, _, _ in _COLUMNS:
            va, vb = (ma or {}).get(key), (mb or {}).get(key)
            out[key] = {
                "a": va,
                "b": vb,
                "delta": (vb - va) if va is not None and vb is not None else None,
            }
        return out

    result: dict[str, Any] = {"overall": pair(sa["overall"], sb["overall"])}
    for key, _ in [*_SECTIONS, ("by_image_control", "")]:
        names = sorted(set(sa.get(key, {})) | set(sb.get(key, {})))
        if names:
            result[key] = {n: pair(sa.get(key, {}).get(n), sb.get(key, {}).get(n)) for n in names}
    return result


def compare(
    run_a_dir: str | Path,
    run_b_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Compare run B (candidate) against run A (baseline) on their `predictions.jsonl`.

    Rows are paired by (id, latent_steps, image condition), except across a
    field in which each run holds a single, different value: a K=0 baseline
    against a K=4 run is paired by id, and so is a real-image run against a
    blank-image run (a paired test of the image dependence). `wins` =
    questions B gets right and A wrong, `losses` = the reverse (error rows
    count as wrong). Returns a dict with the side-by-side metrics and deltas
    (`metrics`, per image condition too), the paired test (`paired`: n, wins,
    losses, ties, acc_a, acc_b, delta, mcnemar_p, ci) on the main condition
    (real images when both runs have them), the same per dataset
    (`paired_by_dataset`) and per condition (`paired_by_image_control`, when
    the runs share several), both runs' image dependence
    (`image_dependence`: a, b, delta), and the won/lost keys. With `out_dir`,
    also writes `compare.json` and `compare.md` there.
    """
    rows_a, rows_b = read_predictions(run_a_dir), read_predictions(run_b_dir)
    by_k = _paired_on(
        {r.get("latent_steps") for r in rows_a}, {r.get("latent_steps") for r in rows_b}
    )
    conds_a, conds_b = {condition_of(r) for r in rows_a}, {condition_of(r) for r in rows_b}
    by_c = _paired_on(conds_a, conds_b)
    ia, ib = _index(rows_a, by_k, by_c), _index(rows_b, by_k, by_c)
    common = sorted(set(ia) & set(ib), key=lambda k: (k[0], str(k[1]), str(k[2])))
    conds = order_conditions({k[2] for k in common}) if by_c else []
    controls = (conds_a | conds_b) - {REAL}
    keys = [k for k in common if k[2] == conds[0]] if conds else common  # the main condition

    def paired(selected: list[tuple[str, Any, Any]]) -> dict[str, Any]:
        a = [_ok(ia[k]) for k in selected]
        b = [_ok(ib[k]) for k in selected]
        wins = sum(1 for x, y in zip(a, b) if y and not x)
        losses = sum(1 for x, y in zip(a, b) if x and not y)
        n = len(selected)
        low, high = paired_bootstrap_ci(a, b, n_boot=n_boot, seed=seed, confidence=confidence)
        return {
            "n": n,
            "wins": wins,
            "losses": losses,
            "ties": n - wins - losses,
            "acc_a": sum(a) / n if n else None,
            "acc_b": sum(b) / n if n else None,
            "delta": (sum(b) - sum(a)) / n if n else None,
            "mcnemar_p": mcnemar_exact(wins, losses),
            "ci": [low, high] if n else None,
            "confidence": confidence,  # no NaN in JSON
        }

    datasets = sorted({str(ia[k].get("dataset")) for k in keys})
    won = [k for k in keys if _ok(ib[k]) and not _ok(ia[k])]
    lost = [k for k in keys if _ok(ia[k]) and not _ok(ib[k])]
    sa, sb = summarize(rows_a), summarize(rows_b)
    dep_a, dep_b = (s.get("image_dependence", {}).get("overall", {}).get("delta") for s in (sa, sb))
    result = {
        "run_a": str(run_a_dir),
        "run_b": str(run_b_dir),
        "matched_on": "+".join(
            ["id"] + ["latent_steps"] * by_k + ["image_control"] * (by_c and bool(controls))
        ),
        "main_image_control": conds[0] if conds else None,
        "only_a": len(set(ia) - set(ib)),
        "only_b": len(set(ib) - set(ia)),
        "metrics": _side_by_side(sa, sb),
        "paired": paired(keys),
        "paired_by_dataset": {
            d: paired([k for k in keys if str(ia[k].get("dataset")) == d]) for d in datasets
        },
        "paired_by_image_control": {c: paired([k for k in common if k[2] == c]) for c in conds}
        if len(conds) > 1
        else {},
        "image_dependence": {
            "a": dep_a,
            "b": dep_b,
            "delta": dep_b - dep_a if dep_a is not None and dep_b is not None else None,
        },
        "won": [_pair_key(k) for k in won],
        "lost": [_pair_key(k) for k in lost],
        "bootstrap": {"n_boot": n_boot, "seed": seed},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_text(
            out / COMPARE_JSON, json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"
        )
        _write_text(out / COMPARE_MD, _compare_markdown(result))
    return result


def _pair_key(k: PairKey) -> dict[str, Any]:
    return {"id": k[0], "latent_steps": k[1], "image_control": k[2]}


def pair_label(x: Mapping[str, Any]) -> str:
    """`id@K=2` / `id@K=2@blank` for a won/lost entry of `compare` (real images and unpaired fields unmarked)."""
    k, c = x.get("latent_steps"), x.get("image_control")
    return (
        str(x["id"])
        + (f"@K={k}" if k is not None else "")
        + (f"@{c}" if c not in (None, REAL) else "")
    )


def _compare_markdown(c: Mapping[str, Any]) -> str:
    def pct(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.1f}"

    def plain(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    def ci(bounds: Sequence[float] | None) -> str:
        return "–" if bounds is None else f"[{pct(bounds[0])}, {pct(bounds[1])}]"

    p = c["paired"]
    out = [
        f"# Comparison: B = {c['run_b']} against A = {c['run_a']}",
        "",
        f"Paired on {c['matched_on']}: {p['n']} questions in both runs ({c['only_a']} only in A, "
        f"{c['only_b']} only in B).",
        "",
        "| scope | n | acc A | acc B | delta | B wins | B losses | McNemar p | "
        f"{int(100 * p['confidence'])}% CI of delta |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    scopes = [("all", p)] + list(c["paired_by_dataset"].items())
    scopes += [(f"images={k}", v) for k, v in c.get("paired_by_image_control", {}).items()]
    for name, s in scopes:
        out.append(
            f"| {name} | {s['n']} | {plain(s['acc_a'])} | {plain(s['acc_b'])} | {pct(s['delta'])} | "
            f"{s['wins']} | {s['losses']} | {s['mcnemar_p']:.4g} | {ci(s['ci'])} |"
        )
    out += [
        "",
        "## Metrics side by side (A / B / delta, in %)",
        "",
        "| scope | acc | invalid | open token F1 |",
        "|---|---|---|---|",
    ]
    m = c["metrics"]
    rows = [("all", m["overall"])] + [
        (f"dataset {k}", v) for k, v in m.get("by_dataset", {}).items()
    ]
    rows += [(f"K={k}", v) for k, v in m.get("by_latent_steps", {}).items()]
    rows += [(f"images={k}", v) for k, v in m.get("by_image_control", {}).items()]
    for name, v in rows:
        cells = []
        for key in ("accuracy", "invalid_rate", "open_token_f1"):
            cells.append(f"{plain(v[key]['a'])} / {plain(v[key]['b'])} / {pct(v[key]['delta'])}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    dep = c.get("image_dependence", {})
    if dep.get("a") is not None or dep.get("b") is not None:
        out += [
            "",
            f"Image dependence (real − blank, points): A {pct(dep['a'])}, B {pct(dep['b'])}, "
            f"B − A {pct(dep['delta'])}.",
        ]
    for label, items in (("B wins", c["won"]), ("B losses", c["lost"])):
        if items:
            shown = ", ".join(pair_label(x) for x in items[:30])
            more = f" ... and {len(items) - 30} more" if len(items) > 30 else ""
            out += ["", f"{label} ({len(items)}): {shown}{more}"]
    return "\n".join(out) + "\n"
