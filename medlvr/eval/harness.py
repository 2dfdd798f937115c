"""The evaluation harness: batched generation, scored rows on disk as they come, resumable and shardable.

`evaluate` answers every question of one or more JSONL files with a model (or
any `Predictor` callable), scores each response with THE scorer
(`medlvr.eval.metrics.prediction_row`), and writes the run directory:

- `predictions.jsonl`: one scored row per (question id, latent budget K,
  image condition), appended and flushed after every batch, so a crash loses
  at most the batch in flight. A rerun on the same `out` skips the rows
  already there, so adding a K or a condition to a finished run computes only
  the new rows.
- `run.json`: the settings of the run (a rerun with another model or reasoning on
  the same directory is refused: its rows would be mixed).
- `summary.json`, `report.md`, `plots/*.png` from `medlvr.eval.report.write_report`.

Reasoning (prompts in `medlvr.data.prompts`): `direct` answers at once (K=0),
`cot` writes its reasoning before a tagged answer (K=0, a longer token
budget), `latent` runs K continuous latent steps before the answer; a list of
K sweeps the latent budget in one call (one collated batch serves every K).

Image conditions (`medlvr.eval.controls`): `none` (the real images), `blank`
(same-size grey-128 images), `shuffled` (another question's images, a fixed
derangement for `control_seed`) and `question-only` (no image, no image
placeholder in the prompt). Several conditions run in one call, each a full
pass like each K; the reports put the controls beside the real accuracy
(image dependence = real minus blank). Which images a condition needs decides
its error rows: `none` and `blank` need the question's own images (a blank
image copies their size), `shuffled` its donor's, `question-only` none.

Order: samples are sorted by (number of images, prompt length, id), so a batch
holds prompts of similar length (little left padding) and the order never
depends on the model or on the machine.

Sharding: with `world_size` W > 1 (read from an initialised
`torch.distributed` group, e.g. under `torchrun` or `accelerate launch`), rank
r takes the strided slice `sorted_samples[r::W]` and appends to its own
`predictions.rank{r}.jsonl`; after a barrier rank 0 merges every file into
`predictions.jsonl` (deduplicated and sorted on (id, K, condition)) and writes
the reports. A single process ends with the same merge, so one process and W
processes give the same `predictions.jsonl` up to the timing fields.

A sample whose image is missing or unreadable becomes an error row carrying
the reason (scored wrong, counted in `n_errors`) and the run goes on. An
exception raised by the predictor itself stops the run (it is a bug or a
crash, not a property of the sample); the rows already flushed survive it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, get_args

from PIL import Image

from medlvr.data.prompts import Reasoning, question_text
from medlvr.data.schema import VQASample, load_jsonl
from medlvr.errors import MedlvrError, not_a_file
from medlvr.eval.controls import (
    IMAGE_CONTROLS,
    REAL,
    blank_like,
    condition_of,
    kept_own,
    order_conditions,
    shuffle_donors,
)
from medlvr.eval.metrics import prediction_row
from medlvr.eval.report import PREDICTIONS_FILE, write_report
from medlvr.rundir import claim_output, holds_run_folder
from medlvr.stop import StopSignals

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = [
    "Generated",
    "Predictor",
    "ModelPredictor",
    "EvalResult",
    "evaluate",
    "load_samples",
    "sort_for_batching",
    "merge_shards",
    "parse_latent_steps",
    "parse_image_controls",
    "default_max_new_tokens",
    "RUN_FILE",
    "run_settings",
]

RUN_FILE = "run.json"
# What an evaluation writes in its folder (no input may be there).
EVAL_WRITES = (
    RUN_FILE,
    "predictions*.jsonl",
    "summary.json",
    "report.md",
    "explain.json*",
    "probes.json",
    "plots",
    "*.tmp",
)
REASONING: tuple[str, ...] = get_args(Reasoning)
# Token budgets: a short answer fits in 32 tokens; written reasoning needs room before its tag.
DEFAULT_MAX_NEW_TOKENS = {"direct": 32, "latent": 32, "cot": 256}


@dataclass
class Generated:
    """One response of a predictor; `n_tokens` is the number of generated tokens when known."""

    text: str
    n_tokens: int | None = None


Predictor = Callable[
    [Sequence[VQASample], Sequence[Sequence[Image.Image]], int], Sequence["str | Generated"]
]
"""`predictor(samples, images, latent_steps) -> one response per sample` (a str or a `Generated`).

