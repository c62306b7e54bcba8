"""The judge, rule by rule, on responses and answers checked by hand (each row's comment says why).

Rows marked ORIGINAL are cases the original pipeline gets wrong: its ANLS scored the edit distance instead of the
similarity, and its answer fix rewrote wrong answers that merely contain the truth.
"""

import doctest
import threading
from fractions import Fraction

import pytest

from internvl_tune import judge as judge_module
from internvl_tune.judge import (
    CORRECT_THRESHOLD,
    DEFAULT_SCORERS,
    Judgement,
    extract_answer,
    fix_answer,
    is_correct,
    judge,
    latex_score,
    latex_value,
    levenshtein,
    math_verify_score,
    resolve_scorers,
    score_answer,
    scorers_for,
)

EXTRACTION = [
    # en / zh: the trigger family, the last trigger, the original's failure rules
    ("Step one.\nStep two.\nFinal answer: 5", "en", "5"),
    ("Step one.\nStep two.\nFinal Answer: B", "en", "B"),  # the second trigger of the family
    ("第一步。\n第二步。\n答案: 3", "zh", "3"),  # the third
    ("答案: 1\nCheck again.\nFinal answer: 2", "zh", "2"),  # "Final answer:" first, whatever the version
    ("Final answer: 3\nWait, recheck.\nFinal answer: 4", "en", "4"),  # twice is allowed: the last one counts
    ("Final answer: 1\nFinal answer: 2\nFinal answer: 3", "en", None),  # more than twice
    ("Reasoning.\nFinal answer: 5", "en", None),  # fewer than 2 newlines
    ("\n\nFinal answer: 5", "en", None),  # empty reasoning
    ("One.\nTwo.\nFinal answer: 5\nand also 6", "en", None),  # an answer over two lines
    ("One.\nTwo.\nThree.", "en", None),  # no trigger
    ("One.\nTwo.\nFinal answer:   ", "en", None),  # nothing after the trigger
    ("One.\nTwo.\nFinal answer: 5\n\n", "en", "5"),  # trailing blank lines are not a second answer line
    ("One.\nTwo.\n**Final answer:** 5", "en", "5"),  # markdown bold is not part of the answer
    ("One.\nTwo.\nFinal answer: **B**", "en", "B"),
    # v2: more than 20 characters, the last brace-balanced box
    ("Adding 2 and 3 gives 5.\nAnswer: \\boxed{5}", "en_v2", "5"),
    ("So x is one half.\nAnswer: \\boxed{\\frac{1}{2}}", "zh_v2", "\\frac{1}{2}"),  # nested braces
    ("First I got \\boxed{1}, then corrected: \\boxed{2}", "en_v2", "2"),
    ("Answer: \\boxed{5}", "en_v2", None),  # 17 characters
    ("A long answer without any box at all.", "en_v2", None),
    ("A long enough answer here: \\boxed{5", "en_v2", None),  # unbalanced
    ("A long enough answer here: \\boxed{ }", "en_v2", None),  # empty
    # r1: one <think> and one </think>, in order, a thought over 20 characters, a box after </think>
    ("<think>I count the apples one by one: 3.</think>\nThe answer is \\boxed{3}", "en_r1", "3"),
    ("<think>short</think>\n\\boxed{3}", "en_r1", None),
    ("<think>I count the apples: three of them.</think><think>again</think> \\boxed{3}", "zh_r1", None),
    ("<think>I count the apples: three of them, \\boxed{3}</think>\nSo three.", "en_r1", None),  # box in thought
    ("</think>I count the apples: three of them.<think>\n\\boxed{3}", "en_r1", None),  # tags reversed
    # direct prompts: the evaluation's "(Final answer:|Answer:)" regex, else the whole response
    ("B", "direct", "B"),
    ("The shape is round.\nAnswer: B", "direct", "B"),
    ("final answer: 12 apples", "direct", "12 apples"),
    ("Answer:\nB", "direct", "B"),
    ("**Answer:** red", "direct", "red"),
    ("   ", "direct", None),
]


