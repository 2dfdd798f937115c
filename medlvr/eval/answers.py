"""The judge: deterministic answer extraction and reading, shared by every dataset and mode.

One documented judge is the whole point (`docs/scoring.md`): the same model's
numbers swing by many points between public kits because each parses
differently, and several kits map an unparseable answer to the most similar or
a random option. Here an answer is read as a careful reader would, but by fixed
rules: an answer that does not parse is *invalid* (scored wrong and counted),
never guessed, and no rule rewards a response for naming several answers, so
the RL reward (`medlvr.eval.metrics.accuracy_reward`) cannot be gamed by
hedging or by listing every option.

Rules, applied in this order by `parse_answer` (`judge` then says right or wrong):

1. **Extract a span** from the response (`_extract_span`):
   a. special tokens `<|...|>` are dropped;
   b. the content of the last complete `<answer>...</answer>` tag; if the last
      tag is opened but never closed (a truncated generation), the text after it;
   c. otherwise, reasoning is skipped: only the text after the last `</think>`
      counts for the rules below; a `<think>` that is never closed holds no
      answer (`think:unfinished`, invalid), whatever it says along the way;
   d. the content of the last `\\boxed{...}` (braces balanced; `\\text{}`-style
      wrappers removed);
   e. the text after the last answer marker ("Answer:", "The answer is",
      "Final answer:", "The correct answer is", ...), up to the end of its line;
   f. the whole (remaining) response.
   An empty span is invalid (`how="...:empty"`).
2. **Read the span** by question kind:
   - *choice* (`answer_type == "choice"`), value = an option letter:
     i.   the span is a bare letter: "B", "(b)", "B.", "[C]", "**D**";
     ii.  a letter followed by an option's text ("B. Pleural effusion",
          "(B) Pleural effusion"): that letter if the text is its own option's,
          invalid if it is another option's (a contradiction);
     iii. the normalised span equals the normalised text of exactly one option
          ("Pneumonia" -> the letter of that option; an option text such as
          "Vitamin D" is read as text, not as the letter D);
     iv.  standalone option letters in the span, after masking the options'
          texts: an upper-case letter standing alone ("B", "(B)", "B.", "B)"),
          a parenthesised lower-case one "(c)", or any letter after
          "option"/"choice". A letter inside a word or joined by a hyphen,
          digit, apostrophe or dot ("CT", "Bone", "B-mode", "B12", "A's",
          "U.S.") does not count, nor does the article "A" before a lower-case
          word or a number ("A mass is seen"). Letters that are not options are
          ignored. Exactly one distinct letter -> that letter; several ("A and
          B") -> invalid;
     v.   no letter: the option the span *names* (`_named_option`): an option
          whose canonical words (`medlvr.eval.equivalence`: "Computed
          tomography" is "CT", "effusions" is "effusion") all occur in the span
          ("The left lung is involved." names "Left lung"), or else the one
          option holding every word of a short span ("Effusion"). Exactly one
          option, and no word that belongs only to another option ("Pneumonia
          or effusion" names two) -> that letter; otherwise invalid (a
          similar-looking text is never mapped to an option).
   - *yes/no* (`answer_type == "closed"` and the gold normalises to yes or no,
     whatever its case and punctuation: "Yes", "Yes."; `yes_no_question`, the
     one definition the prompt uses too), value = "yes"/"no" (`_read_yes_no`):
     a hedge ("I cannot tell", "possibly", "maybe", "might") -> invalid; the
     words "yes" and "no" as answers (a leading "No ...", or a "no" ending a
     clause: "Yes, there is no fracture" answers yes) -> that one, both ->
     invalid; without them, each clause's polarity: a negation ("not seen",
     "absent", "negative for effusion", "none") or an affirmation ("present",
     "there is a left pleural effusion", "The heart is enlarged." to "Is the
     heart enlarged?"), where a clause counts only if it is bare ("Absent") or
     about the question (it names every word the question asks about, or only
     words of the question); "normal" answers "abnormal?" with no. Clauses of
     both polarities ("present or absent") -> invalid; none -> invalid.
   - *a question naming its alternatives* ("Is this a CT or an MRI?", "Is the
     lesion on the left or right?", "... T1, T2, or FLAIR?"), whose gold is one
     of them, value = the alternative picked (`_alternatives`): the one
     alternative the span names, skipping one named after "not" ("It is an MRI,
     not a CT"); several, or "both" when both is no alternative -> invalid.
   - *open and other closed questions*, value = the normalised span
     (`normalize_text`); empty after normalisation -> invalid.
3. **Judge** (`judge`): choice and yes/no by value; alternatives by the gold's
   alternative; open answers when their canonical content words are equal
   (`medlvr.eval.equivalence`: "4mm" == "0.4 cm", "kidneys" == "kidney",
   "oedema" == "edema", "X-ray" == "radiograph", "The right lung" == "Right
   lung"), first with the question's own words set aside ("Right" answers
   "Which lung is abnormal?" with gold "Right lung"), then without. Never by
   containment: "liver, spleen, kidney" is not "liver".

`normalize_text` follows the SQuAD/VQA answer normalisation (lower-case,
punctuation stripped, articles removed, whitespace folded) and adds number
words -> digits ("two" -> "2", up to ninety-nine) so that VQA-RAD's integer
answers match either spelling. Numbers are compared as numbers: each is
written in one canonical form (".5" -> "0.5", "2.0" -> "2", "02" -> "2"), so
a wrong "5 cm" never matches a gold ".5 cm".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medlvr.data.schema import VQASample
from medlvr.eval.equivalence import FILLER, canonical_tokens, content, normalize_text, same_content

__all__ = [
    "AnswerKey",
    "Parsed",
    "answer_key",
    "is_yes_no",
    "judge",
    "normalize_text",
    "parse_answer",
    "same_answer",
    "yes_no_question",
]


@dataclass(frozen=True)
class Parsed:
    """The parser's reading of one response.

    `value` is an option letter (choice), "yes"/"no" (yes/no questions), the
    alternative picked (questions naming their alternatives, in canonical form:
    "mri") or the normalised answer text (open), and None when `invalid`. `how`
    names the span source and the rule, `"<source>:<rule>"`: source in tag,
    think, boxed, marker, full; rule in letter, option_text, yes_no,
    alternative, text, or for invalid answers empty, unfinished,
    several_letters, several_options, no_match, not_an_option,
    letter_text_conflict, ambiguous_option_text, both_yes_no, hedge,
    several_alternatives. `span` is the extracted text the rule looked at (for
    debugging reports).
    """

    value: str | None
    invalid: bool
    how: str
    span: str = ""


@dataclass(frozen=True)
class AnswerKey:
    """What the judge needs to know about a question: its kind, gold, options and wording.

    `question` is optional; without it yes/no answers must use the words and
    alternatives named by the question are not recognised.
    """

    answer_type: str
    gold: str
    options: dict[str, str] = field(default_factory=dict)
    question: str = ""


def answer_key(sample_or_fields: VQASample | Mapping[str, Any] | AnswerKey) -> AnswerKey:
    """An `AnswerKey` from a `VQASample`, an `AnswerKey` or a mapping.

    A mapping needs `answer_type` and either `gold` or (`answer`, and
    `answer_letter` for choice questions); `options` and `question` are
    optional (without options choice answers can only be read as letters). This
    lets prediction rows be re-scored without the dataset.
    """
    if isinstance(sample_or_fields, AnswerKey):
        return sample_or_fields
    if isinstance(sample_or_fields, VQASample):
        s = sample_or_fields
        return AnswerKey(s.answer_type, s.gold, dict(s.options), s.question)
    f = sample_or_fields
    if f.get("answer_type") is None:  # e.g. another kit's rows: the kind is the dataset's
        raise ValueError(
            "the fields need `answer_type` (closed, open or choice); for another kit's "
            "predictions use medlvr eval rescore with --data"
        )
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
    return AnswerKey(answer_type, str(gold).strip(), options, str(f.get("question") or ""))


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
_THINK_START = re.compile(r"<think>", re.IGNORECASE)
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
    opened = list(_THINK_START.finditer(text))
    if opened and not _THINK_END.search(text, opened[-1].end()):
        return "think", ""  # reasoning cut off before its end: no answer was given
    text = _THINK_END.split(text)[-1]
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
    return _named_option(span, options)


def _named_option(span: str, options: Mapping[str, str]) -> tuple[str | None, str]:
    """Rule 2.v: the one option whose words the span names, with no word of another option."""
    said = content(canonical_tokens(span))
    words = {k: content(canonical_tokens(v)) or canonical_tokens(v) for k, v in options.items()}
    named = [k for k, w in words.items() if w and set(w) <= set(said)]
    named = [k for k in named if not any(set(words[k]) < set(words[o]) for o in named)]
    if not named and said and len(said) <= 3:  # a short span inside one option: "Effusion"
        named = [k for k, w in words.items() if set(said) <= set(w)]
    if len(named) > 1:
        return None, "several_options"
    if not named:
        return None, "no_match"
    others = set().union(*(words[o] for o in words if o != named[0])) - set(words[named[0]])
    if others & set(said):  # "Pneumonia or effusion": a word only another option has
        return None, "several_options"
    return named[0], "option_text"


# --------------------------------------------------------------------------- yes/no

_HEDGE = re.compile(
    r"\b(?:can ?not|can't|don't|do not|unable to|not able to|hard to|difficult to)\s+(?:\w+\s+)?"
    r"(?:tell|say|determine|assess|evaluate|be determined|be assessed|be sure|decide|know)\b"
    r"|\b(?:not sure|unsure|uncertain|unclear|equivocal|indeterminate|inconclusive|possibly|"
    r"possible|maybe|perhaps|probably|might|may or may not|could be|cannot exclude|"
    r"can't exclude|not certain)\b",
    re.IGNORECASE,
)
_YES_WORD = re.compile(r"\byes\b", re.IGNORECASE)
# "no" as an answer: at the start of the span, or ending a clause ("Yes, no", "yes/no").
# A "no" before a noun inside a sentence ("there is no fracture") is a negation, not an answer.
_NO_WORD = re.compile(r"^\W*no\b|\bno\b(?=\s*(?:[.,;:!?/)\]]|$|or\b|and\b))", re.IGNORECASE)
_OR_WORD = re.compile(r"\bor\b|/", re.IGNORECASE)
_CLAUSE = re.compile(r"[.;,/]|\b(?:or|and|but|however|although|whereas)\b", re.IGNORECASE)
_NEGATORS = {"no", "not", "without", "never", "nor", "none", "nil", "absent", "absence", "negative"}
_NEGATION_PHRASE = re.compile(r"\bfree of\b|n't\b|\bruled out\b|\brule out\b", re.IGNORECASE)
_AFFIRM = {
    "present", "presence", "seen", "visible", "positive", "identified", "noted", "evident",
    "contain", "shows", "show", "demonstrated", "demonstrates", "there", "true", "correct",
    "affirmative", "indeed", "detected", "observed", "depicted", "included",
}  # fmt: skip
# Question words that only frame the question ("Is there any evidence of ..."), never its subject.
_QUESTION_FRAME = FILLER | {
    "do", "does", "did", "can", "could", "should", "would", "will", "has", "have", "had",
    "any", "evidence", "patient", "present", "presence", "visible", "seen", "contain", "include",
    "what", "which", "where", "how", "there", "identified", "noted", "evident", "see", "you",
    "appear", "appears", "look", "looks", "like", "finding", "findings", "study",
}  # fmt: skip
_ANTONYM_PREFIXES = ("ab", "un", "non", "in", "im", "dis", "a")


def _negated(a: str, b: str) -> bool:
    """`a` and `b` are a word and its negation ("normal"/"abnormal", "enhancing"/"nonenhancing")."""
    short, long_ = sorted((a, b), key=len)
    return any(long_ == p + short for p in _ANTONYM_PREFIXES) and len(short) > 3


def _clause_polarity(clause: str, question: list[str], focus: set[str]) -> str | None:
    """yes, no or None (the clause says nothing about the question) for a clause without yes/no."""
    tokens = canonical_tokens(clause)
    negative = bool(_NEGATORS & set(tokens)) or bool(_NEGATION_PHRASE.search(clause))
    affirm = bool(_AFFIRM & set(tokens))
    words = [t for t in content(tokens) if t not in _NEGATORS and t not in _AFFIRM]
    flipped = [w for w in words if any(_negated(w, q) for q in question)]  # "normal" to "abnormal?"
    rest = [w for w in words if w not in flipped]
    bare = not words and (negative or affirm)  # "Absent", "Not seen", "Present"
    restates = bool(words) and set(rest) <= set(question)  # "Enlarged", "The lung appears normal."
    names_all = bool(focus) and focus <= set(words)  # "Extensive fibrosis" to "Is there fibrosis?"
    if not (bare or restates or names_all):
        return None
    return "yes" if negative == (len(flipped) % 2 == 1) else "no"


def _read_yes_no(span: str, question: str) -> tuple[str | None, str]:
    if _HEDGE.search(span):
        return None, "hedge"
    yes, no = bool(_YES_WORD.search(span)), bool(_NO_WORD.search(span))
    if yes and no:
        return None, "both_yes_no"
    if yes or no:
        return ("yes" if yes else "no"), "yes_no"
    if _OR_WORD.search(span):  # "Fibrosis or necrosis", "present or absent": no committed answer
        return None, "hedge"
    q_tokens = canonical_tokens(question)
    focus = {t for t in q_tokens if t not in _QUESTION_FRAME}
    polarities = {_clause_polarity(c, q_tokens, focus) for c in _CLAUSE.split(span) if c.strip()}
    polarities.discard(None)
    if len(polarities) > 1:
        return None, "both_yes_no"
    if polarities:
        return polarities.pop(), "yes_no"
    return None, "no_match"


# --------------------------------------------------------------------------- named alternatives

_OR = re.compile(r"\s+or\s+", re.IGNORECASE)
_ALT_SKIP = FILLER | {"just", "either", "more", "less", "most", "least"}


def _alt_words(text: str) -> list[str]:
    return [t for t in canonical_tokens(text) if t not in _ALT_SKIP]


def _alternatives(question: str) -> list[str]:
    """The alternatives a question names, one canonical word each ("CT or MRI?" -> [ct, mri]).

    The words either side of the first "or"; a shared head noun is skipped ("left lung or
    right lung" -> left, right); an Oxford list adds its earlier items ("T1, T2, or FLAIR").
    """
    parts = _OR.split(question.split("?")[0], maxsplit=1)
    if len(parts) != 2:
        return []
    left_text, right_text = parts
    right = _alt_words(right_text)
    segments = left_text.split(",")
    oxford = not segments[-1].strip()  # "A, B, or C"
    if oxford:
        segments.pop()
    last = _alt_words(segments[-1]) if segments else []
    if not right or not last:
        return []
    shared_head = len(last) >= 2 and last[-1] in right[1:]  # "left lung or right lung"
    alts = [last[-2] if shared_head else last[-1], right[0]]
    if oxford or len(segments) > 2:  # a list: each earlier item's last word
        earlier = [_alt_words(s) for s in segments[:-1]]
        alts = [w[-1] for w in earlier if w] + alts
    return list(dict.fromkeys(alts))


def _gold_alternative(key: AnswerKey) -> tuple[list[str], str] | None:
    """(alternatives, the gold's) when the question names alternatives and the gold is one of them."""
    if not key.question or " or " not in f" {key.question.lower()} ":
        return None
    alts = _alternatives(key.question)
    gold = set(canonical_tokens(key.gold))
    hits = [a for a in alts if a in gold]
    if len(alts) < 2 or len(hits) != 1:
        return None
    return alts, hits[0]


def _read_alternative(span: str, alts: list[str]) -> tuple[str | None, str]:
    tokens = canonical_tokens(span)
    picked = []
    for i, t in enumerate(tokens):
        negated = i > 0 and tokens[i - 1] in ("not", "no")
        if negated and f"non{t}" in alts:  # "not displaced" picks "non-displaced"
            picked.append(f"non{t}")
        elif t in alts and not negated:
            picked.append(t)
    if len(set(picked)) > 1 or ("both" in tokens and "both" not in alts):
        return None, "several_alternatives"
    if picked:
        return picked[0], "alternative"
    return None, "no_match"


# --------------------------------------------------------------------------- entry points


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
    if source == "think":
        return Parsed(None, True, "think:unfinished", span)
    if not span.strip(_DECOR):
        return Parsed(None, True, f"{source}:empty", span)
    alternatives = _gold_alternative(key) if key.answer_type != "choice" else None
    if key.answer_type == "choice":
        value, rule = _parse_choice(span, key.options)
    elif yes_no_question(key):
        value, rule = _read_yes_no(span, key.question)
    elif alternatives is not None:
        value, rule = _read_alternative(span, alternatives[0])
        if rule == "no_match":  # names no alternative: read as text, judged as an open answer
            value = normalize_text(span) or None
            rule = "text" if value else "empty"
    else:
        value = normalize_text(span) or None
        rule = "text" if value else "empty"
    return Parsed(value, value is None, f"{source}:{rule}", span)


def judge(parsed: Parsed, sample_or_fields: VQASample | Mapping[str, Any] | AnswerKey) -> bool:
    """Whether the reading `parsed` (from `parse_answer`) is the gold answer (rule 3)."""
    key = answer_key(sample_or_fields)
    if parsed.invalid or parsed.value is None:
        return False
    if key.answer_type == "choice":
        return parsed.value == key.gold.strip().upper()
    if yes_no_question(key):
        return parsed.value == normalize_text(key.gold)
    if parsed.how.endswith(":alternative"):
        alternatives = _gold_alternative(key)
        return alternatives is not None and parsed.value == alternatives[1]
    return same_answer(parsed.value, key.gold, key.question)


def same_answer(answer: str, gold: str, question: str = "") -> bool:
    """Open answers: equal canonical content, with the question's own words set aside, then without."""
    a, g = canonical_tokens(answer), canonical_tokens(gold)
    asked = set(canonical_tokens(question))
    a_rest, g_rest = content(a, asked), content(g, asked)
    if a_rest and g_rest:
        return same_content(a_rest, g_rest)
    return same_content(content(a), content(g)) or (bool(a) and a == g)