`images[i]` are the loaded images of `samples[i]`, in order. A model is
wrapped by `ModelPredictor`; tests pass scripted callables.
"""


def default_max_new_tokens(reasoning: str) -> int:
    _check_reasoning(reasoning)
    return DEFAULT_MAX_NEW_TOKENS[reasoning]


def _check_reasoning(reasoning: str) -> None:
    if reasoning not in REASONING:
        raise MedlvrError(f"reasoning must be one of {', '.join(REASONING)}, got {reasoning!r}")


def parse_reasoning(reasoning: str) -> Reasoning:
    """A --reasoning value as a `Reasoning` (a user error names the choices)."""
    _check_reasoning(reasoning)
    return cast(Reasoning, reasoning)  # checked just above


def _parse_list(text: Any, convert: Callable[[Any], Any], what: str) -> list[Any]:
    """A comma-separated string, one item or a sequence -> converted items, order kept, duplicates dropped."""
    if isinstance(text, str):
        items: list[Any] = [t.strip() for t in text.split(",") if t.strip()]
    else:
        items = list(text) if isinstance(text, Sequence) else [text]
    out = list(dict.fromkeys(convert(item) for item in items))
    if not out:
        raise MedlvrError(f"no {what} given")
    return out


def parse_latent_steps(text: str | int | Sequence[int] | None) -> list[int] | None:
    """ "0,2,4,8" -> [0, 2, 4, 8] (order kept, duplicates dropped); None stays None."""

    def step(item: Any) -> int:
        try:
            k = int(item)
        except (TypeError, ValueError):
            raise MedlvrError(f"latent steps must be integers like 0,2,4,8, got {item!r}") from None
        if k < 0:
            raise MedlvrError(f"latent steps must be >= 0, got {k}")
        return k

    return None if text is None else _parse_list(text, step, "latent steps")


def parse_image_controls(text: str | Sequence[str] | None) -> list[str]:
    """ "none,blank" -> ["none", "blank"] (order kept, duplicates dropped); None -> ["none"]."""

    def control(item: Any) -> str:
        if str(item).strip() not in IMAGE_CONTROLS:
            raise MedlvrError(
                f"image control must be one of {', '.join(IMAGE_CONTROLS)}, got {item!r}"
            )
        return str(item).strip()

    return [REAL] if text is None else _parse_list(text, control, "image control")


class ModelPredictor:
    """A `LatentVLM` as a `Predictor`: collate without answers or ROIs, greedy `generate`."""

    def __init__(self, vlm: Any, reasoning: Reasoning, max_new_tokens: int):
        from medlvr.data.collate import VQACollator

        self.vlm = vlm
        self.max_new_tokens = max_new_tokens
        self.collate = VQACollator(
            vlm.processor, vlm.adapter, reasoning=reasoning, with_answers=False, with_rois=False
        )

    def __call__(
        self,
        samples: Sequence[VQASample],
        images: Sequence[Sequence[Image.Image]],
        latent_steps: int,
    ) -> list[Generated]:
        import torch

        batch = self.collate(list(samples), images=[list(imgs) for imgs in images])
        with torch.inference_mode():
            out = self.vlm.generate(batch, latent_steps, max_new_tokens=self.max_new_tokens)
        return [Generated(text, len(ids)) for text, ids in zip(out.texts, out.token_ids)]


@dataclass
class EvalResult:
    """What `evaluate` did. `summary` is None on ranks other than 0 and for an unmerged shard."""

    out_dir: Path
    n_samples: int
    """Questions of this rank's slice (all questions with one process)."""
    n_new: int
    """(id, K, condition) rows written by this call (the rest were already done)."""
    n_skipped: int
    """(id, K, condition) rows found done and skipped (a resumed run)."""
    n_errors: int
    """Error rows written by this call (missing or unreadable images)."""
    seconds: float
    """Wall time of this call's generation loop."""
    samples_per_s: float
    """Rows written per second of `seconds`."""
    summary: dict[str, Any] | None = None
    report: dict[str, Any] | None = field(default=None, repr=False)


# --------------------------------------------------------------------------- data


