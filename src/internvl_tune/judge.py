"""The judge: a response's final answer, and whether it matches the ground truth.

One module for every place that grades an answer: `sample`, `build-pairs`, `eval` and a reward. Two steps:

1. **Extraction** by the prompt version the response was sampled with (`answer_span`, `extract_answer`):

   - `en` / `zh` (chain of thought ending in a trigger line): the trigger is "Final answer:", else
     "Final Answer:", else "答案:"; the answer is the text after its LAST occurrence. Unparseable (None) when the
     trigger is missing or appears more than twice, the response has fewer than 2 newlines, the reasoning before
     the trigger is empty, or the answer runs over more than one line. Markdown bold around the answer
     (`**Final answer:** 5`, `Final answer: **5**`) is not part of it.
   - `en_v2` / `zh_v2`: the content of the last brace-balanced `\\boxed{...}`; responses of 20 characters or fewer
     are unparseable.
   - `en_r1` / `zh_r1`: exactly one `<think>` and one `</think>`, in that order, more than 20 characters of thought
     between them, and the last boxed answer in the text after `</think>`.
   - `direct`: what follows the last "Answer:" or "Final answer:" (any case) up to the end of its line, else the
     whole response (a direct prompt answers with just the answer).

   An empty answer, or a missing or unbalanced box, is unparseable too (the original scored the whole response
   of a v2 reply without a box as its answer).

2. **Scoring** (`score_answer`): a case-insensitive exact match scores 1; otherwise the best of the enabled
   scorers, each in [0, 1]; correct means a score above `CORRECT_THRESHOLD` (0.9).

   =========== ========================================================= =========================================
   scorer      rule                                                      example (prediction / truth -> score)
   =========== ========================================================= =========================================
   vqa         equal after the VQA normalisation (`vqa_normalize`)       "Two dogs." / "2 dogs" -> 1
   mc          the same option letter ("A", "A.", "(A)", "A) text",      "(B) 45°" / "B" -> 1
               "The answer is A")
   numeric     units stripped (degree, °, %, cm, \\angle, ...), then     "30.02 cm" / "30" -> 1; "30.1" / "30"
               relative error <= 1e-3 (exact for a truth of 0)           -> 0
   latex       one side LaTeX or a fraction `a/b`, both the same         "3/4" / "\\frac{3}{4}" -> 1;
               rational number (`latex_value`: \\frac, + - * /, powers)  "3/5" / "\\frac{3}{4}" -> 0
   relaxed     charts: relative error <= 5%; a 4-character "20xx" is     "10.4" / "10" -> 1; "2019" / "2020" -> 0
               a year and must match exactly
   anls        similarity 1 - levenshtein / longer length; 0 from a      "John Smth" / "John Smith" -> 0.9
               normalised distance of 0.5 on
   math_verify math-verify's equivalence, each answer read as one        "\\sqrt{2}" / "\\frac{2}{\\sqrt{2}}" -> 1;
               formula; 0 for an answer with a word in it                "2 or 3" / "3" -> 0
   =========== ========================================================= =========================================

   Which scorers apply comes from the data's source name as in the original (`scorers_for`): chartqa -> relaxed;
   docvqa, infographics -> anls; sroie, clevr_math, geos, geometry -> relaxed, vqa, mc, latex, math_verify;
   anything else -> vqa, mc, numeric, latex, math_verify (the original's LaTeX scorer ran on mavis data only;
   `latex` goes with `math_verify` here). `resolve_scorers` also takes an explicit list or a kind name.

The original's ANLS branch returned the normalised edit DISTANCE as the score, so for docvqa and infographics only
exact matches, or answers almost entirely different from the truth, counted as correct; here it is the ANLS
similarity. Its answer fix rewrote responses whose prediction merely contained the truth (truth "5", prediction
"15") and judged the unfixed prediction; `fix_answer` rewrites correct answers only and the caller judges the
rewritten response.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from internvl_tune.errors import UserError

CORRECT_THRESHOLD = 0.9  # a score above it is correct (the original's threshold)
NUMERIC_TOLERANCE = 1e-3  # relative, for the numeric scorer
RELAXED_TOLERANCE = 0.05  # relative, for charts (pix2struct's relaxed accuracy)
ANLS_CUTOFF = 0.5  # normalised edit distances at or above it score 0 (the ANLS metric's tau)

SCORERS = ("vqa", "mc", "numeric", "latex", "relaxed", "anls", "math_verify")
EXTRACTION_VERSIONS = ("en", "zh", "en_v2", "zh_v2", "en_r1", "zh_r1", "direct")

DEFAULT_SCORERS = ("vqa", "mc", "numeric", "latex", "math_verify")
# Source-name keywords -> scorers, first match wins (the original's modes). The original ran its LaTeX scorer on
# mavis data only and math-verify on everything but charts and documents; `latex` goes with `math_verify` here: it
# accepts only what math-verify should (the same rational number), and keeps `3/4` = `\frac{3}{4}` when math-verify
# is missing or fails on an input. So mavis gets the default, which is the original's mavis mode.
SOURCE_SCORERS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("chartqa",), ("relaxed",)),
    (("docvqa", "infographics"), ("anls",)),
    (("sroie", "clevr_math", "geos", "geometry"), ("relaxed", "vqa", "mc", "latex", "math_verify")),
)

_TRIGGERS = ("Final answer:", "Final Answer:", "答案:")
_MAX_TRIGGERS = 2
_MIN_NEWLINES = 2
_MIN_FORMAT_CHARS = 20  # v2: a longer response; r1: a longer thought
_BOX = "\\boxed{"
_DIRECT = re.compile(r"(?:Final answer:|Answer:)\s*(.*)", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- extraction


def answer_span(response: str, prompt_version: str = "en") -> tuple[int, int] | None:
    """Where the final answer is in `response` (start, end), or None when it is unparseable.

    Example:
        >>> r = "The sides are 3 and 4.\\nSo the hypotenuse is 5.\\nFinal answer: 5"
        >>> answer_span(r, "en"), r[61:62]
        ((61, 62), '5')
        >>> answer_span("Final answer: 5", "en") is None  # no reasoning lines
        True
    """
    if prompt_version in ("en", "zh"):
        return _trigger_span(response)
    if prompt_version in ("en_v2", "zh_v2"):
        return _last_box_span(response) if len(response.strip()) > _MIN_FORMAT_CHARS else None
    if prompt_version in ("en_r1", "zh_r1"):
        return _r1_span(response)
    if prompt_version == "direct":
        matches = list(_DIRECT.finditer(response))
        start, end = matches[-1].span(1) if matches else (0, len(response))
        return _trim(response, start, end)
    raise UserError(f"unknown prompt version {prompt_version!r}: expected one of {', '.join(EXTRACTION_VERSIONS)}")


def extract_answer(response: str, prompt_version: str = "en") -> str | None:
    """The final answer of `response`, or None when it is unparseable (a format negative)."""
    span = answer_span(response, prompt_version)
    return None if span is None else response[span[0] : span[1]]


def _trim(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The span without surrounding whitespace and markdown emphasis; None when nothing is left."""
    while start < end and (text[start].isspace() or text[start] == "*"):
        start += 1
    while end > start and (text[end - 1].isspace() or text[end - 1] == "*"):
        end -= 1
    return (start, end) if end > start else None


