"""The demo's report: accuracy by depth, paired tests of the claims, controls, cost and a verdict.

The verdict is computed from the numbers at the deepest hop against thresholds fixed in
advance (issue 15's goal): (c) >= (a) + 10 points and (c) >= (p) + 5 points with the
seeds' spreads apart (or, with one seed, a paired test at p < 0.05 and a CI above 0),
(d) >= (c), and blank-image accuracy at chance for every arm.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from medlvr.recipes.demo_config import ARMS, ArmResult, DemoConfig, DemoData

COMPARISONS = (
    ("c", "a"),
    ("c", "p"),
    ("c", "t"),
    ("c", "b"),
    ("d", "c"),
    ("e", "a"),
    ("e", "t"),
    ("e", "b"),
)
"""(arm, against): the claims tested at each depth."""


def _ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    m, s = _ms(values)
    return "–" if m != m else f"{m:.3f} ± {s:.3f}"


class Numbers:
    """Accuracies of every arm and seed, by depth, from the scored rows."""

    def __init__(self, cfg: DemoConfig, data: DemoData, results: dict[str, dict[int, ArmResult]]):
        self.cfg, self.data, self.results = cfg, data, results
        self.arms = [a for a in cfg.arm_list if results.get(a)]
        self.split = cfg.split
        self.hop_of = {s.id: int(s.meta.get("hops", 1)) for s in data.tests[self.split]}
        self.depths = sorted(set(self.hop_of.values()))
        self.deepest = self.depths[-1]

    def rows(self, arm: str, seed: int, latent_steps: int | None = None) -> list[dict[str, Any]]:
        k = self.cfg.latent_steps_of(arm) if latent_steps is None else latent_steps
        return [
            r
            for r in self.results[arm][seed].rows[self.split]
            if int(r.get("latent_steps") or 0) == k
        ]

    def per_seed(
        self,
        arm: str,
        depth: int | None = None,
        latent_steps: int | None = None,
        control: str = "none",
    ) -> list[float]:
        """Accuracy per seed, on all questions or those of one depth, with real images or under a control."""
        out = []
        for seed in self.cfg.seeds:
            rows = self.rows(arm, seed, latent_steps)
            if control != "none":
                rows = [
                    r for r in self.results[arm][seed].controls if r.get("image_control") == control
                ]
            ok = [
                bool(r["correct"])
                for r in rows
                if depth is None or self.hop_of.get(r["id"]) == depth
            ]
            if ok:
                out.append(sum(ok) / len(ok))
        return out

    def paired(self, arm: str, other: str, depth: int) -> dict[str, Any] | None:
        """Paired comparison over (seed, question) at one depth: arm minus other."""
        from medlvr.eval.report import mcnemar_exact, paired_bootstrap_ci

        if arm not in self.arms or other not in self.arms:
            return None
        a_ok, b_ok = [], []
        for seed in self.cfg.seeds:
            mine = {
                r["id"]: bool(r["correct"])
                for r in self.rows(arm, seed)
                if self.hop_of.get(r["id"]) == depth
            }
            theirs = {
                r["id"]: bool(r["correct"])
                for r in self.rows(other, seed)
                if self.hop_of.get(r["id"]) == depth
            }
            for qid in sorted(mine.keys() & theirs.keys()):
                a_ok.append(theirs[qid])
                b_ok.append(mine[qid])
        if not a_ok:
            return None
        wins = sum(b and not a for a, b in zip(a_ok, b_ok))
        losses = sum(a and not b for a, b in zip(a_ok, b_ok))
        low, high = paired_bootstrap_ci(a_ok, b_ok)
        delta = (sum(b_ok) - sum(a_ok)) / len(a_ok)
        return {"arm": arm, "against": other, "hops": depth, "n": len(a_ok), "delta": delta, "wins": wins,
                "losses": losses, "p": mcnemar_exact(wins, losses), "ci": [low, high]}  # fmt: skip

    def chance(self) -> float:
        """Accuracy of always answering the most frequent test answer (the floor a control should sit at)."""
        golds = Counter(s.answer.strip().lower() for s in self.data.tests[self.split])
        return golds.most_common(1)[0][1] / max(sum(golds.values()), 1)

    def cost(self, arm: str) -> tuple[list[float], list[float]]:
        """Per seed: mean milliseconds per question (batch 32) and mean generated tokens."""
        ms, tokens = [], []
        for seed in self.cfg.seeds:
            rows = self.rows(arm, seed)
            lat = [r["latency_s"] for r in rows if r.get("latency_s") is not None]
            tok = [r["n_tokens"] for r in rows if r.get("n_tokens") is not None]
            if lat:
                ms.append(1000 * statistics.fmean(lat))
            if tok:
                tokens.append(statistics.fmean(tok))
        return ms, tokens


def results_table(n: Numbers) -> list[dict[str, Any]]:
    """One row per (arm, group): all test questions, then each depth."""
    table = []
    for arm in n.arms:
        for depth in [None, *n.depths]:
            per_seed = n.per_seed(arm, depth)
            m, s = _ms(per_seed)
            count = sum(
                1
                for r in n.rows(arm, n.cfg.seeds[0])
                if depth is None or n.hop_of.get(r["id"]) == depth
            )
            table.append({"variant": arm, "name": ARMS[arm], "split": n.split if depth is None else f"{n.split}, {depth} hop(s)",
                          "hops": depth, "K": n.cfg.latent_steps_of(arm), "mean": m, "std": s, "per_seed": per_seed, "n": count})  # fmt: skip
    return table


def _apart(x: list[float], y: list[float], margin: float) -> bool:
    """mean(x) - mean(y) >= margin and the seed spreads (mean +- std) do not overlap."""
    (mx, sx), (my, sy) = _ms(x), _ms(y)
    return mx - my >= margin and mx - sx > my + sy


def verdict(n: Numbers, pairs: dict[tuple[str, str, int], dict[str, Any]]) -> list[str]:
    """What the numbers say, in plain words, from thresholds fixed in advance."""
    cfg, h = n.cfg, n.deepest
    several = len(cfg.seeds) >= 3
    lines = []

    def acc(arm: str, depth: int | None = None) -> list[float]:
        return n.per_seed(arm, depth) if arm in n.arms else []

    def claim(arm: str, other: str, margin: float, text: str) -> None:
        if arm not in n.arms or other not in n.arms:
            return
        x, y = acc(arm, h), acc(other, h)
        p = pairs.get((arm, other, h))
        delta = 100 * (_ms(x)[0] - _ms(y)[0])
        if several:
            shown = _apart(x, y, margin)
            how = (
                "seed spreads apart"
                if shown or _ms(x)[0] - _ms(y)[0] < 0
                else "seed spreads overlap"
            )
        else:
            shown = bool(p and delta >= 100 * margin and p["p"] < 0.05 and p["ci"][0] > 0)
            how = "one seed: judged by the paired test"
        test = (
            f"McNemar p = {p['p']:.3g}, 95% CI [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}]"
            if p
            else "no paired test"
        )
        lines.append(f"- {text} at {h} hops: **{delta:+.1f} points** ({_fmt(x)} vs {_fmt(y)}; {how}; {test}); "
                     f"threshold {100 * margin:+.0f} points: **{'met' if shown else 'not met'}**.")  # fmt: skip

    if "a" in n.arms:
        a1, ad = _ms(acc("a", n.depths[0]))[0], _ms(acc("a", h))[0]
        regime = a1 >= 0.90 and a1 - ad >= 0.20
        lines.append(f"- Regime: direct (a) answers {n.depths[0]}-hop questions at {a1:.3f} and {h}-hop ones at {ad:.3f} "
                     f"({100 * (ad - a1):+.1f} points): {'the depth regime exists, so extra steps can pay' if regime else 'the regime (>= 0.90 at 1 hop, >= 20 points lower at the deepest) is not reached, so comparisons say little'}.")  # fmt: skip
    claim("c", "a", 0.10, "ROI-SFT (c) minus direct (a)")
    claim(
        "c",
        "p",
        0.05,
        "ROI-SFT (c) minus the pause control (p): what the fed-back states add beyond extra positions,",
    )
    claim("c", "t", 0.0, "ROI-SFT (c) minus text reasoning (t)")
    claim(
        "c",
        "b",
        0.0,
        "ROI-SFT (c) minus latent steps without ROI loss (b): what the alignment adds,",
    )
    claim("d", "c", 0.0, "VLPO (d) minus ROI-SFT (c)")
    claim("e", "a", 0.0, "The latent curriculum (e) minus direct (a)")
    claim(
        "e",
        "b",
        0.0,
        "The latent curriculum (e) minus latent steps trained on answers alone (b): what the curriculum adds,",
    )
    claim("e", "t", 0.0, "The latent curriculum (e) minus the text reasoning it starts from (t)")
    chance = n.chance()
    for control, what in (("blank", "Blank images"), ("question-only", "No image (question only)")):
        acc_c = {arm: _ms(n.per_seed(arm, control=control))[0] for arm in n.arms}
        off = [f"({a}) {v:.3f}" for a, v in acc_c.items() if v > chance + 0.05]
        lines.append(f"- {what} (chance {chance:.3f}): "
                     + ("no arm more than 5 points above chance: the accuracy comes from the image." if not off
                        else f"above chance for {', '.join(off)}: part of the accuracy does not come from the image."))  # fmt: skip
    best = max(n.arms, key=lambda a: _ms(acc(a, h))[0])
    lines.append(f"- Best arm at {h} hops: ({best}) {ARMS[best]}, {_fmt(acc(best, h))}.")
    if not several:
        lines.append(
            f"- {len(cfg.seeds)} seed(s): seed spreads need `--full` (3 seeds); differences under ~3 points are noise."
        )
    return lines


def write_demo_report(
    cfg: DemoConfig, data: DemoData, results: dict, explain: dict, out: Path, seconds: float
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    n = Numbers(cfg, data, results)
    table = results_table(n)
    pairs = {
        (a, b, d): p
        for d in n.depths
        for a, b in COMPARISONS
        if (p := n.paired(a, b, d)) is not None
    }
    said = verdict(n, pairs)

    lines = [
        f"# MedLVR demo ({cfg.dataset}, {cfg.budget} budget)",
        "",
        f"Arms {', '.join(f'({a})' for a in n.arms)}; seeds {', '.join(map(str, cfg.seeds))}; K = {cfg.latent_steps} "
        f"for the latent arms; projector `{cfg.projector}`; ROI alignment `{cfg.align_kind}` (lambda {cfg.align_weight}, "
        f"assign `{cfg.align_assign}`); {cfg.spec.sft_steps} SFT steps of batch {cfg.spec.batch_size} per arm, "
        f"{cfg.spec.vlpo_steps} VLPO steps for (d); {len(data.tests[cfg.split])} {cfg.split} questions. Wall time "
        f"{seconds / 60:.1f} min. Accuracies are means ± population std over seeds, scored by the evaluation "
        "harness (unparseable answers count as wrong).",
        "",
        *[f"> {note}" for note in data.notes],
        "",
        "## Verdict",
        "",
        *said,
        "",
        f"## Accuracy by reasoning depth ({cfg.split})",
        "",
        "| arm | K | "
        + " | ".join(f"{d} hop(s)" for d in n.depths)
        + " | all | blank image | no image | ms / question | tokens written |",
        "|---|---|" + "---|" * (len(n.depths) + 5),
    ]
    for arm in n.arms:
        ms, tok = n.cost(arm)
        lines.append(f"| ({arm}) {ARMS[arm]} | {cfg.latent_steps_of(arm)} | " + " | ".join(_fmt(n.per_seed(arm, d)) for d in n.depths)
                     + f" | {_fmt(n.per_seed(arm))} | {_fmt(n.per_seed(arm, control='blank'))} | "
                     f"{_fmt(n.per_seed(arm, control='question-only'))} | {_fmt(ms)} | {_fmt(tok)} |")  # fmt: skip
    lines += ["", f"Chance (the most frequent test answer): {n.chance():.3f}. Blank image: every image replaced by a "
              "mean-grey one of the same size; no image: the prompt without the image; both at the arm's K. Cost: harness time per question at batch 32 and the "
              "answer tokens generated (the written chain of (t) included)."]  # fmt: skip
    _depth_plot(plt, n, plots / "accuracy_by_hops.png")

    lines += ["", "## Paired comparisons by depth", "",
              "Pairs are (seed, question); wins/losses count questions only the first / only the second arm gets right.", "",
              "| comparison | hops | pairs | difference | wins | losses | McNemar p | 95% bootstrap CI |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (a, b, d), p in pairs.items():
        lines.append(f"| ({a}) − ({b}) | {d} | {p['n']} | {100 * p['delta']:+.1f} | {p['wins']} | {p['losses']} | "
                     f"{p['p']:.3g} | [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}] |")  # fmt: skip

    sweep_arms = [a for a in "cd" if a in n.arms]
    if sweep_arms:
        latent_steps = sorted(set(results[sweep_arms[0]][cfg.seeds[0]].latent_steps))
        lines += [
            "",
            "## Accuracy against the latent budget K at inference",
            "",
            "| arm | questions | " + " | ".join(f"K={k}" for k in latent_steps) + " |",
            "|---|---|" + "---|" * len(latent_steps),
        ]
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm in sweep_arms:
            for depth, label in ((None, "all"), (n.deepest, f"{n.deepest} hops")):
                vals = [n.per_seed(arm, depth, k) for k in latent_steps]
                lines.append(f"| ({arm}) | {label} | " + " | ".join(_fmt(v) for v in vals) + " |")
                ax.plot(
                    latent_steps,
                    [_ms(v)[0] for v in vals],
                    marker="o",
                    ls="-" if depth is None else "--",
                    label=f"({arm}) {label}",
                )
        ax.set_xlabel("latent steps K at inference")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
        ax.set_title(f"Accuracy against the latent budget (trained at K = {cfg.latent_steps})")
        fig.tight_layout()
        fig.savefig(plots / "accuracy_vs_k.png", dpi=100)
        plt.close(fig)

    if explain.get("metrics"):
        lines += ["", f"## Evidence maps: per-hop pointing ({cfg.split}, seed {cfg.seeds[0]})", "",
                  "Step k of the K latent steps is assigned to a hop as chain alignment does; a hit is a step whose "
                  "latent-to-image similarity map (or attention) peaks inside that hop's ROI. `random`: a seeded "
                  "random map (the floor); `other hops`: the similarity peak lands on another hop's ROI.", "",
                  "| arm | similarity | attention | random floor | other hops | steps scored | ROI mass (similarity) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for arm, m in explain["metrics"].items():
            hp = m.get("hop_pointing", {})

            def cell(x: Any) -> str:
                return "–" if x is None else f"{x:.3f}"

            lines.append(f"| ({arm}) | {cell(hp.get('similarity'))} | {cell(hp.get('attention'))} | {cell(hp.get('random'))} | "
                         f"{cell(hp.get('similarity_other_hops'))} | {hp.get('steps', 0)} | {cell(m.get('similarity', {}).get('roi_mass'))} |")  # fmt: skip
        by_hop = {
            arm: m.get("hop_pointing", {}).get("by_hop", {})
            for arm, m in explain["metrics"].items()
        }
        hops = sorted({int(j) for v in by_hop.values() for j in v})
        if hops:
            lines += [
                "",
                "Similarity pointing by the hop a step group is assigned to (random floor in brackets):",
                "",
                "| arm | " + " | ".join(f"hop {j}" for j in hops) + " |",
                "|---|" + "---|" * len(hops),
            ]
            for arm, v in by_hop.items():
                cells = [
                    f"{v[str(j)]['similarity']:.3f} ({v[str(j)]['random']:.3f})"
                    if str(j) in v
                    else "–"
                    for j in hops
                ]
                lines.append(f"| ({arm}) | " + " | ".join(cells) + " |")
        for img in explain.get("images", []):
            lines.append(f"\n![explanation]({Path(img).relative_to(out)})")

    _curves(plt, n, plots / "training_curves.png")
    lines += ["", "## Plots", ""] + [
        f"![{p.stem}](plots/{p.name})" for p in sorted(plots.glob("*.png"))
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    payload = {"table": table, "pairs": list(pairs.values()), "chance": n.chance(),
               "controls": {c: {a: n.per_seed(a, control=c) for a in n.arms} for c in ("blank", "question-only")},
               "explain": explain.get("metrics", {}),
               "verdict": said, "minutes": seconds / 60}  # fmt: skip
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    return report, table


def _depth_plot(plt, n: Numbers, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, arm in enumerate(n.arms):
        stats = [_ms(n.per_seed(arm, d)) for d in n.depths]
        xs = [d + (i - len(n.arms) / 2) * 0.04 for d in n.depths]
        ax.errorbar(
            xs,
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=f"({arm}) {ARMS[arm]}",
        )
    ax.axhline(n.chance(), color="grey", ls=":", label="chance")
    ax.set_xticks(n.depths)
    ax.set_xlabel("hops (lookups in sequence)")
    ax.set_ylabel(f"{n.split} accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Accuracy by reasoning depth (mean ± std over {len(n.cfg.seeds)} seed(s))")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curves(plt, n: Numbers, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    seed = n.cfg.seeds[0]
    for arm in (a for a in n.arms if a != "d"):
        hist = [h for h in n.results[arm][seed].history if h.get("ce") is not None]
        if hist:
            ax.plot([h["step"] for h in hist], [h["ce"] for h in hist], label=f"({arm}) answer CE")
    if "c" in n.arms:
        aligned = [h for h in n.results["c"][seed].history if h.get("align") is not None]
        if aligned:
            ax.plot(
                [h["step"] for h in aligned],
                [h["align"] for h in aligned],
                "--",
                label="(c) alignment loss",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"Training curves (seed {seed})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