@pytest.mark.parametrize("response, version, expected", EXTRACTION)
def test_extract_answer(response, version, expected):
    assert extract_answer(response, version) == expected


def test_unknown_prompt_version_is_an_error():
    with pytest.raises(ValueError, match="unknown prompt version 'en_v3'"):
        extract_answer("x", "en_v3")


SCORING = [
    ("Paris", "paris", (), 1.0),  # exact, case-insensitive, with no scorer at all
    # vqa: the VQA evaluation's normalisation
    ("Two dogs.", "2 dogs", ("vqa",), 1.0),  # number word, final period
    ("the cat", "cat", ("vqa",), 1.0),  # article
    ("dont", "don't", ("vqa",), 1.0),  # contraction
    ("blue-green", "blue green", ("vqa",), 1.0),  # a hyphen inside a word becomes a space
    ("cat", "dog", ("vqa",), 0.0),
    ("the", "a", ("vqa",), 0.0),  # both normalise to nothing: no match
    # mc: option letters
    ("B.", "B", ("mc",), 1.0),
    ("(B)", "B", ("mc",), 1.0),
    ("B) 45°", "B", ("mc",), 1.0),
    ("The answer is B.", "B", ("mc",), 1.0),
    ("(C)", "B", ("mc",), 0.0),
    ("B", "(B) 45°", ("mc",), 1.0),  # the truth as an option line
    ("A cat", "A", ("mc",), 0.0),  # an article, not an option
    # numeric: units stripped, relative tolerance 1e-3
    ("5 cm", "5", ("numeric",), 1.0),
    ("60°", "60", ("numeric",), 1.0),
    ("60 degrees", "60", ("numeric",), 1.0),
    ("45\\%", "45", ("numeric",), 1.0),
    ("30.02", "30", ("numeric",), 1.0),  # |30.02 - 30| / 30 = 6.7e-4
    ("30.04", "30", ("numeric",), 0.0),  # 1.3e-3
    ("10.4", "10", ("numeric",), 0.0),  # 4e-2: only the chart scorer allows that
    ("1,000", "1000", ("numeric",), 1.0),  # thousands separator
    ("3/4", "0.75", ("numeric",), 1.0),  # a fraction
    ("0.0", "0", ("numeric",), 1.0),  # a truth of 0 is compared exactly (the original compared the strings: 0)
    ("0.001", "0", ("numeric",), 0.0),
    ("1_000", "1000", ("numeric",), 0.0),  # Python's float() accepts this; a number written so does not
    # relaxed (charts): 5%, years exact
    ("10.4", "10", ("relaxed",), 1.0),  # 4%
    ("10.6", "10", ("relaxed",), 0.0),  # 6%
    ("45%", "45", ("relaxed",), 1.0),
    ("2021", "2020", ("relaxed",), 0.0),  # a year: 0.05% off, still wrong
    # anls: a similarity, 0 from a normalised distance of 0.5 on
    ("ACME Corporation Ltd.", "ACME Corporation Ltd", ("anls",), 1 - 1 / 21),  # ORIGINAL: 1/21 = 0.048, wrong
    ("xxxxxxxxxx", "John Smith", ("anls",), 0.0),  # ORIGINAL: 10/10 = 1.0, correct
    ("  john   SMITH ", "John Smith", ("anls",), 1.0),  # case and spaces normalised
    ("John Smth", "John Smith", ("anls",), 0.9),  # 1 edit in 10: exactly the threshold, not above it
    ("Johnn Smith", "John Smith", ("anls",), 1 - 1 / 11),
    # the default scorers: vqa, mc, numeric, latex, math_verify
    ("seven", "7", DEFAULT_SCORERS, 1.0),
    ("15", "5", DEFAULT_SCORERS, 0.0),
]


@pytest.mark.parametrize("pred, truth, scorers, expected", SCORING)
def test_score_answer(pred, truth, scorers, expected):
    assert score_answer(pred, truth, scorers) == pytest.approx(expected)
    assert is_correct(pred, truth, scorers) == (expected > CORRECT_THRESHOLD)


