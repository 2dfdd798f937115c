"""Scoring one response, and aggregating prediction rows into a summary.

`score` is the only place where a response becomes right or wrong. The RL
accuracy reward (`accuracy_reward`) is the same function, so training
optimises exactly what evaluation reports (nanochat's `Task` does the same).

Per question kind (see `medlvr.eval.answers` for the parser):

- choice: correct iff the parsed letter is the gold letter;
- closed yes/no: correct iff the parsed yes/no equals the gold (any case);
- questions naming their alternatives ("CT or MRI?"): correct iff the answer
  picks the gold's alternative;
- open and other closed questions: correct iff the answer's canonical content
  words equal the gold's (`medlvr.eval.answers.judge`; "4mm" == "0.4 cm",
  "kidneys" == "kidney"). Open questions also get the strict exact match
  (normalised answer == normalised gold, `exact_match`) and token
  precision/recall/F1 against the gold's normalised tokens, counted as
  multisets as in the SQuAD evaluation script:
  recall = |pred ∩ gold| / |gold|, precision = |pred ∩ gold| / |pred|.

An invalid (unparseable) answer is wrong and counted in the invalid rate.
A row with an `error` (missing or unreadable image, generation failure) is
wrong too, but counted separately in `n_errors`, not as invalid.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError
from medlvr.eval.answers import AnswerKey, Parsed, answer_key, judge, normalize_text, parse_answer
from medlvr.eval.controls import REAL, condition_of, order_conditions
from medlvr.eval.kit_rules import summarize_kits

__all__ = [
    "GROUP_FIELDS",
    "Score",
    "accuracy_reward",
    "ensure_scored",
    "prediction_row",
    "score",
    "summarize",
    "token_scores",
]

UNKNOWN = "unknown"
"""Group name for rows whose grouping field is missing or null."""

GROUP_FIELDS = ("dataset", "modality", "question_type", "answer_type", "content_type", "hops")
"""Fields `summarize` groups by. The optional ones are read from the row or its `meta` and grouped
only when some row has them: `content_type` (SLAKE), `hops` (the synthetic chain questions)."""
_OPTIONAL_FIELDS = ("content_type", "hops")


@dataclass(frozen=True)
class Score:
    """The verdict on one response. `exact_match` and the token fields are set for open questions only."""

    correct: bool
    invalid: bool
    parsed: Parsed
    exact_match: float | None = None
    token_precision: float | None = None
    token_recall: float | None = None
    token_f1: float | None = None


def token_scores(pred: str, gold: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of the normalised tokens of `pred` against those of `gold`.

    >>> token_scores("left lower lung", "left lung")
    (0.6666666666666666, 1.0, 0.8)
    """
    p, g = normalize_text(pred).split(), normalize_text(gold).split()
    if not p or not g:
        same = float(p == g)
        return same, same, same
    overlap = sum((Counter(p) & Counter(g)).values())
    if overlap == 0:
        return 0.0, 0.0, 0.0
    precision, recall = overlap / len(p), overlap / len(g)
    return precision, recall, 2 * precision * recall / (precision + recall)


def score(sample: VQASample | Mapping[str, Any] | AnswerKey, response: str) -> Score:
    """Parse `response` and score it against the sample's gold answer.

    `sample` is a `VQASample`, or a mapping/`AnswerKey` as accepted by
    `medlvr.eval.answers.answer_key` (e.g. a prediction row, to re-score).
    """
    key = answer_key(sample)
    parsed = parse_answer(response, key)
    correct = judge(parsed, key)
    if key.answer_type != "open":
        return Score(correct, parsed.invalid, parsed)
    if parsed.invalid:
        return Score(False, True, parsed, 0.0, 0.0, 0.0, 0.0)
    precision, recall, f1 = token_scores(parsed.value or "", key.gold)
    exact = float(parsed.value == normalize_text(key.gold))  # strict, beside the judge's verdict
    return Score(correct, False, parsed, exact, precision, recall, f1)


