"""The demo's report: tables (mean and spread over seeds), plots and an honest verdict."""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from medlvr.recipes.demo import VARIANTS, DemoConfig, DemoData, accuracy


def _ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    m, s = _ms(values)
    return "–" if m != m else f"{m:.3f} ± {s:.3f}"


def main_k(variant: str, cfg: DemoConfig) -> int:
    return 0 if variant == "a" else cfg.latent_steps


def results_table(cfg: DemoConfig, data: DemoData, results: dict) -> list[dict[str, Any]]:
    """One row per (variant, split): accuracy per seed, mean and spread, question count."""
    table = []
    for v in "abcd":
        for split in data.tests:
            per_seed = []
            n = 0
            for seed in cfg.seeds:
                rows = results[v][seed]["rows"][split]
                acc = accuracy(rows, main_k(v, cfg)).get("all")
                if acc is not None:
                    per_seed.append(acc)
                    n = sum(int(r.get("latent_steps") or 0) == main_k(v, cfg) for r in rows)
            m, s = _ms(per_seed)
            table.append({"variant": v, "name": VARIANTS[v], "split": split, "K": main_k(v, cfg),
                          "mean": m, "std": s, "per_seed": per_seed, "n": n})
    return table


def _grouped(cfg, results, v, split, k, key) -> dict[Any, list[float]]:
    out: dict[Any, list[float]] = defaultdict(list)
    for seed in cfg.seeds:
        for g, acc in accuracy(results[v][seed]["rows"][split], k, key).items():
            out[g].append(acc)
    return out


def verdict(cfg: DemoConfig, table: list[dict[str, Any]], split: str) -> list[str]:
    """What the numbers say about the paper's effect, in plain words."""
    by = {r["variant"]: r for r in table if r["split"] == split}
    if len(by) < 4:
        return []
    a, c, d = by["a"], by["c"], by["d"]
    delta = 100 * (c["mean"] - a["mean"])
    several = len(cfg.seeds) > 1
    overlap = (c["mean"] - c["std"]) <= (a["mean"] + a["std"]) and (a["mean"] - a["std"]) <= (c["mean"] + c["std"])
    spread = ("seed spreads overlap" if overlap else "seed spreads do not overlap") if several else "one seed: no spread"
    shown = delta >= 5 and several and not overlap
    lines = [
        f"- ROI-SFT (c) minus direct (a) on {split}: **{delta:+.1f} points** "
        f"({c['mean']:.3f} vs {a['mean']:.3f}; {spread}). "
        f"The paper's effect (at least +5 points, spreads apart) is {'reproduced' if shown else 'not shown'} on this run.",
        f"- VLPO (d) minus ROI-SFT (c) on {split}: **{100 * (d['mean'] - c['mean']):+.1f} points**.",
        f"- Latent without ROI (b) minus direct (a) on {split}: **{100 * (by['b']['mean'] - a['mean']):+.1f} points**.",
    ]
    if len(cfg.seeds) < 3:
        lines.append(f"- Only {len(cfg.seeds)} seed(s): spreads are not meaningful; differences under ~3 points are noise.")
    return lines


