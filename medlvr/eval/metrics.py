"""Scoring one response, and aggregating prediction rows into a summary.

`score` is the only place where a response becomes right or wrong. The RL
accuracy reward (`accuracy_reward`) is the same function, so training
optimises exactly what evaluation reports (nanochat's `Task` does the same).

Per question kind (see `medlvr.eval.answers` for the parser):

- choice: correct iff the parsed letter is the gold letter;
- closed yes/no: correct iff the parsed yes/no equals the gold (any case);
- open and other closed questions: correct iff the normalised answer equals
  the normalised gold (exact match). Open questions also get token
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medlvr.data.schema import VQASample
from medlvr.eval.answers import AnswerKey, Parsed, answer_key, normalize_text, parse_answer

__all__ = [
    "Score",
    "score",
    "accuracy_reward",
    "token_scores",
    "prediction_row",
    "summarize",
    "GROUP_FIELDS",
]

UNKNOWN = "unknown"
"""Group name for rows whose grouping field is missing or null."""

GROUP_FIELDS = ("dataset", "modality", "question_type", "answer_type", "content_type")
"""Fields `summarize` groups by (`content_type` is read from the row or its `meta`; SLAKE has it)."""


@dataclass(frozen=True)
class Score:
    """The verdict on one response. Token fields are set for open questions only."""

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


def _is_correct(key: AnswerKey, parsed: Parsed) -> bool:
    if parsed.invalid or parsed.value is None:
        return False
    if key.answer_type == "choice":
        return parsed.value == key.gold.strip().upper()
    return parsed.value == normalize_text(key.gold)  # yes/no golds normalise to "yes"/"no" too


def score(sample: VQASample | Mapping[str, Any] | AnswerKey, response: str) -> Score:
    """Parse `response` and score it against the sample's gold answer.

    `sample` is a `VQASample`, or a mapping/`AnswerKey` as accepted by
    `medlvr.eval.answers.answer_key` (e.g. a prediction row, to re-score).
    """
    key = answer_key(sample)
    parsed = parse_answer(response, key)
    correct = _is_correct(key, parsed)
    if key.answer_type != "open":
        return Score(correct, parsed.invalid, parsed)
    if parsed.invalid:
        return Score(False, True, parsed, 0.0, 0.0, 0.0, 0.0)
    precision, recall, f1 = token_scores(parsed.value or "", key.gold)
    return Score(correct, False, parsed, float(correct), precision, recall, f1)


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
        "question_type": sample.question_type,
        "answer_type": sample.answer_type,
        "modality": sample.modality,
        "content_type": sample.meta.get("content_type"),
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
        row.update(parsed=s.parsed.value, parse_how=s.parsed.how, correct=s.correct, invalid=s.invalid)
        if sample.answer_type == "open":
            row.update(exact_match=s.exact_match, token_precision=s.token_precision,
                       token_recall=s.token_recall, token_f1=s.token_f1)
    row.update(extra)
    return row


# --------------------------------------------------------------------------- aggregation


def _has_error(row: Mapping[str, Any]) -> bool:
    return bool(row.get("error"))


def _field(row: Mapping[str, Any], name: str) -> Any:
    if name == "content_type" and row.get(name) is None:
        return (row.get("meta") or {}).get("content_type")
    return row.get(name)


def _open_tokens(row: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """(exact match, precision, recall, F1) of an open row, recomputed if the row lacks them."""
    if _has_error(row) or row.get("invalid"):
        return 0.0, 0.0, 0.0, 0.0
    if row.get("token_recall") is not None:
        return (float(row.get("exact_match", row.get("correct", 0.0))), float(row.get("token_precision", 0.0)),
                float(row["token_recall"]), float(row.get("token_f1", 0.0)))
    p, r, f = token_scores(str(row.get("parsed") or ""), str(row.get("gold") or ""))
    return float(bool(row.get("correct"))), p, r, f


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _metrics(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The metrics of one group of rows (None where the group has no row of that kind)."""
    ok = [bool(r.get("correct")) and not _has_error(r) for r in rows]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r, c in zip(rows, ok):
        by_type[str(r.get("answer_type", "")).strip().lower()].append(c)
    opens = [_open_tokens(r) for r in rows if str(r.get("answer_type", "")).strip().lower() == "open"]
    latencies = [float(r["latency_s"]) for r in rows
                 if isinstance(r.get("latency_s"), (int, float)) and math.isfinite(r["latency_s"])]
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


def _grouped(rows: list[Mapping[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[_group_key(_field(r, name))].append(r)
    return {k: _metrics(groups[k]) for k in sorted(groups)}


def _k_sort(k: str) -> tuple[int, float | str]:
    try:
        return 0, float(k)
    except ValueError:
        return 1, k


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate prediction rows into the summary written as `summary.json`.

    Keys: `overall` and `by_dataset`, `by_modality`, `by_question_type`,
    `by_answer_type` (each a dict group -> metrics), `by_content_type` when a
    row carries `content_type` (directly or in `meta`), `by_latent_steps` and
    `by_latent_steps_dataset` (K -> dataset -> metrics; K as a string) when
    rows carry `latent_steps`, and `dataset_macro_accuracy` (the unweighted
    mean of the per-dataset accuracies, the average that papers report).
    Metrics of a group: n, accuracy, n_closed, closed_accuracy, n_choice,
    choice_accuracy, n_open, open_exact_match, open_token_precision,
    open_token_recall, open_token_f1, n_invalid, invalid_rate, n_errors,
    latency_p50, latency_p95 (seconds, from `latency_s`), mean_tokens (from
    `n_tokens`); None where a group has no row of that kind.
    When one run holds several K, `overall` pools them; read `by_latent_steps`.
    """
    rows = list(rows)
    summary: dict[str, Any] = {"overall": _metrics(rows)}
    for name in GROUP_FIELDS:
        if name == "content_type" and all(_field(r, name) is None for r in rows):
            continue
        summary[f"by_{name}"] = _grouped(rows, name)
    datasets = [m["accuracy"] for m in summary["by_dataset"].values() if m["accuracy"] is not None]
    summary["dataset_macro_accuracy"] = _mean(datasets)
    if any(r.get("latent_steps") is not None for r in rows):
        by_k: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for r in rows:
            by_k[_group_key(r.get("latent_steps"))].append(r)
        keys = sorted(by_k, key=_k_sort)
        summary["by_latent_steps"] = {k: _metrics(by_k[k]) for k in keys}
        summary["by_latent_steps_dataset"] = {k: _grouped(by_k[k], "dataset") for k in keys}
    return summary
