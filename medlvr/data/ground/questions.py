"""Question templates over annotated regions, and the coarse position scheme their answers use.

Every question depends only on what the annotation says. Five question types:

- presence  "Is there any <finding> in this image?"  yes / no (negatives from images known not to
            have it; the builder balances yes and no per finding and split)
- location  "Where is the <finding> in this image?"  a choice among coarse positions (below); only
            when the image has exactly one region of the finding
- count     "How many <finding> regions are there in this image?"  the number of regions
- size      "Which is larger in this image, the <a> or the <b>?"  a choice between two findings
            with one region each whose areas differ by at least a factor (default 1.5)
- grounding "Which region of this image shows <phrase>?"  a choice among coarse positions, for
            releases with a phrase per box (MS-CXR); the phrase's boxes are the ROIs

Coarse position: the box centre on a 3 x 3 grid of the image, rows upper / middle / lower and
columns left / center / right split at thirds; "center" for the middle cell, else "<row> <col>"
("upper left", "middle right", "lower center"). Left and right are the viewer's (image) sides by
default; with `sides="patient"` they are the patient's, i.e. mirrored, as for frontal chest
films and axial CT/MRI shown in radiological convention (the patient's right on the image left).
The answer is never stated by the question: when a finding's name or a phrase names a side
("left kidney", "right basilar opacity") the options cover only the height, when it names a
height ("apical", "lower lobe") only the side, and when it names both no such question is asked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from medlvr.data.ground.annotations import Box
from medlvr.data.schema import LETTERS

QUESTION_TYPES = ("presence", "location", "count", "size", "grounding")
Sides = Literal["image", "patient"]

ROWS = ("upper", "middle", "lower")
COLS = ("left", "center", "right")
# Words that state where a finding is: a question containing one must not be answered with it.
SIDE_WORDS = frozenset({"left", "right", "bilateral", "bilaterally"})
HEIGHT_WORDS = frozenset({
    "upper", "lower", "mid", "middle", "apical", "apex", "apices", "basal", "base", "bases", "basilar",
    "bibasilar", "superior", "inferior", "top", "bottom",
})  # fmt: skip
PATIENT_SIDES_NOTE = " Left and right are the patient's sides."


def display_name(label: str) -> str:
    """A label as it reads inside a question: capitalised words lower-cased, acronyms kept
    ("Nodule/Mass" -> "nodule/mass", "Enlarged PA" -> "enlarged PA", "ILD" -> "ILD")."""
    return re.sub(
        r"[A-Za-z]+",
        lambda m: (
            m.group().lower() if m.group()[1:].islower() or len(m.group()) == 1 else m.group()
        ),
        label.strip(),
    )


def named_axes(text: str) -> tuple[bool, bool]:
    """(names a side, names a height) for the words of `text`."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return bool(words & SIDE_WORDS), bool(words & HEIGHT_WORDS)


def cell(box: Box, width: int, height: int, sides: Sides) -> tuple[str, str]:
    """(row, column) words of the box centre on the 3 x 3 grid."""
    cx = (box[0] + box[2]) / 2 / width
    cy = (box[1] + box[3]) / 2 / height
    col = min(int(cx * 3), 2)
    if sides == "patient":
        col = 2 - col
    return ROWS[min(int(cy * 3), 2)], COLS[col]


def position_text(row: str, col: str) -> str:
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


GRID = tuple(position_text(r, c) for r in ROWS for c in COLS)


def position_choice(
    boxes: Sequence[Box], width: int, height: int, sides: Sides, named: tuple[bool, bool]
) -> tuple[dict[str, str], str] | None:
    """(options, answer letter) for where `boxes` are, on the axes `named` leaves open; None when
    the name states both axes or the boxes fall in different places on an open axis."""
    names_side, names_height = named
    if names_side and names_height:
        return None
    cells = {cell(b, width, height, sides) for b in boxes}
    rows, cols = {r for r, _ in cells}, {c for _, c in cells}
    choices: tuple[str, ...]
    if names_side:
        choices, answer = ROWS, rows
    elif names_height:
        choices, answer = COLS, cols
    else:
        choices, answer = GRID, {position_text(r, c) for r, c in cells}
    if len(answer) != 1:
        return None
    options = {LETTERS[i]: c for i, c in enumerate(choices)}
    return options, LETTERS[choices.index(answer.pop())]


def presence_question(name: str) -> str:
    return f"Is there any {name} in this image?"


def location_question(name: str, options: dict[str, str], sides: Sides) -> str:
    return f"Where is the {name} in this image?" + _sides_note(options, sides)


def count_question(name: str) -> str:
    return f"How many {name} regions are there in this image?"


def size_question(a: str, b: str) -> str:
    return f"Which is larger in this image, the {a} or the {b}?"


def grounding_question(phrase: str, options: dict[str, str], sides: Sides) -> str:
    return f"Which region of this image shows {display_name(phrase).rstrip('.')}?" + _sides_note(
        options, sides
    )


def _sides_note(options: dict[str, str], sides: Sides) -> str:
    mentions_sides = any(w in ("left", "right") for o in options.values() for w in o.split())
    return PATIENT_SIDES_NOTE if sides == "patient" and mentions_sides else ""
