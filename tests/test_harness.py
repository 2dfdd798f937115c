"""The evaluation harness: exact accuracies on VQA-RAD with a scripted predictor, resume, sharding, error rows."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from medlvr.data.schema import VQASample, write_jsonl
from medlvr.errors import MedlvrError
from medlvr.eval.harness import evaluate, merge_shards, parse_latent_steps, sort_for_batching
from medlvr.eval.report import PREDICTIONS_FILE, read_predictions, write_report
from medlvr.model.backbones import families
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
    assert (
        0.3 < expected["closed"] < 1 and 0.3 < expected["open"] < 1
    )  # the script is not trivially right

    result = evaluate(
        samples, tmp_path / "run", predictor=gold_or_yes, batch_size=64, progress=False
    )
    by_type = result.summary["by_answer_type"]
    assert by_type["closed"]["accuracy"] == pytest.approx(expected["closed"], abs=1e-12)
    assert by_type["open"]["accuracy"] == pytest.approx(expected["open"], abs=1e-12)
    assert result.summary["overall"]["closed_accuracy"] == pytest.approx(
        expected["closed"], abs=1e-12
    )
    assert result.summary["overall"]["n"] == 451 and result.summary["overall"]["n_errors"] == 0
    for name in (
        "summary.json",
        "report.md",
        "plots/accuracy_by_dataset.png",
        "plots/accuracy_by_question_type.png",
    ):
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
            fields = {
                "options": {"A": "round", "B": "square"},
                "answer": "round",
                "answer_letter": "A",
            }
        samples.append(
            VQASample(
                id=f"q{i:03d}",
                dataset="toy" if i % 2 else "toy2",
                split="test",
                images=[str(path)],
                question="Is there a lesion?" + " really" * (i % 5),
                answer_type=kind,
                question_type=f"t{i % 4}",
                **fields,
            )
        )
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
    ref = evaluate(
        [data],
        tmp_path / "ref",
        predictor=keyed,
        reasoning="latent",
        latent_steps=[0, 2],
        batch_size=5,
        progress=False,
    )

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(
            [data],
            run,
            predictor=CrashAfter(17),
            reasoning="latent",
            latent_steps=[0, 2],
            batch_size=5,
            progress=False,
        )
    kept = read_predictions(run)
    assert 0 < len(kept) < 48 and len(kept) % 5 == 0  # whole batches were flushed before the crash
    with (run / PREDICTIONS_FILE).open("a") as fh:
        fh.write('{"id": "q000", "torn')  # a write cut by the crash

    calls = []

    def counting(samples, images, k):
        calls.extend((s.id, k) for s in samples)
        return keyed(samples, images, k)

    res = evaluate(
        [data],
        run,
        predictor=counting,
        reasoning="latent",
        latent_steps=[0, 2],
        batch_size=5,
        progress=False,
    )
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
    one = evaluate(
        [data],
        tmp_path / "one",
        predictor=keyed,
        reasoning="latent",
        latent_steps="0,4",
        batch_size=3,
        progress=False,
    )
    for r in (1, 0):
        part = evaluate(
            [data],
            tmp_path / "two",
            predictor=keyed,
            reasoning="latent",
            latent_steps=[0, 4],
            batch_size=3,
            rank=r,
            world_size=2,
            progress=False,
        )
        assert part.summary is None and part.n_samples == (7 if r == 0 else 6)
    assert (tmp_path / "two" / "predictions.rank1.jsonl").is_file()
    merge_shards(tmp_path / "two")
    two = write_report(tmp_path / "two")["data"]
    assert not list((tmp_path / "two").glob("predictions.rank*"))
    assert _strip_timing(two) == _strip_timing(one.summary)
    assert _strip_timing(read_predictions(tmp_path / "two")) == _strip_timing(
        read_predictions(tmp_path / "one")
    )


_WORKER = """
import sys
import torch.distributed as dist
from medlvr.eval.harness import evaluate
from tests.test_harness import keyed

dist.init_process_group("gloo")
res = evaluate([sys.argv[1]], sys.argv[2], predictor=keyed, reasoning="latent", latent_steps=[0, 2], batch_size=3,
               progress=False)
