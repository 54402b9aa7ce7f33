"""Temperature schedules (synthesis/temperature.py): per round and per sample."""

from __future__ import annotations

import pytest

from alignpipe import AlignpipeError
from alignpipe.synthesis.temperature import round_temperature, sample_temperatures


def test_round_temperature_constant_list_linear():
    assert [round_temperature(0.7, r, 3) for r in range(3)] == [0.7, 0.7, 0.7]
    assert [round_temperature([1.0, 0.8], r, 4) for r in range(4)] == [1.0, 0.8, 0.8, 0.8]  # last repeats
    linear = {"from": 1.2, "to": 0.6}
    assert [round_temperature(linear, r, 4) for r in range(4)] == pytest.approx([1.2, 1.0, 0.8, 0.6])
    assert round_temperature(linear, 0, 1) == 1.2  # a one-round run starts (and ends) at `from`


def test_sample_temperatures_spread():
    assert sample_temperatures(1.0, 3) == [1.0, 1.0, 1.0]
    assert sample_temperatures({"lo": 0.4, "hi": 1.2}, 5) == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.2])
    assert sample_temperatures({"lo": 0.4, "hi": 1.2}, 1) == pytest.approx([0.8])
    assert sample_temperatures({"spread": 0.5}, 3, center=0.3) == pytest.approx([0.0, 0.3, 0.8])  # floored at 0
    assert sample_temperatures([0.0, 1.0], 2) == [0.0, 1.0]


@pytest.mark.parametrize("call, match", [
    (lambda: round_temperature(-0.1, 0, 1), r"synthesis.temperature: a temperature must be a number >= 0"),
    (lambda: round_temperature({"from": 1.0}, 0, 2), "needs both 'from' and 'to'"),
    (lambda: round_temperature({"start": 1.0}, 0, 2), r"unknown schedule keys \['start'\]"),
    (lambda: round_temperature([1.0, "hot"], 1, 2), r"synthesis.temperature\[1\]"),
    (lambda: round_temperature([], 0, 2), "list is empty"),
    (lambda: sample_temperatures([1.0, 0.5], 3), "2 temperatures listed for 3 samples"),
    (lambda: sample_temperatures({"lo": 1.0, "hi": 0.5}, 3), r"lo \(1.0\) is above hi"),
    (lambda: sample_temperatures({"spread": 0.2}, 3), "needs the round's temperature"),
    (lambda: sample_temperatures(True, 3), "must be a number"),
])
def test_bad_schedules_name_the_key(call, match):
    with pytest.raises(AlignpipeError, match=match):
        call()
