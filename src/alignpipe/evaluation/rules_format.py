"""Format rules: the counting and shape checks that instruction-following prompts state ("in 3 paragraphs",
"all in lowercase", "end with the phrase ...").

They live beside `rules.py` (which stays small) and are reached through it: `rules.rule_from_spec` knows
every type in `FIELDS` below, so prompts carry them in `meta["rules"]` like the basic ones. Types:

- `sentence_count`, `paragraph_count`, `bullet_count`, `placeholder_count` (min, max)
- `section_count` (min, max, marker: default `SECTION`)
- `word_frequency` (word, min, max): whole-word occurrences, case-insensitive
- `all_lowercase`, `all_uppercase`: every letter in that case (and at least one letter)
- `starts_with`, `ends_with` (phrase, case_sensitive: default true)
- `title`: a non-empty title in double angle brackets, `<<like this>>`

Conventions (kept simple so that a person can count by hand and agree with the checker): surrounding
whitespace is ignored; a sentence ends at `.`, `!` or `?` followed by whitespace (closing quotes or brackets
allowed between), or at a line break, so "e.g. this" counts as two; paragraphs are separated by blank lines;
a bullet is a line starting with `-`, `*`, `+` or `•` and a space; a section starts a line with the marker and
a number (`SECTION 2`); a placeholder is text in square brackets on one line (`[address]`).
"""

from __future__ import annotations

import re
from typing import Any

from alignpipe.evaluation.rules import Rule, _bounds, _check_bounds

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_BULLET = re.compile(r"^[ \t]*[-*+•][ \t]+\S", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]*\S[^\[\]\n]*\]")
_TITLE = re.compile(r"<<[^<>\n]*\S[^<>\n]*>>")
_HAS_WORD = re.compile(r"\w")


def count_sentences(text: str) -> int:
    """Pieces with a letter or digit after splitting at line breaks and sentence-ending punctuation."""
    pieces = (p for line in text.strip().splitlines() for p in _SENTENCE_END.split(line.strip()))
    return sum(1 for p in pieces if _HAS_WORD.search(p))


def count_paragraphs(text: str) -> int:
    return sum(1 for p in _PARAGRAPH_BREAK.split(text.strip()) if p.strip())


def _counter(kind: str, count: Any, unit: str, lo: int | None, hi: int | None, name: str | None) -> Rule:
    _check_bounds(lo, hi, kind)
    return Rule(name or kind, lambda text: _bounds(count(text), lo, hi, unit))


def sentence_count(min_sentences: int | None = None, max_sentences: int | None = None, *,
                   name: str | None = None) -> Rule:
    return _counter("sentence_count", count_sentences, "sentences", min_sentences, max_sentences, name)


def paragraph_count(min_paragraphs: int | None = None, max_paragraphs: int | None = None, *,
                    name: str | None = None) -> Rule:
    return _counter("paragraph_count", count_paragraphs, "paragraphs", min_paragraphs, max_paragraphs, name)


def bullet_count(min_bullets: int | None = None, max_bullets: int | None = None, *,
                 name: str | None = None) -> Rule:
    return _counter("bullet_count", lambda t: len(_BULLET.findall(t)), "bullets", min_bullets, max_bullets, name)


def placeholder_count(min_placeholders: int | None = None, max_placeholders: int | None = None, *,
                      name: str | None = None) -> Rule:
    """Counts `[...]` placeholders: a template the reader fills in (`[date]`, `[your name]`)."""
    return _counter("placeholder_count", lambda t: len(_PLACEHOLDER.findall(t)), "placeholders",
                    min_placeholders, max_placeholders, name)


def section_count(min_sections: int | None = None, max_sections: int | None = None, *, marker: str = "SECTION",
                  name: str | None = None) -> Rule:
    """Counts lines that start with `marker` and a number (`SECTION 1`), case-sensitive: the prompt names
    the marker exactly."""
    if not marker.strip():
        raise ValueError("section_count: marker must not be empty")
    pattern = re.compile(rf"^[ \t#*]*{re.escape(marker.strip())}[ \t]+\d+", re.MULTILINE)
    return _counter("section_count", lambda t: len(pattern.findall(t)), f"{marker.strip()} sections",
                    min_sections, max_sections, name)


def word_frequency(word: str, min_count: int | None = None, max_count: int | None = None, *,
                   name: str | None = None) -> Rule:
    """Whole-word, case-insensitive occurrences of `word` (which may be a phrase): "garden" does not count
    inside "gardening"."""
    if not word.strip():
        raise ValueError("word_frequency: word must not be empty")
    pattern = re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)
    return _counter("word_frequency", lambda t: len(pattern.findall(t)), f"x {word.strip()!r}",
                    min_count, max_count, name)


