"""Deterministic answer extraction and normalisation, shared by every dataset and mode.

One documented parser is the whole point (BENCHMARKS.md, "Scoring
conventions"): the same model's numbers swing by many points between public
kits because each parses differently, and several kits map an unparseable
answer to the most similar or a random option. Here an answer that does not
parse is *invalid* (scored wrong and counted), never guessed.

Rules, applied in this order by `parse_answer`:

1. **Extract a span** from the response (`_extract_span`):
   a. special tokens `<|...|>` are dropped;
   b. the content of the last complete `<answer>...</answer>` tag; if the last
      tag is opened but never closed (a truncated generation), the text after it;
   c. otherwise, reasoning is skipped: only the text after the last `</think>`
      counts for the rules below;
   d. the content of the last `\\boxed{...}` (braces balanced; `\\text{}`-style
      wrappers removed);
   e. the text after the last answer marker ("Answer:", "The answer is",
      "Final answer:", "The correct answer is", ...), up to the end of its line;
   f. the whole (remaining) response.
   An empty span is invalid (`how="...:empty"`).
2. **Interpret the span** by question kind:
   - *choice* (`answer_type == "choice"`), value = an option letter:
     i.   the span is a bare letter: "B", "(b)", "B.", "[C]", "**D**";
     ii.  a letter followed by an option's text ("B. Pleural effusion",
          "(B) Pleural effusion"): that letter if the text is its own option's,
          invalid if it is another option's (a contradiction);
     iii. the normalised span equals the normalised text of exactly one option
          ("Pneumonia" -> the letter of that option; an option text such as
          "Vitamin D" is read as text, not as the letter D);
     iv.  otherwise the span is scanned for standalone option letters, after
          masking the options' texts: an upper-case letter standing alone
          ("B", "(B)", "B.", "B)"), a parenthesised lower-case one "(c)", or
          any letter after "option"/"choice". A letter inside a word or joined
          by a hyphen, digit, apostrophe or dot ("CT", "Bone", "B-mode",
          "B12", "A's", "U.S.") does not count, nor does the article "A" before
          a lower-case word or a number ("A mass is seen", "A 45-year-old").
          Letters that are not options are ignored. Exactly one distinct
          letter -> that letter; several ("A and B") -> invalid; none ->
          invalid (a similar-looking text is never mapped to an option).
   - *yes/no* (`answer_type == "closed"` and the gold normalises to yes or no,
     whatever its case and punctuation: "Yes", "Yes."; `yes_no_question`, the
     one definition the prompt uses too), value = "yes"/"no": the words "yes"
     and "no" are looked for in the span only; one of them -> it; both or
     neither -> invalid.
   - *open and other closed questions* ("MRI or CT?" -> "MRI"), value = the
     normalised span (`normalize_text`); empty after normalisation -> invalid.

`normalize_text` follows the SQuAD/VQA answer normalisation (lower-case,
punctuation stripped, articles removed, whitespace folded) and adds number
words -> digits ("two" -> "2", up to ninety-nine) so that VQA-RAD's integer
answers match either spelling. Numbers are compared as numbers: each is
written in one canonical form (".5" -> "0.5", "2.0" -> "2", "02" -> "2"), so
a wrong "5 cm" never matches a gold ".5 cm".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from medlvr.data.schema import VQASample

__all__ = [
    "Parsed",
    "AnswerKey",
    "answer_key",
    "parse_answer",
    "normalize_text",
    "is_yes_no",
    "yes_no_question",
]


@dataclass(frozen=True)
class Parsed:
    """The parser's reading of one response.

    `value` is an option letter (choice), "yes"/"no" (yes/no questions) or the
    normalised answer text (open), and None when `invalid`. `how` names the
    span source and the rule, `"<source>:<rule>"`: source in tag, boxed,
    marker, full; rule in letter, option_text, yes_no, text, or for invalid
    answers empty, several_letters, no_match, not_an_option,
    letter_text_conflict, ambiguous_option_text, both_yes_no. `span` is the
    extracted text the rule looked at (for debugging reports).
    """

    value: str | None
    invalid: bool
    how: str
    span: str = ""


@dataclass(frozen=True)
class AnswerKey:
    """What the parser needs to know about a question: its kind, options and gold."""

    answer_type: str
    gold: str
    options: dict[str, str] = field(default_factory=dict)


def answer_key(sample_or_fields: VQASample | Mapping[str, Any] | AnswerKey) -> AnswerKey:
    """An `AnswerKey` from a `VQASample`, an `AnswerKey` or a mapping.

    A mapping needs `answer_type` and either `gold` or (`answer`, and
    `answer_letter` for choice questions); `options` is optional (without it
    choice answers can only be read as letters). This lets prediction rows be
    re-scored without the dataset.
    """
    if isinstance(sample_or_fields, AnswerKey):
        return sample_or_fields
    if isinstance(sample_or_fields, VQASample):
        s = sample_or_fields
        return AnswerKey(s.answer_type, s.gold, dict(s.options))
    f = sample_or_fields
    answer_type = str(f["answer_type"]).strip().lower()
    if answer_type not in ("closed", "open", "choice"):
        raise ValueError(f"answer_type must be closed, open or choice, got {f['answer_type']!r}")
    if "gold" in f and f["gold"] is not None:
        gold = f["gold"]
    elif answer_type == "choice":
        gold = f.get("answer_letter")
    else:
        gold = f.get("answer")
    if gold is None:
        raise ValueError(
            "the fields need `gold`, or `answer` (and `answer_letter` for choice questions)"
        )
    options = {str(k).strip().upper(): str(v) for k, v in (f.get("options") or {}).items()}
    return AnswerKey(answer_type, str(gold).strip(), options)


# --------------------------------------------------------------------------- normalisation

_UNITS = [
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
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(_UNITS)} | {w: str(v) for w, v in _TENS.items()}
_COMPOUND = re.compile(r"\b(" + "|".join(_TENS) + r")[\s-]+(" + "|".join(_UNITS[1:10]) + r")\b")
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
    s = _COMPOUND.sub(lambda m: str(_TENS[m.group(1)] + _UNITS.index(m.group(2))), s)
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


def is_yes_no(gold: str) -> bool:
    """Whether a gold answer is yes or no, whatever its case and punctuation (SLAKE writes "Yes")."""
    return normalize_text(gold) in ("yes", "no")


def yes_no_question(sample_or_fields: VQASample | Mapping[str, Any] | AnswerKey) -> bool:
    """A closed question whose gold is yes or no: the one definition of a yes/no question.

    The prompt (`medlvr.data.prompts`, "Please answer 'yes' or 'no'.") and the scorer
    both use it, so a question is scored as yes/no exactly when it was asked as one.
    """
    key = answer_key(sample_or_fields)
    return key.answer_type == "closed" and is_yes_no(key.gold)


# --------------------------------------------------------------------------- span extraction

_SPECIAL = re.compile(r"<\|[^|<>]*\|>")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)
_THINK_END = re.compile(r"</think>", re.IGNORECASE)
_MARKER = re.compile(
    r"(?:\bfinal\s+answer|\b(?:the\s+)?(?:correct\s+|best\s+|right\s+)?answer)"
    r"(?:\s*:|\s+(?:is|would\s+be|should\s+be|will\s+be)\b\s*:?)",
    re.IGNORECASE,
)
_LATEX_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|rm|bf)\s*\{([^{}]*)\}")


def _last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}`, braces balanced."""
    for start in reversed([m.end() for m in re.finditer(r"\\boxed\s*\{", text)]):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    inner = text[start:i]
                    while True:  # \text{B} -> B, possibly nested
                        unwrapped = _LATEX_WRAP.sub(r"\1", inner)
                        if unwrapped == inner:
                            return inner
                        inner = unwrapped
    return None


