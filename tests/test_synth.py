"""The embedded synthetic benchmark: determinism, held-out pairs, exact ROIs, answers recomputed from the scene."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlvr.data.schema import read_jsonl
from medlvr.data.synth import (
    QUESTION_TYPES,
    SPLITS,
    SynthConfig,
    generate,
    generate_samples,
    make_sample,
    render,
)
from medlvr.data.synth_render import SHAPES

CFG = SynthConfig(
    n=240, seed=7, answers="letters", texture=0.5
)  # every question type, answered with option letters
FILES = (*SPLITS, "describe")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(CFG, out, workers=1)
    return out


@pytest.fixture(scope="module")
def records(synth_dir: Path) -> dict[str, list]:
    # read_jsonl validates every record and checks every image exists.
    return {name: read_jsonl(synth_dir / f"{name}.jsonl") for name in FILES}


def _by_region(meta: dict) -> dict[str, dict]:
    return {les["region"]: les for les in meta["lesions"]}


def _adjective(shape: str) -> str:
    return {
        "round": "round",
        "square": "square",
        "triangle": "triangular",
        "cross": "cross-shaped",
    }[shape]


# ---------------------------------------------------------------- files, counts, determinism


def test_counts_per_split_are_exact(synth_dir: Path, records: dict[str, list]) -> None:
    counts = CFG.split_counts()
    assert counts == {"train": 168, "val": 24, "test": 24, "compositional": 24}
    assert sum(counts.values()) == CFG.n
    for split in SPLITS:
        assert len(records[split]) == counts[split]
        assert all(r.split == split for r in records[split])
    assert len(records["describe"]) == 3 * counts["train"]
    manifest = json.loads((synth_dir / "manifest.json").read_text())
    for name in FILES:
        assert manifest["counts"][name]["total"] == len(records[name])
        by_question_type: dict[str, int] = {}
        for r in records[name]:
            by_question_type[r.question_type] = by_question_type.get(r.question_type, 0) + 1
        assert manifest["counts"][name]["by_question_type"] == by_question_type
    assert {r.question_type for r in records["train"]} == set(QUESTION_TYPES)
    assert len(manifest["held_pairs"]) == 9
    assert len(list((synth_dir / "images").glob("*.png"))) == CFG.n


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    cfg = SynthConfig(n=40, seed=3)
    a, b = (
        generate(cfg, tmp_path / "a", workers=1),
        generate(cfg, tmp_path / "b", workers=2, chunk=7),
    )
    for name in (*FILES, "manifest"):
        assert a[name].read_bytes() == b[name].read_bytes(), name
    images_a = sorted(p.name for p in a["images"].iterdir())
    assert images_a == sorted(p.name for p in b["images"].iterdir())
    for name in images_a:
        assert (a["images"] / name).read_bytes() == (b["images"] / name).read_bytes(), name
    other = generate(SynthConfig(n=40, seed=4), tmp_path / "c", workers=1)
    assert other["train"].read_bytes() != a["train"].read_bytes()


def test_samples_do_not_depend_on_n() -> None:
    small, large = SynthConfig(n=50, seed=1), SynthConfig(n=500, seed=1)
    for split in SPLITS:
        for i in range(3):
            assert make_sample(small, split, i)[0] == make_sample(large, split, i)[0]


def test_records_validate_and_images_are_8bit(synth_dir: Path, records: dict[str, list]) -> None:
    for name in FILES:
        for r in records[name]:
            assert r.dataset == "synth" and r.modality and r.question_type
            assert len(r.images) == 1 and Path(r.images[0]).is_file()
    img = Image.open(records["train"][0].images[0])
    assert img.mode in ("L", "RGB") and img.size == (168, 168)


def test_choice_letters_are_valid(records: dict[str, list]) -> None:
    for name in FILES:
        for r in records[name]:
            if r.answer_type == "choice":
                assert (
                    list(r.options) == list("ABCD"[: len(r.options)]) and 2 <= len(r.options) <= 4
                )
                assert len(set(r.options.values())) == len(r.options)
                assert r.options[r.answer_letter] == r.answer
            else:
                assert r.options == {} and r.answer_letter is None
            if r.answer_type == "closed":
                assert r.answer in ("yes", "no")
    # Shuffling is not degenerate: the gold letter varies.
    letters = {r.answer_letter for r in records["train"] if r.answer_type == "choice"}
    assert letters == set("ABCD")


# ---------------------------------------------------------------- held-out (shape, region) pairs


def test_held_pairs_only_in_compositional(records: dict[str, list]) -> None:
    held = {(shape, CFG.region_names()[region]) for shape, region in CFG.held_pairs()}
    assert len(held) == 9
    # Latin square: every shape and every region keeps training examples.
    assert {s for s, _ in held} == set(SHAPES) and len({r for _, r in held}) == 9
    for name in ("train", "val", "test", "describe"):
        for r in records[name]:
            pairs = {(les["shape"], les["region"]) for les in r.meta["lesions"]}
            assert not pairs & held, (name, r.id, pairs & held)
            assert r.meta.get("held_pair") in (False, None)
    seen = {(les["shape"], les["region"]) for r in records["train"] for les in r.meta["lesions"]}
    assert {s for s, _ in seen} == set(SHAPES) and len({g for _, g in seen}) == 9
    for r in records["compositional"]:
        target = r.meta["lesions"][r.meta["target"]]
        assert (target["shape"], target["region"]) in held
        assert r.meta["held_pair"] is True
        assert tuple(target["box"]) in {tuple(roi.box) for roi in r.rois}
        others = [les for i, les in enumerate(r.meta["lesions"]) if i != r.meta["target"]]
        assert not {(les["shape"], les["region"]) for les in others} & held


# ---------------------------------------------------------------- pixels and ROI boxes


def test_roi_boxes_are_tight_around_the_lesion_pixels(records: dict[str, list]) -> None:
    items = generate_samples(CFG, "train", range(40)) + generate_samples(
        CFG, "compositional", range(20)
    )
    for item in items:
        on = item.image.astype(np.int16)
        off = render(CFG, item.scene, lesions=False).astype(np.int16)
        changed = on != off  # exactly the lesion pixels
        assert on.shape == (168, 168)
        covered = np.zeros_like(changed)
        for les in item.scene.lesions:
            x0, y0, x1, y1 = les.box
            ys, xs = np.nonzero(changed[y0:y1, x0:x1])
            # tight: the changed pixels touch every side of the box
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x1 - x0, y1 - y0), (
                item.sample.id,
                les,
            )
            sign = 1 if les.intensity == "bright" else -1
            assert (sign * (on - off)[y0:y1, x0:x1][changed[y0:y1, x0:x1]] > 20).all()
            span = max(x1 - x0, y1 - y0)
            assert (
                0.9 * les.extent - 2 <= span <= les.extent + 1
            )  # squares are drawn at 0.9 of the extent
            covered[y0:y1, x0:x1] = True
            rx0, ry0, rx1, ry1 = CFG.region_box(les.region)
            assert rx0 <= x0 and ry0 <= y0 and x1 <= rx1 and y1 <= ry1
        assert not (changed & ~covered).any(), "pixels changed outside every lesion box"
        # The saved record's ROIs are boxes of the scene's lesions (or a region box for presence-no).
        boxes = {les.box for les in item.scene.lesions}
        for roi in item.sample.rois:
            assert roi.label in ("lesion", "region")
            if roi.label == "lesion":
                assert tuple(int(v) for v in roi.box) in boxes


def test_saved_png_equals_render(records: dict[str, list]) -> None:
    for item in generate_samples(CFG, "val", range(5)):
        saved = next(r for r in records["val"] if r.id == item.sample.id)
        assert np.array_equal(np.asarray(Image.open(saved.images[0])), item.image)


def test_lesion_sizes_follow_the_token_cell() -> None:
    items = generate_samples(CFG, "train", range(60), render_images=False)
    spans = {"small": [], "large": []}
    for item in items:
        for les in item.scene.lesions:
            spans[les.size].append(les.extent)
    # extents are jittered by +-10% around small_size / large_size token cells
    assert (
        max(spans["small"]) <= CFG.small_size * 1.1 * 28
        and min(spans["large"]) >= CFG.large_size * 0.9 * 28
    )
    assert max(spans["small"]) < min(spans["large"])


# ---------------------------------------------------------------- answers recomputed from the scene

_STEP = {"to the right of": (0, 1), "to the left of": (0, -1), "above": (-1, 0), "below": (1, 0)}
_NAMES = ("upper left", "upper middle", "upper right", "middle left", "center", "middle right",
          "lower left", "lower middle", "lower right")  # fmt: skip


def _check_chain(r, at: dict[str, dict]) -> None:
    """Follow the chain from the question text alone and compare with the answer, ROIs and reasoning."""
    lesions = r.meta["lesions"]
    m = re.fullmatch(r"What is the intensity of (.+)\?", r.question)
    subject, phrases = m.group(1), []
    while subject.startswith("the lesion "):
        rest = subject[len("the lesion ") :]
        phrase = next(p for p in _STEP if rest.startswith(p + " "))
        phrases.append(phrase)
        subject = rest[len(phrase) + 1 :]
    (kind,) = re.fullmatch(r"the (largest|smallest) lesion", subject).groups()
    size = "large" if kind == "largest" else "small"
    (anchor,) = [les for les in lesions if les["size"] == size]  # the one lesion of its size
    region, path = _NAMES.index(anchor["region"]), [anchor]
    for phrase in reversed(phrases):  # the innermost phrase is the first step
        row, col = divmod(region, 3)
        dr, dc = _STEP[phrase]
        assert 0 <= row + dr < 3 and 0 <= col + dc < 3
        region = (row + dr) * 3 + col + dc
        path.append(at[_NAMES[region]])  # the region is occupied
    hops = len(path)
    assert r.meta["hops"] == hops and r.meta["roi_hops"] == list(range(1, hops + 1))
    assert len({les["region"] for les in path}) == hops  # no region visited twice
    assert r.answer == path[-1]["intensity"] and r.answer_type == "open"
    assert [tuple(roi.box) for roi in r.rois] == [tuple(les["box"]) for les in path]
    assert r.meta["chain"] == [les["region"] for les in path]
    assert r.meta["reasoning"].startswith(f"{kind} lesion: {anchor['region']}")
    # the image is exactly half bright: its majority says nothing
    assert (
        len(lesions) in (6, 8)
        and sum(les["intensity"] == "bright" for les in lesions) == len(lesions) // 2
    )


def _check_answer(r) -> None:  # one branch per question type, read top to bottom
    meta, q, qtype = r.meta, r.question, r.question_type
    lesions, at = meta["lesions"], _by_region(meta)
    boxes = [tuple(roi.box) for roi in r.rois]
    assert meta["n_lesions"] == len(lesions)
    # at most one lesion per region
    assert len(at) == len(lesions)
    if qtype == "presence":
        (region,) = re.findall(r"in the (.+) region\?", q)
        assert r.answer == ("yes" if region in at else "no")
        if region in at:
            assert boxes == [tuple(at[region]["box"])] and r.rois[0].label == "lesion"
        else:
            assert r.rois[0].label == "region"
    elif qtype == "attribute":
        attr, region = re.findall(r"What is the (\w+) of the lesion in the (.+) region\?", q)[0]
        assert r.answer == at[region][attr]
        assert boxes == [tuple(at[region]["box"])]
    elif qtype == "location":
        (words,) = re.findall(r"Where is the (.+) lesion\?", q)
        matches = [
            les
            for les in lesions
            if words
            == " ".join(
                _adjective(les[k]) if k == "shape" else les[k]
                for k in ("size", "intensity", "shape")
                if k in meta["descriptor"]
            )
        ]
        assert len(matches) == 1 and matches[0]["region"] == r.answer
        assert boxes == [tuple(matches[0]["box"])]
    elif qtype == "comparison":
        word, a, b = re.findall(
            r"Which lesion is (\w+): the one in the (.+) region or the one in the (.+) region\?", q
        )[0]
        attr, value = {"larger": ("size", "large"), "smaller": ("size", "small"),
                       "brighter": ("intensity", "bright"), "darker": ("intensity", "dark")}[word]  # fmt: skip
        assert at[a][attr] != at[b][attr]
        assert r.answer == (a if at[a][attr] == value else b)
        assert set(boxes) == {tuple(at[a]["box"]), tuple(at[b]["box"])}
    elif qtype == "count":
        assert r.answer == str(len(lesions)) and r.answer.isdigit()
        assert set(boxes) == {tuple(les["box"]) for les in lesions}
    elif qtype == "relational" and meta["variant"] == "same_shape":
        a, b = re.findall(r"Are the lesions in the (.+) and (.+) regions the same shape\?", q)[0]
        assert r.answer == ("yes" if at[a]["shape"] == at[b]["shape"] else "no")
        assert set(boxes) == {tuple(at[a]["box"]), tuple(at[b]["box"])}
    elif qtype == "relational":
        phrase, anchor_words = re.findall(
            r"What shape is the lesion (to the right of|to the left of|above|below) the (.+) lesion\?",
            q,
        )[0]
        superlative = {"brightest": ("intensity", "bright"), "darkest": ("intensity", "dark"),
                       "largest": ("size", "large"), "smallest": ("size", "small")}  # fmt: skip
        if anchor_words in superlative:
            attr, value = superlative[anchor_words]
            anchors = [les for les in lesions if les[attr] == value]
        else:
            anchors = [les for les in lesions if _adjective(les["shape"]) == anchor_words]
        assert len(anchors) == 1, "the anchor must be unique"
        names = CFG.region_names()
        g = CFG.grid
        ar, ac = divmod(names.index(anchors[0]["region"]), g)
        dr, dc = {
            "to the right of": (0, 1),
            "to the left of": (0, -1),
            "above": (-1, 0),
            "below": (1, 0),
        }[phrase]
        target = at[names[(ar + dr) * g + ac + dc]]
        assert r.answer == target["shape"]
        # nothing further along the same direction: one reading only
        rr, cc = ar + 2 * dr, ac + 2 * dc
        while 0 <= rr < g and 0 <= cc < g:
            assert names[rr * g + cc] not in at
            rr, cc = rr + dr, cc + dc
        assert boxes == [tuple(anchors[0]["box"]), tuple(target["box"])]
    elif qtype == "describe":
        expected = "; ".join(
            f"{les['region']}: {les['size']} {les['intensity']} {les['shape']}" for les in lesions
        )
        assert r.answer == expected and q == "Describe the lesions."
        assert len(boxes) == len(lesions)
    elif qtype == "ground":
        (words,) = re.findall(r"Where is the (.+) lesion\?", q)
        matches = [
            les
            for les in lesions
            if words == f"{les['size']} {les['intensity']} {_adjective(les['shape'])}"
        ]
        assert len(matches) == 1 and matches[0]["region"] == r.answer
        assert boxes == [tuple(matches[0]["box"])]
    elif qtype == "inspect":
        (region,) = re.findall(r"What is in the (.+) region\?", q)
        inside = [les for les in lesions if les["region"] == region]
        if inside:
            (les,) = inside
            assert r.answer == f"{les['size']} {les['intensity']} {les['shape']}" and boxes == [
                tuple(les["box"])
            ]
        else:
            assert r.answer == "nothing" and r.rois[0].label == "region"
    elif qtype == "chain":
        _check_chain(r, at)
    else:
        raise AssertionError(f"unexpected question type {qtype}")


def test_every_answer_is_consistent_with_the_scene(records: dict[str, list]) -> None:
    seen = set()
    for name in FILES:
        for r in records[name]:
            _check_answer(r)
            seen.add((r.question_type, r.meta.get("variant")))
    assert ("relational", "neighbor") in seen and ("relational", "same_shape") in seen
    assert {"describe", "ground", "inspect"} <= {f for f, _ in seen}
    inspect = [r.answer for r in records["describe"] if r.question_type == "inspect"]
    assert 0.3 < inspect.count("nothing") / len(inspect) < 0.7


def test_both_presence_answers_occur(records: dict[str, list]) -> None:
    answers = {r.answer for r in records["train"] if r.question_type == "presence"}
    assert answers == {"yes", "no"}


# ---------------------------------------------------------------- knobs


def test_level_one_has_single_lesions_and_no_two_lesion_question_types() -> None:
    cfg = SynthConfig(n=60, seed=2, level=1)
    items = generate_samples(cfg, "train", render_images=False) + generate_samples(
        cfg, "compositional", render_images=False
    )
    assert {len(i.scene.lesions) for i in items} == {1}
    assert {i.sample.question_type for i in items} <= {"presence", "attribute", "location", "count"}
    for item in items:
        _check_answer(item.sample)


def test_higher_levels_and_same_shape_distractors() -> None:
    cfg = SynthConfig(n=80, seed=5, level=5, same_shape_distractors=1.0)
    items = generate_samples(cfg, "train", render_images=False)
    counts = [len(i.scene.lesions) for i in items]
    assert min(counts) >= 4 and max(counts) >= 7
    shared = 0
    for item in items:
        _check_answer_cfg(cfg, item.sample)
        target = item.scene.lesions[item.scene.target] if item.scene.target is not None else None
        if target is not None:
            shared += sum(les.shape == target.shape for les in item.scene.lesions) > 1
    assert shared > len(items) // 2


def _check_answer_cfg(cfg: SynthConfig, sample) -> None:
    assert cfg.grid == CFG.grid  # the regex checks use 3x3 region names
    _check_answer(sample)


def test_image_size_and_grid_knobs(tmp_path: Path) -> None:
    cfg = SynthConfig(
        n=12,
        seed=0,
        image_size=224,
        grid=2,
        question_types={"attribute": 1, "relational": 1},
        describe=False,
    )
    paths = generate(cfg, tmp_path, workers=1)
    assert "describe" not in paths
    recs = read_jsonl(paths["train"])
    assert Image.open(recs[0].images[0]).size == (224, 224)
    assert {r.question_type for r in recs} <= {"attribute", "relational"}
    for r in recs:
        for les in r.meta["lesions"]:
            assert les["region"] in ("upper left", "upper right", "lower left", "lower right")


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"n": 0}, "n must be positive"),
        ({"image_size": 170}, "multiple of 28"),
        ({"question_types": {"colour": 1.0}}, "unknown question type"),
        ({"level": 1, "question_types": {"comparison": 1.0}}, "needs 2 lesions"),
        ({"level": 9}, "level must be"),
        ({"modalities": ("ultrasound",)}, "unknown or no modalities"),
        ({"large_size": 2.5}, "does not fit"),
        ({"splits": {"train": 0.5}}, "summing to 1"),
        ({"contrast": 0.1}, "bright above dark"),
    ],
)
def test_bad_knobs_are_clear_errors(knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(**knobs)


def test_cli_synth(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medlvr.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        app, ["data", "synth", "--out", str(out), "--n", "20", "--seed", "1", "--level", "2"]
    )
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(out / "train.jsonl")) == SynthConfig(n=20).split_counts()["train"]
    bad = runner.invoke(
        app, ["data", "synth", "--out", str(out), "--n", "5", "--image-size", "100"]
    )
    assert bad.exit_code == 2 and "multiple of 28" in bad.output
    bad = runner.invoke(
        app, ["data", "synth", "--out", str(out), "--n", "5", "--question-types", "colour"]
    )
    assert bad.exit_code == 2 and "unknown question type" in bad.output


def test_compositional_split_has_no_presence_questions(records: dict[str, list]) -> None:
    assert "presence" not in {r.question_type for r in records["compositional"]}


def test_many_held_pairs_still_yield_valid_questions() -> None:
    # Three of four shapes held per region leaves one shape per region in training.
    cfg = SynthConfig(n=200, seed=4, level=5, held_per_region=3)
    held = set(cfg.held_pairs())
    for split in SPLITS:
        for item in generate_samples(cfg, split, render_images=False):
            _check_answer(item.sample)
            pairs = {(les.shape, les.region) for les in item.scene.lesions}
            if split == "compositional":
                target = item.scene.lesions[item.scene.target]
                assert (target.shape, target.region) in held
            else:
                assert not pairs & held


def test_fresh_anatomy_per_image_differs_from_cached_variants() -> None:
    fresh = generate_samples(SynthConfig(n=20, seed=1, anatomy_variants=0), "train", range(2))
    cached = generate_samples(SynthConfig(n=20, seed=1), "train", range(2))
    for a, b in zip(fresh, cached, strict=True):
        assert a.sample == b.sample  # pixels only: the records do not change
        assert a.image.shape == b.image.shape and not np.array_equal(a.image, b.image)


# ---------------------------------------------------------------- chain questions: depth without shortcuts


def test_default_world_answers_in_words_and_asks_shape_only_of_large_lesions() -> None:
    cfg = SynthConfig(n=400, seed=3)
    items = generate_samples(cfg, "train", render_images=False)
    assert all(i.sample.answer_type in ("open", "closed") and not i.sample.options for i in items)
    shapes = [
        i
        for i in items
        if i.sample.question_type == "attribute" and i.sample.meta["attribute"] == "shape"
    ]
    assert shapes and all(i.scene.lesions[i.scene.target].size == "large" for i in shapes)
    assert all(
        i.sample.meta["hops"] >= 1 and len(i.sample.meta["roi_hops"]) == len(i.sample.rois)
        for i in items
    )
    letters = make_sample(SynthConfig(n=400, seed=3, answers="letters"), "train", 0)[1]
    assert (
        letters == make_sample(cfg, "train", 0)[1]
    )  # the same scenes, whichever way answers are written


def test_chain_depths_are_uniform_and_no_shortcut_predicts_the_answer() -> None:
    cfg = SynthConfig(n=4000, seed=11, question_types={"chain": 1.0}, hops=(1, 4), describe=False)
    samples = [make_sample(cfg, "train", i)[0] for i in range(1600)]
    by_hops = {h: [s for s in samples if s.meta["hops"] == h] for h in range(1, 5)}
    assert all(300 <= len(v) <= 500 for v in by_hops.values())
    for s in samples[:200]:
        _check_answer(s)
    deep = [s for s in samples if s.meta["hops"] >= 2]

    def rate(xs) -> float:
        xs = list(xs)
        return sum(xs) / len(xs)

    # The question alone: every template's answers are balanced.
    assert 0.45 < rate(s.answer == "bright" for s in samples) < 0.55
    # The first hop's lesion (the anchor) and the one before the last say nothing about the answer.
    at = [{les["region"]: les for les in s.meta["lesions"]} for s in deep]
    assert (
        0.45 < rate(a[s.meta["chain"][0]]["intensity"] == s.answer for s, a in zip(deep, at)) < 0.55
    )
    assert (
        0.45
        < rate(a[s.meta["chain"][-2]]["intensity"] == s.answer for s, a in zip(deep, at))
        < 0.55
    )
    # Nor does the image's majority: every image is exactly half bright.
    assert all(
        sum(les["intensity"] == "bright" for les in s.meta["lesions"]) * 2 == s.meta["n_lesions"]
        for s in samples
    )


def test_written_reasoning_spells_out_the_chain_and_parses_to_the_answer() -> None:
    from medlvr.data.prompts import written_reasoning
    from medlvr.eval.metrics import score

    cfg = SynthConfig(n=200, seed=5, question_types={"chain": 1.0}, hops=(3, 3))
    sample = make_sample(cfg, "test", 0)[0]
    written = written_reasoning(sample)
    regions = sample.meta["chain"]
    assert written.answer == f"{sample.meta['reasoning']}; answer: {sample.answer}"
    assert all(region in written.answer for region in regions) and written.answer.count(";") == 3
    assert score(
        sample, written.answer
    ).correct  # the evaluation parser reads the answer after the chain
    # The curriculum's stages: the first `hidden` hops left to the latent steps, one at a time.
    steps = sample.meta["reasoning"].split("; ")
    assert len(steps) == 3 and all(step.endswith(region) for step, region in zip(steps, regions))
    for hidden in range(5):
        later = written_reasoning(sample, hidden).answer
        assert later == "; ".join([*steps[hidden:], f"answer: {sample.answer}"])
        assert score(sample, later).correct
    assert written_reasoning(sample, 3).answer == f"answer: {sample.answer}"
    with pytest.raises(ValueError, match=">= 0"):
        written_reasoning(sample, -1)
    other = make_sample(SynthConfig(n=200, seed=5, question_types={"presence": 1.0}), "test", 1)[0]
    assert written_reasoning(other) == other  # nothing written to show
    lettered = sample.model_copy(update={"answer_type": "choice", "options": {"A": "bright", "B": "dark"},
                                         "answer_letter": "A" if sample.answer == "bright" else "B"})  # fmt: skip
    assert written_reasoning(lettered) == lettered  # a choice question is trained on its letter
    with pytest.raises(ValueError, match="hops"):
        SynthConfig(hops=(0, 2))
    with pytest.raises(ValueError, match="hops"):
        SynthConfig(hops=(1, 5))


def _subtle(n: int = 4000, seed: int = 13, **knobs) -> SynthConfig:
    """The demo's subtlety world: one lookup (presence, a named or anchored lesion's intensity) at 8 rungs."""
    knobs = {"subtlety": (0, 7), **knobs}
    return SynthConfig(n=n, seed=seed, question_types={"presence": 1.0, "attribute": 1.0, "chain": 1.0},
                       hops=(1, 1), attributes=("intensity",), describe=False, **knobs)  # fmt: skip


def test_subtlety_rungs_are_uniform_and_change_only_how_the_evidence_looks() -> None:
    from medlvr.data.synth import SUBTLETY_RUNGS, render
    from medlvr.data.synth_render import gaussian_filter

    cfg, plain = _subtle(), _subtle(subtlety=None)
    pairs = [(make_sample(cfg, "train", i), make_sample(plain, "train", i)) for i in range(800)]
    rungs = Counter(s.meta["rung"] for (s, _), _ in pairs)
    assert sorted(rungs) == list(range(8)) and min(rungs.values()) >= 70
    for (s, scene), (p, _) in pairs:
        _check_answer(s)
        # the same question, answer and places; only size, contrast and noise follow the rung
        assert (s.question, s.answer, s.question_type) == (p.question, p.answer, p.question_type)
        assert [les["region"] for les in s.meta["lesions"]] == [
            les["region"] for les in p.meta["lesions"]
        ]
        assert "rung" not in p.meta and scene.rung == s.meta["rung"]
    # measured on the pixels: lesions shrink and fade, noise grows, rung by rung
    contrast, noise, extent = {}, {}, {}
    for (_, scene), _ in pairs[:400]:
        with_lesions = render(cfg, scene).astype(float) / 255
        without = render(cfg, scene, lesions=False).astype(float) / 255
        box = scene.lesions[0].box
        diff = (
            with_lesions[box[1] : box[3], box[0] : box[2]]
            - without[box[1] : box[3], box[0] : box[2]]
        )
        contrast.setdefault(scene.rung, []).append(float(np.abs(diff).max()))
        les = scene.lesions[
            0
        ]  # its extent over its size's nominal one: the rung's scale, jittered +-10%
        nominal = (cfg.large_size if les.size == "large" else cfg.small_size) * 28
        extent.setdefault(scene.rung, []).append(les.extent / nominal)
        # pixel noise: what a 2-px blur removes from the middle of the image (lesions and anatomy are smoother)
        middle = with_lesions[40:130, 40:130]
        noise.setdefault(scene.rung, []).append(float(np.std(middle - gaussian_filter(middle, 2))))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    for r in range(8):
        _, c, sigma = SUBTLETY_RUNGS[r]
        assert abs(mean(contrast[r]) - c) < 0.02 + 2.5 * sigma, (r, mean(contrast[r]))
    assert all(mean(noise[r]) < mean(noise[r + 1]) for r in range(7)), noise
    assert mean(noise[7]) > 2 * mean(noise[0]) and abs(mean(noise[7]) - SUBTLETY_RUNGS[7][2]) < 0.01
    assert all(abs(mean(extent[r]) - SUBTLETY_RUNGS[r][0]) < 0.03 for r in range(8)), extent
    assert mean(contrast[0]) > 3 * mean(contrast[7])


def test_subtlety_world_has_no_shortcut_to_the_answer() -> None:
    """What a model could use instead of the lesion: the answer prior, the question text, the image's
    statistics. Each sits at chance (0.5) on 4,000 questions / 1,600 rendered images."""
    from medlvr.data.synth import render

    samples = [make_sample(_subtle(), "train", i) for i in range(4000)]

    def rate(xs) -> float:
        xs = list(xs)
        return sum(xs) / len(xs)

    # the answer prior per question type: both answers equally likely
    for qtype, word in (("presence", "yes"), ("attribute", "bright"), ("chain", "bright")):
        of_type = [s for s, _ in samples if s.question_type == qtype]
        assert len(of_type) > 1100 and 0.45 < rate(s.answer == word for s in of_type) < 0.55
    # the question text alone: each text's most frequent answer, fitted on these same questions
    by_text: dict[str, Counter] = {}
    for s, _ in samples:
        by_text.setdefault(s.question, Counter())[s.answer] += 1
    assert len(by_text) == 20  # 9 regions x (presence, intensity) + largest / smallest
    assert sum(c.most_common(1)[0][1] for c in by_text.values()) / len(samples) < 0.54
    # image statistics: the image's mean grey level, thresholded at its median per question type
    stats = {}
    for s, scene in samples[:1600]:
        img = render(_subtle(), scene).astype(float)
        stats.setdefault(s.question_type, []).append((img.mean(), s.answer))
    for qtype, rows in stats.items():
        cut = float(np.median([m for m, _ in rows]))
        high = Counter(a for m, a in rows if m > cut).most_common(1)[0][0]
        agree = rate((m > cut) == (a == high) for m, a in rows)
        assert agree < 0.56, (qtype, agree)
    # and the majority intensity of the image's lesions says nothing about an anchored lesion's
    chains = [s for s, _ in samples if s.question_type == "chain"]
    assert all(sum(les["intensity"] == "bright" for les in s.meta["lesions"]) * 2 == s.meta["n_lesions"]
               for s in chains)  # fmt: skip