def _trigger_span(response: str) -> tuple[int, int] | None:
    trigger = next((t for t in _TRIGGERS if t in response), None)
    if trigger is None or response.count(trigger) > _MAX_TRIGGERS or response.count("\n") < _MIN_NEWLINES:
        return None
    cut = response.rindex(trigger)
    if not response[:cut].strip() or "\n" in response[cut + len(trigger) :].strip():
        return None
    return _trim(response, cut + len(trigger), len(response))


def _last_box_span(text: str, offset: int = 0) -> tuple[int, int] | None:
    """The content of the last `\\boxed{...}` of `text[offset:]`, braces balanced."""
    start = text.rfind(_BOX, offset)
    if start < 0:
        return None
    depth = 1
    for i in range(start + len(_BOX), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return _trim(text, start + len(_BOX), i)
    return None


def _r1_span(response: str) -> tuple[int, int] | None:
    if response.count("<think>") != 1 or response.count("</think>") != 1:
        return None
    opened, closed = response.index("<think>"), response.index("</think>")
    if closed < opened or len(response[opened + len("<think>") : closed].strip()) <= _MIN_FORMAT_CHARS:
        return None
    return _last_box_span(response, closed + len("</think>"))


# ---------------------------------------------------------------------------------------------- scorers

# The VQA evaluation's answer normalisation (EvalAI / the official VQA eval code), rule for rule.
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've
    hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's
    Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
    let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
    mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at
    'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
    someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
    somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll
    thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
    theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
    wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
    whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
    whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
    wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all
    yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
    youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've""".split()
)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
_NUMBER_WORDS |= {"six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# A period not followed by a digit. (The evaluation code's pattern is written `(?!<=\d)(\.)(?!\d)`, which is not a
# lookbehind: "5." loses its period too. We keep what it does.)
_PERIOD = re.compile(r"\.(?!\d)")


def vqa_normalize(text: str) -> str:
    """An answer as the VQA evaluation compares it: lower case, punctuation removed or spaced, number words as
    digits, articles dropped, contractions restored.

    Example:
        >>> vqa_normalize("Two dogs."), vqa_normalize("The cat's toy"), vqa_normalize("dont know")
        ('2 dogs', "cat 's toy", "don't know")
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = original = text.replace("\n", " ").replace("\t", " ").strip()
    for p in _PUNCTUATION:
        # Removed where it touches a space ("a - b"), a space where it joins words ("blue-green" -> "blue green").
        # (The evaluation code also removes it when a comma sits between digits, which cannot happen: the commas
        # went in the first step.)
        text = text.replace(p, "" if p + " " in original or " " + p in original else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


_CHOICE_PATTERNS = (
    re.compile(r"\(([A-Z])\)(?:\s.*)?", re.DOTALL),  # (A), (A) text
    re.compile(r"([A-Z])(?:[.:)](?:\s.*)?)?", re.DOTALL),  # A, A., A:, A), A. text, A) text
    re.compile(r"(?i:.*\banswer is)\s*:?\s*\(?([A-Z])(?:\)|[.:,]|\s*$).*", re.DOTALL),  # The answer is (A).
)


def choice_letter(text: str) -> str | None:
    """The option letter an answer names, or None.

    Example:
        >>> [choice_letter(t) for t in ("B", "B.", "(B)", "B) 45°", "The answer is B.", "Because")]
        ['B', 'B', 'B', 'B', 'B', None]
    """
    text = text.strip().strip("*").strip()
    for pattern in _CHOICE_PATTERNS:
        match = pattern.fullmatch(text)
        if match:
            return match.group(1)
    return None


# Longest first: "degrees" before "degree", "\%" before "%".
_UNITS = ("degrees", "degree", "^{\\circ}", "^\\circ", "\\circ", "°", "\\angle", "\\%", "%", "cm", "$")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")


def to_number(text: str) -> float | None:
    """A plain number, a number with thousands commas ("30,594") or a fraction ("3/4"); else None."""
    text = text.strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if _NUMBER.fullmatch(text):
        return float(text)
    fraction = _FRACTION.fullmatch(text)
    if fraction and int(fraction.group(2)):
        return int(fraction.group(1)) / int(fraction.group(2))
    return None


def _close(pred: float | None, truth: float | None, tolerance: float) -> bool:
    if pred is None or truth is None:
        return False
    return pred == 0 if truth == 0 else abs(pred - truth) / abs(truth) <= tolerance


def _strip_units(text: str) -> str:
    for unit in _UNITS:
        text = text.replace(unit, "")
    return text


def numeric_score(pred: str, truth: str) -> float:
    """1 when both are numbers (units stripped) within a relative `NUMERIC_TOLERANCE`."""
    return float(_close(to_number(_strip_units(pred)), to_number(_strip_units(truth)), NUMERIC_TOLERANCE))


def relaxed_score(pred: str, truth: str) -> float:
    """Chart answers: numbers within a relative `RELAXED_TOLERANCE` ("%" dropped); a year must match exactly."""
    pred, truth = pred.strip(), truth.strip()
    if len(truth) == 4 and truth.startswith("20"):
        return float(pred.lower() == truth.lower())
    return float(_close(to_number(pred.removesuffix("%")), to_number(truth.removesuffix("%")), RELAXED_TOLERANCE))


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions) between two strings.

    Example:
        >>> levenshtein("kitten", "sitting")
        3
    """
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, cb in enumerate(b, start=1):
        current = [j]
        for i, ca in enumerate(a, start=1):
            current.append(min(previous[i] + 1, current[i - 1] + 1, previous[i - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_score(pred: str, truth: str) -> float:
    """ANLS similarity: 1 - edit distance / longer length (lower case, spaces collapsed), 0 from `ANLS_CUTOFF` on.

    Example:
        >>> anls_score("John Smth", "john smith"), anls_score("Jane Doe", "John Smith")
        (0.9, 0.0)
    """
    pred, truth = " ".join(pred.lower().split()), " ".join(truth.lower().split())
    length = max(len(pred), len(truth))
    if length == 0:
        return 1.0
    distance = levenshtein(pred, truth) / length
    return 1.0 - distance if distance < ANLS_CUTOFF else 0.0


# A LaTeX answer's exact value: rationals only (sums, products, quotients, integer powers of numbers and \frac's).
# A square root, pi or a variable is not a rational; math-verify judges those.
_LATEX_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\\[A-Za-z]+|\\.)|(\S))")
_LATEX_SPACING = {"\\left", "\\right", "\\displaystyle", "\\,", "\\;", "\\:", "\\!", "\\ "}
_LATEX_FRACTIONS = {"\\frac", "\\dfrac", "\\tfrac", "\\cfrac"}
_LATEX_TIMES = {"*", "\\times", "\\cdot"}
_LATEX_DIVIDE = {"/", "\\div"}
_LATEX_GROUPS = {"(": ")", "[": "]", "{": "}"}
_LATEX_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_LATEX_MAX_BITS = 4096  # a value past it (10^{10^{9}}) is not an answer to compare; refusing keeps the judge fast
_SIMPLE_FRACTION = re.compile(r"\s*[+-]?\d+\s*/\s*\d+\s*")


class _NotRational(Exception):
    """Raised inside `latex_value` when the text is not a rational number written in LaTeX."""


def latex_value(text: str) -> Fraction | None:
    """The exact value of a number written in LaTeX or as a fraction, or None when it is not a rational number.

    Numbers (`3`, `0.75`), `\\frac` / `\\dfrac` / `\\tfrac` / `\\cfrac` (`\\frac34` too), `a/b`, `+ - * / \\times
    \\cdot \\div`, signs, parentheses (`( )`, `[ ]`, `{ }`, `\\left( \\right)`), integer powers (`2^{-1}`), in `$`s or
    not. Two terms side by side (`2\\frac{1}{2}`: a mixed number to a reader, a product to LaTeX) are ambiguous: None.

    Example:
        >>> latex_value("\\\\dfrac{6}{8}"), latex_value("\\\\frac{1}{2}+\\\\frac{1}{4}"), latex_value("-0.75")
        (Fraction(3, 4), Fraction(3, 4), Fraction(-3, 4))
        >>> latex_value("\\\\sqrt{2}") is None, latex_value("2\\\\frac{1}{2}") is None, latex_value("\\\\frac{1}{0}") is None
        (True, True, True)
    """
    text = text.strip()
    for opening, closing in _LATEX_DELIMITERS:
        if len(text) > len(opening) + len(closing) and text.startswith(opening) and text.endswith(closing):
            text = text[len(opening) : -len(closing)]
            break
    tokens = [m.group(m.lastindex) for m in _LATEX_TOKEN.finditer(text)]
    tokens = [token for token in tokens if token not in _LATEX_SPACING]
    if not tokens:
        return None
    parser = _RationalParser(tokens)
    try:
        value = parser.expression()
        if parser.peek() is not None:
            raise _NotRational
    except (_NotRational, ZeroDivisionError):
        return None
    return value


class _RationalParser:
    """Recursive descent over LaTeX tokens: expression := term (+|- term)*; term := factor (*|/ factor)*;
    factor := (+|-) factor | atom [^ argument]; atom := number | group | \\frac argument argument."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.index = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise _NotRational
        self.index += 1
        return token

    def expression(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = _bounded(value + self.term() if self.take() == "+" else value - self.term())
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in _LATEX_TIMES or self.peek() in _LATEX_DIVIDE:
            value = _bounded(value * self.factor() if self.take() in _LATEX_TIMES else value / self.factor())
        return value

    def factor(self) -> Fraction:
        if self.peek() in ("+", "-"):
            return self.factor() if self.take() == "+" else -self.factor()
        value = self.atom()
        if self.peek() != "^":
            return value
        self.take()
        exponent = self.argument()
        bits = max(value.numerator.bit_length(), value.denominator.bit_length())
        if exponent.denominator != 1 or bits * abs(exponent) > _LATEX_MAX_BITS:
            raise _NotRational
        return _bounded(value**exponent)

    def atom(self) -> Fraction:
        token = self.take()
        if token in _LATEX_FRACTIONS:
            return _bounded(self.argument() / self.argument())
        if token in _LATEX_GROUPS:
            value = self.expression()
            if self.take() != _LATEX_GROUPS[token]:
                raise _NotRational
            return value
        if token[0].isdigit() or token[0] == ".":
            return _bounded(Fraction(token))
        raise _NotRational

    def argument(self) -> Fraction:
        """A `\\frac` or `^` argument: a `{...}` group, or a single digit (`\\frac34`, `2^3`)."""
        token = self.peek()
        if token is not None and token[0].isdigit():
            # LaTeX takes one character: `\frac34` is 3/4 and `2^12` is 2^1 followed by 2.
            self.tokens[self.index] = token[1:]
            if not self.tokens[self.index]:
                self.index += 1
            return Fraction(int(token[0]))
        if token != "{":
            raise _NotRational
        return self.atom()


def _bounded(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > _LATEX_MAX_BITS:
        raise _NotRational
    return value


def looks_like_latex(text: str) -> bool:
    """Whether an answer is written in LaTeX (a backslash) or is a plain fraction (`3/4`, `-1 / 2`): the original's
    condition for its LaTeX scorer."""
    return "\\" in text or _SIMPLE_FRACTION.fullmatch(text) is not None


def latex_score(pred: str, truth: str) -> float:
    """1 when one of the two is LaTeX or a fraction (`looks_like_latex`) and both are the same rational number.

    Example:
        >>> latex_score("3/4", "\\\\frac{3}{4}"), latex_score("0.75", "\\\\dfrac{6}{8}"), latex_score("3/5", "\\\\frac{3}{4}")
        (1.0, 1.0, 0.0)
    """
    if not (looks_like_latex(pred) or looks_like_latex(truth)):
        return 0.0
    pred_value = latex_value(pred)
    return float(pred_value is not None and pred_value == latex_value(truth))


@functools.cache
def _math_verify():
    # Imported on first use: it brings sympy (0.3 s), which nothing else in a training run needs.
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def math_verify_available() -> bool:
    """Whether the `math-verify` package (a dependency of the package) is importable."""
    return _math_verify() is not None


_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2,}")


def math_verify_score(pred: str, truth: str) -> float:
    """1 when math-verify finds the two answers equivalent; 0 when it does not, fails, or is not installed, and 0 for
    answers with a word in them (two letters in a row, LaTeX commands aside).

    Each answer is given to math-verify as one LaTeX formula (`$answer$`). math-verify looks for an answer anywhere in
    a text it is given, and reads bare LaTeX only inside `$`s: unwrapped, `\\dfrac{6}{8}` parses to nothing,
    `\\frac{1}{2}+\\frac{1}{4}` to its last fraction 1/4, and "2 or 3" or "not 5" to their last number, so they
    equalled "3" and "5". Words are left to the VQA scorer: as a formula "no" is the product n*o, which equals "on".
    """
    package = _math_verify()
    if package is None or any(_WORD.search(_LATEX_COMMAND.sub(" ", text)) for text in (pred, truth)):
        return 0.0
    # Its timeouts use signal.alarm, which only the main thread may set (a server backend scores in threads).
    seconds = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        parsed_truth = package.parse(_as_formula(truth), parsing_timeout=seconds)
        parsed_pred = package.parse(_as_formula(pred), parsing_timeout=seconds)
        return float(package.verify(parsed_truth, parsed_pred, timeout_seconds=seconds))
    except Exception:  # a parser or timeout failure on odd input is a non-match, not a crash of the whole run
        return 0.0


def _as_formula(text: str) -> str:
    text = text.strip()
    return text if text.startswith(("$", "\\(", "\\[")) else f"${text}$"


_SCORER_FUNCTIONS = {
    "vqa": lambda pred, truth: float(vqa_normalize(pred) == vqa_normalize(truth) != ""),
    "mc": lambda pred, truth: float(choice_letter(pred) is not None and choice_letter(pred) == choice_letter(truth)),
    "numeric": numeric_score,
    "latex": latex_score,
    "relaxed": relaxed_score,
    "anls": anls_score,
    "math_verify": math_verify_score,
}
assert tuple(_SCORER_FUNCTIONS) == SCORERS


def score_answer(pred: str, truth: str, scorers: Sequence[str] = DEFAULT_SCORERS) -> float:
    """1 for a case-insensitive exact match, else the best score of `scorers` (each in [0, 1]).

    Example:
        >>> score_answer("(B) 45°", "B"), score_answer("15", "5"), score_answer("John Smth", "John Smith", ["anls"])
        (1.0, 0.0, 0.9)
    """
    if pred.strip().lower() == truth.strip().lower():
        return 1.0
    return max((_SCORER_FUNCTIONS[name](pred, truth) for name in scorers), default=0.0)


def is_correct(pred: str | None, truth: str, scorers: Sequence[str] = DEFAULT_SCORERS) -> bool:
    """Whether an extracted answer counts as correct: a score above `CORRECT_THRESHOLD`; None never does."""
    return pred is not None and score_answer(pred, truth, scorers) > CORRECT_THRESHOLD


def scorers_for(source: str) -> tuple[str, ...]:
    """The scorers for data from `source` (a dataset or file name), by keyword as the original chose them.

    Example:
        >>> scorers_for("chartqa_train_18k"), scorers_for("DocVQA_val"), scorers_for("ai2d")
        (('relaxed',), ('anls',), ('vqa', 'mc', 'numeric', 'latex', 'math_verify'))
    """
    name = source.lower()
    return next((scorers for keywords, scorers in SOURCE_SCORERS if any(k in name for k in keywords)), DEFAULT_SCORERS)


def resolve_scorers(spec: str, source: str = "") -> tuple[str, ...]:
    """The scorers a user's setting names: `auto` (by `source`, see `scorers_for`), a kind (`chartqa`, `docvqa`,
    `default`, ...: the scorers of data of that kind) or a comma-separated list of scorer names.

    Raises:
        ValueError: an unknown name, or `math_verify` named explicitly without the package installed.
    """
    if spec == "auto":
        return scorers_for(source)
    kinds = {k: scorers for keywords, scorers in SOURCE_SCORERS for k in keywords} | {"default": DEFAULT_SCORERS}
    if spec.lower() in kinds:
        return kinds[spec.lower()]
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    unknown = [name for name in names if name not in SCORERS]
    if unknown or not names:
        raise UserError(
            f"unknown scorer {', '.join(unknown) or repr(spec)}: use auto, a kind ({', '.join(kinds)}) "
            f"or scorers from {', '.join(SCORERS)}"
        )
    if "math_verify" in names and not math_verify_available():
        raise UserError("the math_verify scorer needs the math-verify package: pip install math-verify")
    return names


# ---------------------------------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class Judgement:
    """A judged response: its answer (None when unparseable) and the answer's score against the truth."""

    answer: str | None
    score: float

    @property
    def correct(self) -> bool:
        return self.score > CORRECT_THRESHOLD


def judge(response: str, truth: str, prompt_version: str = "en", scorers: Sequence[str] = DEFAULT_SCORERS) -> Judgement:
    """Extract the answer of `response` and score it against `truth`.

    Example:
        >>> judge("3 + 4 = 7.\\nSo there are 7.\\nFinal answer: seven", "7")
        Judgement(answer='seven', score=1.0)
    """
    answer = extract_answer(response, prompt_version)
    return Judgement(answer, 0.0 if answer is None else score_answer(answer, truth, scorers))


def same_answer(pred: str, truth: str) -> bool:
    """Whether `pred` is `truth` written another way: equal after VQA normalisation, the same option letter, the
    same number (units and thousands commas aside, within `NUMERIC_TOLERANCE`) or the same fraction ("3/4" for
    "\\frac{3}{4}"). Tolerance matches (relaxed, ANLS) are not: "10.4" is not the chart's "10" written another way."""
    return any(_SCORER_FUNCTIONS[name](pred, truth) == 1.0 for name in ("vqa", "mc", "numeric", "latex"))


def fix_answer(response: str, truth: str, prompt_version: str = "en", scorers: Sequence[str] = DEFAULT_SCORERS) -> str:
    """`response` with its final answer replaced by `truth`, when the answer is correct and is the truth written
    another way (`same_answer`); otherwise `response` unchanged. Judge the returned response: that is what is kept.

    Only the answer's own span changes (not some other occurrence of the same text), and a wrong answer is never
    rewritten: truth "5" and answer "15" are not a match (the original rewrote such answers to "5" and kept them
    as rejected responses).

    Example:
        >>> fix_answer("30 + 30 = 60.\\nSo 60 degrees.\\nFinal answer: 60°", "60")
        '30 + 30 = 60.\\nSo 60 degrees.\\nFinal answer: 60'
        >>> fix_answer("5 + 10 = 15.\\nThat is 15.\\nFinal answer: 15", "5")
        '5 + 10 = 15.\\nThat is 15.\\nFinal answer: 15'
    """
    span = answer_span(response, prompt_version)
    if span is None:
        return response
    pred, truth = response[span[0] : span[1]], truth.strip()
    if pred == truth or not is_correct(pred, truth, scorers) or not same_answer(pred, truth):
        return response
    fixed = response[: span[0]] + truth + response[span[1] :]
    # A truth that breaks the format (a line break, say) would turn a correct response into an unparseable one.
    return fixed if judge(fixed, truth, prompt_version, scorers).correct else response