def _letter_case(upper: bool, name: str | None) -> Rule:
    kind = "all_uppercase" if upper else "all_lowercase"

    def check(text: str) -> tuple[bool, str]:
        letters = [c for c in text if c.isalpha()]
        if not letters:
            return False, "no letters"
        wrong = [c for c in letters if (c.islower() if upper else c.isupper())]
        if wrong:
            return False, f"{len(wrong)} {'lowercase' if upper else 'uppercase'} letter(s), first {wrong[0]!r}"
        return True, f"all {len(letters)} letters {'uppercase' if upper else 'lowercase'}"

    return Rule(name or kind, check)


def all_lowercase(*, name: str | None = None) -> Rule:
    return _letter_case(False, name)


def all_uppercase(*, name: str | None = None) -> Rule:
    return _letter_case(True, name)


def _affix(kind: str, phrase: str, case_sensitive: bool, name: str | None) -> Rule:
    if not phrase.strip():
        raise ValueError(f"{kind}: phrase must not be empty")
    want = phrase.strip() if case_sensitive else phrase.strip().lower()

    def check(text: str) -> tuple[bool, str]:
        body = text.strip() if case_sensitive else text.strip().lower()
        ok = body.startswith(want) if kind == "starts_with" else body.endswith(want)
        edge = body[:len(want) + 10] if kind == "starts_with" else body[-(len(want) + 10):]
        return (True, f"{kind} {phrase.strip()!r}") if ok else (False, f"{kind} {phrase.strip()!r} fails: {edge!r}")

    return Rule(name or kind, check)


def starts_with(phrase: str, *, case_sensitive: bool = True, name: str | None = None) -> Rule:
    return _affix("starts_with", phrase, case_sensitive, name)


def ends_with(phrase: str, *, case_sensitive: bool = True, name: str | None = None) -> Rule:
    """The stripped text ends with `phrase` exactly: nothing may follow it, not even a full stop."""
    return _affix("ends_with", phrase, case_sensitive, name)


def title(*, name: str | None = None) -> Rule:
    def check(text: str) -> tuple[bool, str]:
        m = _TITLE.search(text)
        return (True, f"title {m.group(0)[:80]!r}") if m else (False, "no <<title>>")

    return Rule(name or "title", check)


_COUNTS = {"sentence_count": sentence_count, "paragraph_count": paragraph_count, "bullet_count": bullet_count,
           "placeholder_count": placeholder_count}
# the spec fields of each type (besides `type` and `name`)
FIELDS: dict[str, set[str]] = {**{k: {"min", "max"} for k in _COUNTS},
                               "section_count": {"min", "max", "marker"}, "word_frequency": {"word", "min", "max"},
                               "all_lowercase": set(), "all_uppercase": set(),
                               "starts_with": {"phrase", "case_sensitive"}, "ends_with": {"phrase", "case_sensitive"},
                               "title": set()}


def _int_or_none(fields: dict[str, Any], key: str) -> int | None:
    value = fields.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"field {key!r} must be an integer")
    return value


def _text(fields: dict[str, Any], key: str) -> str:
    if not isinstance(fields.get(key), str):
        raise ValueError(f"field {key!r} is required and must be a string")
    return fields[key]


def rule_from_fields(kind: str, fields: dict[str, Any], name: str | None) -> Rule:
    """The rule of type `kind` (one of `FIELDS`) from a spec's checked fields; `rules.rule_from_spec` calls
    this and adds the rule type to any error."""
    if kind in _COUNTS or kind in ("section_count", "word_frequency"):
        lo, hi = _int_or_none(fields, "min"), _int_or_none(fields, "max")
        if kind == "section_count":
            marker = fields.get("marker", "SECTION")
            if not isinstance(marker, str):
                raise ValueError("field 'marker' must be a string")
            return section_count(lo, hi, marker=marker, name=name)
        if kind == "word_frequency":
            return word_frequency(_text(fields, "word"), lo, hi, name=name)
        return _COUNTS[kind](lo, hi, name=name)
    if kind in ("starts_with", "ends_with"):
        fn = starts_with if kind == "starts_with" else ends_with
        return fn(_text(fields, "phrase"), case_sensitive=bool(fields.get("case_sensitive", True)), name=name)
    if kind == "all_lowercase":
        return all_lowercase(name=name)
    if kind == "all_uppercase":
        return all_uppercase(name=name)
    if kind == "title":
        return title(name=name)
    raise ValueError(f"unknown format rule type {kind!r}")
