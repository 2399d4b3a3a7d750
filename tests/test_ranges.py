"""ranges.py: work stealing between the connections of one file, and the adaptive count."""
from __future__ import annotations

import pytest

from ranges import Growth, LinkProbe, Pieces, left

MiB = 1 << 20


def test_an_idle_connection_takes_the_back_half_of_the_range_with_most_left() -> None:
    pieces = Pieces([[0, 10 * MiB - 1, 0], [10 * MiB, 20 * MiB - 1, 10 * MiB]])
    a, b = pieces.take(), pieces.take()
    assert (a, b) == ([0, 10 * MiB - 1, 0], [10 * MiB, 20 * MiB - 1, 10 * MiB])
    assert pieces.advance(a, 8 * MiB) == 10 * MiB - 1           # a has 2 MiB left, b 10
    c = pieces.take()
    assert c == [15 * MiB, 20 * MiB - 1, 15 * MiB] and b[1] == 15 * MiB - 1
    assert pieces.advance(b, 16 * MiB) == 15 * MiB - 1          # past its new end: clipped
    assert b[2] == 15 * MiB and left(b) == 0
    assert [p[0] for p in pieces.parts] == [0, 10 * MiB, 15 * MiB]    # in file order
    assert pieces.done() == 8 * MiB + 5 * MiB


def test_nothing_is_split_below_the_minimum_and_released_ranges_are_taken_first() -> None:
    pieces = Pieces([[0, 3 * MiB - 1, 0]], min_split=2 * MiB)
    part = pieces.take()
    assert part is not None and pieces.take() is None and not pieces.worth_more()
    pieces.release(part)                       # its connection failed: another takes the rest
    assert pieces.worth_more() and pieces.take() is part


def test_connections_double_while_throughput_grows_and_stop_when_it_does_not() -> None:
    g = Growth(8, 32, interval=0.25)
    assert g.tick(0, now=0.0) == 8 and g.tick(1, now=0.1) == 8     # measured from the first byte
    assert g.tick(100, now=0.35) == 16         # first rate measured: try twice as many
    assert g.tick(300, now=0.6) == 32          # twice the rate: double again, up to the most
    capped = Growth(8, 64, interval=0.25)
    assert [capped.tick(n, now=t) for n, t in ((1, 0.0), (101, 0.25), (301, 0.5))] == [8, 16, 32]
    assert capped.tick(401, now=0.75) == 32    # twice the connections, half again: it stops
    assert capped.tick(1401, now=1.0) == 32
    fixed = Growth(8, 8)
    assert [fixed.tick(n, now=t) for n, t in ((1, 0.0), (100, 1.0), (300, 2.0))] == [8, 8, 8]


def test_the_probe_judges_the_runs_total_from_its_first_bytes_on_and_a_cap_is_for_good() -> None:
    fetched = [0]
    fast = LinkProbe(100.0, lambda: fetched[0], first=0.1, every=0.25)
    assert not fast.capped_now(0.0) and not fast.judged            # nothing yet: no clock
    fetched[0] = 1000                                                # a first burst: not counted
    assert not fast.capped_now(0.01) and not fast.judged
    fetched[0] += 12                                                 # 12 B in 0.1 s: 120 B/s
    assert not fast.capped_now(0.11) and fast.judged and fast.rate == pytest.approx(120)
    fetched[0] += 15                                                 # 60 B/s: still half of 100
    assert not fast.capped_now(0.36)
    fetched[0] += 10                                                 # 40 B/s: capped, for good
    assert fast.capped_now(0.61) and fast.capped and fast.rate == pytest.approx(40)   # why
    fetched[0] += 1000
    assert fast.capped_now(0.86)
    slow = LinkProbe(100.0, lambda: fetched[0])
    slow.capped_now(1.0)
    fetched[0] += 1
    slow.capped_now(1.01)
    fetched[0] += 5                                                  # 50 B/s in the probe
    assert slow.capped_now(1.11) and slow.rate == pytest.approx(50)


def test_a_probed_file_stays_on_one_connection_until_the_link_is_known_capped() -> None:
    fetched = [0]
    probe = LinkProbe(100.0, lambda: fetched[0], first=0.1)
    g = Growth(8, 16, interval=0.25, probe=probe)
    assert g.wanted == 1 and g.probing and g.tick(0, now=0.0) == 1
    fetched[0] = 10
    assert g.tick(10, now=0.0) == 1                                  # the clock starts
    fetched[0] += 20                                                 # 200 B/s: one is enough
    assert g.tick(30, now=0.1) == 1 and not g.probing
    fetched[0] += 5                                                  # 20 B/s: capped
    assert g.tick(35, now=0.36) == 8 and g.probe is None
    assert g.tick(135, now=0.62) == 16                               # and grows from there
    late = Growth(8, 8, probe=probe)                                 # a file started after that
    assert late.wanted == 8 and not late.probing
    assert Growth(1, 1, probe=LinkProbe(1.0, lambda: 0)).wanted == 1   # nothing to probe for


def test_a_far_server_skips_the_probe_from_its_first_answer_on() -> None:
    far = LinkProbe(100.0, lambda: 0, far=0.02)
    far.answered(0.05)                          # the redirect: 50 ms
    assert not far.capped
    far.answered(0.06)                          # and the CDN: a far server
    assert far.capped and far.judged and far.rate is None and far.answer == 0.05
    g = Growth(8, 8, probe=far)
    assert g.wanted == 8 and not g.probing
    near = LinkProbe(100.0, lambda: 0, far=0.02)
    near.answered(0.3)                          # one slow answer: a busy moment
    near.answered(0.001)
    near.answered(0.5)                          # later answers do not count
    assert not near.capped and not near.judged and near.answer == 0.001