def load_samples(paths: Sequence[str | Path], limit: int | None = None) -> list[VQASample]:
    """Samples of every file in order, without checking images (a missing image is an error row later).

    Malformed records still fail fast with every problem listed; ids must be
    unique over all the files, since a row is keyed by (id, K, condition).
    """
    if not paths:
        raise MedlvrError("no data file given")
    samples: list[VQASample] = []
    seen: dict[str, str] = {}
    for path in paths:
        for s in load_jsonl(path, check_images=False).samples:
            if s.id in seen:
                raise MedlvrError(
                    f"duplicate question id {s.id!r} in {path} (also in {seen[s.id]}): "
                    "ids must be unique over all data files"
                )
            seen[s.id] = str(path)
            samples.append(s)
    if limit is not None:
        if limit < 1:
            raise MedlvrError(f"limit must be >= 1, got {limit}")
        samples = samples[:limit]
    return samples


def sort_for_batching(
    samples: Iterable[VQASample], reasoning: Reasoning = "direct"
) -> list[VQASample]:
    """Sorted by (number of images, prompt length in characters, id): similar lengths share a batch."""
    return sorted(samples, key=lambda s: (len(s.images), len(question_text(s, reasoning)), s.id))


def _default_loader(path: str) -> Image.Image:
    from medlvr.data.images import load_image

    return load_image(path)


@contextlib.contextmanager
def _restoring(signals: StopSignals | None) -> Iterator[None]:
    try:
        yield
    finally:
        if signals is not None:
            signals.restore()


def _load_images(
    sample: VQASample, loader: Callable[[str], Image.Image], need: bool = False
) -> tuple[list[Image.Image], str | None]:
    """(images, None), or ([], reason) when one is missing or unreadable, or (`need`) there is none."""
    if need and not sample.images:  # a model's visual question without its image: never scored
        return [], "the record has no image"
    images = []
    for path in sample.images:
        if not Path(path).is_file():
            return [], not_a_file(path)
        try:
            images.append(loader(path))
        except Exception as err:  # noqa: BLE001 - any decoder failure is a property of the file
            return [], f"unreadable image {path}: {type(err).__name__}: {err}"
    return images, None


# --------------------------------------------------------------------------- rows on disk


def _shard_file(out: Path, rank: int) -> Path:
    return out / f"predictions.rank{rank}.jsonl"


def _read_rows(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a predictions file; a torn last line (a crash mid-write) is dropped, and cut off if `repair`."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows = []
    good_end = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # the last line was never finished
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise MedlvrError(f"{path}: malformed row at byte {good_end}: {err.msg}") from None
        good_end += len(line)
    if repair and good_end < len(data):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    return rows


Key = tuple[str, int, str]
"""A row's identity: (question id, latent budget K, image condition)."""


def _key(row: Mapping[str, Any]) -> Key:
    return (
        str(row["id"]),
        int(row["latent_steps"] if row.get("latent_steps") is not None else 0),
        condition_of(row),
    )


def _done_keys(out: Path) -> set[Key]:
    files = [out / PREDICTIONS_FILE, *sorted(out.glob("predictions.rank*.jsonl"))]
    return {_key(r) for f in files for r in _read_rows(f)}


def merge_shards(out_dir: str | Path) -> Path:
    """Fold `predictions.rank*.jsonl` into `predictions.jsonl`: one row per (id, K, condition), sorted so.

    When a key appears twice (a resumed run), the shard's row wins over the
    merged file's, and a later row over an earlier one. Shard files are removed.
    """
    out = Path(out_dir)
    main = out / PREDICTIONS_FILE
    shards = sorted(out.glob("predictions.rank*.jsonl"))
    merged: dict[Key, dict[str, Any]] = {}
    for f in [main, *shards]:
        for row in _read_rows(f):
            merged[_key(row)] = row
    tmp = main.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for k in sorted(merged):
            fh.write(json.dumps(merged[k], ensure_ascii=False) + "\n")
    tmp.replace(main)
    for f in shards:
        f.unlink()
    return main


# --------------------------------------------------------------------------- distribution


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """(rank, world size, whether a process group is there to synchronise with)."""
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized()
    if group:
        g_rank, g_world = dist.get_rank(), dist.get_world_size()
        if (rank is not None and rank != g_rank) or (
            world_size is not None and world_size != g_world
        ):
            raise MedlvrError(
                f"rank/world_size {rank}/{world_size} disagree with the process group "
                f"{g_rank}/{g_world}"
            )
        return g_rank, g_world, True
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise MedlvrError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size, False


def _barrier(synced: bool) -> None:
    if synced:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------- the loop


def _check_run_file(out: Path, settings: dict[str, Any], rank: int) -> None:
    """Refuse to mix rows of another model, reasoning or shuffle seed into an existing run; record the settings."""
    path = out / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if "mode" in old:  # run.json of releases before `reasoning` had one name
            old["reasoning"] = old.pop("mode")
        old_controls = old.get("image_controls", [REAL])
        old.setdefault("latents", "own")  # runs before `--latents` answered with their own
        for key in ("model", "reasoning", "control_seed", "latents"):
            if key == "model" and (old.get(key) is None or settings.get(key) is None):
                continue  # an in-memory model or a predictor has no identity to check
            if key == "control_seed" and not (
                "shuffled" in old_controls and "shuffled" in settings["image_controls"]
            ):
                continue  # the seed only makes the shuffled rows
            if old.get(key) != settings.get(key):
                raise MedlvrError(
                    f"{out} holds a run with {key}={old.get(key)!r}, not {settings.get(key)!r}: "
                    "use another --out"
                )
        settings = {
            **old,
            **settings,
            "latent_steps": sorted(
                set(old.get("latent_steps", [])) | set(settings["latent_steps"])
            ),
            "image_controls": order_conditions([*old_controls, *settings["image_controls"]]),
            "data": list(dict.fromkeys([*old.get("data", []), *settings["data"]])),
        }
    if rank == 0:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)