assert (res.summary is None) == (dist.get_rank() != 0)
dist.destroy_process_group()
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    data = _tiny_set(tmp_path, n=11)
    one = evaluate(
        [data],
        tmp_path / "one",
        predictor=keyed,
        reasoning="latent",
        latent_steps=[0, 2],
        batch_size=3,
        progress=False,
    )
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(data),
            str(tmp_path / "two"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert _strip_timing(two) == _strip_timing(one.summary)
    assert not list((tmp_path / "two").glob("predictions.rank*"))


# --------------------------------------------------------------------------- arguments


def test_reasoning_and_latent_steps_are_checked(tmp_path):
    data = _tiny_set(tmp_path, n=3)
    assert parse_latent_steps("0, 2,4,2") == [0, 2, 4]
    with pytest.raises(MedlvrError, match=">= 0"):
        parse_latent_steps("0,-1")
    with pytest.raises(MedlvrError, match="reasoning direct answers without latent steps"):
        evaluate([data], tmp_path / "r", predictor=keyed, reasoning="direct", latent_steps=[2])
    with pytest.raises(MedlvrError, match="reasoning must be one of direct, latent, cot"):
        evaluate([data], tmp_path / "r", predictor=keyed, reasoning="fast")
    evaluate([data], tmp_path / "r", predictor=keyed, reasoning="direct", progress=False)
    with pytest.raises(MedlvrError, match="reasoning='direct'"):
        evaluate([data], tmp_path / "r", predictor=keyed, reasoning="cot", progress=False)


def test_a_run_written_before_reasoning_had_its_name_is_still_checked_and_resumed(tmp_path):
    data = _tiny_set(tmp_path, n=3)
    run = tmp_path / "r"
    evaluate([data], run, predictor=keyed, reasoning="direct", progress=False)
    settings = json.loads((run / "run.json").read_text())
    settings["mode"] = settings.pop("reasoning")  # run.json as releases before the rename wrote it
    (run / "run.json").write_text(json.dumps(settings))
    with pytest.raises(MedlvrError, match="reasoning='direct'"):
        evaluate([data], run, predictor=keyed, reasoning="cot", progress=False)
    res = evaluate([data], run, predictor=keyed, reasoning="direct", progress=False)
    assert (
        res.summary["overall"]["n"] == 3
        and json.loads((run / "run.json").read_text())["reasoning"] == "direct"
    )


def test_batches_are_sorted_by_prompt_length_deterministically(tmp_path):
    from medlvr.data.prompts import question_text
    from medlvr.data.schema import read_jsonl

    samples = read_jsonl(_tiny_set(tmp_path, n=10))
    order = [s.id for s in sort_for_batching(samples)]
    assert order == [s.id for s in sort_for_batching(list(reversed(samples)))]
    lengths = [len(question_text(s)) for s in sort_for_batching(samples)]
    assert lengths == sorted(lengths)


# --------------------------------------------------------------------------- grounding controls


def _kind(sample, images, own) -> str:
    """Which condition a scripted predictor was given, read from what it was shown."""
    if not images:
        return "question-only"
    if all(np.unique(np.asarray(im)).tolist() == [128] for im in images):
        return "blank"
    return "shuffled" if sample.images != own[sample.id] else "none"


def test_blank_images_answer_alike_and_shuffled_is_a_fixed_derangement(tmp_path):
    from medlvr.data.schema import read_jsonl
    from medlvr.eval.controls import shuffle_donors

    data = _tiny_set(tmp_path, n=9)
    own = {s.id: s.images for s in read_jsonl(data)}
    seen = {}

    def by_pixels(samples, images, k):
        """Answers a digest of the pixels it is shown: two images answer alike only when equal."""
        out = []
        for s, imgs in zip(samples, images):
            kind = _kind(s, imgs, own)
            seen[(s.id, kind)] = [(im.mode, im.size) for im in imgs]
            out.append(
                hashlib.md5(b"".join(im.tobytes() for im in imgs)).hexdigest()[:8]
                if imgs
                else "none"
            )
        return out

    res = evaluate(
        [data],
        tmp_path / "run",
        predictor=by_pixels,
        image_control="none,blank,shuffled",
        batch_size=4,
        control_seed=3,
        progress=False,
    )
    rows = read_predictions(tmp_path / "run")
    resp = {(r["id"], r["image_control"]): r["response"] for r in rows}
    # Blank: same-size same-mode grey images; q000 and q003 share a size (32x32) but differ in pixels.
    assert resp[("q000", "none")] != resp[("q003", "none")]
    assert resp[("q000", "blank")] == resp[("q003", "blank")]
    assert seen[("q001", "blank")] == seen[("q001", "none")] == [("RGB", (36, 32))]
    # Shuffled: the permutation of shuffle_donors for seed 3, no question on its own image.
    donors = shuffle_donors(read_jsonl(data), seed=3)
    shuffled = {r["id"]: r for r in rows if r["image_control"] == "shuffled"}
    assert {i: r["images_from"] for i, r in shuffled.items()} == donors
    assert (
        all(r["images_from"] != i for i, r in shuffled.items()) and len(set(donors.values())) == 9
    )
    assert all(shuffled[i]["response"] == resp[(d, "none")] for i, d in donors.items())
    assert res.summary["overall"]["n"] == 9 and set(res.summary["by_image_control"]) == {
        "none",
        "blank",
        "shuffled",
    }


def test_each_blank_image_is_made_once_for_every_k_of_a_batch(tmp_path, monkeypatch):
    from medlvr.eval import harness

    data = _tiny_set(tmp_path, n=9)
    made = []
    real_blank = harness.blank_like
    monkeypatch.setattr(harness, "blank_like", lambda im: made.append(im.size) or real_blank(im))
    evaluate(
        [data],
        tmp_path / "run",
        predictor=keyed,
        reasoning="latent",
        latent_steps=[0, 2, 4],
        image_control="none,blank",
        batch_size=4,
        progress=False,
        report=False,
    )
    assert len(made) == 9  # one per question's image, not one per K
    rows = read_predictions(tmp_path / "run")
    assert len(rows) == 9 * 3 * 2


def test_control_summary_equals_hand_computation(tmp_path):
    """Real images answer the gold; blank the gold on even-hash ids; shuffled never; question-only on i % 3 == 0."""
    from medlvr.data.schema import read_jsonl

    data = _tiny_set(tmp_path, n=24)
    samples = read_jsonl(data)
    own = {s.id: s.images for s in samples}
    right = {
        "none": lambda i, sid: True,
        "blank": lambda i, sid: _even(sid),
        "shuffled": lambda i, sid: False,
        "question-only": lambda i, sid: i % 3 == 0,
    }

    def scripted(batch, images, k):
        return [
            s.gold if right[_kind(s, imgs, own)](int(s.id[1:]), s.id) else "maybe"
            for s, imgs in zip(batch, images)
        ]

    res = evaluate(
        [data],
        tmp_path / "run",
        predictor=scripted,
        reasoning="latent",
        latent_steps=[0, 2],
        image_control="none,blank,shuffled,question-only",
        batch_size=5,
        progress=False,
    )
    s = res.summary
    expected = {c: sum(f(i, x.id) for i, x in enumerate(samples)) / 24 for c, f in right.items()}
    assert expected["blank"] not in (0.0, 1.0)
    assert list(s["by_image_control"]) == ["none", "blank", "shuffled", "question-only"]
    for c, acc in expected.items():
        assert s["by_image_control"][c]["n"] == 48 and s["by_image_control"][c][
            "accuracy"
        ] == pytest.approx(acc)
        assert s["by_image_control_latent_steps"][c]["2"]["accuracy"] == pytest.approx(acc)
        if c != "none":
            assert s["real_minus_control"][c]["delta"] == pytest.approx(1 - acc)
    assert s["overall"]["n"] == 48 and s["overall"]["accuracy"] == 1.0  # the real-image rows only
    dep = s["image_dependence"]
    assert dep["overall"]["n"] == 48 and dep["overall"]["delta"] == pytest.approx(
        1 - expected["blank"]
    )
    toy = [x.id for i, x in enumerate(samples) if i % 2]  # dataset "toy" holds the odd indices
    assert dep["by_dataset"]["toy"]["delta"] == pytest.approx(1 - sum(map(_even, toy)) / len(toy))
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"**Image dependence (real − blank): {100 * (1 - expected['blank']):+.1f} points**" in md
    assert "### By image condition and K" in md and "| question-only |" in md


def test_question_only_prompts_have_no_image_placeholder(tmp_path):
    data = _tiny_set(tmp_path, n=4)
    got = []

    def spy(samples, images, k):
        got.extend((s.images, list(imgs)) for s, imgs in zip(samples, images))
        return ["yes"] * len(samples)

    evaluate([data], tmp_path / "run", predictor=spy, image_control="question-only", progress=False)
    assert got and all(paths == [] and imgs == [] for paths, imgs in got)
    rows = read_predictions(tmp_path / "run")
    assert {r["image_control"] for r in rows} == {"question-only"} and not any(
        r.get("error") for r in rows
    )


@pytest.mark.parametrize("family", families())
def test_every_family_answers_a_question_only_prompt(tiny_factory, family, tmp_path):
    from medlvr.data.collate import VQACollator
    from medlvr.data.schema import read_jsonl
    from medlvr.model.latent import LatentVLM

    data = _tiny_set(tmp_path, n=3)
    vlm = LatentVLM.from_pretrained(tiny_factory(family))
    text_only = [s.model_copy(update={"images": []}) for s in read_jsonl(data)]
    batch = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)(
        text_only, [[]] * 3
    )
    assert (
        int((batch["input_ids"] == vlm.image_token_id).sum()) == 0
        and batch.get("pixel_values") is None
    )
    res = evaluate(
        [data],
        tmp_path / "run",
        vlm=vlm,
        image_control="none,question-only",
        max_new_tokens=2,
        progress=False,
    )
    assert res.summary["by_image_control"]["question-only"]["n"] == 3 and res.n_errors == 0


