"""Rescore predictions written by other kits with medlvr's judge, into a normal run folder.

`rescore(FILE, format, out)` reads the per-question outputs of another kit:

- `lmms-eval`: the JSONL of `--log_samples`, one object per question: `doc_id`, `doc` (the
  dataset record: `question`, `answer`, and where the dataset has them `answer_type`, `qid`,
  options), `target` (the gold), `resps` (`[[text]]`) and `filtered_resps` (`[text]`, the
  answer the task scored), plus the task's metric and `doc_hash`/`prompt_hash`/`target_hash`;
  without `doc`, `input` (the prompt) stands for the question;
- `medevalkit`: MedEvalKit's results JSON, a list of per-question objects (or an object
  holding it under `results`, `samples`, `outputs` or `data`) with `question`, `answer`,
  `response` and, per dataset, `answer_type`, an id (`id`, `qid`, `question_id`,
  `sample_id`) and `options`/`choices`;
- `jsonl`: a plain JSONL or CSV (by suffix) of `id`, `question`, `answer`, `prediction`
  (optional: `answer_type`, `options`, `dataset`).

Each row is matched to medlvr's converted records when `data` is given (its id, the
record's `meta.qid`, else its question and gold; several identical records are taken in
order), so the question kind and options come from the dataset's own labels; without
`data` the kind is the row's `answer_type`, else multiple choice when it has options,
else yes/no when the gold is yes or no, else open (PathVQA's own rule). A row that
matches no record stops the rescore with one line (nothing is dropped silently).

The run folder holds what `medlvr eval` writes: `predictions.jsonl` (scored by
`medlvr.eval.metrics.prediction_row`, each row also carrying `kit_scores`, see
`medlvr.eval.kit_rules`), `run.json` (under `rescore`: the file, its format, the data,
how rows were matched) and the reports (`summary.json` with `kit_rules`, `report.md`,
plots), so `medlvr eval compare` pairs a rescored run with any other run. The folder follows
the one overwrite rule of `medlvr.rundir.claim_output`: new, an earlier rescore's output, or
`overwrite`; never onto the input file or the data.
"""

from __future__ import annotations

import csv
import functools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlvr.data.schema import LETTERS, VQASample
from medlvr.errors import MedlvrError
from medlvr.eval.answers import is_yes_no, normalize_text
from medlvr.eval.harness import EVAL_WRITES, RUN_FILE, load_samples
from medlvr.eval.kit_rules import kit_scores
from medlvr.eval.metrics import prediction_row
from medlvr.eval.report import PREDICTIONS_FILE, write_report
from medlvr.rundir import claim_output, run_folder

__all__ = ["FORMATS", "KitRow", "read_kit_file", "rescore"]

FORMATS = ("lmms-eval", "medevalkit", "jsonl")
"""Input formats of `medlvr eval rescore --format` (`jsonl` reads a .csv file too)."""

_ID_KEYS = ("id", "qid", "question_id", "sample_id", "idx")
_RESPONSE_KEYS = ("response", "prediction", "output", "model_output", "pred", "answer_pred")
_GOLD_KEYS = ("answer", "gt_answer", "gold", "label", "target")


@dataclass
class KitRow:
    """One question of another kit's output, as read (`where` locates it in the file)."""

    where: str
    prediction: str
    question: str = ""
    answer: str | None = None
    id: str | None = None
    answer_type: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    dataset: str | None = None
    prompt: str = ""
    """The prompt as the kit logged it (lmms-eval's `input`), to find a question inside."""


# --------------------------------------------------------------------------- reading


def _text(value: Any) -> str:
    """A response or gold as text: the first string of a (nested) list, numbers as written."""
    while isinstance(value, (list, tuple)):
        if not value:
            return ""
        value = value[0]
    return "" if value is None else str(value)


