"""When two answers say the same thing: canonical tokens, content words and lengths.

The judge (`medlvr.eval.answers`) compares answers as a careful reader would, yet
deterministically and never by similarity: each answer is rewritten into canonical
tokens, and two answers match only when their canonical content is *equal*. Nothing
here accepts an answer because it contains the gold among other words, so a response
that lists every candidate never matches (the RL reward must not be exploitable).

`canonical_tokens(text)`, from `normalize_text` (lower case, punctuation and articles
dropped, number words as digits, numbers in one form), then:

1. a number glued to its unit is split ("4mm" -> "4 mm") and unit words are
   abbreviated ("millimetres" -> "mm");
2. phrases with one meaning take one spelling (`PHRASES`): imaging modalities
   ("x ray", "xray", "radiograph", "plain film" -> "xray"; "computed tomography",
   "ct scan" -> "ct"; "magnetic resonance imaging", "mr" -> "mri"), MR weightings
   ("t2 weighted" -> "t2"), a few anatomical abbreviations ("inferior vena cava" ->
   "ivc", "right upper lobe" -> "rul"), ordinals ("fourth" -> "4th");
3. each word is spelled the American way ("oedema" -> "edema", "grey" -> "gray",
   "haemorrhage" -> "hemorrhage", "tumour" -> "tumor") and in the singular
   ("kidneys" -> "kidney", "arteries" -> "artery", "masses" -> "mass");
4. a length (a number and mm/cm/m/um) becomes one token in millimetres, so
   "0.4 cm" == "4 mm" and "5 cm" != "5 mm".

`content(tokens)` drops the words that carry no answer (`FILLER`: "it is", "the
image shows", "side", "seen", prepositions); negations ("no", "not", "without")
stay. Two answers are the same when their content tokens are equal, in order
(`same_content`): "The lesion is on the right side." == "right" once the question's
own words are set aside (see `medlvr.eval.answers`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation

__all__ = [
    "FILLER",
    "PHRASES",
    "canonical_tokens",
    "content",
    "normalize_text",
    "same_content",
]

# --------------------------------------------------------------------------- normalisation

_NUMBER_UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = {
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(_NUMBER_UNITS)} | {
    w: str(v) for w, v in _TENS.items()
}
_COMPOUND = re.compile(
    r"\b(" + "|".join(_TENS) + r")[\s-]+(" + "|".join(_NUMBER_UNITS[1:10]) + r")\b"
)
_ARTICLES = {"a", "an", "the"}


def normalize_text(text: str) -> str:
    """Lower-case, strip punctuation, drop articles, fold whitespace, number words -> digits.

    >>> normalize_text("The  Left-sided, TWO lesions.")
    'left sided 2 lesions'
    >>> normalize_text("twenty-one") == normalize_text("21")
    True

    Decimal points and thousands separators inside numbers are kept ("2.5",
    "1,000" -> "1000"); every other punctuation mark becomes a space, so
    "x-ray" == "x ray". Numbers take one canonical form (`_canonical_number`).
    """
    s = unicodedata.normalize("NFKC", str(text)).casefold()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = _COMPOUND.sub(lambda m: str(_TENS[m.group(1)] + _NUMBER_UNITS.index(m.group(2))), s)
    s = re.sub(r"(?<![\w.])\.(?=\d)", "0.", s)  # ".5 cm" is 0.5 cm, not 5 cm
    s = re.sub(r"\.(?!\d)|(?<!\d)\.", " ", s)  # keep only decimal points
    s = re.sub(r"[^\w\s.]|_", " ", s)
    tokens = [_canonical_number(_NUMBER_WORDS.get(t, t)) for t in s.split() if t not in _ARTICLES]
    return " ".join(tokens)


_DECIMAL = re.compile(r"\d+(?:\.\d+)?")


def _canonical_number(token: str) -> str:
    """A number's one spelling: no leading or trailing zeros ("02" -> "2", "2.50" -> "2.5", "2.0" -> "2")."""
    if not _DECIMAL.fullmatch(token):
        return token
    return format(Decimal(token).normalize(), "f")


# --------------------------------------------------------------------------- canonical tokens

