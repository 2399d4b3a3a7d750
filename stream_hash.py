"""Hashing a file while its bytes land, for backends that do not write it in order themselves
(ranged parts, aria2c, wget): the contiguous finished prefix is read back from the disk (the page
cache: cheap) in a background thread as it grows, so when the last byte lands only the tail is
left to hash, and the file is checked without being read again. Our own ranged parts hand over
the bytes their connection at the front of the prefix has just written (feed): those are hashed
from memory, so a file fetched on one connection is never read back.

What is hashed is what is on disk (or what this process wrote there itself), never what a tool
meant to write; a digest that does not match the listing is not vouched for (None), so the
caller hashes the whole file once more and reports what it finds there, as before.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from dataset_manager import RemoteFile
from utils import HASH_CHUNK, new_hasher

log = logging.getLogger("hfdl.hash")


class PrefixHasher:
    """The hash of a file's first bytes, read from disk as the backend says they are final.

    advance(n), from any thread: bytes [0, n) are on disk and will not change. feed(offset,
    data), from any thread: this process has just written `data` at `offset`. close(): stop
    reading in the background (safe to call twice). finish(), after the last byte landed: hash
    the rest, return the digest if it is the listed one, else None."""

    def __init__(self, path: Path, f: RemoteFile) -> None:
        self.path, self.file = path, f
        self._hasher = new_hasher(f.hash_kind, f.size)
        self._hashed = 0                   # bytes fed to the hasher
        self._hashing = threading.Lock()   # the hasher and _hashed: the thread's or a feeder's
        self._target = 0                   # bytes known final on disk
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._broken: str | None = None    # why the digest cannot be trusted
        self._fd: int | None = None
        self._buf = memoryview(bytearray(min(HASH_CHUNK, max(f.size, 1))))

    @property
    def hashed(self) -> int:
        """Bytes hashed so far."""
        return self._hashed

    def advance(self, done: int) -> None:
        """Bytes [0, done) are final on disk. A thread starts only once there is a chunk to
        hash ahead: small files are hashed by finish() alone."""
        with self._cond:
            if self._closed or done <= self._target:
                return
            self._target = min(done, self.file.size)
            if self._thread is None:
                if self._target - self._hashed < HASH_CHUNK:
                    return
                self._thread = threading.Thread(target=self._run, name="prefix-hash", daemon=True)
                self._thread.start()
            self._cond.notify()

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        """`data` was just written at `offset` by this process: if it extends what is hashed,
        hash it from memory instead of reading it back later."""
        with self._hashing:
            skip = self._hashed - offset
            if 0 <= skip < len(data) and self._broken is None:
                self._hasher.update(memoryview(data)[skip:])
                self._hashed = offset + len(data)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._hashed >= self._target and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                upto = self._target
            self._hash_to(upto)

    def _hash_to(self, upto: int) -> None:
        """Feed the hasher bytes [hashed, upto) read from the file; stops early on close()."""
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            while self._broken is None:
                with self._hashing:
                    at = self._hashed
                    if at >= upto:
                        break
                    n = os.preadv(self._fd, [self._buf[:min(len(self._buf), upto - at)]], at)
                    if n <= 0:
                        self._broken = f"the file ended at {at} bytes"
                        break
                    self._hasher.update(self._buf[:n])
                    self._hashed = at + n
                if self._closed and threading.current_thread() is self._thread:
                    return                 # finish() takes over from here
        except OSError as exc:
            self._broken = f"reading it back failed: {exc.strerror}"
        if self._broken:
            with self._cond:
                self._target = self._hashed
                self._closed = True

    def _stop_thread(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> str | None:
        """Hash what is left; the digest if it is the listed one, else None (the caller hashes
        the file itself: a tool may have rewritten bytes hashed earlier)."""
        started = time.monotonic()
        self._stop_thread()
        ahead = self._hashed
        if self._broken is None:
            self._hash_to(self.file.size)
        self.close()
        digest = self._hasher.hexdigest()
        log.debug("%s: %d of %d bytes hashed as they landed, the rest in %.3f s",
                  self.file.path, ahead, self.file.size, time.monotonic() - started)
        if self._broken or digest != self.file.expected_hash:
            log.info("%s: the hash read while downloading is not the listed one (%s): "
                     "checking the whole file", self.file.path, self._broken or "mismatch")
            return None
        return digest

    def close(self) -> None:
        self._stop_thread()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@functools.cache
def hash_speed() -> float:
    """Bytes/s one core hashes (sha256) here: the best of two 4 MiB runs (a few ms, once)."""
    data, best = bytes(4 << 20), 0.0
    for _ in range(2):
        started = time.perf_counter()
        hashlib.sha256(data)
        best = max(best, len(data) / max(1e-6, time.perf_counter() - started))
    return best


def aria2_done_prefix(bitfield: str, piece_length: int, size: int) -> int:
    """Bytes at the start of the file in pieces aria2c has completed. Its bitfield is hex, the
    high bit of the first digit piece 0; a piece is marked only once written (aria2c flushes
    its write cache before completing a piece)."""
    pieces = 0
    for digit in bitfield:
        value = int(digit, 16)
        pieces += (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 4)[value]   # leading one bits
        if value != 15:
            break
    return min(size, pieces * piece_length)
