"""A file's bytes until they are whole and checked: the partial file, the side files the
backends keep beside it (aria2c's control file, the python ranges' part map), their place (the
target's .hfdl/ folder, or blobs/ in a hub cache snapshot) and their promotion to the final name.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import re
import stat
from pathlib import Path
from typing import Any, Iterable

from utils import (
    SIDE_FOLDER,
    UnsafePathError,
    cache_repo_of,
    fsync_dir,
    safe_join,
    safe_target,
)


class Partial:
    """The bytes of one version of a file until they are whole and checked, with the side files
    the backends keep beside them. The only code that knows their names.

    They live in <target>/.hfdl/partial/<path>.<hash10>.incomplete, out of the repo's own
    namespace (a repo file may be called anything, including another file's partial name).
    The version (hash prefix) is in the name, so a partial is only ever continued against the
    same file version, whatever the metadata says after a crash.

    In a snapshot of the Hugging Face hub cache (`download --hf-cache`) they live where
    huggingface_hub keeps its own: <repo folder>/blobs/<etag>.incomplete (its side files beside
    it), written under huggingface_hub's blob lock <cache>/.locks/<repo folder>/<etag>.lock;
    the checked bytes become blobs/<etag> (`blob`)."""

    def __init__(self, root: Path, relpath: str, expected_hash: str) -> None:
        self.root, self.relpath = Path(root), relpath
        suffix = f".{expected_hash[:10]}.incomplete"
        self.rel = self.rel_name(relpath, expected_hash)
        name = relpath.rpartition("/")[2]
        if len(name.encode()) > 200:
            name = "." + hashlib.sha1(name.encode()).hexdigest()[:16]
        # where versions before .hfdl/ kept it: beside the final name
        final = safe_join(self.root, relpath)
        self.old_path = final.with_name(f"{name}{suffix}")
        self.blob: Path | None = None
        self.lock: Path | None = None
        repo = cache_repo_of(self.root)
        if repo is not None:
            self._in_blobs(repo, expected_hash)
        self.path = safe_join(self.root, self.rel)
        self.control = self.path.with_name(self.path.name + ".aria2")   # aria2c's control file
        self.part_map = self.path.with_name(self.path.name + ".parts")  # python's ranged parts

    def _in_blobs(self, repo: Path, etag: str) -> None:
        """A hub cache snapshot's partial: blobs/<etag>.incomplete, as huggingface_hub names
        its own (`blob_path + ".incomplete"`); the old place, the snapshot's .hfdl/, is adopted."""
        if not etag or "/" in etag or etag.startswith("."):
            raise ValueError(f"not a blob name: {etag!r}")
        self.old_path = safe_join(self.root, self.rel)
        self.root, self.rel = repo, posixpath.join("blobs", etag + ".incomplete")
        self.blob = repo / "blobs" / etag
        self.lock = repo.parent / ".locks" / repo.name / f"{etag}.lock"

    def __repr__(self) -> str:
        return f"Partial({str(self.path)!r})"

    @staticmethod
    def rel_name(relpath: str, expected_hash: str) -> str:
        """The partial's path inside the target folder."""
        head, _, name = relpath.rpartition("/")
        if len(name.encode()) > 200:          # keep within NAME_MAX (255) with the suffixes
            name = "." + hashlib.sha1(name.encode()).hexdigest()[:16]
        return posixpath.join(SIDE_FOLDER, "partial", head, f"{name}.{expected_hash[:10]}.incomplete")

    @classmethod
    def bytes_of(cls, root: Path, files: Iterable[tuple[str, str]]) -> dict[str, int]:
        """bytes_on_disk() of many (relpath, expected_hash) at one stat each, without building
        a Partial per file (100k of them cost seconds); nothing at all when no partial folder
        exists. Only stats: the names were validated when the listing was read."""
        if cache_repo_of(Path(root)) is not None:     # a hub cache snapshot: blobs/<etag>...
            return {path: n for path, digest in files
                    if (n := cls(root, path, digest).bytes_on_disk())}
        base = os.path.join(root, SIDE_FOLDER, "partial")
        if not os.path.isdir(base):
            return {}
        found = {}
        for relpath, expected_hash in files:
            try:
                st = os.stat(os.path.join(root, cls.rel_name(relpath, expected_hash)))
            except (FileNotFoundError, NotADirectoryError):
                continue
            if min(st.st_size, st.st_blocks * 512):
                found[relpath] = min(st.st_size, st.st_blocks * 512)
        return found

    def files(self) -> tuple[Path, Path, Path]:
        """The partial and its side files (any of them may be absent)."""
        return self.path, self.control, self.part_map

    def check(self) -> None:
        """Refuse (UnsafePathError) if the partial, its side files or their folders are
        symlinks: check before handing the path to a tool or renaming it."""
        for p in self.files():      # the folders are checked (and remembered) by the first
            safe_target(self.root, os.path.relpath(p, self.root))

    def _check_folder(self) -> None:
        """The partial's folder is real (no symlinked component). Enough where the name itself
        is opened with O_NOFOLLOW or unlinked (unlink removes a symlink, never its target)."""
        safe_target(self.root, os.path.relpath(self.path.parent, self.root))

    def prepare(self) -> None:
        """Make the partial's folder, and adopt a partial left beside the final name by a
        version before .hfdl/ (once: it then continues from here)."""
        self._check_folder()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.check()                          # nothing swapped in while we made the folders
        old = [self.old_path, self.old_path.with_name(self.old_path.name + ".aria2"),
               self.old_path.with_name(self.old_path.name + ".parts")]
        try:
            safe_target(self.root, os.path.relpath(self.old_path, self.root))
            st = os.lstat(self.old_path)
        except (UnsafePathError, FileNotFoundError, NotADirectoryError):
            return
        if not stat.S_ISREG(st.st_mode) or os.path.lexists(self.path):
            return
        for src, dst in zip(old, self.files()):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(os.lstat(src).st_mode):
                    os.replace(src, dst)

    def adopt_leftover(self) -> None:
        """Continue from the bytes a killed hf_hub_download left: huggingface_hub writes a blob
        sequentially into blobs/<etag>.<8 hex>.incomplete (a name unique to its process) and
        never reuses it. Call holding the blob lock (no one is writing it then); the longest
        such file becomes ours when we have none, the others are removed."""
        if self.blob is None:
            return
        pattern = re.compile(re.escape(self.blob.name) + r"\.[0-9a-f]{8}\.incomplete")
        try:
            names = [n for n in os.listdir(self.path.parent) if pattern.fullmatch(n)]
        except OSError:
            return
        left = []
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(self.path.parent / name)
                if stat.S_ISREG(st.st_mode):
                    left.append((st.st_size, name))
        left.sort(reverse=True)
        if left and not os.path.lexists(self.path) and not os.path.lexists(self.control) \
                and not os.path.lexists(self.part_map):
            os.replace(self.path.parent / left.pop(0)[1], self.path)
        for _size, name in left:
            with contextlib.suppress(OSError):
                os.unlink(self.path.parent / name)

    def open(self, mode: str) -> Any:
        """Open the partial for writing without following a symlink at its name."""
        flags = {"wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "r+b": os.O_RDWR,
                 "w+b": os.O_RDWR | os.O_CREAT | os.O_TRUNC}[mode]
        self._check_folder()
        flags |= os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileNotFoundError:
                if not flags & os.O_CREAT:
                    raise
                self.prepare()      # another process sharing the target tidied the folder away
                fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"refused to write through a symlink: {self.path}") from None
            raise
        return os.fdopen(fd, mode)

    @staticmethod
    def tidy(root: Path) -> None:
        """Remove the partials' folders left empty (call when no worker is running), so a
        finished download leaves no .hfdl/ behind."""
        side = Path(root) / SIDE_FOLDER
        try:
            if not stat.S_ISDIR(os.lstat(side).st_mode):
                return
        except OSError:
            return
        for folder, _dirs, _files in os.walk(side, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    def kind(self) -> str:
        """How the bytes can be continued: "aria2" (control file), "parts" (part map), "seq"
        (by length), "sparse" (holes without a map: cannot be continued) or "none" (no bytes).

        An empty control file (aria2c could not save it: disk full) is unreadable: removed."""
        with contextlib.suppress(FileNotFoundError):
            if self.control.stat().st_size == 0:
                self.control.unlink()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "none"
        if self.control.exists():
            return "aria2"
        if self.part_map.exists():
            return "parts"
        # A split download killed before its control file was saved leaves a sparse file whose
        # length says nothing about which bytes are there.
        return "sparse" if st.st_blocks * 512 + 4096 < st.st_size else "seq"

    def bytes_on_disk(self) -> int:
        """Bytes written so far; allocated blocks count holes left by parallel segments right."""
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        return min(st.st_size, st.st_blocks * 512)

    def discard(self) -> None:
        """Remove the partial and its side files (a symlink there is removed, not followed)."""
        try:
            self._check_folder()
        except UnsafePathError:
            return
        for p in self.files():
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                p.unlink()

    def promote_to(self, final: Path) -> None:
        """Give the (checked) bytes their final name, durably: fsync, side files gone, rename,
        fsync of the folder."""
        safe_target(self.root, os.path.relpath(final, self.root))
        with self.open("r+b") as fh:
            os.fsync(fh.fileno())
        for side in (self.control, self.part_map):
            with contextlib.suppress(FileNotFoundError):
                side.unlink()
        os.replace(self.path, final)
        fsync_dir(final.parent)
