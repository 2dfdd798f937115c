"""The evaluation harness: exact accuracies on VQA-RAD with a scripted predictor, resume, sharding, error rows."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medlvr.data.schema import VQASample, write_jsonl
from medlvr.errors import MedlvrError
from medlvr.eval.harness import evaluate, merge_shards, parse_latent_steps, sort_for_batching
from medlvr.eval.report import PREDICTIONS_FILE, read_predictions, write_report
from tests.conftest import REPO, random_image

TIMING = ("latency_p50", "latency_p95", "latency_s")


def _even(sample_id: str) -> bool:
    return hashlib.md5(sample_id.encode()).digest()[0] % 2 == 0


def gold_or_yes(samples, images, k):
    """Answers the gold for ids whose hash is even, "yes" otherwise (never looks at the images)."""
    return [s.answer if _even(s.id) else "yes" for s in samples]


def _vqa_rad_test(root: Path) -> list[VQASample]:
    from medlvr.data import sources

    return list(sources.convert("vqa-rad", root, split="test"))


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- VQA-RAD


def test_vqa_rad_scripted_predictor_gives_exact_accuracies(vqa_rad_root, tmp_path):
    samples = _vqa_rad_test(vqa_rad_root)
    raw = json.loads((vqa_rad_root / "VQA_RAD Dataset Public.json").read_text())
    raw_test = [r for r in raw if r["phrase_type"] in ("test_freeform", "test_para")]
    assert len(samples) == len(raw_test) == 451
    n_closed_raw = sum(1 for r in raw_test if r["answer_type"].strip().upper() == "CLOSED")
    assert sum(s.answer_type == "closed" for s in samples) == n_closed_raw

    # The expectation, without the scorer: an even id answers its own gold (right), an odd one
    # says "yes", right exactly when the gold is the word yes (any case).
    expected = {}
    for kind in ("closed", "open"):
        group = [s for s in samples if s.answer_type == kind]
        right = sum(1 for s in group if _even(s.id) or s.answer.strip().lower() == "yes")
        expected[kind] = right / len(group)
    assert 0.3 < expected["closed"] < 1 and 0.3 < expected["open"] < 1  # the script is not trivially right

    result = evaluate(samples, tmp_path / "run", predictor=gold_or_yes, batch_size=64, progress=False)
    by_type = result.summary["by_answer_type"]
    assert by_type["closed"]["accuracy"] == pytest.approx(expected["closed"], abs=1e-12)
    assert by_type["open"]["accuracy"] == pytest.approx(expected["open"], abs=1e-12)
    assert result.summary["overall"]["closed_accuracy"] == pytest.approx(expected["closed"], abs=1e-12)
    assert result.summary["overall"]["n"] == 451 and result.summary["overall"]["n_errors"] == 0
    for name in ("summary.json", "report.md", "plots/accuracy_by_dataset.png", "plots/accuracy_by_question_type.png"):
        assert (tmp_path / "run" / name).is_file(), name


# --------------------------------------------------------------------------- small hand-made sets


def _tiny_set(tmp_path: Path, n: int = 24, missing: tuple[int, ...] = ()) -> Path:
    """A JSONL of n closed/open/choice questions over generated PNGs; indices in `missing` lack their image."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        path = img_dir / f"im{i}.png"
        if i not in missing:
            random_image(32 + 4 * (i % 3), 32, seed=i).save(path)
        kind = ("closed", "open", "choice")[i % 3]
        fields = {"answer": "yes" if i % 4 else "no"}
        if kind == "choice":
            fields = {"options": {"A": "round", "B": "square"}, "answer": "round", "answer_letter": "A"}
        samples.append(VQASample(
            id=f"q{i:03d}", dataset="toy" if i % 2 else "toy2", split="test", images=[str(path)],
            question="Is there a lesion?" + " really" * (i % 5), answer_type=kind, question_type=f"t{i % 4}",
            **fields,
        ))
    write_jsonl(samples, tmp_path / "test.jsonl")
    return tmp_path / "test.jsonl"


def keyed(samples, images, k):
    """A deterministic answer per (id, K): right for some, wrong or unparseable for others."""
    out = []
    for s in samples:
        h = hashlib.md5(f"{s.id}/{k}".encode()).digest()[0] % 3
        out.append(s.gold if h == 0 else ("maybe" if h == 1 else "no"))
    return out