# Phrase -> one spelling, longest first when applied. Keys are normalised token strings.
PHRASES: dict[str, str] = {
    # modalities
    "computed tomography scan": "ct",
    "computed tomography": "ct",
    "computerized tomography": "ct",
    "computerised tomography": "ct",
    "cat scan": "ct",
    "ct scan": "ct",
    "ct image": "ct",
    "magnetic resonance imaging": "mri",
    "magnetic resonance image": "mri",
    "magnetic resonance": "mri",
    "mri scan": "mri",
    "mri image": "mri",
    "mr": "mri",
    "x ray": "xray",
    "x rays": "xray",
    "xrays": "xray",
    "plain radiograph": "xray",
    "plain film": "xray",
    "plain x ray": "xray",
    "radiograph": "xray",
    "radiographs": "xray",
    "radiography": "xray",
    "roentgenogram": "xray",
    "xr": "xray",
    "ultrasonography": "ultrasound",
    "sonography": "ultrasound",
    "sonogram": "ultrasound",
    "ultrasound scan": "ultrasound",
    # MR weightings and sequences
    "t1 weighted": "t1",
    "t2 weighted": "t2",
    "t1w": "t1",
    "t2w": "t2",
    "fluid attenuated inversion recovery": "flair",
    "diffusion weighted imaging": "dwi",
    "diffusion weighted": "dwi",
    # anatomy written out or abbreviated
    "inferior vena cava": "ivc",
    "superior vena cava": "svc",
    "right upper lobe": "rul",
    "right middle lobe": "rml",
    "right lower lobe": "rll",
    "left upper lobe": "lul",
    "left lower lobe": "lll",
    "upper right lobe": "rul",
    "lower right lobe": "rll",
    "upper left lobe": "lul",
    "lower left lobe": "lll",
    "gall bladder": "gallbladder",
    "pancreatic head": "head pancreas",
    "cerebrospinal fluid": "csf",
    "anteroposterior": "ap",
    "posteroanterior": "pa",
    "posterior anterior": "pa",
    "anterior posterior": "ap",
    # sex
    "woman": "female",
    "women": "female",
    "man": "male",
    "men": "male",
    # ordinals and counts
    "first": "1st",
    "second": "2nd",
    "third": "3rd",
    "fourth": "4th",
    "fifth": "5th",
    "sixth": "6th",
    "seventh": "7th",
    "eighth": "8th",
    "ninth": "9th",
    "tenth": "10th",
    "single": "1",
    # normal
    "unremarkable": "normal",
    "within normal limits": "normal",
}
_PHRASE_RE = re.compile(
    r"(?<!\S)("
    + "|".join(re.escape(p) for p in sorted(PHRASES, key=len, reverse=True))
    + r")(?!\S)"
)

# Whole-word British -> American spellings, and British stems in medical words.
_WORDS = {
    "grey": "gray",
    "greyish": "grayish",
    "colour": "color",
    "tumour": "tumor",
    "tumours": "tumors",
    "centre": "center",
    "fibre": "fiber",
    "fibres": "fibers",
    "litre": "liter",
    "calibre": "caliber",
    "sulphate": "sulfate",
    "aluminium": "aluminum",
}
_STEMS = [
    (re.compile(r"^oedem"), "edem"),
    (re.compile(r"^oesophag"), "esophag"),
    (re.compile(r"^foet"), "fet"),
    (re.compile(r"^oestr"), "estr"),
    (re.compile(r"^(an|)aem"), r"\1em"),  # anaemia
    (re.compile(r"haem"), "hem"),  # haemorrhage, haematoma, haemangioma, haemothorax
    (re.compile(r"^paed"), "ped"),
    (re.compile(r"^orthopaed"), "orthoped"),
    (re.compile(r"ischaem"), "ischem"),
    (re.compile(r"leukaem"), "leukem"),
    (re.compile(r"^caec"), "cec"),
    (re.compile(r"diarrhoe"), "diarrhe"),
    (re.compile(r"(?<=\w)is(ed|ing|ation)$"), r"iz\1"),  # localised, calcification stays
]

_UNITS = {
    "mm": "mm",
    "millimeter": "mm",
    "millimeters": "mm",
    "millimetre": "mm",
    "millimetres": "mm",
    "cm": "cm",
    "centimeter": "cm",
    "centimeters": "cm",
    "centimetre": "cm",
    "centimetres": "cm",
    "m": "m",
    "meter": "m",
    "meters": "m",
    "metre": "m",
    "metres": "m",
    "um": "um",
    "µm": "um",
    "micrometer": "um",
    "micrometers": "um",
    "micron": "um",
    "microns": "um",
}
_MM_PER = {"mm": Decimal(1), "cm": Decimal(10), "m": Decimal(1000), "um": Decimal("0.001")}
_GLUED = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)([a-zµ]+)(?!\S)")

