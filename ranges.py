"""The ranges of one file fetched over several connections: who fetches what, and how many.

A file is cut into one range per connection; a connection that finishes takes an untaken range,
else the back half of the range with the most bytes left (as aria2c's --min-split-size does), so
no connection idles while another still has a long way to go and the last bytes of the file
arrive at about the same time on every connection. With an adaptive count, connections are
added while the total throughput still grows (a link capped per connection) and no more once it
does not (a link or a CPU that is already full); and a file may first try one connection alone
(the probe), to learn whether the link needs more at all.

Each range is a list [start, end (inclusive), next offset]; the list is shared with the part
map saved on disk, so a stolen half is a part of its own there too. Pure bookkeeping: no I/O.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

MiB = 1 << 20


def left(part: list[int]) -> int:
    """Bytes of a range not fetched yet."""
    return max(0, part[1] + 1 - part[2])


class Pieces:
    """The ranges of one file and which of them a connection is fetching now."""

    def __init__(self, parts: list[list[int]], min_split: int = MiB) -> None:
        self.parts = sorted(parts)
        self.min_split = min_split          # never leave either half of a split smaller
        self.lock = threading.Lock()
        self._busy: set[int] = set()

    def take(self) -> list[int] | None:
        """A range for an idle connection: an untaken one, else the back half of the range
        with the most bytes left; None when nothing is worth another request."""
        with self.lock:
            for part in self.parts:
                if id(part) not in self._busy and left(part):
                    self._busy.add(id(part))
                    return part
            victim = max(self.parts, key=left, default=None)
            if victim is None or left(victim) < 2 * self.min_split:
                return None
            mid = victim[2] + left(victim) // 2
            new = [mid, victim[1], mid]
            victim[1] = mid - 1
            self.parts.insert(self.parts.index(victim) + 1, new)
            self._busy.add(id(new))
            return new

    def worth_more(self) -> bool:
        """Whether another connection would get a range (take() would not say None)."""
        with self.lock:
            return any(id(p) not in self._busy and left(p) for p in self.parts) or any(
                left(p) >= 2 * self.min_split for p in self.parts)

    def release(self, part: list[int]) -> None:
        with self.lock:
            self._busy.discard(id(part))

    def advance(self, part: list[int], offset: int) -> int:
        """Record that the range's bytes up to `offset` are written; returns the range's end
        now (a split may have moved it closer)."""
        with self.lock:
            part[2] = min(offset, part[1] + 1)
            return part[1]

    def end_of(self, part: list[int]) -> int:
        with self.lock:
            return part[1]

    def done(self) -> int:
        """Bytes of the file written so far."""
        with self.lock:
            return sum(p[2] - p[0] for p in self.parts)

    def prefix(self) -> int:
        """Bytes from the file's start that are all written (the ranges are in file order)."""
        with self.lock:
            for _start, end, offset in self.parts:
                if offset <= end:
                    return offset
            return self.parts[-1][1] + 1 if self.parts else 0

    def snapshot(self) -> list[list[int]]:
        with self.lock:
            return [list(p) for p in self.parts]


class LinkProbe:
    """Whether one connection per big file is enough on the run's link. Not if the server is
    far (see answered); else judged on the run's total throughput while its big files have one
    connection each: at `enough` bytes/s the CPU, not the link, sets the pace, and more
    connections cost more than they bring. Judged once `first` seconds of data have come (the
    probe), then every `every` seconds against half of `enough` (a dip is the CPU's noise, not
    a capped link). `capped` (one is not enough) is for good: every big file opens its
    connections from then on.

    The total, not each file's own rate: files sharing a CPU take turns, so each one's rate
    jumps around while their sum holds. `fetched()` gives the run's bytes so far."""

    def __init__(self, enough: float, fetched: Callable[[], int], first: float = 0.1,
                 every: float = 0.25, far: float = 0.02) -> None:
        self.enough, self.fetched = enough, fetched
        self.first, self.every, self.far = first, every, far
        self.capped = False
        self.rate: float | None = None          # the run's rate at the judgement that stands
        self.answer: float | None = None        # seconds the quicker of the first two waited
        self._answers: list[float] = []
        self._lock = threading.Lock()
        self._base: int | None = None
        self._mark: tuple[float, int] | None = None

    @property
    def judged(self) -> bool:
        return self.capped or self.rate is not None

    def answered(self, seconds: float) -> None:
        """A file request got its answer after `seconds`. The first two (a redirect and the
        CDN's answer, usually) decide whether the server is far, if both took `far` or more
        (one alone may be a busy moment): there one TCP connection cannot fill the link (its
        window per round trip), so the big files open all their connections at once instead
        of probing, which would cost them a round trip or more on the connections they add."""
        with self._lock:
            if len(self._answers) < 2:
                self._answers.append(seconds)
                if len(self._answers) == 2:
                    self.answer = min(self._answers)
                    self.capped = self.capped or self.answer >= self.far

    def capped_now(self, now: float | None = None) -> bool:
        """Called by the files on one connection; True once the link is known to be capped."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.capped:
                return True
            done = self.fetched()
            if self._mark is None:     # the clock starts at the first bytes seen, which are
                if self._base is None:  # not counted (they may be a server's first burst)
                    self._base = done
                if done > self._base:
                    self._mark = (now, done)
                return False
            since, then = self._mark
            if now - since < (self.every if self.judged else self.first):
                return False
            rate = (done - then) / (now - since)
            self._mark = (now, done)
            bar = self.enough / 2 if self.judged else self.enough
            self.capped = rate < bar
            if self.capped or self.rate is None:
                self.rate = rate
            return self.capped


class Growth:
    """How many connections a file should use: from `start`, doubled each time the total
    throughput over the last `interval` grew by `gain` since the previous doubling, up to
    `most`; once a doubling does not pay, no more. On a link capped per connection a doubling
    nearly doubles the throughput; on one that is not (or a CPU that is full) it adds nothing.

    With a `probe` whose link is not known to be capped, the file starts on one connection and
    stays on it while the probe says one is enough; once it says otherwise, the file goes to
    `start` and grows from there."""

    def __init__(self, start: int, most: int, interval: float = 0.25, gain: float = 1.3,
                 probe: LinkProbe | None = None) -> None:
        self.start = max(1, start)
        self.most = max(self.start, most)
        self.interval, self.gain = interval, gain
        self.probe = probe if probe is not None and not probe.capped and self.start > 1 else None
        self.wanted = 1 if self.probe else self.start
        self._base: int | None = None           # bytes done at the first tick (a resumed file)
        self._mark: tuple[float, int] | None = None
        self._before: float | None = None       # bytes/s before the last doubling

    @property
    def probing(self) -> bool:
        """On one connection until the probe has judged (it wants frequent ticks)."""
        return self.probe is not None and not self.probe.judged

    def tick(self, done: int, now: float | None = None) -> int:
        """Called with the bytes done so far; returns the connection count wanted now."""
        now = time.monotonic() if now is None else now
        if self.probe is not None:
            if not self.probe.capped_now(now):
                return self.wanted
            self.probe, self.wanted = None, self.start    # and grow from here
        if self._base is None:
            self._base = done
        if self._mark is None or done == self._base:    # measured from the first byte on
            self._mark = (now, done)
            return self.wanted
        since, then = self._mark
        if now - since < self.interval or self.wanted >= self.most:
            return self.wanted
        rate = (done - then) / (now - since)
        self._mark = (now, done)
        if self._before is None or rate >= self._before * self.gain:
            self._before = rate
            self.wanted = min(self.most, 2 * self.wanted)
        else:
            self.most = self.wanted               # it stopped paying: no more additions
        return self.wanted