def _first(record: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((record[k] for k in keys if record.get(k) is not None), None)


def _options(value: Any) -> dict[str, str]:
    """Options as letter -> text from a mapping, a list, or a JSON string of either."""
    if isinstance(value, str) and value.strip()[:1] in "[{":
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    if isinstance(value, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in value.items() if str(v).strip()}
    if isinstance(value, (list, tuple)):
        return {LETTERS[i]: str(v) for i, v in enumerate(value[: len(LETTERS)])}
    return {}


def _row(record: Mapping[str, Any], where: str, prediction: Any) -> KitRow:
    rid = _first(record, _ID_KEYS)
    kind = record.get("answer_type")
    return KitRow(
        where=where,
        prediction=_text(prediction),
        question=_text(record.get("question")),
        answer=None if _first(record, _GOLD_KEYS) is None else _text(_first(record, _GOLD_KEYS)),
        id=None if rid is None else str(rid).strip(),
        answer_type=None if kind is None else str(kind).strip().lower() or None,
        options=_options(_first(record, ("options", "choices"))),
        dataset=None if record.get("dataset") is None else str(record["dataset"]),
    )


def _json_lines(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise MedlvrError(
                    f"{path}:{lineno}: malformed JSON ({err.msg}): this format is one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise MedlvrError(f"{path}:{lineno}: this format is one JSON object per line")
            yield lineno, obj


def _lmms_eval(path: Path) -> list[KitRow]:
    rows = []
    for lineno, obj in _json_lines(path):
        if "resps" not in obj and "filtered_resps" not in obj:
            raise MedlvrError(
                f"{path}:{lineno}: no `filtered_resps` or `resps`: not an lmms-eval --log_samples file"
            )
        doc: Mapping[str, Any] = obj["doc"] if isinstance(obj.get("doc"), Mapping) else {}
        answer = _first(obj, ("filtered_resps",))
        row = _row(doc, f"{path.name}:{lineno}", answer if answer is not None else obj.get("resps"))
        if obj.get("target") is not None:
            row.answer = _text(obj["target"])
        row.prompt = _text(obj.get("input"))
        if not row.question:
            row.question = row.prompt
        rows.append(row)
    return rows


def _medevalkit(path: Path) -> list[KitRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise MedlvrError(f"{path}: malformed JSON: {err.msg} at line {err.lineno}") from None
    if isinstance(data, Mapping):
        data = _first(data, ("results", "samples", "outputs", "data"))
    if not isinstance(data, list):
        raise MedlvrError(
            f"{path}: expected a list of per-question results (or one under `results`, `samples`, "
            "`outputs` or `data`): not a MedEvalKit results file"
        )
    rows = []
    for i, rec in enumerate(data):
        if not isinstance(rec, Mapping) or _first(rec, _RESPONSE_KEYS) is None:
            raise MedlvrError(
                f"{path}: result {i} has no {' / '.join(_RESPONSE_KEYS[:3])}: not a MedEvalKit results file"
            )
        rows.append(_row(rec, f"{path.name}[{i}]", _first(rec, _RESPONSE_KEYS)))
    return rows


def _plain(path: Path) -> list[KitRow]:
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:
            records = [(i + 2, dict(r)) for i, r in enumerate(csv.DictReader(fh))]
    else:
        records = list(_json_lines(path))
    rows = []
    for lineno, rec in records:
        if _first(rec, _RESPONSE_KEYS) is None:
            raise MedlvrError(f"{path}:{lineno}: no `prediction` (the model's answer)")
        rows.append(_row(rec, f"{path.name}:{lineno}", _first(rec, _RESPONSE_KEYS)))
    return rows


_READERS = {"lmms-eval": _lmms_eval, "medevalkit": _medevalkit, "jsonl": _plain}


def read_kit_file(path: str | Path, fmt: str) -> list[KitRow]:
    """The rows of another kit's output file (see the module docstring for each format)."""
    path = Path(path)
    if fmt not in _READERS:
        raise MedlvrError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not path.is_file():
        raise MedlvrError(f"predictions file not found: {path}")
    rows = _READERS[fmt](path)
    if not rows:
        raise MedlvrError(f"{path} holds no predictions")
    return rows


# --------------------------------------------------------------------------- matching


def _qa(question: str, answer: str | None) -> tuple[str, str]:
    return normalize_text(question), normalize_text(answer or "")


class _Records:
    """medlvr's records, looked up by id, by the release's qid, by question and gold."""

    def __init__(self, samples: Sequence[VQASample]):
        self.by_id = {s.id: s for s in samples}
        self.by_qid: dict[str, list[VQASample]] = defaultdict(list)
        self.by_qa: dict[tuple[str, str], list[VQASample]] = defaultdict(list)
        for s in samples:
            if s.meta.get("qid") is not None:
                self.by_qid[str(s.meta["qid"]).strip()].append(s)
            self.by_qa[_qa(s.question, s.answer)].append(s)
        self.used: set[str] = set()

    def _free(self, found: Iterable[VQASample], row: KitRow) -> VQASample | None:
        """The first unused record of `found` that agrees with the row's question, if it has one."""
        q = normalize_text(row.question)
        for s in found:
            if s.id not in self.used and (not q or normalize_text(s.question) == q):
                return s
        return None

    def match(self, row: KitRow) -> tuple[VQASample | None, str]:
        tries: list[tuple[str, list[VQASample]]] = []
        if row.id is not None:
            tries += [("id", [self.by_id[row.id]] if row.id in self.by_id else [])]
            tries += [("qid", self.by_qid.get(row.id, []))]
        tries += [("question", self.by_qa.get(_qa(row.question, row.answer), []))]
        for how, found in tries:
            sample = self._free(found, row)
            if sample is not None:
                self.used.add(sample.id)
                return sample, how
        if (
            row.prompt and row.answer is not None
        ):  # lmms-eval without `doc`: the question in the prompt
            prompt, gold = normalize_text(row.prompt), normalize_text(row.answer)
            for (q, a), found in self.by_qa.items():
                if a == gold and q and f" {q} " in f" {prompt} ":
                    sample = next((s for s in found if s.id not in self.used), None)
                    if sample is not None:
                        self.used.add(sample.id)
                        return sample, "prompt"
        return None, ""


def _sample_from_row(row: KitRow, index: int, dataset: str) -> tuple[VQASample, str]:
    """A record built from the row alone, and where its kind came from (file or inferred)."""
    if row.answer is None:
        raise MedlvrError(f"{row.where}: no gold answer (`answer`) and no --data to find it in")
    kind, source = row.answer_type, "file"
    if kind not in ("closed", "open", "choice"):
        source = "inferred"
        kind = "choice" if row.options else ("closed" if is_yes_no(row.answer) else "open")
    letter = None
    if kind == "choice":
        gold = row.answer.strip()
        letter = gold.upper() if gold.upper() in row.options else None
        if letter is None:
            letter = next(
                (k for k, v in row.options.items() if normalize_text(v) == normalize_text(gold)),
                None,
            )
        if letter is None:
            raise MedlvrError(
                f"{row.where}: gold {gold!r} is neither an option letter nor option text"
            )
    try:
        sample = VQASample(
            id=row.id or f"{dataset}-{index}",
            dataset=row.dataset or dataset,
            split="test",
            question=row.question or "(no question in the file)",
            options=row.options if kind == "choice" else {},
            answer=row.options[letter] if letter else row.answer,
            answer_letter=letter,
            answer_type=kind,  # type: ignore[arg-type]
        )
    except ValueError as err:
        raise MedlvrError(f"{row.where}: {str(err).splitlines()[0]}") from None
    return sample, source


def _pairs(
    rows: Sequence[KitRow], samples: Sequence[VQASample] | None, dataset: str, path: Path
) -> tuple[list[tuple[KitRow, VQASample]], Counter[str]]:
    """Each row with its record, and how many rows were matched (or built) each way."""
    how: Counter[str] = Counter()
    pairs = []
    if samples is None:
        for i, row in enumerate(rows):
            sample, source = _sample_from_row(row, i, dataset)
            pairs.append((row, sample))
            how[f"kind from the {source}" if source == "file" else "kind inferred"] += 1
        ids = Counter(s.id for _, s in pairs)
        twice = [i for i, n in ids.items() if n > 1]
        if twice:
            raise MedlvrError(
                f"{path}: the id {twice[0]!r} answers two questions; ids must be unique"
            )
        return pairs, how
    records = _Records(samples)
    unmatched: list[KitRow] = []
    for row in rows:
        found, by = records.match(row)
        if found is None:
            unmatched.append(row)
        else:
            pairs.append((row, found))
            how[f"by {by}"] += 1
    if unmatched:
        r = unmatched[0]
        shown = f"id {r.id!r}" if r.id is not None else f"question {r.question[:60]!r}"
        raise MedlvrError(
            f"{len(unmatched)} of {len(rows)} predictions match no record of --data (first: {r.where}, "
            f"{shown}): give the data files these predictions were made on"
        )
    return pairs, how


# --------------------------------------------------------------------------- writing


def _is_rescore(folder: Path) -> bool:
    """Whether `folder` holds an earlier rescore's output (its run.json says so)."""
    try:
        settings = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and "rescore" in settings


def rescore(
    path: str | Path,
    fmt: str,
    out: str | Path,
    *,
    data: Sequence[str | Path] = (),
    dataset: str | None = None,
    overwrite: bool = False,
    title: str | None = None,
) -> dict[str, Any]:
    """Score another kit's predictions with medlvr's judge and the kits' rules; write a run folder.

    Returns `write_report`'s result plus `n` (rows) and `matched` (rows per way of matching).
    """
    path, out = Path(path), Path(out)
    rows = read_kit_file(path, fmt)
    samples = load_samples(data) if data else None
    pairs, how = _pairs(rows, samples, dataset or path.stem, path)
    claim = functools.partial(
        claim_output, out, "eval rescore", overwrite=overwrite, inputs=[path, *data],
        writes=EVAL_WRITES, own=_is_rescore,
    )  # fmt: skip
    with run_folder(out, "--out", check=claim):  # new, an earlier rescore's, or --overwrite
        scored = []
        for row, sample in pairs:
            line = prediction_row(sample, row.prediction, source=row.where)
            line["kit_scores"] = kit_scores(line)
            scored.append(line)
        tmp = out / (PREDICTIONS_FILE + ".tmp")
        tmp.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored), encoding="utf-8"
        )
        tmp.replace(out / PREDICTIONS_FILE)
        settings = {
            "rescore": {
                "file": str(path.resolve()),
                "format": fmt,
                "data": [str(Path(p).resolve()) for p in data],
                "rows": len(scored),
                "matched": dict(how),
            }
        }
        (out / RUN_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        result = write_report(out, scored, title=title or f"Rescored: {path.name} ({fmt})")
    return {**result, "n": len(scored), "matched": dict(how)}