def write_demo_report(cfg, data, results, meta, explain, out: Path, seconds: float) -> tuple[Path, list[dict[str, Any]]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    table = results_table(cfg, data, results)
    (out / "results.json").write_text(json.dumps({"table": table, "explain": explain.get("metrics", {})}, indent=2, default=str))

    lines = [
        f"# MedLVR demo ({cfg.dataset}, {cfg.budget} budget)",
        "",
        f"Seeds {', '.join(map(str, cfg.seeds))}; K = {cfg.latent_steps} for (b)-(d); projector `{cfg.projector}`; "
        f"ROI alignment `{cfg.align_kind}` with lambda = {cfg.align_weight}; {cfg.spec.sft_steps} SFT steps "
        f"(batch {cfg.spec.batch_size}) per variant, {cfg.spec.vlpo_steps} VLPO steps for (d). "
        f"Wall time {seconds / 60:.1f} min. Accuracies are means ± population std over seeds, scored by the "
        "evaluation harness (unparseable answers count as wrong).",
        "",
        *[f"> {n}" for n in data.notes],
        "",
        "## Results",
        "",
        "| variant | split | K | accuracy | per seed | questions |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        seeds = ", ".join(f"{x:.3f}" for x in r["per_seed"])
        lines.append(f"| ({r['variant']}) {r['name']} | {r['split']} | {r['K']} | {_fmt(r['per_seed'])} | {seeds} | {r['n']} |")
    for split in data.tests:
        lines += ["", f"**{split}:**", *verdict(cfg, table, split)]

    if cfg.dataset == "vqa-rad":
        lines += ["", *_vqa_rad_section(cfg, data, results)]

    # by question family and by number of lesions
    families = sorted({r.get("question_type") or "?" for rows in results["a"][cfg.seeds[0]]["rows"].values() for r in rows})
    for split in data.tests:
        lines += ["", f"## By question family ({split})", "", "| family | " + " | ".join(f"({v})" for v in "abcd") + " |",
                  "|---|" + "---|" * 4]
        fam = {v: _grouped(cfg, results, v, split, main_k(v, cfg), lambda r: r.get("question_type") or "?") for v in "abcd"}
        for f in families:
            lines.append(f"| {f} | " + " | ".join(_fmt(fam[v].get(f, [])) for v in "abcd") + " |")
        _bar_plot(plt, fam, families, plots / f"family_{split}.png", f"Accuracy by question family ({split})")
        if any("n_lesions" in m for m in meta.values()):
            nl = {v: _grouped(cfg, results, v, split, main_k(v, cfg), lambda r: meta.get(r["id"], {}).get("n_lesions", "?")) for v in "abcd"}
            counts = sorted({g for d in nl.values() for g in d}, key=str)
            lines += ["", f"### By number of lesions ({split})", "", "| lesions | " + " | ".join(f"({v})" for v in "abcd") + " |",
                      "|---|" + "---|" * 4]
            for c in counts:
                lines.append(f"| {c} | " + " | ".join(_fmt(nl[v].get(c, [])) for v in "abcd") + " |")

    # latent budget sweep
    lines += ["", "## Accuracy against the latent budget K", ""]
    sweep_ks = sorted(set(results["c"][cfg.seeds[0]]["ks"]))
    lines += ["| variant | split | " + " | ".join(f"K={k}" for k in sweep_ks) + " |", "|---|---|" + "---|" * len(sweep_ks)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in "cd":
        for split in data.tests:
            cells, means = [], []
            for k in sweep_ks:
                vals = [accuracy(results[v][s]["rows"][split], k).get("all") for s in cfg.seeds]
                vals = [x for x in vals if x is not None]
                cells.append(_fmt(vals))
                means.append(_ms(vals)[0])
            lines.append(f"| ({v}) | {split} | " + " | ".join(cells) + " |")
            ax.plot(sweep_ks, means, marker="o", label=f"({v}) {split}")
    ax.set_xlabel("latent steps K at inference")
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.set_title("Accuracy against the latent budget")
    fig.tight_layout()
    fig.savefig(plots / "accuracy_vs_k.png", dpi=100)
    plt.close(fig)

    # training curves: answer cross-entropy of the SFT variants, and (c)'s alignment loss
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in "abc":
        hist = [h for h in results[v][cfg.seeds[0]]["history"] if h.get("ce") is not None]
        if hist:
            ax.plot([h["step"] for h in hist], [h["ce"] for h in hist], label=f"({v}) {VARIANTS[v]}: answer CE")
    aligned = [h for h in results["c"][cfg.seeds[0]]["history"] if h.get("align") is not None]
    if aligned:
        ax.plot([h["step"] for h in aligned], [h["align"] for h in aligned], "--", label="(c) alignment loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"Training curves (seed {cfg.seeds[0]})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "training_curves.png", dpi=100)
    plt.close(fig)

    if explain.get("metrics"):
        lines += ["", f"## Evidence maps: faithfulness (test questions with ROIs, seed {cfg.seeds[0]})", "",
                  "Pointing game = the map's peak lies in an ROI; ROI mass = share of the map inside the ROIs. "
                  "`random` is a seeded random map (the floor).", "",
                  "| variant | similarity pointing | similarity mass | attention pointing | attention mass | random pointing | random mass | chance pointing | chance mass |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v, m in explain["metrics"].items():
            def cell(kind, key):
                x = m.get(kind, {}).get(key)
                return "–" if x is None else f"{x:.3f}"
            lines.append(f"| ({v}) | {cell('similarity', 'pointing')} | {cell('similarity', 'roi_mass')} | "
                         f"{cell('attention', 'pointing')} | {cell('attention', 'roi_mass')} | "
                         f"{cell('random', 'pointing')} | {cell('random', 'roi_mass')} | "
                         f"{cell('chance', 'pointing')} | {cell('chance', 'roi_mass')} |")
        for img in explain.get("images", []):
            lines.append(f"\n![explanation]({Path(img).relative_to(out)})")

    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in sorted(plots.glob("*.png"))]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report, table


def _bar_plot(plt, fam: dict[str, dict[Any, list[float]]], families: list[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(max(6, len(families) * 1.2), 4))
    width = 0.2
    for i, v in enumerate("abcd"):
        means = [_ms(fam[v].get(f, []))[0] for f in families]
        ax.bar([j + i * width for j in range(len(families))], [0 if m != m else m for m in means], width, label=f"({v}) {VARIANTS[v]}")
    ax.set_xticks([j + 1.5 * width for j in range(len(families))], families, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _vqa_rad_section(cfg: DemoConfig, data: DemoData, results: dict) -> list[str]:
    """Closed accuracy and open metrics beside the majority-answer baseline."""
    from medlvr.data.schema import read_jsonl
    from medlvr.eval.metrics import score, summarize

    train = read_jsonl(data.train)
    majority = {t: Counter(s.answer.strip().lower() for s in train if s.answer_type == t).most_common(1)[0][0]
                for t in ("closed", "open") if any(s.answer_type == t for s in train)}
    test = data.tests["test"]
    base = defaultdict(list)
    for s in test:
        if s.answer_type in majority:
            base[s.answer_type].append(score(s, majority[s.answer_type]).correct)
    lines = ["## VQA-RAD: closed and open metrics", "",
             f"Majority-answer baseline (most frequent train answer per type: {majority}): "
             + ", ".join(f"{t} {sum(v) / len(v):.3f}" for t, v in base.items()), "",
             "| variant | closed accuracy | open exact match | open token recall | open token F1 | invalid rate |",
             "|---|---|---|---|---|---|"]
    for v in "abcd":
        vals = defaultdict(list)
        for seed in cfg.seeds:
            rows = [r for r in results[v][seed]["rows"]["test"] if int(r.get("latent_steps") or 0) == main_k(v, cfg)]
            summ = summarize(rows).get("overall", {})
            for key in ("closed_accuracy", "open_exact_match", "open_token_recall", "open_token_f1", "invalid_rate"):
                if summ.get(key) is not None:
                    vals[key].append(summ[key])
        lines.append(f"| ({v}) | " + " | ".join(_fmt(vals[k]) for k in
                     ("closed_accuracy", "open_exact_match", "open_token_recall", "open_token_f1", "invalid_rate")) + " |")
    return lines
