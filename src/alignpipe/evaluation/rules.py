"""Rule verifiers: cheap, deterministic checks of a completion's text.

A `Rule` maps a text to `(passed, detail)`. Constructors: `regex`, `contains_all` (required strings),
`contains_none` (forbidden strings), `char_length` and `word_count` bounds, `valid_json`,
`ends_with_number`. A `RuleSet` combines rules with `all` or `any` and is a pointwise judge: its
judgment scores every rule (`rule:<name>`: 1.0 / 0.0), the fraction passed (`score`) and the combined
verdict (`passed`).

Rules can also come with the data: `rule_verifier` reads `Prompt.meta["rules"]`, a list of specs such as
`{"type": "regex", "pattern": "\\d+"}` (see `rule_from_spec`), combined by `Prompt.meta["rules_mode"]`
(`all`, the default, or `any`). The format rules of `rules_format` (sentence / paragraph / bullet / section /
placeholder counts, word frequency, letter case, starts / ends with a phrase, a `<<title>>`) are specs too.

Lengths count the completion with surrounding whitespace stripped; words are whitespace-separated tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from alignpipe.records import Candidate, Judgment, Prompt

MODES = ("all", "any")


@dataclass(frozen=True)
class Rule:
    name: str
    check: Callable[[str], tuple[bool, str]]

    def __call__(self, text: str) -> tuple[bool, str]:
        return self.check(text)


def _bounds(value: int, lo: int | None, hi: int | None, unit: str) -> tuple[bool, str]:
    if lo is not None and value < lo:
        return False, f"{value} {unit} < minimum {lo}"
    if hi is not None and value > hi:
        return False, f"{value} {unit} > maximum {hi}"
    return True, f"{value} {unit}"


def _check_bounds(lo: int | None, hi: int | None, what: str) -> None:
    if lo is None and hi is None:
        raise ValueError(f"{what}: give a minimum, a maximum or both")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{what}: minimum {lo} > maximum {hi}")


def regex(pattern: str, *, name: str | None = None, flags: int = 0, fullmatch: bool = False) -> Rule:
    """Passes when `pattern` is found in the text (or matches all of it, with `fullmatch`)."""
    compiled = re.compile(pattern, flags)

    def check(text: str) -> tuple[bool, str]:
        m = compiled.fullmatch(text.strip()) if fullmatch else compiled.search(text)
        return (True, f"matched {m.group(0)[:80]!r}") if m else (False, f"no match for /{pattern}/")

    return Rule(name or f"regex:{pattern}", check)


def contains_all(strings: Iterable[str], *, case_sensitive: bool = True, name: str | None = None) -> Rule:
    """Passes when every one of `strings` occurs in the text."""
    needles = list(strings)
    if not needles:
        raise ValueError("contains_all: no strings given")

    def check(text: str) -> tuple[bool, str]:
        hay = text if case_sensitive else text.lower()
        missing = [s for s in needles if (s if case_sensitive else s.lower()) not in hay]
        return (False, f"missing {missing}") if missing else (True, "all present")

    return Rule(name or "contains_all", check)


def contains_none(strings: Iterable[str], *, case_sensitive: bool = False, name: str | None = None) -> Rule:
    """Passes when none of `strings` occurs in the text (case-insensitive by default)."""
    needles = list(strings)
    if not needles:
        raise ValueError("contains_none: no strings given")

    def check(text: str) -> tuple[bool, str]:
        hay = text if case_sensitive else text.lower()
        found = [s for s in needles if (s if case_sensitive else s.lower()) in hay]
        return (False, f"forbidden {found}") if found else (True, "none present")

    return Rule(name or "contains_none", check)


def char_length(min_chars: int | None = None, max_chars: int | None = None, *, name: str | None = None) -> Rule:
    _check_bounds(min_chars, max_chars, "char_length")
    return Rule(name or "char_length", lambda text: _bounds(len(text.strip()), min_chars, max_chars, "chars"))


def word_count(min_words: int | None = None, max_words: int | None = None, *, name: str | None = None) -> Rule:
    _check_bounds(min_words, max_words, "word_count")
    return Rule(name or "word_count", lambda text: _bounds(len(text.split()), min_words, max_words, "words"))


_JSON_FENCE = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n(.*?)\n?```$", re.DOTALL | re.IGNORECASE)


def valid_json(*, required_keys: Iterable[str] = (), allow_fence: bool = True, name: str | None = None) -> Rule:
    """Passes when the whole text (optionally inside one ```json fence) is valid JSON; with
    `required_keys`, it must be an object holding them all."""
    keys = list(required_keys)

    def check(text: str) -> tuple[bool, str]:
        body = text.strip()
        m = _JSON_FENCE.match(body) if allow_fence else None
        if m:
            body = m.group(1)
        try:
            value = json.loads(body)
        except ValueError as exc:
            return False, f"not valid JSON: {exc}"
        if keys:
            if not isinstance(value, dict):
                return False, f"JSON is a {type(value).__name__}, not an object"
            missing = [k for k in keys if k not in value]
            if missing:
                return False, f"JSON object lacks keys {missing}"
        return True, "valid JSON"

    return Rule(name or "valid_json", check)


_ENDS_WITH_NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?[.!]?$")


def ends_with_number(*, name: str | None = None) -> Rule:
    """Passes when the text's last token is a number (`42`, `-3.5`, `1,000`, `3/4`, `12%`), a final `.`
    or `!` allowed; a number glued to a word (`x42`) does not count."""

    def check(text: str) -> tuple[bool, str]:
        m = _ENDS_WITH_NUMBER.search(text.strip())
        return (True, f"ends with {m.group(0)!r}") if m else (False, "does not end with a number")

    return Rule(name or "ends_with_number", check)


class RuleSet:
    """Rules combined with `all` or `any`; a pointwise judge (`(Prompt, Candidate) -> Judgment`)."""

    def __init__(self, rules: Iterable[Rule], mode: str = "all", name: str = "rules") -> None:
        self.rules = list(rules)
        if not self.rules:
            raise ValueError("RuleSet: no rules given")
        if mode not in MODES:
            raise ValueError(f"RuleSet: mode must be one of {MODES}, got {mode!r}")
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"RuleSet: rule names must be unique (pass name=...), repeated: {dupes}")
        self.mode, self.name = mode, name
        self.__name__ = name

    def evaluate(self, text: str) -> dict[str, Any]:
        results = {r.name: r(text) for r in self.rules}
        n_passed = sum(ok for ok, _ in results.values())
        combined = n_passed == len(results) if self.mode == "all" else n_passed > 0
        return {"passed": combined, "score": n_passed / len(results), "results": results}

    def __call__(self, prompt: Prompt, candidate: Candidate) -> Judgment:
        return _judgment(self, prompt, candidate)


def _judgment(rules: RuleSet, prompt: Prompt, candidate: Candidate) -> Judgment:
    ev = rules.evaluate(candidate.completion)
    failed = [f"{name} ({detail})" for name, (ok, detail) in ev["results"].items() if not ok]
    n = len(ev["results"])
    scores = {f"rule:{name}": float(ok) for name, (ok, _) in ev["results"].items()}
    scores.update(score=ev["score"], passed=float(ev["passed"]))
    rationale = f"{n - len(failed)}/{n} rules passed ({rules.mode})" + (f"; failed: {'; '.join(failed)}"
                                                                          if failed else "")
    raw = json.dumps({name: {"passed": ok, "detail": detail} for name, (ok, detail) in ev["results"].items()})
    return Judgment(prompt_id=prompt.id, candidate_ids=[candidate.id], judge=rules.name, scores=scores,
                    rationale=rationale, raw=raw, reason="passed" if ev["passed"] else "failed")


_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def rule_from_spec(spec: dict[str, Any]) -> Rule:
    """A rule from a plain dict (YAML / JSON / Prompt.meta). Types and their fields:
    `regex` (pattern, flags: letters of "imsx", fullmatch), `contains_all` / `contains_none` (strings,
    case_sensitive), `char_length` (min, max), `word_count` (min, max), `valid_json` (required_keys,
    allow_fence), `ends_with_number`, and the types of `rules_format.FIELDS`. Every type takes an optional
    `name`."""
    from alignpipe.evaluation import rules_format  # imports this module: loaded on first use

    if not isinstance(spec, dict):
        raise ValueError(f"rule spec must be a mapping, got {type(spec).__name__}")
    kind = spec.get("type")
    fields = {k: v for k, v in spec.items() if k != "type"}
    allowed = {"regex": {"pattern", "flags", "fullmatch"}, "contains_all": {"strings", "case_sensitive"},
               "contains_none": {"strings", "case_sensitive"}, "char_length": {"min", "max"},
               "word_count": {"min", "max"}, "valid_json": {"required_keys", "allow_fence"},
               "ends_with_number": set(), **rules_format.FIELDS}
    if kind not in allowed:
        raise ValueError(f"rule field 'type': unknown rule type {kind!r} (one of {sorted(allowed)})")
    unknown = set(fields) - allowed[kind] - {"name"}
    if unknown:
        raise ValueError(f"rule {kind!r}: unknown field(s) {sorted(unknown)}")
    name = fields.pop("name", None)
    try:
        if kind in rules_format.FIELDS:
            return rules_format.rule_from_fields(kind, fields, name)
        if kind == "regex":
            if not isinstance(fields.get("pattern"), str):
                raise ValueError("field 'pattern' is required and must be a string")
            flags = 0
            for letter in fields.get("flags", ""):
                if letter not in _FLAGS:
                    raise ValueError(f"field 'flags': unknown flag {letter!r} (use letters of 'imsx')")
                flags |= _FLAGS[letter]
            return regex(fields["pattern"], name=name, flags=flags, fullmatch=bool(fields.get("fullmatch")))
        if kind in ("contains_all", "contains_none"):
            strings = fields.get("strings")
            if isinstance(strings, str) or not isinstance(strings, list) or not all(
                    isinstance(s, str) for s in strings):
                raise ValueError("field 'strings' is required and must be a list of strings")
            fn = contains_all if kind == "contains_all" else contains_none
            kw = {"case_sensitive": bool(fields["case_sensitive"])} if "case_sensitive" in fields else {}
            return fn(strings, name=name, **kw)
        if kind in ("char_length", "word_count"):
            for key in ("min", "max"):
                if fields.get(key) is not None and (not isinstance(fields[key], int) or isinstance(fields[key], bool)):
                    raise ValueError(f"field {key!r} must be an integer")
            fn = char_length if kind == "char_length" else word_count
            return fn(fields.get("min"), fields.get("max"), name=name)
        if kind == "valid_json":
            return valid_json(required_keys=fields.get("required_keys", ()),
                              allow_fence=fields.get("allow_fence", True), name=name)
        return ends_with_number(name=name)
    except re.error as exc:
        raise ValueError(f"rule {kind!r}: field 'pattern' is not a valid regular expression: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"rule {kind!r}: {exc}") from None


def ruleset_from_spec(specs: list[dict[str, Any]], mode: str = "all", name: str = "rules") -> RuleSet:
    """A RuleSet from a list of specs; an error names the index of the bad rule."""
    if not isinstance(specs, list) or not specs:
        raise ValueError("rules must be a non-empty list of rule specs")
    rules = []
    for i, spec in enumerate(specs):
        try:
            rules.append(rule_from_spec(spec))
        except ValueError as exc:
            raise ValueError(f"rules[{i}]: {exc}") from None
    return RuleSet(rules, mode=mode, name=name)


def rule_verifier(prompt: Prompt, candidate: Candidate) -> Judgment:
    """Judge a candidate by the rules its prompt carries in `meta["rules"]` (mode: `meta["rules_mode"]`).
    A prompt without rules, or with a malformed spec, gives an `error` judgment naming the problem."""
    try:
        rules = ruleset_from_spec(prompt.meta.get("rules"), mode=prompt.meta.get("rules_mode", "all"),
                                  name="rule_verifier")
    except ValueError as exc:
        return Judgment(prompt_id=prompt.id, candidate_ids=[candidate.id], judge="rule_verifier",
                        status="error", reason=f"prompt meta: {exc}")
    return rules(prompt, candidate)