def test_a_family_without_text_only_prompts_fails_in_one_line(tiny_dir, tmp_path, monkeypatch):
    from medlvr.model.latent import LatentVLM

    vlm = LatentVLM.from_pretrained(tiny_dir)
    monkeypatch.setattr(type(vlm.adapter), "text_only", False)
    with pytest.raises(MedlvrError, match="qwen2_5_vl cannot answer without an image"):
        evaluate(
            [_tiny_set(tmp_path, n=2)], tmp_path / "run", vlm=vlm, image_control="question-only"
        )


def test_resuming_with_a_new_condition_computes_only_its_rows(tmp_path):
    data = _tiny_set(tmp_path, n=10)
    run = tmp_path / "run"
    first = evaluate([data], run, predictor=keyed, batch_size=3, progress=False)
    before = {r["id"]: r for r in read_predictions(run)}
    calls = []

    def counting(samples, images, k):
        calls.extend((s.id, np.asarray(imgs[0]).max()) for s, imgs in zip(samples, images))
        return keyed(samples, images, k)

    res = evaluate(
        [data], run, predictor=counting, image_control="none,blank", batch_size=3, progress=False
    )
    assert (res.n_new, res.n_skipped) == (10, 10)
    assert len(calls) == 10 and all(peak == 128 for _, peak in calls)  # blank images only
    after = read_predictions(run)
    assert {r["id"]: r for r in after if r["image_control"] == "none"} == before
    assert res.summary["overall"] == first.summary["overall"]  # the real rows, unchanged
    assert json.loads((run / "run.json").read_text())["image_controls"] == ["none", "blank"]

    evaluate([data], run, predictor=keyed, image_control="shuffled", control_seed=1, progress=False)
    with pytest.raises(MedlvrError, match="control_seed=1"):
        evaluate(
            [data], run, predictor=keyed, image_control="shuffled", control_seed=2, progress=False
        )