def _extract_span(response: str) -> tuple[str, str]:
    """(source, span) following rule 1 of the module docstring."""
    text = _SPECIAL.sub(" ", response or "")
    tags = _TAG.findall(text)
    opens = list(_OPEN_TAG.finditer(text))
    last_open = opens[-1] if opens else None
    if last_open is not None:
        closed_after = re.search(r"</answer>", text[last_open.end() :], re.IGNORECASE)
        if closed_after is None:  # truncated generation inside the final tag
            return "tag", text[last_open.end() :].strip()
    if tags:
        return "tag", tags[-1].strip()
    parts = _THINK_END.split(text)
    text = parts[-1]
    boxed = _last_boxed(text)
    if boxed is not None:
        return "boxed", boxed.strip()
    markers = list(_MARKER.finditer(text))
    if markers:
        rest = text[markers[-1].end() :].lstrip()
        return "marker", rest.split("\n", 1)[0].strip()
    return "full", text.strip()


# --------------------------------------------------------------------------- choice letters

_DECOR = " \t\r\n*_`'\"“”‘’"
_BARE_LETTER = re.compile(
    r"^(?:option|choice)?\s*[\(\[]?\s*([A-Ja-j])\s*[\)\]]?\s*[.:)]?$", re.IGNORECASE
)
_LEADING_LETTER = re.compile(r"^(?:[\(\[]([A-Ja-j])[\)\]]|([A-Ja-j])[.:)])\s*(.+)$", re.DOTALL)
# Words after which a capital "A" is a letter, not the article ("A and B", "A is correct").
_AFTER_LETTER = {
    "and",
    "or",
    "nor",
    "is",
    "was",
    "are",
    "seems",
    "appears",
    "looks",
    "would",
    "could",
    "should",
    "must",
    "might",
    "because",
    "since",
    "as",
    "vs",
    "versus",
    "then",
    "than",
    "best",
    "fits",
    "matches",
    "corresponds",
    "remains",
    "through",
    "to",
}
_CAPITAL = re.compile(r"(?<![\w\-'’.])([A-J])(?![\w\-'’])(?!\.\w)")
_PAREN_LOWER = re.compile(r"[\(\[]([a-j])[\)\]]")
_NAMED = re.compile(r"\b(?:option|choice)\s*[\(\[]?([A-Ja-j])(?![\w\-'’])", re.IGNORECASE)


