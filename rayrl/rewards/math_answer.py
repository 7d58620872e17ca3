"""Math answer verifier: is the final answer in a completion numerically equal to the reference?

The built-in reward ``math_answer`` (contract ``fn(prompt, completion, **fields) -> float``)
reads the reference from the row's ``answer`` field and returns 1.0 or 0.0.

Extraction of the completion's final answer, in order:

1. the content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced;
2. else the text after the last ``####`` marker (GSM8K style), if it holds a number;
3. else the first number after the last "answer is"/"answer:";
4. else the LAST number in the completion. A "number" is an integer or decimal with an
   optional sign and exponent, thousands groups (``9,386``), a fraction ``a/b`` or a LaTeX
   ``\\frac{a}{b}`` (also ``\\dfrac``/``\\tfrac``, ``\\frac12``).

The reference ``answer`` is parsed as a number if it is one as a whole (after the clean-up
below); a GSM8K-style rationale ending in ``#### 72`` or a MATH-style solution with a
``\\boxed{}`` is reduced to that final answer first, and a number with a unit (``2 apples``) is
the number.

Numeric comparison is exact on rationals (``fractions.Fraction``), so ``"9,386" == "9386" ==
"9386.0"`` and ``"1/2" == "0.5" == "\\frac{1}{2}"``, while 2000000001 != 2000000000 and
0.3333 != 1/3; ``rel_tol`` (``make_math_answer``, config ``options``) accepts rounded values.
Clean-up before parsing removes ``$``, ``\\$``, ``\\!``/``\\,`` spacing, ``\\text{...}`` units,
``%``, degree marks, a leading ``x =`` and a trailing period.

If the reference is not numeric, the comparison falls back to normalised strings (strip,
lowercase, ``\\text{}`` unwrapped, surrounding ``$`` removed, trailing period removed, whitespace
collapsed) between
the reference and the boxed content, or (no box) the whole completion or the text after the
last "answer is"/"answer:".
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, Callable

__all__ = [
    "extract_boxed",
    "extract_final_answer",
    "make_math_answer",
    "math_answer",
    "math_answers_equal",
    "normalize_text_answer",
    "parse_number",
]

_SIGNED = r"[-+]?"
_UNSIGNED_DEC = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_EXP = r"(?:[eE][-+]?\d+)?"
_FRAC_LATEX = r"\\[dt]?frac\s*(?:\{[^{}]*\}|\d)\s*(?:\{[^{}]*\}|\d)"
# One numeric token: LaTeX fraction, a/b, or a (grouped) decimal with exponent.
_NUMBER_TOKEN = re.compile(
    rf"(?<![\w.])((?:[-+]\s*)?{_FRAC_LATEX}"
    rf"|{_SIGNED}(?:{_UNSIGNED_DEC}){_EXP}\s*/\s*(?:{_UNSIGNED_DEC}){_EXP}"
    rf"|{_SIGNED}(?:{_UNSIGNED_DEC}){_EXP})"
)
_FULL_DEC = re.compile(rf"^{_SIGNED}(?:{_UNSIGNED_DEC}){_EXP}$")
_LATEX_FRAC_FULL = re.compile(r"^([-+]?)\\[dt]?frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)$")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{[^{}]*\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*", re.IGNORECASE)
_NUMBER_WITH_UNIT = re.compile(r"^\s*(\S+)\s+[A-Za-z][A-Za-z ]*$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}``/``\\fbox{...}`` in ``text`` (braces balanced), or None.

    An unterminated last box (truncated generation) yields None for that box; ``\\boxed 5``
    (no braces) yields ``"5"``.
    """
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    if not starts:
        return None
    closing = _matching_braces(text)
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            if i in closing:
                return text[i + 1 : closing[i]]
            continue  # unbalanced: try an earlier box
        bare = re.match(r"[^\s$]+", text[i:])
        if bare:
            return bare.group(0)
    return None