def _claim(args: dict[str, Any]) -> None:
    """The folder of an evaluation: new, an evaluation's (its run.json or rank shards) or `overwrite`."""
    data = args["data"]
    inputs = [] if data and isinstance(data[0], VQASample) else [*data, args["model"]]
    claim_output(args["out_dir"], "eval", overwrite=args["overwrite"], inputs=inputs, writes=EVAL_WRITES,
                 own=lambda f: (f / RUN_FILE).is_file() or any(f.glob("predictions.rank*.jsonl")))  # fmt: skip


# A second run into the same folder is refused, and a folder of other files unless `overwrite`.
@holds_run_folder(lambda args: args["out_dir"], "--out", check=_claim)
def evaluate(
    data: Sequence[str | Path] | Sequence[VQASample],
    out_dir: str | Path,
    *,
    model: str | Path | None = None,
    vlm: Any = None,
    predictor: Predictor | None = None,
    reasoning: Reasoning = "direct",
    latent_steps: Sequence[int] | int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    image_loader: Callable[[str], Image.Image] | None = None,
    progress: bool = True,
    report: bool = True,
    title: str | None = None,
    explain: bool = False,
    image_control: str | Sequence[str] = REAL,
    control_seed: int = 0,
    allow_pickle: bool = False,
    overwrite: bool = False,
    latents: str = "own",
    probes: Sequence[str | Path] | Sequence[VQASample] | None = None,
) -> EvalResult:
    """Answer, score and report; see the module docstring.

    Exactly one of `model` (a folder, loaded with `LatentVLM.from_pretrained`),
    `vlm` (a loaded `LatentVLM`) or `predictor` answers. `data` is a list of
    JSONL files or of `VQASample`s. `latent_steps` defaults to [0] with reasoning
    direct and cot (where K > 0 is refused) and to the model's configured K with
    reasoning latent (a predictor needs it given). `rank`/`world_size` default to
    the initialised process group, else 0/1; without a group, a sharded call
    only writes its shard and `merge_shards` + `write_report` finish the run.
    `explain` (a model only, reasoning latent) also measures the evidence maps on
    the questions with ROIs for every K >= 1 (`medlvr.explain.explain_metrics`:
    pointing game and ROI mass beside a random map) on rank 0, saved as
    `explain.json` and merged into `summary.json` and `report.md`.
    `image_control` is one condition or several ("none,blank,shuffled,question-only",
    see `medlvr.eval.controls`), each answered like each K; `control_seed`
    fixes the `shuffled` permutation. `allow_pickle` lets a `model` folder with pickle weights only load.
    `out_dir` must be new or hold an evaluation (`run.json`); `overwrite` lets it hold other files.
    `latents` (a model, reasoning latent) replaces the latent inputs: `gold`, `gold-prefix` or
    `shuffled-gold` (`medlvr.eval.diagnostics`); recorded in run.json, the rows and the summary.
    With `explain`, multi-hop questions also get next-hop pointing under a gold prefix.
    `probes` (JSONL files or samples, a model, K >= 1) fits linear probes of the latent states on
    those questions and scores them on `data` (`diagnostics.latent_probes`), per K: probes.json
    and the summary's `probes`.
    """
    _check_reasoning(reasoning)
    if sum(x is not None for x in (model, vlm, predictor)) != 1:
        raise MedlvrError("give exactly one of model, vlm or predictor")
    if batch_size < 1:
        raise MedlvrError(f"batch_size must be >= 1, got {batch_size}")
    max_new_tokens = default_max_new_tokens(reasoning) if max_new_tokens is None else max_new_tokens
    if max_new_tokens < 1:
        raise MedlvrError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    latent_steps = parse_latent_steps(latent_steps)
    conds = parse_image_controls(image_control)
    if reasoning in ("direct", "cot"):
        if latent_steps is not None and latent_steps != [0]:
            raise MedlvrError(
                f"reasoning {reasoning} answers without latent steps (K=0); use --reasoning latent for K={latent_steps}"
            )
        latent_steps = [0]
    rank, world_size, synced = _dist_info(rank, world_size)

    # `data` is one form of its union or the other: its first item tells which.
    if data and isinstance(data[0], VQASample):
        given = cast("Sequence[VQASample]", data)
        samples = list(given)[:limit] if limit is not None else list(given)
        data_names = sorted({s.dataset for s in samples})
    else:
        paths = cast("Sequence[str | Path]", data)
        samples = load_samples(paths, limit)
        data_names = [str(Path(p).resolve()) for p in paths]

    if model is not None:
        from medlvr.model.latent import LatentVLM

        vlm = LatentVLM.from_pretrained(model, allow_pickle=allow_pickle)
    if latents != "own":
        from medlvr.eval.diagnostics import check_source

        check_source(latents)
    if latents != "own" and (vlm is None or reasoning != "latent"):
        raise MedlvrError(
            f"--latents {latents} replaces a model's latent inputs: use reasoning latent"
        )
    if vlm is not None:
        if latent_steps is None:
            latent_steps = [vlm.resolve_steps(None)]
        predictor = ModelPredictor(vlm, reasoning, max_new_tokens)
        if latents != "own":
            from medlvr.eval.diagnostics import LatentSourcePredictor

            predictor = LatentSourcePredictor(vlm, latents, samples, max_new_tokens, control_seed)
    if latent_steps is None:
        raise MedlvrError("reasoning latent with a predictor needs latent_steps")
    if (
        vlm is not None
    ):  # before anything is written: a K the model cannot hold fails every question
        vlm.check_length(0, max(latent_steps), max_new_tokens)
    assert predictor is not None
    if explain and (vlm is None or max(latent_steps) < 1):
        raise MedlvrError("explanation metrics need a model and reasoning latent with K >= 1")
    if probes is not None and (vlm is None or max(latent_steps) < 1):
        raise MedlvrError("latent probes need a model and reasoning latent with K >= 1")
    if "question-only" in conds and vlm is not None and not vlm.adapter.text_only:
        raise MedlvrError(
            f"backbone family {vlm.adapter.family} cannot answer without an image: "
            "drop question-only from the image controls"
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_file(
        out,
        {
            # A folder by its absolute path; a shipped name or a Hub id as given.
            "model": (str(Path(model).resolve()) if Path(model).exists() else str(model))
            if model is not None
            else None,
            "reasoning": reasoning,
            "latent_steps": latent_steps,
            "data": data_names,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "limit": limit,
            "world_size": world_size,
            "image_controls": conds,
            "control_seed": control_seed,
            "latents": latents,
        },
        rank,
    )

    mine = sort_for_batching(samples, reasoning)[rank::world_size]  # this rank's strided slice
    shard = out / PREDICTIONS_FILE if world_size == 1 else _shard_file(out, rank)
    _read_rows(shard, repair=True)  # cut a torn last line before appending after it
    done = _done_keys(out)
    runs = [(c, k) for c in conds for k in latent_steps]
    pending = [s for s in mine if any((s.id, k, c) not in done for c, k in runs)]
    n_todo = sum((s.id, k, c) not in done for s in pending for c, k in runs)
    n_skipped = len(mine) * len(runs) - n_todo
    load = image_loader or _default_loader
    shown = _Shown(samples, control_seed if "shuffled" in conds else None, load, warn=rank == 0,
                   need_images=vlm is not None)  # a custom predictor may answer from text  # fmt: skip

    n_new = n_err = 0
    t0 = time.perf_counter()
    label = f"eval {reasoning} K={','.join(map(str, latent_steps))}" + (
        "" if conds == [REAL] else f" images={','.join(conds)}"
    )
    bar = _Bar(n_todo, enabled=progress and rank == 0, label=label)
    # SIGTERM/SIGINT stop after the batch (its rows flushed); a process group's ranks are just ended.
    signals = StopSignals() if not synced else None
    with shard.open("a", encoding="utf-8") as fh, bar, _restoring(signals):
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            for c, k in runs:
                todo = [shown(s, c) for s in chunk if (s.id, k, c) not in done]
                if not todo:
                    continue
                rows = [
                    prediction_row(
                        s, None, latent_steps=k, error=v.error, reasoning=reasoning, **v.fields
                    )
                    for s, v in todo
                    if v.error is not None
                ]
                good = [(s, v) for s, v in todo if v.error is None]
                if good:
                    t = time.perf_counter()
                    responses = list(
                        predictor([v.sample for _, v in good], [v.images for _, v in good], k)
                    )
                    per_sample = (time.perf_counter() - t) / len(good)
                    if len(responses) != len(good):
                        raise MedlvrError(
                            f"the predictor returned {len(responses)} responses for {len(good)} questions"
                        )
                    for (s, v), r in zip(good, responses):
                        g = r if isinstance(r, Generated) else Generated(str(r))
                        rows.append(
                            prediction_row(
                                s,
                                g.text,
                                latent_steps=k,
                                latency_s=per_sample,
                                n_tokens=g.n_tokens,
                                reasoning=reasoning,
                                **v.fields,
                            )
                        )
                for row in rows:
                    if latents != "own":
                        row["latents"] = latents
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                fh.flush()  # one batch on disk: a crash after this loses nothing of it
                os.fsync(fh.fileno())
                n_new += len(rows)
                n_err += sum(1 for r in rows if r.get("error"))
                bar.advance(len(rows))
            shown.forget()
            if signals is not None and signals.requested():
                raise signals.stopped(
                    f"{n_new} new rows are in {shard}; the same command continues from there"
                )
    seconds = time.perf_counter() - t0

    result = EvalResult(
        out, len(mine), n_new, n_skipped, n_err, seconds, n_new / seconds if seconds > 0 else 0.0
    )
    if world_size > 1 and not synced:
        return result  # an unsynchronised shard: the caller merges once every shard is written
    _barrier(synced)
    if rank == 0:
        merge_shards(out)
        if explain:
            _explain(vlm, samples, [k for k in latent_steps if k >= 1], out, batch_size, load)
        fitted: dict[str, Any] = {}
        if probes is not None:
            fitted = _probes(
                vlm, probes, samples, [k for k in latent_steps if k >= 1], out, batch_size, load
            )
        if report:
            result.report = write_report(out, title=title)
            result.summary = result.report["data"]
            if isinstance(result.summary, dict) and (latents != "own" or probes is not None):
                extra = {"latents": latents} if latents != "own" else {}
                _record(
                    out, result.summary, extra | ({"probes": fitted} if probes is not None else {})
                )
    _barrier(synced)  # the other ranks return once the merged files exist
    return result


def _record(out: Path, summary: dict[str, Any], extra: dict[str, Any]) -> None:
    """Add the latent source and the probes to the summary and summary.json."""
    from medlvr.eval.report import SUMMARY_FILE

    summary.update(extra)
    path = out / SUMMARY_FILE
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(data | extra, indent=2) + "\n", encoding="utf-8")


