"""Exact reading of numeric answers for the math verifier.

Rules (issue 12):

- Numbers compare exactly, never as floats: integers and decimals as `decimal.Decimal` (exact at any size; a
  Decimal keeps its exponent, so `1.5e999999999` costs nothing), `a/b` and `\\frac{a}{b}` as
  `fractions.Fraction`; Python compares a Decimal with a Fraction exactly.
- Scientific notation is one number: `1.5e3`, `1.5E+3`, `1.5 \\times 10^{3}`, `1.5 \\cdot 10^3`, `1.5 x 10^3`,
  and a bare `10^{3}`.
- Thousands separators are `,`, the LaTeX thin space `\\,` and `{,}`, and only in a valid grouping: 1 to 3
  leading digits, then groups of exactly 3 (`1,234,567`, `1\\,234`). Anything else (`1,2`, `12,34`,
  `1,2345`) is AMBIGUOUS: a list or a European decimal, we cannot tell, so it is never equal to a single
  number (`1,2` is neither 12 nor 1.2). It is kept as written, so a list-valued reference can still match
  it symbolically.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_SEP = r"(?:,|\\,|\{,\})"
_MANTISSA = rf"\d+(?:{_SEP}\d+)*(?:\.\d+)?"
_POWER = r"\^\s*(?:\{\s*[+-]?\d+\s*\}|[+-]?\d+)"
_TIMES = r"\s*(?:\\times|\\cdot|[x×*·])\s*"
# A number as it appears in a completion; only non-capturing groups, so re.findall returns whole tokens.
# A power (`2^{10}`) is kept with its base so `2^{10}` is never read as "2" or "10".
_MINUS = "[-\u2212]?"  # an ASCII or a typeset minus sign
NUMBER = rf"{_MINUS}{_MANTISSA}(?:[eE][+-]?\d+|{_TIMES}10\s*{_POWER}|{_POWER}|/\d+)?"

_EXPONENT = r"(?:\{\s*(?P<braced>[+-]?\d+)\s*\}|(?P<plain>[+-]?\d+))"
_DECIMAL_RE = re.compile(
    rf"(?P<sign>[+-]?)(?P<mantissa>{_MANTISSA})(?:[eE](?P<e>[+-]?\d+)|{_TIMES}10\s*\^\s*{_EXPONENT})?")
_POWER_OF_TEN_RE = re.compile(rf"(?P<sign>[+-]?)10\s*\^\s*{_EXPONENT}")
_SLASH_RE = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\s*\{\s*([+-]?\d+)\s*\}\s*\{\s*([+-]?\d+)\s*\}")


class _Ambiguous:
    """The marker for digits joined by separators in no valid thousands grouping (`1,2`)."""

    def __repr__(self) -> str:
        return "AMBIGUOUS"


AMBIGUOUS = _Ambiguous()
Exact = Decimal | Fraction


def grouping_ok(mantissa: str) -> bool:
    """True when the separators in `mantissa` (if any) are thousands separators: 1-3 digits, then 3s."""
    integer = mantissa.lstrip("+-\u2212").split(".")[0]
    groups = re.split(_SEP, integer)
    return len(groups) == 1 or (1 <= len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:]))


def normalize_token(token: str) -> str:
    """An extracted number token with valid thousands separators removed; an ambiguous one as written."""
    token = token.strip()
    mantissa = re.match(rf"{_MINUS}{_MANTISSA}", token)
    if mantissa and not grouping_ok(mantissa.group(0)):
        return token
    return re.sub(_SEP, "", token)


def _strip_wrappers(text: str) -> str:
    """Drop math delimiters, a currency sign and a sentence-final period around a bare answer."""
    s = text.strip().replace("\u2212", "-")  # a typeset minus sign
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left):-len(right)].strip()
    s = s.strip("$").strip()
    s = s.removeprefix("\\$").strip().rstrip(".").strip()
    return s


def parse_exact(text: str) -> Exact | _Ambiguous | None:
    """The exact value of a plain numeric answer, AMBIGUOUS for `1,2`-like digits, None for anything else
    (an expression, LaTeX beyond a plain fraction, or an exponent too large for Decimal)."""
    s = _strip_wrappers(text)
    if m := _FRAC_RE.fullmatch(s):
        sign, num, den = m.groups()
        return _fraction(num, den, negate=sign == "-")
    if m := _SLASH_RE.fullmatch(s):
        return _fraction(m.group(1), m.group(2), negate=False)
    if m := _POWER_OF_TEN_RE.fullmatch(s):
        return _decimal(m.group("sign") + "1", m.group("braced") or m.group("plain"))
    if m := _DECIMAL_RE.fullmatch(s):
        if not grouping_ok(m.group("mantissa")):
            return AMBIGUOUS
        digits = m.group("sign") + re.sub(_SEP, "", m.group("mantissa"))
        return _decimal(digits, m.group("e") or m.group("braced") or m.group("plain") or "0")
    return None


def _decimal(digits: str, exponent: str) -> Decimal | None:
    try:
        return Decimal(f"{digits}e{exponent}")
    except InvalidOperation:  # an exponent past Decimal's range (about 10**18): not read exactly
        return None


def _fraction(num: str, den: str, *, negate: bool) -> Fraction | None:
    # via Decimal: int() refuses strings past 4300 digits, Decimal does not
    numerator, denominator = Fraction(Decimal(num)), Fraction(Decimal(den))
    if denominator == 0:
        return None
    value = numerator / denominator
    return -value if negate else value