def test_threshold_and_unparseable():
    assert CORRECT_THRESHOLD == 0.9
    assert not is_correct("John Smth", "John Smith", ["anls"])  # 0.9 is not above 0.9
    assert is_correct("Johnn Smith", "John Smith", ["anls"])  # 0.909
    assert not is_correct(None, "5")
    assert judge("just 5", "5", "en") == Judgement(None, 0.0) and not judge("just 5", "5").correct
    verdict = judge("3 + 4 = 7.\nSo there are 7.\nFinal answer: seven", "7", "en")
    assert verdict == Judgement("seven", 1.0) and verdict.correct


@pytest.mark.parametrize(
    "a, b, distance", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "abc", 0), ("flaw", "lawn", 2)]
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance == levenshtein(b, a)


def test_scorers_by_source_kind_and_list():
    assert scorers_for("chartqa_train_18k") == ("relaxed",)
    assert scorers_for("DocVQA_val") == scorers_for("infographics_vqa") == ("anls",)
    assert scorers_for("CLEVR_math_en") == ("relaxed", "vqa", "mc", "latex", "math_verify")
    # the original's mavis mode: vqa, mc, its math score, its LaTeX scorer (and math-verify)
    assert DEFAULT_SCORERS == ("vqa", "mc", "numeric", "latex", "math_verify")
    assert scorers_for("ai2d") == scorers_for("mavis_geo") == DEFAULT_SCORERS
    assert resolve_scorers("auto", "chartqa_test") == ("relaxed",)
    assert resolve_scorers("docvqa", "chartqa_test") == ("anls",)  # a kind, whatever the source
    assert resolve_scorers("default") == DEFAULT_SCORERS
    assert resolve_scorers("vqa, mc") == ("vqa", "mc")
    with pytest.raises(ValueError, match="unknown scorer bogus"):
        resolve_scorers("vqa,bogus")


LATEX_VALUES = [
    # (text, its exact value or None when it is not a rational number written in LaTeX)
    ("3/4", Fraction(3, 4)),
    ("\\frac{3}{4}", Fraction(3, 4)),
    ("\\dfrac{6}{8}", Fraction(3, 4)),  # reduced
    ("\\tfrac{3}{4}", Fraction(3, 4)),
    ("\\frac34", Fraction(3, 4)),  # LaTeX's one-character arguments
    ("0.75", Fraction(3, 4)),  # exactly, not as a float
    ("\\frac{1}{2}+\\frac{1}{4}", Fraction(3, 4)),
    ("\\frac{1}{2} - \\frac{1}{4}", Fraction(1, 4)),
    ("3 \\times \\frac{1}{4}", Fraction(3, 4)),
    ("\\frac{1}{2} \\cdot 3", Fraction(3, 2)),
    ("3 \\div 4", Fraction(3, 4)),
    ("2/3^2", Fraction(2, 9)),  # a power binds before a quotient
    ("2^{-2}", Fraction(1, 4)),
    ("-3^2", Fraction(-9)),  # and before a sign
    ("-\\frac{3}{4}", Fraction(-3, 4)),
    ("\\frac{-3}{4}", Fraction(-3, 4)),
    ("-(-3)/4", Fraction(3, 4)),
    ("\\left(\\frac{3}{4}\\right)", Fraction(3, 4)),
    ("\\left[ 1 + \\frac{1}{2} \\right]", Fraction(3, 2)),
    ("$\\frac{3}{4}$", Fraction(3, 4)),
    ("\\(\\frac{3}{4}\\)", Fraction(3, 4)),
    ("\\frac{1}{0}", None),  # no value
    ("0^{-1}", None),
    ("2\\frac{1}{2}", None),  # a mixed number to a reader, 2 * 1/2 to LaTeX: ambiguous
    ("2(3)", None),  # two terms side by side
    ("\\sqrt{4}", None),  # roots, pi, variables: for math-verify
    ("\\pi", None),
    ("x", None),
    ("2^{1/2}", None),  # not a rational power
    ("(1 + 2", None),  # unbalanced
    ("(1 + 2]", None),
    ("2^{100000}", None),  # too large to be an answer
    ("", None),
]


