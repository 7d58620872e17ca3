"""Math answer verifier and exact match: hand-written cases, positives and clear negatives."""

import pytest

from rayrl.rewards.exact_match import exact_match, make_exact_match
from rayrl.rewards.math_answer import extract_boxed, extract_final_answer, math_answer, parse_number


@pytest.mark.parametrize(
    "completion",
    [
        "9386",
        "9,386",
        "\\boxed{9386}",
        "9386.0",
        "The answer is 9386.",
        "So the total is $9,386$.",
        "Work: 12 * 700 = 8400, plus 986.\n\nFinal: \\boxed{9,386}",
        "\\boxed{9386 \\text{ dollars}}",
        "Natalia sold 48 clips.\n#### 9386",
        "first guess \\boxed{12}, corrected: \\boxed{9386}",  # LAST box wins
    ],
)
def test_math_equivalent_forms_of_9386(completion):
    assert math_answer("q", completion, answer="9386") == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("1/2", "0.5"),
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("\\boxed{\\dfrac{1}{2}}", "1/2"),
        ("x = \\frac12", "0.5"),
        ("-3", "-3"),
        ("The temperature dropped to -17 degrees.", "-17"),
        ("\\boxed{-\\frac{3}{4}}", "-0.75"),
        ("so it is \u22124", "-4"),  # unicode minus
        ("1e3", "1000"),
        ("The answer is 9386.", "9,386"),
        ("The answer is 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72"),  # GSM8K-style reference
        ("The answer is 9386.", 9386),  # non-str answer field
    ],
)
def test_math_fractions_negatives_latex(completion, answer):
    assert math_answer("q", completion, answer=answer) == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("9387", "9386"),
        ("9386 at first, then 1", "9386"),  # no marker: the last number (1) is the answer
        ("no answer", "9386"),
        ("", "9386"),
        ("\\boxed{9386} ... actually \\boxed{9387}", "9386"),
        ("\\boxed{2x+1}", "1"),  # an expression is not the number 1
        ("0.5", "-0.5"),
        ("1/3", "0.333"),
        ("1/3", "0.3333333333"),  # exact by default: no tolerance for rounded decimals
        ("2000000001", "2000000000"),
        ("\\boxed{1.0000000001}", "1"),
        ("123456789012345678901234567891", "123456789012345678901234567890"),
        ("1e999999999", "1"),  # absurd exponent must not hang or match
    ],
)
def test_math_negatives(completion, answer):
    assert math_answer("q", completion, answer=answer) == 0.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("The answer is 8. Check: 8 - 3 = 5", "8"),  # the marked answer, not the last number
        ("Answer: 12 apples, since 4 x 3 = 12 and 12 - 0 = 12", "12"),
        ("It loses -$5 a day", "-5"),
        ("\\boxed{2}", "2 apples"),  # a reference with a unit is its number
    ],
)
def test_math_marked_answers_signs_and_units(completion, answer):
    assert math_answer("q", completion, answer=answer) == 1.0


def test_math_tolerance_is_an_option():
    from rayrl.rewards import make_math_answer

    assert make_math_answer(rel_tol=1e-4)("q", "0.33333", answer="1/3") == 1.0
    assert math_answer("q", "0.33333", answer="1/3") == 0.0


def test_math_extraction_is_linear_on_adversarial_input():
    import time

    started = time.perf_counter()
    for text in ["\\boxed{" * 20_000, "1" + " " * 100_000 + "x", "#### " + " " * 100_000]:
        assert math_answer("q", text, answer="5") == 0.0
    assert time.perf_counter() - started < 1.0  # was ~4 s per 32 KB (quadratic scans)


def test_math_non_numeric_answers_use_normalised_strings():
    assert math_answer("q", "\\boxed{\\text{A}}", answer="A") == 1.0
    assert math_answer("q", "The capital is \\boxed{Paris}", answer="paris") == 1.0
    assert math_answer("q", "  Paris. ", answer="paris") == 1.0
    assert math_answer("q", "The answer is Paris.", answer="Paris") == 1.0
    assert math_answer("q", "\\boxed{x^2+1}", answer="$x^2+1$") == 1.0
    assert math_answer("q", "\\boxed{London}", answer="paris") == 0.0
    assert math_answer("q", "Paris or London", answer="paris") == 0.0


def test_math_helpers_and_missing_answer():
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{{3}}") == "{3}"
    assert extract_boxed("no box") is None
    assert extract_final_answer("costs 1,000 then 2,500.")[1] == 2500
    assert parse_number("9,386") == parse_number("9386.0") == 9386
    assert parse_number("abc") is None
    with pytest.raises(ValueError, match="answer"):
        math_answer("q", "42")


def test_exact_match():
    assert exact_match("p", "  Paris\n", answer="Paris ") == 1.0
    assert exact_match("p", "paris", answer="Paris") == 0.0  # case-sensitive by default
    assert exact_match("p", "Paris.", answer="Paris") == 0.0
    assert exact_match("p", "42", answer=42) == 1.0
    insensitive = make_exact_match(case_sensitive=False)
    assert insensitive("p", "PARIS", answer="paris") == 1.0
    assert insensitive("p", "Lyon", answer="paris") == 0.0
    with pytest.raises(ValueError, match="answer"):
        exact_match("p", "x")