# Words that end in s but are not plurals (kept as they are).
_SINGULAR_S = {
    "pelvis",
    "sinus",
    "bronchus",
    "uterus",
    "fetus",
    "thorax",
    "stenosis",
    "fibrosis",
    "sclerosis",
    "necrosis",
    "diagnosis",
    "metastasis",
    "ascites",
    "pancreas",
    "corpus",
    "calculus",
    "humerus",
    "radius",
    "thalamus",
    "hypothalamus",
    "hippocampus",
    "plexus",
    "status",
    "virus",
    "anus",
    "iris",
    "glottis",
    "epiglottis",
    "trachelis",
    "mucus",
    "meningitis",
    "abscess",
    "mass",
    "process",
    "gas",
    "lens",
    "axis",
    "this",
    "its",
    "does",
    "is",
    "was",
    "has",
    "yes",
    "us",
    "as",
    "less",
    "versus",
    "vs",
    "bilateral",
}


def _singular(word: str) -> str:
    """A plural noun in the singular; words that only end in s are left alone."""
    if len(word) <= 3 or not word.endswith("s") or word in _SINGULAR_S:
        return word
    if word.endswith(("itis", "osis", "asis", "esis", "ysis", "us", "ss", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    return word[:-1]


def _american(word: str) -> str:
    word = _WORDS.get(word, word)
    for pattern, repl in _STEMS:
        word = pattern.sub(repl, word)
    return word


def _lengths(tokens: list[str]) -> list[str]:
    """A number followed by a length unit -> one token, the length in millimetres."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        unit = _UNITS.get(tokens[i + 1]) if i + 1 < len(tokens) else None
        if _DECIMAL.fullmatch(t) and unit is not None:
            try:
                mm = Decimal(t) * _MM_PER[unit]
            except InvalidOperation:  # pragma: no cover - the pattern only lets numbers through
                mm = None
            if mm is not None:
                out.append(f"{format(mm.normalize(), 'f')}mm")
                i += 2
                continue
        out.append(t)
        i += 1
    return out


def canonical_tokens(text: str) -> list[str]:
    """The answer's words in one spelling each (see the module docstring).

    >>> canonical_tokens("Computed tomography")
    ['ct']
    >>> canonical_tokens("0.4 cm") == canonical_tokens("4mm")
    True
    """
    s = normalize_text(text)
    s = _GLUED.sub(
        lambda m: f"{m.group(1)} {m.group(2)}" if m.group(2) in _UNITS else m.group(0), s
    )
    s = re.sub(r"(?<!\S)non (?=[a-z])", "non", s)  # "non-displaced" == "nondisplaced"
    words = [_american(_singular(w)) for w in s.split()]
    s = _PHRASE_RE.sub(lambda m: PHRASES[m.group(1)], " ".join(words))
    s = _PHRASE_RE.sub(lambda m: PHRASES[m.group(1)], s)  # "x rays" -> "x ray" -> "xray"
    return _lengths(s.split())


FILLER = frozenset({
    "it", "its", "is", "are", "was", "were", "be", "been", "being", "am", "this", "that",
    "these", "those", "there", "here", "s", "i", "we", "you", "answer", "final", "image",
    "images", "picture", "scan", "shows", "show", "showing", "shown", "seen", "visible",
    "noted", "identified", "appears", "appear", "looks", "look", "demonstrates", "demonstrated",
    "reveals", "revealed", "located", "location", "in", "on", "at", "of", "to", "for", "from",
    "within", "into", "by", "side", "sided", "region", "area", "just", "measure", "measures",
    "measuring", "about", "approximately", "around", "roughly",
})  # fmt: skip
"""Words that carry no answer: sentence frames ("it is", "the image shows"), prepositions,
"side" ("right side" == "right"). Negations are not filler."""


def content(tokens: Iterable[str], drop: Iterable[str] = ()) -> list[str]:
    """`tokens` without `FILLER` and without the words in `drop` (e.g. the question's own words)."""
    skip = FILLER | set(drop)
    return [t for t in tokens if t not in skip]


def same_content(a: Sequence[str], b: Sequence[str]) -> bool:
    """The same words in the same order, both non-empty; a word repeated at once counts once
    ("computed tomography (CT)" == "CT"). Order matters: "upper left: round; center: cross" is
    not "upper left: cross; center: round" (word order is folded only inside `PHRASES`:
    "upper right lobe" == "right upper lobe")."""
    return bool(a) and _once(a) == _once(b)


def _once(words: Sequence[str]) -> list[str]:
    return [w for i, w in enumerate(words) if i == 0 or w != words[i - 1]]