def accuracy_reward(sample: VQASample | Mapping[str, Any] | AnswerKey, response: str) -> float:
    """The RL accuracy reward: 1.0 if `score` says correct, else 0.0 (invalid answers earn 0)."""
    return 1.0 if score(sample, response).correct else 0.0


def prediction_row(
    sample: VQASample,
    response: str | None,
    *,
    latent_steps: int | None = None,
    latency_s: float | None = None,
    n_tokens: int | None = None,
    error: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One prediction row (a JSONL line of `predictions.jsonl`) for `sample`, scored.

    With `error` set (image missing or unreadable, generation failed) the row
    is wrong, not invalid, and carries the error message.
    """
    row: dict[str, Any] = {
        "id": sample.id,
        "dataset": sample.dataset,
        "split": sample.split,
        "question": sample.question,
        "question_type": sample.question_type,
        "answer_type": sample.answer_type,
        "modality": sample.modality,
        "content_type": sample.meta.get("content_type"),
        "hops": sample.meta.get("hops"),
        "gold": sample.gold,
        "options": dict(sample.options),
        "response": response or "",
        "latent_steps": latent_steps,
        "latency_s": latency_s,
        "n_tokens": n_tokens,
    }
    if error is not None:
        row.update(parsed=None, parse_how="error", correct=False, invalid=False, error=str(error))
    else:
        s = score(sample, response or "")
        row.update(
            parsed=s.parsed.value, parse_how=s.parsed.how, correct=s.correct, invalid=s.invalid
        )
        if sample.answer_type == "open":
            row.update(
                exact_match=s.exact_match,
                token_precision=s.token_precision,
                token_recall=s.token_recall,
                token_f1=s.token_f1,
            )
    row.update(extra)
    return row


def ensure_scored(rows: list[dict[str, Any]], where: str | Path) -> list[dict[str, Any]]:
    """Rows that all carry `correct`: a row without it is scored again from its own fields
    (`answer_type`, `gold` or `answer`, `response`, `question`, `options`), or one line says why it
    cannot be (never a silent accuracy of 0)."""
    out = []
    for r in rows:
        if "correct" in r or r.get("error"):
            out.append(r)
            continue
        response = r.get("response", r.get("prediction"))
        lacks = "a `response`" if response is None else None
        if lacks is None and r.get("answer_type") is None:
            lacks = "an `answer_type`"
        if lacks is None and r.get("gold") is None and r.get("answer") is None:
            lacks = "a `gold` answer"
        if lacks is not None:
            raise MedlvrError(
                f"{where}: row {r.get('id')!r} has no `correct` and cannot be scored again (it lacks "
                f"{lacks}): score the predictions with medlvr eval rescore"
            )
        try:
            s = score(r, str(response))
        except ValueError as err:
            raise MedlvrError(f"{where}: row {r.get('id')!r}: {err}") from None
        fresh = {**r, "response": str(response), "parsed": s.parsed.value}
        fresh.update(parse_how=s.parsed.how, correct=s.correct, invalid=s.invalid)
        if s.token_recall is not None:
            fresh.update(
                exact_match=s.exact_match,
                token_precision=s.token_precision,
                token_recall=s.token_recall,
                token_f1=s.token_f1,
            )
        out.append(fresh)
    return out


# --------------------------------------------------------------------------- aggregation


def _has_error(row: Mapping[str, Any]) -> bool:
    return bool(row.get("error"))


def _field(row: Mapping[str, Any], name: str) -> Any:
    if name in _OPTIONAL_FIELDS and row.get(name) is None:
        return (row.get("meta") or {}).get(name)
    return row.get(name)


def _right(row: Mapping[str, Any]) -> bool:
    """Correct, and not an error row (an error row is wrong whatever it claims)."""
    return bool(row.get("correct")) and not _has_error(row)


def _open_tokens(row: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """(exact match, precision, recall, F1) of an open row, recomputed if the row lacks them."""
    if _has_error(row) or row.get("invalid"):
        return 0.0, 0.0, 0.0, 0.0
    if row.get("token_recall") is not None:
        return (
            float(row.get("exact_match", row.get("correct", 0.0))),
            float(row.get("token_precision", 0.0)),
            float(row["token_recall"]),
            float(row.get("token_f1", 0.0)),
        )
    p, r, f = token_scores(str(row.get("parsed") or ""), str(row.get("gold") or ""))
    return float(bool(row.get("correct"))), p, r, f


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _metrics(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The metrics of one group of rows (None where the group has no row of that kind)."""
    ok = [_right(r) for r in rows]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r, c in zip(rows, ok):
        by_type[str(r.get("answer_type", "")).strip().lower()].append(c)
    opens = [
        _open_tokens(r) for r in rows if str(r.get("answer_type", "")).strip().lower() == "open"
    ]
    latencies = [
        float(r["latency_s"])
        for r in rows
        if isinstance(r.get("latency_s"), (int, float)) and math.isfinite(r["latency_s"])
    ]
    tokens = [float(r["n_tokens"]) for r in rows if isinstance(r.get("n_tokens"), (int, float))]
    n_invalid = sum(1 for r in rows if r.get("invalid") and not _has_error(r))
    return {
        "n": len(rows),
        "accuracy": _mean([float(c) for c in ok]),
        "n_closed": len(by_type["closed"]),
        "closed_accuracy": _mean([float(c) for c in by_type["closed"]]),
        "n_choice": len(by_type["choice"]),
        "choice_accuracy": _mean([float(c) for c in by_type["choice"]]),
        "n_open": len(opens),
        "open_accuracy": _mean([float(c) for c in by_type["open"]]),
        "open_exact_match": _mean([o[0] for o in opens]),
        "open_token_precision": _mean([o[1] for o in opens]),
        "open_token_recall": _mean([o[2] for o in opens]),
        "open_token_f1": _mean([o[3] for o in opens]),
        "n_invalid": n_invalid,
        "invalid_rate": n_invalid / len(rows) if rows else None,
        "n_errors": sum(1 for r in rows if _has_error(r)),
        "latency_p50": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p95": float(np.percentile(latencies, 95)) if latencies else None,
        "mean_tokens": _mean(tokens),
    }


def _group_key(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return UNKNOWN
    return str(value).strip()


def _split(
    rows: Iterable[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], Any]
) -> dict[str, list[Mapping[str, Any]]]:
    """Rows by group name (`key(row)` as a string, `unknown` when missing), integers in numeric order."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[_group_key(key(r))].append(r)
    return {k: groups[k] for k in sorted(groups, key=_k_sort)}


def _grouped(rows: list[Mapping[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    return {k: _metrics(g) for k, g in _split(rows, lambda r: _field(r, name)).items()}


def _k_sort(k: str) -> tuple[int, int | str]:
    try:
        return 0, int(k)
    except ValueError:
        return 1, k


def _latent_steps(row: Mapping[str, Any]) -> Any:
    return row.get("latent_steps")


def _gap(real: list[Mapping[str, Any]], control: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy with real images minus under a control, paired on the (id, K) both answered.

    Paired, so a control run over part of the questions (or a half-finished
    one) is compared on those questions only. Overall, per dataset and per K.
    """

    def key(r: Mapping[str, Any]) -> tuple[str, str]:
        return str(r.get("id")), _group_key(_latent_steps(r))

    a, b = {key(r): r for r in real}, {key(r): r for r in control}
    both = [a[k] for k in sorted(set(a) & set(b))]

    def one(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
        if not rows:
            return {"n": 0, "real": None, "control": None, "delta": None}
        acc_a = sum(map(_right, rows)) / len(rows)
        acc_b = sum(_right(b[key(r)]) for r in rows) / len(rows)
        return {"n": len(rows), "real": acc_a, "control": acc_b, "delta": acc_a - acc_b}

    return {
        "overall": one(both),
        "by_dataset": {d: one(g) for d, g in _split(both, lambda r: r.get("dataset")).items()},
        "by_latent_steps": {k: one(g) for k, g in _split(both, _latent_steps).items()},
    }


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate prediction rows into the summary written as `summary.json`.

    Keys: `overall` and `by_dataset`, `by_modality`, `by_question_type`,
    `by_answer_type` (each a dict group -> metrics), `by_content_type` and
    `by_hops` when a row carries them (directly or in `meta`; hop groups in
    numeric order), `by_latent_steps` and `by_latent_steps_dataset` (K ->
    dataset -> metrics; K as a string) when rows carry `latent_steps`, and
    `dataset_macro_accuracy` (the unweighted mean of the per-dataset
    accuracies, the average that papers report).
    Metrics of a group: n, accuracy, n_closed, closed_accuracy, n_choice,
    choice_accuracy, n_open, open_accuracy (the judge's), open_exact_match (strict),
    open_token_precision, open_token_recall, open_token_f1, n_invalid, invalid_rate, n_errors,
    latency_p50, latency_p95 (seconds, from `latency_s`), mean_tokens (from
    `n_tokens`); None where a group has no row of that kind.
    When one run holds several K, `overall` pools them; read `by_latent_steps`.
    Rows carrying `kit_scores` (a run of `medlvr eval rescore`) add `kit_rules`
    (kit -> n, accuracy, closed_accuracy, open_score, n_crash; `medlvr.eval.kit_rules`).

    Image controls (`medlvr.eval.controls`; a row's `image_control`, `none`
    when absent) are never pooled: every key above covers the rows of the
    main condition only, `none` (real images) when present. A run holding any
    other condition adds `image_control_main`, `by_image_control` (condition
    -> metrics, K pooled), `by_image_control_dataset` and
    `by_image_control_latent_steps` (condition -> group -> metrics); with
    real-image rows, `real_minus_control` (control -> {n, real, control,
    delta}: accuracy with real images minus under the control, paired on the
    (id, K) both answered) and, with blank rows, `image_dependence` (that gap
    for `blank`, with its `overall`, `by_dataset` and `by_latent_steps`).
    Rows with hops add `by_image_control_latent_steps_hops` (condition -> K ->
    hops -> metrics), the curves of the accuracy-by-hops plot.
    """
    rows = list(rows)
    by_cond = _split(rows, condition_of)
    conds = order_conditions(by_cond)
    main = conds[0] if conds else REAL
    summary = _summary(by_cond.get(main, []))
    if conds and conds != [REAL]:
        summary["image_control_main"] = main
        summary["by_image_control"] = {c: _metrics(by_cond[c]) for c in conds}
        summary["by_image_control_dataset"] = {c: _grouped(by_cond[c], "dataset") for c in conds}
        summary["by_image_control_latent_steps"] = {
            c: {k: _metrics(g) for k, g in _split(by_cond[c], _latent_steps).items()} for c in conds
        }
        if REAL in by_cond:
            gaps = {c: _gap(by_cond[REAL], by_cond[c]) for c in conds if c != REAL}
            summary["real_minus_control"] = {c: g["overall"] for c, g in gaps.items()}
            if "blank" in gaps:
                summary["image_dependence"] = gaps["blank"]
    if any(_field(r, "hops") is not None for r in rows):
        summary["by_image_control_latent_steps_hops"] = {
            c: {k: _grouped(g, "hops") for k, g in _split(by_cond[c], _latent_steps).items()}
            for c in conds
        }
    return summary


def _summary(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Every key of `summarize` but the image-control ones, over `rows`."""
    summary: dict[str, Any] = {"overall": _metrics(rows)}
    for name in GROUP_FIELDS:
        if name in _OPTIONAL_FIELDS and all(_field(r, name) is None for r in rows):
            continue
        summary[f"by_{name}"] = _grouped(rows, name)
    datasets = [m["accuracy"] for m in summary["by_dataset"].values() if m["accuracy"] is not None]
    summary["dataset_macro_accuracy"] = _mean(datasets)
    kits = summarize_kits(rows)
    if kits:  # a rescored run: the common kits' rules on the same predictions
        summary["kit_rules"] = kits
    if any(_latent_steps(r) is not None for r in rows):
        by_k = _split(rows, _latent_steps)
        summary["by_latent_steps"] = {k: _metrics(g) for k, g in by_k.items()}
        summary["by_latent_steps_dataset"] = {k: _grouped(g, "dataset") for k, g in by_k.items()}
    return summary
