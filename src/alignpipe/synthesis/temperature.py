"""Temperature schedules for sampling (exploration, survey section 4.3): per round and per sample.

A schedule is plain data, as it appears in a recipe:

- per round (`round_temperature`): a number (every round), a list (round r takes item r; the last one
  repeats for later rounds), or `{"from": a, "to": b}` (linear over the run: a in round 0, b in the last);
  e.g. explore hot early and exploit cooler later.
- per sample within a prompt (`sample_temperatures`): a number (all k samples alike), a list of k values,
  `{"lo": a, "hi": b}` (k temperatures evenly spread over [a, b], so one prompt's k samples range from
  conservative to adventurous), or `{"spread": s}` (evenly over [t - s, t + s] around the round's
  temperature t, floored at 0).

Temperature 0 means greedy. Bad values raise AlignpipeError naming `key` (the recipe key, for the message).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from alignpipe import AlignpipeError

Schedule = float | int | Sequence[float] | Mapping[str, Any]


def _temp(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise AlignpipeError(f"{key}: a temperature must be a number >= 0, got {value!r}")
    return float(value)


def _keys(schedule: Mapping[str, Any], allowed: set[str], key: str) -> None:
    unknown = sorted(set(schedule) - allowed)
    if unknown or not schedule:
        raise AlignpipeError(f"{key}: unknown schedule keys {unknown or '(none given)'}; "
                             f"use {' or '.join(sorted(allowed))}")


def round_temperature(schedule: Schedule, round: int, rounds: int, key: str = "synthesis.temperature") -> float:
    """The sampling temperature of round `round` (0-based) of `rounds`."""
    if round < 0 or rounds < 1:
        raise ValueError(f"need 0 <= round and rounds >= 1, got round={round}, rounds={rounds}")
    if isinstance(schedule, Mapping):
        _keys(schedule, {"from", "to"}, key)
        if set(schedule) != {"from", "to"}:
            raise AlignpipeError(f"{key}: a linear schedule needs both 'from' and 'to', got {sorted(schedule)}")
        start, end = _temp(schedule["from"], f"{key}.from"), _temp(schedule["to"], f"{key}.to")
        frac = min(round, rounds - 1) / (rounds - 1) if rounds > 1 else 0.0
        return start + (end - start) * frac
    if isinstance(schedule, (list, tuple)):
        if not schedule:
            raise AlignpipeError(f"{key}: the per-round list is empty")
        return _temp(schedule[min(round, len(schedule) - 1)], f"{key}[{min(round, len(schedule) - 1)}]")
    return _temp(schedule, key)


def sample_temperatures(schedule: Schedule, k: int, center: float | None = None,
                        key: str = "synthesis.sample_temperatures") -> list[float]:
    """k temperatures, one per sample of a prompt (in sample order). `center`: the round's temperature, for
    a `{"spread": s}` schedule."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(schedule, Mapping):
        if "spread" in schedule:
            _keys(schedule, {"spread"}, key)
            if center is None:
                raise AlignpipeError(f"{key}: a 'spread' schedule needs the round's temperature")
            s = _temp(schedule["spread"], f"{key}.spread")
            lo, hi = _temp(center, key) - s, _temp(center, key) + s
        else:
            _keys(schedule, {"lo", "hi"}, key)
            if set(schedule) != {"lo", "hi"}:
                raise AlignpipeError(f"{key}: a range needs both 'lo' and 'hi', got {sorted(schedule)}")
            lo, hi = _temp(schedule["lo"], f"{key}.lo"), _temp(schedule["hi"], f"{key}.hi")
            if lo > hi:
                raise AlignpipeError(f"{key}: lo ({lo}) is above hi ({hi})")
        if k == 1:
            return [max((lo + hi) / 2, 0.0)]
        return [max(lo + (hi - lo) * j / (k - 1), 0.0) for j in range(k)]
    if isinstance(schedule, (list, tuple)):
        if len(schedule) != k:
            raise AlignpipeError(f"{key}: {len(schedule)} temperatures listed for {k} samples per prompt")
        return [_temp(t, f"{key}[{j}]") for j, t in enumerate(schedule)]
    return [_temp(schedule, key)] * k