class CrashAfter:
    """`keyed`, but raises once `n` questions have been answered (a simulated crash)."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def __call__(self, samples, images, k):
        if self.seen + len(samples) > self.n:
            raise RuntimeError("simulated crash")
        self.seen += len(samples)
        return keyed(samples, images, k)


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    data = _tiny_set(tmp_path)
    ref = evaluate([data], tmp_path / "ref", predictor=keyed, mode="latent", latent_steps=[0, 2],
                   batch_size=5, progress=False)

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate([data], run, predictor=CrashAfter(17), mode="latent", latent_steps=[0, 2], batch_size=5,
                 progress=False)
    kept = read_predictions(run)
    assert 0 < len(kept) < 48 and len(kept) % 5 == 0  # whole batches were flushed before the crash
    with (run / PREDICTIONS_FILE).open("a") as fh:
        fh.write('{"id": "q000", "torn')  # a write cut by the crash

    calls = []

    def counting(samples, images, k):
        calls.extend((s.id, k) for s in samples)
        return keyed(samples, images, k)

    res = evaluate([data], run, predictor=counting, mode="latent", latent_steps=[0, 2], batch_size=5,
                   progress=False)
    assert res.n_skipped == len(kept) and len(calls) == 48 - len(kept)
    assert not {(r["id"], r["latent_steps"]) for r in kept} & set(calls)
    assert _strip_timing(res.summary) == _strip_timing(ref.summary)
    rows = read_predictions(run)
    assert len(rows) == len({(r["id"], r["latent_steps"]) for r in rows}) == 48


def test_missing_image_is_an_error_row_and_the_run_goes_on(tmp_path):
    data = _tiny_set(tmp_path, n=9, missing=(4,))
    bad = tmp_path / "imgs" / "im7.png"
    bad.write_bytes(b"not a png at all")
    res = evaluate([data], tmp_path / "run", predictor=keyed, batch_size=4, progress=False)
    assert res.summary["overall"]["n"] == 9 and res.summary["overall"]["n_errors"] == 2
    errors = {r["id"]: r["error"] for r in read_predictions(tmp_path / "run") if r.get("error")}
    assert set(errors) == {"q004", "q007"}
    assert "not found" in errors["q004"] and "im7.png" in errors["q007"]
    assert "## Errors" in (tmp_path / "run" / "report.md").read_text()


def test_two_direct_shards_merge_to_the_single_process_result(tmp_path):
    data = _tiny_set(tmp_path, n=13)
    one = evaluate([data], tmp_path / "one", predictor=keyed, mode="latent", latent_steps="0,4", batch_size=3,
                   progress=False)
    for r in (1, 0):
        part = evaluate([data], tmp_path / "two", predictor=keyed, mode="latent", latent_steps=[0, 4], batch_size=3,
                        rank=r, world_size=2, progress=False)
        assert part.summary is None and part.n_samples == (7 if r == 0 else 6)
    assert (tmp_path / "two" / "predictions.rank1.jsonl").is_file()
    merge_shards(tmp_path / "two")
    two = write_report(tmp_path / "two")["data"]
    assert not list((tmp_path / "two").glob("predictions.rank*"))
    assert _strip_timing(two) == _strip_timing(one.summary)
    assert _strip_timing(read_predictions(tmp_path / "two")) == _strip_timing(read_predictions(tmp_path / "one"))


_WORKER = """
import sys
import torch.distributed as dist
from medlvr.eval.harness import evaluate
from tests.test_harness import keyed

dist.init_process_group("gloo")
res = evaluate([sys.argv[1]], sys.argv[2], predictor=keyed, mode="latent", latent_steps=[0, 2], batch_size=3,
               progress=False)
assert (res.summary is None) == (dist.get_rank() != 0)
dist.destroy_process_group()
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    data = _tiny_set(tmp_path, n=11)
    one = evaluate([data], tmp_path / "one", predictor=keyed, mode="latent", latent_steps=[0, 2], batch_size=3,
                   progress=False)
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(data), str(tmp_path / "two")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert _strip_timing(two) == _strip_timing(one.summary)
    assert not list((tmp_path / "two").glob("predictions.rank*"))


# --------------------------------------------------------------------------- arguments


def test_modes_and_latent_steps_are_checked(tmp_path):
    data = _tiny_set(tmp_path, n=3)
    assert parse_latent_steps("0, 2,4,2") == [0, 2, 4]
    with pytest.raises(MedlvrError, match=">= 0"):
        parse_latent_steps("0,-1")
    with pytest.raises(MedlvrError, match="mode direct"):
        evaluate([data], tmp_path / "r", predictor=keyed, mode="direct", latent_steps=[2])
    with pytest.raises(MedlvrError, match="mode must be"):
        evaluate([data], tmp_path / "r", predictor=keyed, mode="fast")
    evaluate([data], tmp_path / "r", predictor=keyed, mode="direct", progress=False)
    with pytest.raises(MedlvrError, match="mode='direct'"):
        evaluate([data], tmp_path / "r", predictor=keyed, mode="cot", progress=False)


def test_batches_are_sorted_by_prompt_length_deterministically(tmp_path):
    from medlvr.data.prompts import question_text
    from medlvr.data.schema import read_jsonl

    samples = read_jsonl(_tiny_set(tmp_path, n=10))
    order = [s.id for s in sort_for_batching(samples)]
    assert order == [s.id for s in sort_for_batching(list(reversed(samples)))]
    lengths = [len(question_text(s)) for s in sort_for_batching(samples)]
    assert lengths == sorted(lengths)
