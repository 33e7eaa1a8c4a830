"""``onnxopt.validate``'s latency helpers, on a fake clock (deterministic: no timing is asserted)."""

from __future__ import annotations

import pytest

from onnxopt import validate


@pytest.fixture
def fake_calls(monkeypatch):
    """Session i's call advances a fake clock by cost(i, call number); runner(sess) returns that call."""
    clock = [0.0]
    counts: dict[int, int] = {}

    def install(cost):
        def runner(sess, names, feed):
            def call():
                counts[sess] = counts.get(sess, 0) + 1
                clock[0] += cost(sess, counts[sess])
            return call

        monkeypatch.setattr(validate.runtime, "runner", runner)
        monkeypatch.setattr(validate.time, "perf_counter", lambda: clock[0])

    return install


def test_speedups_pair_the_sessions_round_by_round(fake_calls):
    # 2 warm-up calls, then 3 calls per round: the machine is 3x slower from round 4 on (calls > 2 + 3*3),
    # and session 1 is always 2x faster than session 0 in the same round
    fake_calls(lambda sess, n: (1.0 if n <= 11 else 3.0) * (2.0 if sess == 0 else 1.0))
    medians, speedups = validate.interleaved_speedups([0, 1], {}, rounds=7, repeat=3)
    assert speedups == [1.0, 2.0]
    assert medians == [6000.0, 3000.0]  # ms: most rounds were slow
    assert validate.interleaved_latency_ms([0, 1], {}, rounds=7, repeat=3) == medians


def test_several_feeds_are_taken_in_turn(monkeypatch):
    used = []

    def runner(sess, names, feed):
        return lambda: used.append((sess, feed["i"]))

    monkeypatch.setattr(validate.runtime, "runner", runner)
    validate.interleaved_latency_ms(["a", "b"], [{"i": 0}, {"i": 1}, {"i": 2}], rounds=2, repeat=4)
    timed = used[4:]  # after each session's two warm-up calls (feeds 0 and 1)
    assert used[:4] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert timed == [("a", 0), ("a", 1), ("a", 2), ("a", 0), ("b", 0), ("b", 1), ("b", 2), ("b", 0)] * 2