@pytest.mark.parametrize("text, value", LATEX_VALUES)
def test_latex_value(text, value):
    assert latex_value(text) == value


LATEX_SCORES = [
    ("3/4", "\\frac{3}{4}", 1.0),
    ("\\frac{3}{4}", "3/4", 1.0),
    ("\\dfrac{6}{8}", "\\frac{3}{4}", 1.0),
    ("0.75", "\\frac{3}{4}", 1.0),
    ("\\frac{1}{2}+\\frac{1}{4}", "3/4", 1.0),
    ("-3/4", "-\\frac{3}{4}", 1.0),
    ("\\left(\\frac{3}{4}\\right)", "0.75", 1.0),
    ("3/5", "\\frac{3}{4}", 0.0),  # a different number
    ("-\\frac{3}{4}", "\\frac{3}{4}", 0.0),  # the sign counts
    ("\\frac{1}{2}+\\frac{1}{4}", "1/4", 0.0),  # the whole sum, not its last fraction
    ("\\sqrt{2}", "\\sqrt{2}", 0.0),  # not a rational: left to math-verify (and the exact match)
    ("1+1", "2", 0.0),  # neither side LaTeX nor a fraction: the original's condition, so no arithmetic on plain text
]


@pytest.mark.parametrize("pred, truth, expected", LATEX_SCORES)
def test_latex_score(pred, truth, expected):
    assert latex_score(pred, truth) == expected
    assert score_answer(pred, truth, ["latex"]) == expected or pred == truth


def test_fractions_are_judged_without_math_verify(monkeypatch):
    """The regression: without math-verify the default scorers judged "3/4" against "\\frac{3}{4}" wrong."""
    monkeypatch.setattr(judge_module, "_math_verify", lambda: None)  # as if not installed
    assert score_answer("3/4", "\\frac{3}{4}") == 1.0
    assert score_answer("\\dfrac{6}{8}", "0.75", scorers_for("mavis_geo")) == 1.0
    assert score_answer("\\frac{1}{2}", "0.5", scorers_for("geoqa_geometry")) == 1.0
    assert score_answer("3/5", "\\frac{3}{4}") == 0.0
    response = "The shaded part is 6 of 8 squares.\nThat is \\boxed{\\dfrac{6}{8}}"
    assert judge(response, "\\frac{3}{4}", "en_v2") == Judgement("\\dfrac{6}{8}", 1.0)
    # the answer fix respells it as the truth
    fixed = fix_answer("Six of eight.\nSo 6/8.\nFinal answer: 6/8", "\\frac{3}{4}")
    assert fixed == "Six of eight.\nSo 6/8.\nFinal answer: \\frac{3}{4}"


def test_math_verify_is_optional(monkeypatch):
    monkeypatch.setattr(judge_module, "_math_verify", lambda: None)  # as if not installed
    assert score_answer("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}", ["math_verify"]) == 0.0
    assert score_answer("0.5", "0.5", ["math_verify"]) == 1.0  # exact needs no package
    with pytest.raises(ValueError, match="pip install math-verify"):
        resolve_scorers("vqa,math_verify")


