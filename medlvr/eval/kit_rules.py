"""What the common medical-VQA kits' scoring rules give on the same predictions.

medlvr's own implementation of the rules the kits document and publish (not their code), so
that a rescored run (`medlvr eval rescore`) shows beside medlvr's accuracy how far a published
number moves with the scorer that made it. Each rule maps one prediction row to a score in
[0, 1], or to None where the kit itself would stop with an error (`KIT_RULES`):

- `medevalkit` (MedEvalKit): yes/no questions by `('yes' in r) ^ ('no' in r)` on the
  lower-cased response `r` (substrings: "not", "nodule" and "know" hold "no"; neither or both
  is wrong); multiple choice by the option letter the response starts with or names ("Answer:
  B"), else the option whose text is most similar to the response (difflib), so an answer that
  does not parse still gets a guessed letter; other questions by exact match, case-sensitive on
  SLAKE ("yes" is not "Yes") and after lower-casing elsewhere; an empty answer to an open
  question is None (the kit crashes on it).
- `llava-med` (LLaVA-Med v1.0): closed and choice questions right when the lower-cased gold
  (the option text for choices) is a substring of the lower-cased response ("no" is found in
  "not sure", "CT" in "it is not a CT"); open questions score the recall of the gold's words
  in the response (a fraction).
- `lmms-eval` (lmms-eval's SLAKE task): normalised exact match: lower case, punctuation
  dropped, whitespace folded; for choices, the letter or the option text.

`docs/scoring.md` sets these beside medlvr's rules.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from medlvr.eval.answers import is_yes_no

__all__ = ["KIT_RULES", "kit_scores", "rule_table", "summarize_kits"]

Row = Mapping[str, Any]


def _kind(row: Row) -> str:
    return str(row.get("answer_type", "")).strip().lower()


def _response(row: Row) -> str:
    return str(row.get("response") or "")


def _gold_text(row: Row) -> str:
    """The gold as text: the option text for choice questions (the row's gold is its letter)."""
    gold = str(row.get("gold") or "")
    options = row.get("options") or {}
    if _kind(row) == "choice":
        return str(options.get(gold.strip().upper(), gold))
    return gold


def _loose(text: str) -> str:
    """lmms-eval's normalisation: lower case, punctuation dropped, whitespace folded."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


_START_LETTER = re.compile(r"^\W*([A-J])\b(?![\w'])")
_NAMED_LETTER = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\b", re.IGNORECASE)


def _medevalkit(row: Row) -> float | None:
    r, gold, kind = _response(row), str(row.get("gold") or ""), _kind(row)
    if kind == "choice":
        options = {str(k).upper(): str(v) for k, v in (row.get("options") or {}).items()}
        found = _START_LETTER.match(r.strip()) or _NAMED_LETTER.search(r)
        letter = found.group(1).upper() if found else None
        if letter not in options and options:  # unparseable: the most similar option text
            ratios = {
                k: difflib.SequenceMatcher(None, r.lower(), v.lower()).ratio()
                for k, v in options.items()
            }
            letter = max(ratios, key=lambda k: ratios[k])
        return float(letter == gold.strip().upper())
    if kind == "closed" and is_yes_no(gold):
        low = r.lower()
        yes, no = "yes" in low, "no" in low
        if yes == no:
            return 0.0
        return float(("yes" if yes else "no") == gold.strip().lower().rstrip("."))
    if kind == "open" and not r.strip():
        return None  # the kit crashes on an empty open answer
    if str(row.get("dataset", "")).lower() == "slake":
        return float(r.strip() == gold.strip())  # case-sensitive
    return float(r.strip().lower() == gold.strip().lower())


def _llava_med(row: Row) -> float:
    r, gold = _response(row).lower(), _gold_text(row).lower().strip()
    if _kind(row) in ("closed", "choice"):
        return float(bool(gold) and gold in r)
    gold_words = _loose(gold).split()
    said = set(_loose(r).split())
    return sum(w in said for w in gold_words) / len(gold_words) if gold_words else 0.0


def _lmms_eval(row: Row) -> float:
    r = _loose(_response(row))
    if _kind(row) == "choice":
        gold = str(row.get("gold") or "").strip().lower()
        return float(r in (gold, _loose(_gold_text(row))))
    return float(r == _loose(_gold_text(row)))


KIT_RULES: dict[str, Callable[[Row], float | None]] = {
    "medevalkit": _medevalkit,
    "llava-med": _llava_med,
    "lmms-eval": _lmms_eval,
}
"""Kit name -> rule: one prediction row -> score in [0, 1], None where the kit would crash."""


def kit_scores(row: Row) -> dict[str, float | None]:
    """Every kit rule's score of one prediction row (an error row scores 0 under every kit)."""
    if row.get("error"):
        return dict.fromkeys(KIT_RULES, 0.0)
    return {name: rule(row) for name, rule in KIT_RULES.items()}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_kits(rows: Iterable[Row]) -> dict[str, dict[str, Any]]:
    """Per kit: n, accuracy (mean score, a crash counted 0), closed accuracy (closed and choice),
    open score, and n_crash (rows on which the kit would have stopped). Rows without
    `kit_scores` are left out; {} when none has them."""
    rows = [r for r in rows if isinstance(r.get("kit_scores"), Mapping)]
    out: dict[str, dict[str, Any]] = {}
    for name in KIT_RULES:
        scored = [(r, r["kit_scores"].get(name)) for r in rows if name in r["kit_scores"]]
        if not scored:
            continue
        closed = [float(s or 0.0) for r, s in scored if _kind(r) in ("closed", "choice")]
        opens = [float(s or 0.0) for r, s in scored if _kind(r) == "open"]
        out[name] = {
            "n": len(scored),
            "accuracy": _mean([float(s or 0.0) for _, s in scored]),
            "closed_accuracy": _mean(closed),
            "open_score": _mean(opens),
            "n_crash": sum(1 for _, s in scored if s is None),
        }
    return out


def rule_table(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """medlvr's judge, then each kit's rule, with the metrics of `summarize_kits`, from a summary."""
    by_type = summary.get("by_answer_type", {})
    closed = [by_type[t] for t in ("closed", "choice") if t in by_type]
    n_closed = sum(m["n"] for m in closed)
    ours = {
        "n": summary["overall"]["n"],
        "accuracy": summary["overall"]["accuracy"],
        "closed_accuracy": (
            sum(m["accuracy"] * m["n"] for m in closed) / n_closed if n_closed else None
        ),
        "open_score": summary["overall"].get("open_accuracy"),
        "n_crash": 0,
    }
    return {"medlvr": ours, **summary.get("kit_rules", {})}