def test_accuracy_by_hops_has_exact_counts_and_a_plot(tmp_path):
    hops = [1] * 3 + [2] * 4 + [3] * 5
    samples = [
        VQASample(
            id=f"h{i:02d}",
            dataset="chain",
            split="test",
            images=[],
            question=f"Hop question {i}?",
            answer="yes",
            answer_type="closed",
            meta={"hops": h},
        )
        for i, h in enumerate(hops)
    ]
    samples += [
        VQASample(
            id=f"r{i}",
            dataset="other",
            split="test",
            images=[],
            question="Is it?",
            answer="no",
            answer_type="closed",
        )
        for i in range(2)
    ]
    # Right on h00, h03, h04, h07, h08, h09 (1 of 3 at 1 hop, 2 of 4 at 2, 3 of 5 at 3) and on r0.
    good = {"h00", "h03", "h04", "h07", "h08", "h09", "r0"}

    def scripted(batch, images, k):
        return [s.gold if s.id in good and k == 0 else "maybe" for s in batch]

    res = evaluate(
        samples,
        tmp_path / "run",
        predictor=scripted,
        reasoning="latent",
        latent_steps=[0, 2],
        image_control="none,blank",
        progress=False,
    )
    by_hops = res.summary["by_hops"]
    assert list(by_hops) == ["1", "2", "3", "unknown"]
    assert {h: m["n"] for h, m in by_hops.items()} == {
        "1": 6,
        "2": 8,
        "3": 10,
        "unknown": 4,
    }  # K=0 and K=2
    assert [by_hops[h]["accuracy"] for h in ("1", "2", "3")] == pytest.approx(
        [1 / 6, 2 / 8, 3 / 10]
    )
    curves = res.summary["by_image_control_latent_steps_hops"]
    assert (curves["blank"]["0"]["3"]["n"], curves["blank"]["0"]["3"]["accuracy"]) == (5, 3 / 5)
    assert curves["none"]["2"]["1"]["accuracy"] == 0.0
    assert (tmp_path / "run" / "plots" / "accuracy_by_hops.png").is_file()
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## By hops" in md and "| hops | none, K=0 | none, K=2 | blank, K=0 | blank, K=2 |" in md
    assert "| 3 | 60.0 (5) | 0.0 (5) | 60.0 (5) | 0.0 (5) |" in md
