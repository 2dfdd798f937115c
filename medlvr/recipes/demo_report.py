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
    ("c", "r"),
    ("r", "a"),
)
"""(arm, against): the claims tested at each rung (and, on the subtlety ladder, pooled over the
rungs where (a) is in `MID_BAND`)."""


def _ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    m, s = _ms(values)
    return "–" if m != m else f"{m:.3f} ± {s:.3f}"


Rungs = int | frozenset[int] | None
"""One rung of a ladder, a set of rungs pooled, or all questions."""


class Numbers:
    """Accuracies of every arm and seed, by depth, from the scored rows."""

    def __init__(self, cfg: DemoConfig, data: DemoData, results: dict[str, dict[int, ArmResult]]):
        self.cfg, self.data, self.results = cfg, data, results
        self.arms = [a for a in cfg.arm_list if results.get(a)]
        self.split = cfg.split
        # The ladder's rung of every scored question: its hops (depth) or its subtlety rung.
        self.key = cfg.ladder_key
        self.hop_of = {
            s.id: int(s.meta.get(self.key, 1 if self.key == "hops" else 0))
            for s in data.tests[self.split]
        }
        self.depths = sorted(set(self.hop_of.values()))
        self.deepest = self.depths[-1]

    def label(self, depth: int) -> str:
        """A rung as the report names it: "3 hop(s)" or "rung 3"."""
        return f"{depth} hop(s)" if self.key == "hops" else f"rung {depth}"

    def on(self, qid: str, depth: Rungs) -> bool:
        """Whether question `qid` is on rung `depth` (None: every rung; a set: any of them)."""
        if depth is None:
            return True
        rung = self.hop_of.get(qid)
        return rung in depth if isinstance(depth, frozenset) else rung == depth

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
        depth: Rungs = None,
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
            ok = [bool(r["correct"]) for r in rows if self.on(r["id"], depth)]
            if ok:
                out.append(sum(ok) / len(ok))
        return out

    def paired(self, arm: str, other: str, depth: Rungs) -> dict[str, Any] | None:
        """Paired comparison over (seed, question) at one depth: arm minus other."""
        from medlvr.eval.report import mcnemar_exact, paired_bootstrap_ci

        if arm not in self.arms or other not in self.arms:
            return None
        a_ok, b_ok = [], []
        for seed in self.cfg.seeds:
            mine = {
                r["id"]: bool(r["correct"]) for r in self.rows(arm, seed) if self.on(r["id"], depth)
            }
            theirs = {
                r["id"]: bool(r["correct"])
                for r in self.rows(other, seed)
                if self.on(r["id"], depth)
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
        rung = sorted(depth) if isinstance(depth, frozenset) else depth
        return {"arm": arm, "against": other, self.key: rung, "n": len(a_ok), "delta": delta, "wins": wins,
                "losses": losses, "p": mcnemar_exact(wins, losses), "ci": [low, high]}  # fmt: skip

    def chance(self) -> float:
        """The answer prior: accuracy of answering each question type's most frequent test answer
        (the floor a control should sit at; 0.5 for the ladders' two-answer questions)."""
        by_type: dict[str, Counter[str]] = {}
        for s in self.data.tests[self.split]:
            by_type.setdefault(s.question_type or "", Counter())[s.answer.strip().lower()] += 1
        hits = sum(c.most_common(1)[0][1] for c in by_type.values())
        return hits / max(sum(sum(c.values()) for c in by_type.values()), 1)

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
            count = sum(1 for r in n.rows(arm, n.cfg.seeds[0]) if n.on(r["id"], depth))
            table.append({"variant": arm, "name": ARMS[arm], "split": n.split if depth is None else f"{n.split}, {n.label(depth)}",
                          n.key: depth, "K": n.cfg.latent_steps_of(arm), "mean": m, "std": s, "per_seed": per_seed, "n": count})  # fmt: skip
    return table


def _claim(n: Numbers, pairs: Pairs, arm: str, other: str, margin: float, text: str, rung: Rungs,
           where: str) -> str | None:  # fmt: skip
    """One claim "arm >= other + margin" on `rung`, judged as fixed in advance: with three or more
    seeds the means differ by the margin and the seed spreads are apart; with fewer, a paired
    McNemar test at p < 0.05 with the bootstrap CI above 0."""
    if arm not in n.arms or other not in n.arms:
        return None
    x, y = n.per_seed(arm, rung), n.per_seed(other, rung)
    p = pairs.get((arm, other, rung))
    delta = 100 * (_ms(x)[0] - _ms(y)[0])
    if len(n.cfg.seeds) >= 3:
        shown = _apart(x, y, margin)
        how = "seed spreads apart" if shown or delta < 0 else "seed spreads overlap"
        rule = "mean difference at least the margin, seed spreads apart"
    else:
        shown = bool(p and delta >= 100 * margin and p["p"] < 0.05 and p["ci"][0] > 0)
        how = "one seed: judged by the paired test"
        rule = "difference at least the margin, paired p < 0.05 and CI above 0"
    test = (
        f"McNemar p = {p['p']:.3g}, 95% CI [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}]"
        if p
        else "no paired test"
    )
    return (f"- {text} {where}: **{delta:+.1f} points** ({_fmt(x)} vs {_fmt(y)}; {how}; {test}). "
            f"Claim: at least {100 * margin:+.0f} points ({rule}): **{'met' if shown else 'not met'}**.")  # fmt: skip


def _apart(x: list[float], y: list[float], margin: float) -> bool:
    """mean(x) - mean(y) >= margin and the seed spreads (mean +- std) do not overlap."""
    (mx, sx), (my, sy) = _ms(x), _ms(y)
    return mx - my >= margin and mx - sx > my + sy


Pairs = dict[tuple[str, str, Any], dict[str, Any]]


def verdict(n: Numbers, pairs: Pairs) -> list[str]:
    """What the numbers say, in plain words, from thresholds fixed in advance."""
    if n.key == "rung":
        return subtlety_verdict(n, pairs)
    h = n.deepest
    lines: list[str] = []

    def acc(arm: str, depth: int | None = None) -> list[float]:
        return n.per_seed(arm, depth) if arm in n.arms else []

    def claim(arm: str, other: str, margin: float, text: str) -> None:
        line = _claim(n, pairs, arm, other, margin, text, h, f"at {h} hops")
        if line:
            lines.append(line)

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
    lines += _common_lines(n, h, n.label(h))
    return lines


MID_BAND = (0.6, 0.9)
"""The subtlety ladder's claims are judged on the rungs where direct answering (a) is in this band:
evidence hard enough to miss, easy enough to be seen (fixed before the run, issue 22)."""


def subtlety_verdict(n: Numbers, pairs: Pairs) -> list[str]:
    """The subtlety ladder's verdict: on the rungs where (a) is in `MID_BAND`, pooled, (c) >= (a) + 5,
    (c) >= (r) + 3 (the gain is latent reasoning's, not ROI supervision's), (c) >= (p) + 3 and (d) >= (c)."""
    lines: list[str] = []
    mid = mid_rungs(n)
    if "a" in n.arms:
        a = {d: _ms(n.per_seed("a", d))[0] for d in n.depths}
        ends = (
            f"{a[n.depths[0]]:.3f} on rung {n.depths[0]} and {a[n.deepest]:.3f} on rung {n.deepest}"
        )
        lines.append(f"- Calibration: direct (a) answers {ends} (chance {n.chance():.3f}); "
                     + (f"rungs {', '.join(map(str, sorted(mid)))} have (a) between {MID_BAND[0]} and {MID_BAND[1]}, where the claims are judged, pooled."
                        if mid else f"no rung has (a) between {MID_BAND[0]} and {MID_BAND[1]}: the claims cannot be judged."))  # fmt: skip
    if not mid:
        return lines + _common_lines(n, None, "on all rungs")
    where = f"on rungs {', '.join(map(str, sorted(mid)))}"
    for arm, other, margin, text in (
        ("c", "a", 0.05, "ROI-SFT (c) minus direct (a)"),
        ("c", "r", 0.03, "ROI-SFT (c) minus the same ROI supervision without latent steps (r): what the latent steps add,"),
        ("c", "p", 0.03, "ROI-SFT (c) minus the pause control (p)"),
        ("d", "c", 0.0, "VLPO (d) minus ROI-SFT (c)"),
        ("r", "a", 0.0, "ROI supervision without latents (r) minus direct (a): what the ROI signal alone adds,"),
        ("c", "b", 0.0, "ROI-SFT (c) minus latent steps without ROI loss (b)"),
        ("c", "t", 0.0, "ROI-SFT (c) minus text reasoning (t)"),
    ):  # fmt: skip
        line = _claim(n, pairs, arm, other, margin, text, mid, where)
        if line:
            lines.append(line)
    return lines + _common_lines(n, mid, where)


def mid_rungs(n: Numbers) -> frozenset[int]:
    """The rungs where direct answering (a), mean over seeds, is in `MID_BAND` (empty without (a))."""
    if "a" not in n.arms:
        return frozenset()
    return frozenset(
        d for d in n.depths if MID_BAND[0] <= _ms(n.per_seed("a", d))[0] <= MID_BAND[1]
    )


def _common_lines(n: Numbers, rung: Rungs, where: str) -> list[str]:
    """The grounding controls against chance, the best arm on `rung` and the seed caveat."""
    lines = []
    chance = n.chance()
    for control, what in (("blank", "Blank images"), ("question-only", "No image (question only)")):
        acc_c = {arm: _ms(n.per_seed(arm, control=control))[0] for arm in n.arms}
        off = [f"({a}) {v:.3f}" for a, v in acc_c.items() if v > chance + 0.05]
        lines.append(f"- {what} (chance {chance:.3f}): "
                     + ("no arm more than 5 points above chance: the accuracy comes from the image." if not off
                        else f"above chance for {', '.join(off)}: part of the accuracy does not come from the image."))  # fmt: skip
    best = max(n.arms, key=lambda a: _ms(n.per_seed(a, rung))[0])
    lines.append(f"- Best arm {where}: ({best}) {ARMS[best]}, {_fmt(n.per_seed(best, rung))}.")
    if len(n.cfg.seeds) < 3:
        lines.append(
            f"- {len(n.cfg.seeds)} seed(s): seed spreads need `--full` (3 seeds); differences under ~3 points are noise."
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
    pooled: list[Rungs] = [mid_rungs(n)] if n.key == "rung" and mid_rungs(n) else []
    pairs = {
        (a, b, d): p
        for d in [*n.depths, *pooled]
        for a, b in COMPARISONS
        if (p := n.paired(a, b, d)) is not None
    }
    said = verdict(n, pairs)

    lines = [
        f"# MedLVR demo: the {cfg.ladder} ladder ({cfg.dataset}, {cfg.budget} budget)",
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
        *_ladder_lines(n),
        f"## Accuracy by {'reasoning depth' if n.key == 'hops' else 'subtlety rung'} ({cfg.split})",
        "",
        "| arm | K | "
        + " | ".join(n.label(d) for d in n.depths)
        + " | all | blank image | no image | ms / question | tokens written |",
        "|---|---|" + "---|" * (len(n.depths) + 5),
    ]
    for arm in n.arms:
        ms, tok = n.cost(arm)
        lines.append(f"| ({arm}) {ARMS[arm]} | {cfg.latent_steps_of(arm)} | " + " | ".join(_fmt(n.per_seed(arm, d)) for d in n.depths)
                     + f" | {_fmt(n.per_seed(arm))} | {_fmt(n.per_seed(arm, control='blank'))} | "
                     f"{_fmt(n.per_seed(arm, control='question-only'))} | {_fmt(ms)} | {_fmt(tok)} |")  # fmt: skip
    lines += ["", f"Chance (the answer prior: each question type's most frequent test answer): {n.chance():.3f}. Blank image: every image replaced by a "
              "mean-grey one of the same size; no image: the prompt without the image; both at the arm's K. Cost: harness time per question at batch 32 and the "
              "answer tokens generated (the written chain of (t) included)."]  # fmt: skip
    _depth_plot(plt, n, plots / f"accuracy_by_{n.key}.png")

    lines += ["", f"## Paired comparisons by {'depth' if n.key == 'hops' else 'rung'}", "",
              "Pairs are (seed, question); wins/losses count questions only the first / only the second arm gets right.", "",
              f"| comparison | {n.key} | pairs | difference | wins | losses | McNemar p | 95% bootstrap CI |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (a, b, d), p in pairs.items():
        rung = ", ".join(map(str, sorted(d))) + " (pooled)" if isinstance(d, frozenset) else d
        lines.append(f"| ({a}) − ({b}) | {rung} | {p['n']} | {100 * p['delta']:+.1f} | {p['wins']} | {p['losses']} | "
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
            for depth, label in ((None, "all"), (n.deepest, n.label(n.deepest))):
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
        steps = {arm: m.get("similarity", {}).get("per_step", {}).get("pointing") or []
                 for arm, m in explain["metrics"].items()}  # fmt: skip
        k = max((len(v) for v in steps.values()), default=0)
        if k:
            lines += ["", "Per latent step: the share of questions whose step-k similarity map peaks inside the "
                      "ROI (`random`: the seeded random map; `any lesion`: the peak on some lesion, of the aggregate map):", "",
                      "| arm | " + " | ".join(f"z{j + 1}" for j in range(k)) + " | all steps | random | any lesion |",
                      "|---|" + "---|" * (k + 3)]  # fmt: skip
            for arm, m in explain["metrics"].items():
                sim = m.get("similarity", {})
                lines.append(f"| ({arm}) | " + " | ".join(f"{x:.3f}" for x in steps[arm])
                             + f" | {sim.get('pointing', float('nan')):.3f} | {m.get('random', {}).get('pointing', float('nan')):.3f} | "
                             f"{sim.get('any_lesion_pointing', float('nan')):.3f} |")  # fmt: skip
        lines += _diagnostics_lines(explain.get("diagnostics", {}))
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
               "explain": explain.get("metrics", {}), "diagnostics": explain.get("diagnostics", {}),
               "verdict": said, "minutes": seconds / 60}  # fmt: skip
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    return report, table


def write_both_report(cfg: DemoConfig, reports: dict[str, Path], out: Path, seconds: float) -> Path:
    """`out/report.md`: each ladder's verdict and accuracy table, in the order run, as one story
    (the full reports, with paired tests, K sweeps and evidence maps, stay in each ladder's folder)."""
    import re

    lines = [f"# MedLVR demo: what latent steps do and do not do ({cfg.budget} budget, {seconds / 60:.1f} min)", "",
             "Two ladders, the same arms, data budget and seeds. **Depth**: questions that need 1..h lookups in "
             "sequence (does a latent segment chain lookups?). **Subtlety**: one lookup whose evidence is ever harder "
             "to see (do latent steps aligned with the ROI preserve subtle, localized evidence, the method's claim, "
             "beyond the same ROI supervision without latent steps, arm (r)?).", ""]  # fmt: skip
    for path in reports.values():
        text = path.read_text()
        rel = path.parent.relative_to(out)
        # Demote the headings one level and keep links and images pointing into the ladder's folder.
        body = re.sub(r"^#", "##", text, flags=re.M)
        body = re.sub(r"\]\((?!http)([^)]+)\)", rf"]({rel}/\1)", body)
        keep = body.split("\n## Paired comparisons")[0]
        lines += [keep.rstrip(), "", f"Full report: [{rel}/report.md]({rel}/report.md)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _diagnostics_lines(diagnostics: dict[str, Any]) -> list[str]:
    """The latent arms' gates (issue 23): next-hop pointing after a gold prefix, and linear probes."""
    if not diagnostics:
        return []

    def cell(x: Any, floor: Any = None) -> str:
        if x is None:
            return "–"
        return f"{x:.3f}" + (f" ({floor:.3f})" if floor is not None else "")

    hops = sorted(
        {int(j) for d in diagnostics.values() for j in d["next_hop_pointing"].get("by_hop", {})}
    )
    lines = ["", "## Latent diagnostics (the producer's gates)", "",
             "Next-hop pointing: given the gold latents of the hops before it, does the model's own state for hop j "
             "peak on hop j's ROI (random floor in brackets; gate: >= 0.5). Answer probe: a linear probe fitted on "
             "training questions reads the answer from the last latent state (majority floor in brackets; gate: "
             ">= 0.8 at 2-3 hops). Region probe: the region of the first hop's ROI from its latent steps.", "",
             "| arm | " + "".join(f"next hop {j} | " for j in hops) + "answer probe | region probe |",
             "|---|" + "---|" * (len(hops) + 2)]  # fmt: skip
    for arm, d in diagnostics.items():
        nh = d["next_hop_pointing"].get("by_hop", {})
        probes = d["probes"]
        region = probes.get("region", {}).get("1", {})
        lines.append(f"| ({arm}) | " + "".join(f"{cell(nh.get(str(j), {}).get('pointing'), nh.get(str(j), {}).get('random'))} | " for j in hops)
                     + f"{cell(probes['answer'].get('accuracy'), probes['answer'].get('chance'))} | "
                     f"{cell(region.get('accuracy'), region.get('chance'))} |")  # fmt: skip
    return lines


def _ladder_lines(n: Numbers) -> list[str]:
    """What the subtlety ladder's rungs are (the depth ladder's explain themselves)."""
    if n.key != "rung":
        return []
    from medlvr.data.synth import SUBTLETY_RUNGS

    return ["## The rungs", "",
            "One lookup per question (the intensity of the largest or smallest lesion); "
            "each rung makes the evidence harder to see: lesions smaller (a smaller share of the image, more visual "
            "tokens competing), fainter against their surrounding tissue, in more pixel noise.", "",
            "| rung | lesion scale | contrast | noise |", "|---|---|---|---|",
            *[f"| {d} | {SUBTLETY_RUNGS[d][0]:.2f} | {SUBTLETY_RUNGS[d][1]:.3f} | {SUBTLETY_RUNGS[d][2]:.2f} |" for d in n.depths],
            ""]  # fmt: skip


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
    ax.set_xlabel(
        "hops (lookups in sequence)" if n.key == "hops" else "subtlety rung (0 = easiest to see)"
    )
    ax.set_ylabel(f"{n.split} accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"Accuracy by {'reasoning depth' if n.key == 'hops' else 'subtlety'} (mean ± std over {len(n.cfg.seeds)} seed(s))"
    )
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