# Each answer goes to math-verify as one formula, `$answer$`: it reads bare LaTeX only inside $s, and in other text
# looks for an answer anywhere.
MATH_VERIFY = [
    ("\\frac{1}{2}", "0.5", 1.0),
    ("\\frac{1}{3}", "0.5", 0.0),
    ("30^\\circ", "30", 1.0),
    ("\\sqrt{2}", "\\frac{1}{\\sqrt{2}}", 0.0),
    ("on", "no", 0.0),  # as formulas both are n*o: answers with words are left to the VQA scorer
    # given as bare text, these scored the other way
    ("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}", 1.0),
    ("\\frac{\\pi}{2}", "\\pi/2", 1.0),
    ("x^2+2x+1", "(x+1)^2", 1.0),
    ("0.75", "\\dfrac{6}{8}", 1.0),  # \\dfrac{6}{8} parsed to nothing
    ("\\frac{1}{2}+\\frac{1}{4}", "3/4", 1.0),  # the sum parsed to its last fraction, 1/4
    ("\\frac{1}{2}+\\frac{1}{4}", "1/4", 0.0),
    ("2 or 3", "3", 0.0),  # its search found the last number
    ("not 5", "5", 0.0),
    ("5 cats and 7 dogs", "7", 0.0),
]


@pytest.mark.parametrize("pred, truth, expected", MATH_VERIFY)
def test_math_verify(pred, truth, expected):
    assert math_verify_score(pred, truth) == expected


def test_math_verify_in_a_thread():
    """A server backend judges in threads, where math-verify's signal-based timeouts cannot be set (math-verify >= 0.8
    runs without one when given None)."""
    scores = []
    thread = threading.Thread(target=lambda: scores.append(math_verify_score("\\dfrac{6}{8}", "0.75")))
    thread.start()
    thread.join()
    assert scores == [1.0]
    assert resolve_scorers("math_verify") == ("math_verify",)


FIXES = [
    # (response, truth, version, scorers, fixed response or None when unchanged)
    (  # a unit: only the answer is rewritten, not the "60°" of the reasoning
        "Two angles of 30° each.\nSo 60°.\nFinal answer: 60°",
        "60",
        "en",
        DEFAULT_SCORERS,
        "Two angles of 30° each.\nSo 60°.\nFinal answer: 60",
    ),
    (  # an option line becomes its letter
        "Option B says 45°.\nIt matches.\nFinal answer: (B) 45°",
        "B",
        "en",
        DEFAULT_SCORERS,
        "Option B says 45°.\nIt matches.\nFinal answer: B",
    ),
    (  # ORIGINAL: "5" is a substring of "15", so it rewrote this WRONG answer to "5" and kept it as rejected
        "5 + 10 = 15.\nThat is 15.\nFinal answer: 15",
        "5",
        "en",
        DEFAULT_SCORERS,
        None,
    ),
    (  # correct within the chart tolerance, but not the truth written another way: 10.4 stays
        "The bar reads about 10.4.\nSo 10.4.\nFinal answer: 10.4",
        "10",
        "en",
        ("relaxed",),
        None,
    ),
    ("It is signed by\nJohnn Smith.\nFinal answer: Johnn Smith", "John Smith", "en", ("anls",), None),  # ANLS alike
    (  # the box is rewritten, not the last "5.0" of the text (a string replacement would take that one)
        "Count: five.\nAnswer: \\boxed{5.0}\nThat is 5.0 apples.",
        "5",
        "en_v2",
        DEFAULT_SCORERS,
        "Count: five.\nAnswer: \\boxed{5}\nThat is 5.0 apples.",
    ),
    ("One.\nTwo.\nFinal answer: two dogs", "2\ndogs", "en", DEFAULT_SCORERS, None),  # the fix would break the format
    ("just 5", "5", "en", DEFAULT_SCORERS, None),  # unparseable
    ("One.\nTwo.\nFinal answer: 5", "5", "en", DEFAULT_SCORERS, None),  # already the truth
]


@pytest.mark.parametrize("response, truth, version, scorers, fixed", FIXES)
def test_fix_answer(response, truth, version, scorers, fixed):
    before = judge(response, truth, version, scorers)
    result = fix_answer(response, truth, version, scorers)
    assert result == (response if fixed is None else fixed)
    after = judge(result, truth, version, scorers)
    assert after.correct == before.correct  # the fix never changes a verdict: it only respells correct answers
    if fixed is not None:
        assert after.answer == truth


def test_docstring_examples():
    assert doctest.testmod(judge_module).failed == 0