def _probes(vlm: Any, fit: Any, samples: Sequence[VQASample], latent_steps: Sequence[int], out: Path,
            batch_size: int, load: Callable[[str], Image.Image]) -> dict[str, Any]:  # fmt: skip
    """Latent probes fitted on `fit`, scored on `samples`, per K; saved as probes.json."""
    from medlvr.eval.diagnostics import latent_probes

    fit = list(fit) if fit and isinstance(fit[0], VQASample) else load_samples(fit)
    result = {
        str(k): latent_probes(vlm, fit, samples, k, batch_size=batch_size, image_loader=load)
        for k in latent_steps
    }
    (out / "probes.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


@dataclass
class _View:
    """What one question is shown under one image condition, and the fields its row records."""

    sample: VQASample
    """The question as prompted: its image list is emptied (question-only) or the donor's (shuffled)."""
    images: list[Image.Image]
    error: str | None
    fields: dict[str, Any]


class _Shown:
    """The images of each question under each condition, loaded (and blanked) once per batch of questions."""

    def __init__(
        self,
        samples: Sequence[VQASample],
        seed: int | None,
        load: Callable[[str], Image.Image],
        warn: bool,
        need_images: bool = False,
    ):
        self.load = load
        self.need_images = need_images
        self.by_id = {s.id: s for s in samples}
        self.donors = shuffle_donors(samples, seed) if seed is not None else {}
        kept = kept_own(samples, self.donors)
        if kept and warn:
            warnings.warn(
                f"image control shuffled: {len(kept)} question(s) still see an image of their own "
                f"(no other question of their image count has other images), e.g. {kept[0]}",
                stacklevel=3,
            )
        self.cache: dict[str, tuple[list[Image.Image], str | None]] = {}
        self.views: dict[
            tuple[str, str], tuple[VQASample, _View]
        ] = {}  # every K of a batch sees one view

    def _images(self, s: VQASample) -> tuple[list[Image.Image], str | None]:
        if s.id not in self.cache:
            self.cache[s.id] = _load_images(s, self.load, self.need_images)
        return self.cache[s.id]

    def forget(self) -> None:
        """Drop the loaded images (called after each batch)."""
        self.cache.clear()
        self.views.clear()

    def __call__(self, s: VQASample, condition: str) -> tuple[VQASample, _View]:
        if (s.id, condition) not in self.views:
            self.views[s.id, condition] = self._view(s, condition)
        return self.views[s.id, condition]

    def _view(self, s: VQASample, condition: str) -> tuple[VQASample, _View]:
        fields: dict[str, Any] = {"image_control": condition}
        if condition == "question-only":
            return s, _View(s.model_copy(update={"images": [], "rois": []}), [], None, fields)
        if condition == "shuffled" and s.id in self.donors:
            donor = self.by_id[self.donors[s.id]]
            fields["images_from"] = donor.id
            images, err = self._images(donor)
            return s, _View(
                s.model_copy(update={"images": list(donor.images), "rois": []}), images, err, fields
            )
        images, err = self._images(s)
        if condition == "blank":
            images = [blank_like(im) for im in images]
        return s, _View(s, images, err, fields)


def _explain(
    vlm: Any,
    samples: Sequence[VQASample],
    latent_steps: Sequence[int],
    out: Path,
    batch_size: int,
    load: Callable[[str], Image.Image],
) -> dict[str, Any]:
    """Evidence-map faithfulness per K on the questions with ROIs whose images load; saved as explain.json."""
    from medlvr.eval.report import EXPLAIN_FILE
    from medlvr.explain import explain_metrics

    kept, images = [], []
    for s in samples:
        if s.rois:
            imgs, err = _load_images(s, load)
            if err is None and imgs:  # an error row already records the failure
                kept.append(s)
                images.append(imgs)
    if not kept:
        raise MedlvrError(
            "--explain-metrics: no question with an ROI and a readable image in the data"
        )
    result = {
        str(k): explain_metrics(vlm, kept, k, images=images, batch_size=batch_size)
        for k in latent_steps
    }
    from medlvr.eval.diagnostics import n_hops, next_hop_pointing

    if any(n_hops(s) > 1 for s in kept):  # multi-hop: does hop j's own step follow a gold prefix?
        for k in latent_steps:
            result[str(k)]["next_hop_pointing"] = next_hop_pointing(
                vlm, kept, k, images=images, batch_size=batch_size
            )
    tmp = out / (EXPLAIN_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / EXPLAIN_FILE)
    return result


class _Bar:
    """A rich progress bar with a samples/s column (silent when disabled, e.g. on ranks > 0)."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.enabled = enabled and total > 0
        self.total, self.label = total, label
        self.progress: Progress | None = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total, rate="")
            self.t0 = time.perf_counter()
            self.n = 0
        return self

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.n += n
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task, advance=n, rate=f"{rate:.2f} samples/s")

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()


def run_settings(out_dir: str | Path) -> dict[str, Any]:
    """The `run.json` of a run directory ({} when absent)."""
    path = Path(out_dir) / RUN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
