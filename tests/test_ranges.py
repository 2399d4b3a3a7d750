"""ranges.py: work stealing between the connections of one file, and the adaptive count."""
from __future__ import annotations

from ranges import Growth, Pieces, left

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


def test_connections_grow_while_throughput_grows_and_stop_when_it_does_not() -> None:
    g = Growth(16, 32, step=4, interval=0.5)
    assert g.tick(1, now=0.0) == 16
    assert g.tick(160, now=0.5) == 20          # first rate measured: try more
    assert g.tick(360, now=1.0) == 24          # +25%: more again
    assert g.tick(560, now=1.5) == 24          # no gain: stays, and never grows again
    assert g.tick(1060, now=2.0) == 24
    fixed = Growth(8, 8)
    assert [fixed.tick(n, now=t) for n, t in ((1, 0.0), (100, 1.0), (300, 2.0))] == [8, 8, 8]