def _letters_in(span: str, options: Mapping[str, str]) -> set[str]:
    """Distinct standalone option letters in a span whose option texts are already masked."""
    found: set[str] = set()
    for m in _CAPITAL.finditer(span):
        letter = m.group(1)
        if letter == "A":
            nxt = re.match(r" ([a-z0-9][\w-]*)", span[m.end() :])
            if nxt and nxt.group(1) not in _AFTER_LETTER:
                continue  # the article: "A mass is seen"
        found.add(letter)
    found.update(m.group(1).upper() for m in _PAREN_LOWER.finditer(span))
    found.update(m.group(1).upper() for m in _NAMED.finditer(span))
    return {x for x in found if x in options} if options else found


def _mask_options(span: str, options: Mapping[str, str]) -> str:
    """Replace option texts (longest first) by a neutral mark so "Hepatitis B" is no letter B."""
    for text in sorted(options.values(), key=len, reverse=True):
        t = text.strip()
        if len(t) >= 2:
            span = re.sub(r"(?<!\w)" + re.escape(t) + r"(?!\w)", " § ", span, flags=re.IGNORECASE)
    return span


def _option_by_text(text: str, options: Mapping[str, str]) -> list[str]:
    norm = normalize_text(text)
    if not norm:
        return []
    return [k for k, v in options.items() if normalize_text(v) == norm]


def _parse_choice(span: str, options: Mapping[str, str]) -> tuple[str | None, str]:
    core = span.strip(_DECOR)
    bare = _BARE_LETTER.match(core)
    if bare:
        letter = bare.group(1).upper()
        if options and letter not in options:
            return None, "not_an_option"
        return letter, "letter"
    lead = _LEADING_LETTER.match(core)
    if lead:  # "B. Pleural effusion": the text must not name another option
        letter = (lead.group(1) or lead.group(2)).upper()
        claimed = _option_by_text(lead.group(3), options)
        if claimed:
            return (letter, "letter") if letter in claimed else (None, "letter_text_conflict")
    by_text = _option_by_text(core, options)
    if len(by_text) == 1:
        return by_text[0], "option_text"
    if len(by_text) > 1:
        return None, "ambiguous_option_text"
    letters = _letters_in(_mask_options(span, options), options)
    if len(letters) == 1:
        return letters.pop(), "letter"
    if len(letters) > 1:
        return None, "several_letters"
    return None, "no_match"


# --------------------------------------------------------------------------- entry point

_YES = re.compile(r"\byes\b", re.IGNORECASE)
_NO = re.compile(r"\bno\b", re.IGNORECASE)


def parse_answer(
    response: str, sample_or_fields: VQASample | Mapping[str, Any] | AnswerKey
) -> Parsed:
    """Read a model response as an answer to a question; see the module docstring for the rules.

    `sample_or_fields` is a `VQASample`, an `AnswerKey` or a mapping (see
    `answer_key`). Deterministic, never guesses: a response that does not
    parse gives `Parsed(None, True, how)`.
    """
    key = answer_key(sample_or_fields)
    source, span = _extract_span(response)
    if not span.strip(_DECOR):
        return Parsed(None, True, f"{source}:empty", span)
    if key.answer_type == "choice":
        value, rule = _parse_choice(span, key.options)
    elif yes_no_question(key):
        yes, no = bool(_YES.search(span)), bool(_NO.search(span))
        if yes and no:
            value, rule = None, "both_yes_no"
        elif yes or no:
            value, rule = ("yes" if yes else "no"), "yes_no"
        else:
            value, rule = None, "no_match"
    else:
        value = normalize_text(span) or None
        rule = "text" if value else "empty"
    return Parsed(value, value is None, f"{source}:{rule}", span)
