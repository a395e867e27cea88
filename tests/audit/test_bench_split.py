"""bench/audit.py's interleaved comparison: each match call counts for the phase it started in.

Pure function, no server: a call misfiled across a switch would bias the p99 the issue's target is
judged on, so the boundaries are checked here rather than trusted.
"""

from __future__ import annotations

from bench.paced import split_by_phase

SWITCHES = [(10.0, False), (11.0, True), (13.0, False)]  # off 10-11, on 11-13, off 13-end


def test_calls_count_for_the_phase_they_started_in() -> None:
    calls = [(10.5, 1.0), (11.5, 2.0), (12.9, 3.0), (13.5, 4.0)]
    base, loaded = split_by_phase(calls, SWITCHES, end=14.0, settle=0.1)
    assert base == [1.0, 4.0]
    assert loaded == [2.0, 3.0]


def test_calls_just_after_a_switch_before_the_start_or_from_the_end_count_for_neither() -> None:
    calls = [(9.9, 1.0), (10.05, 2.0), (11.0, 3.0), (11.09, 4.0), (11.2, 5.0), (13.05, 6.0), (14.0, 7.0),
             (14.5, 8.0)]
    base, loaded = split_by_phase(calls, SWITCHES, end=14.0, settle=0.1)
    assert base == []
    assert loaded == [5.0]


def test_unsorted_calls_are_split_as_sorted_ones() -> None:
    calls = [(13.5, 4.0), (10.5, 1.0), (12.5, 3.0), (11.5, 2.0)]
    assert split_by_phase(calls, SWITCHES, end=14.0, settle=0.1) == ([1.0, 4.0], [2.0, 3.0])