def _matching_braces(text: str) -> dict[int, int]:
    """``{open index: close index}`` of the balanced braces, in one pass (scanning from every box
    start made a run of ``\\boxed{`` quadratic)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for j, ch in enumerate(text):
        if ch == "{":
            stack.append(j)
        elif ch == "}" and stack:
            pairs[stack.pop()] = j
    return pairs


def _clean_numeric(s: str) -> str:
    s = s.strip()
    s = _TEXT_CMD.sub("", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("−", "-").replace("\u2212", "-")
    s = s.replace("\\%", "").replace("%", "").replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = s.strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5"
    s = s.rstrip(".").strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    return s


_MAX_NUMBER_CHARS = 200
_MAX_EXPONENT = 400


def _to_fraction(dec: str) -> Fraction:
    dec = dec.replace(",", "").replace(" ", "")
    # Guard against "1e999999999" (a huge exact int) or megabyte-long digit strings.
    exp = re.search(r"[eE]([-+]?\d+)$", dec)
    if len(dec) > _MAX_NUMBER_CHARS or (exp and abs(int(exp.group(1))) > _MAX_EXPONENT):
        raise ValueError("number too large to compare")
    return Fraction(dec)


def parse_number(text: str) -> Fraction | None:
    """Parse ``text`` as ONE number (after clean-up) into an exact Fraction, or None.

    Accepts ``9,386``, ``9386.0``, ``-3``, ``1e3``, ``1/2``, ``\\frac{1}{2}``, ``-\\frac12``,
    ``$5$``, ``50%``, ``x = 5``, ``5.`` (trailing period). Rejects anything with other text.
    """
    if text is None:
        return None
    s = _clean_numeric(str(text))
    if not s:
        return None
    try:
        m = _LATEX_FRAC_FULL.match(s)
        if m:
            sign, num, den = m.groups()
            n, d = parse_number(num.strip("{}")), parse_number(den.strip("{}"))
            if n is None or d is None or d == 0:
                return None
            value = n / d
            return -value if sign == "-" else value
        compact = s.replace(" ", "")
        if compact.startswith("+"):
            compact = compact[1:]
        if "/" in compact:
            num_s, _, den_s = compact.partition("/")
            if _FULL_DEC.match(num_s) and _FULL_DEC.match(den_s):
                den = _to_fraction(den_s)
                return None if den == 0 else _to_fraction(num_s) / den
            return None
        if _FULL_DEC.match(compact):
            return _to_fraction(compact)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _number_tokens(text: str) -> list[str]:
    text = text.replace("\u2212", "-").replace("\\$", "").replace("$", "")  # "-$5" is -5
    return [m.group(1) for m in _NUMBER_TOKEN.finditer(text)]


def _last_number(text: str) -> Fraction | None:
    for token in reversed(_number_tokens(text)):
        value = parse_number(token)
        if value is not None:
            return value
    return None


def _number_in_box(content: str) -> Fraction | None:
    value = parse_number(content)
    if value is not None:
        return value
    tokens = _number_tokens(_clean_numeric(content))
    if len(tokens) == 1:  # "5 apples" -> 5, but "2x+1" stays non-numeric
        return parse_number(tokens[0])
    return None


def extract_final_answer(completion: str) -> tuple[str | None, Fraction | None]:
    """(answer text, numeric value or None) of a completion's final answer.

    The text is the boxed content, the text after the last ``####``, or the last number
    token; both are None when the completion has none of them.
    """
    boxed = extract_boxed(completion)
    if boxed is not None:
        return boxed, _number_in_box(boxed)
    if "####" in completion:
        tail = completion.rsplit("####", 1)[1]
        value = _last_number(tail.strip().splitlines()[0] if tail.strip() else "")
        if value is not None:
            return tail.strip(), value
    parts = _ANSWER_IS.split(completion)
    if len(parts) > 1:  # "The answer is 8. Check: 8 - 3 = 5" -> 8, not the last number
        tokens = _number_tokens(parts[-1])
        value = parse_number(tokens[0]) if tokens else None
        if value is not None:
            return tokens[0], value
    tokens = _number_tokens(completion)
    for token in reversed(tokens):
        value = parse_number(token)
        if value is not None:
            return token, value
    return None, None


def _reference_value(answer: str) -> Fraction | None:
    value = parse_number(answer)
    if value is not None:
        return value
    if "####" in answer:
        return parse_number(answer.rsplit("####", 1)[1].strip())
    boxed = extract_boxed(answer)
    if boxed is not None:
        return _number_in_box(boxed)
    with_unit = _NUMBER_WITH_UNIT.match(answer)  # "2 apples", "15 km"
    return parse_number(with_unit.group(1)) if with_unit else None


def normalize_text_answer(text: str) -> str:
    """Strip, lowercase, remove surrounding ``$``/``\\(\\)`` and a trailing period, collapse spaces."""
    s = _TEXT_WRAPPER.sub(r"\1", str(text)).strip().lower()  # \text{A} is A
    changed = True
    while changed:
        changed = False
        s = s.strip()
        if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
            s, changed = s[1:-1], True
        elif s.startswith("\\(") and s.endswith("\\)"):
            s, changed = s[2:-2], True
        elif s.endswith("."):
            s, changed = s[:-1], True
    return re.sub(r"\s+", " ", s).strip()


def _values_close(a: Fraction, b: Fraction, rel_tol: float) -> bool:
    if a == b or not rel_tol:
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=0.0)
    except OverflowError:
        return False


def math_answers_equal(completion: str, answer: Any, *, rel_tol: float = 0.0) -> bool:
    """True if the completion's final answer matches ``answer`` (see module docstring)."""
    completion = "" if completion is None else str(completion)
    answer_s = str(answer)
    ref = _reference_value(answer_s)
    text, value = extract_final_answer(completion)
    if ref is not None:
        return value is not None and _values_close(value, ref, rel_tol)
    # Non-numeric reference: normalised string comparison.
    target = normalize_text_answer(answer_s)
    if not target:
        return False
    boxed = extract_boxed(completion)
    if boxed is not None:
        candidates = [boxed]
    else:
        candidates = [completion]
        parts = _ANSWER_IS.split(completion)
        if len(parts) > 1:
            candidates.append(parts[-1])
    return any(normalize_text_answer(c) == target for c in candidates)


def make_math_answer(*, rel_tol: float = 0.0) -> Callable[..., float]:
    """Factory for a ``math_answer`` reward with a relative tolerance (default 0: exact; config
    ``options: {rel_tol: 1e-4}`` accepts rounded decimals such as 0.3333 for 1/3)."""

    def math_answer(prompt: str, completion: str, answer: Any = None, **fields: Any) -> float:
        """1.0 if the completion's final answer equals the row's ``answer``, else 0.0."""
        if answer is None:
            raise ValueError("math_answer needs an 'answer' field in the dataset row")
        return 1.0 if math_answers_equal(completion, answer, rel_tol=rel_tol) else 0.0

    return math_answer


math_answer = make_math_answer()
math_answer.__name__ = math_answer.__qualname__ = "math_answer"
