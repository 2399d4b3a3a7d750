"""Small shared pieces: error types, sizes, atomic JSON, safe paths, hashing, glob matching."""
from __future__ import annotations

import contextlib
import enum
import fnmatch
import hashlib
import json
import os
import posixpath
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

SCHEMA_VERSION = 1


class ExitStatus(enum.IntEnum):
    """Exit statuses, stable for scripts (listed in README.md)."""

    OK = 0
    ERROR = 1            # a known error: nothing (more) could be done
    USAGE = 2            # bad command line or flag value
    FILES_FAILED = 3     # the task ran to the end but some files failed
    DISK_FULL = 4        # stopped before the disk filled; resume after freeing space
    CANCELLED = 5        # cancelled from another terminal
    LOCKED = 6           # another process holds the task
    INTERNAL = 70        # a bug: the log holds the traceback
    INTERRUPTED = 130    # Ctrl-C
    TERMINATED = 143     # SIGTERM


def strip_query(text: str) -> str:
    """Text with the query strings of its URLs removed: signed links (Signature, Expires,
    X-Amz-*) open gated files to whoever reads them, so none may reach a log."""
    return re.sub(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*)\?[^\s'\"<>]*", r"\1", text)


# ---------------------------------------------------------------- errors

class HFDError(Exception):
    """An error meant for the user: one line, an optional hint, an exit status."""

    exit_status: ExitStatus = ExitStatus.ERROR

    def __init__(self, message: str, hint: str | None = None,
                 exit_status: ExitStatus | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        if exit_status is not None:
            self.exit_status = exit_status


class UsageError(HFDError):
    exit_status = ExitStatus.USAGE


class HubError(HFDError):
    """The Hub said no: unknown repo, gated repo, bad revision, unreachable endpoint."""


class MetadataError(HFDError):
    """A metadata file is missing, corrupt or of an unknown schema."""


class TaskLockedError(HFDError):
    exit_status = ExitStatus.LOCKED


class DiskSpaceError(HFDError):
    exit_status = ExitStatus.DISK_FULL


class ToolError(HFDError):
    """An external tool is missing or misbehaved."""


# ---------------------------------------------------------------- sizes

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
# Bare letters (1G, 10T) follow the df/ls convention: binary multiples.
_UNITS.update({"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50})
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'1073741824', '1G', '500GiB', '10T', '1.5TB' -> bytes. G/GiB are binary, GB decimal."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise UsageError(f"invalid size {text!r}",
                         hint="use bytes or a unit, e.g. 1073741824, 500M, 1G, 500GiB, 10TB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """Bytes -> '1.50 GiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} PiB"


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------- JSON

def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 1) -> None:
    """Write JSON so readers see the old file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # dumps, not dump: only dumps uses the C encoder (4-5x faster on a 100k-file status);
        # no indent means no spaces either (the per-file files are read by programs)
        text = json.dumps(data, indent=indent, ensure_ascii=False,
                          separators=(",", ":") if indent is None else None)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the folder that holds it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str | Path, *, kind: type[dict] | type[list] = dict,
              default: Any = None) -> Any:
    """Read a JSON metadata file; a corrupt one is a MetadataError naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        if default is not None:
            return default
        raise MetadataError(f"metadata file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetadataError(f"metadata file {path} is corrupt ({exc})",
                            hint=_RECOVER_HINT) from None
    if not isinstance(data, kind):
        raise MetadataError(f"metadata file {path} has the wrong shape (expected a JSON "
                            f"{'object' if kind is dict else 'list'})", hint=_RECOVER_HINT)
    version = data.get("schema_version", SCHEMA_VERSION) if isinstance(data, dict) else None
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise MetadataError(f"metadata file {path} has a bad 'schema_version' (expected an "
                            f"integer, got {version!r})", hint=_RECOVER_HINT)
    if version is not None and version > SCHEMA_VERSION:
        raise MetadataError(f"metadata file {path} was written by a newer version of this tool",
                            hint="upgrade this tool, or point --metadata-dir elsewhere")
    return data


_RECOVER_HINT = ("restore it from a backup, or move it aside and run "
                 "'python main.py fix-progress' to rebuild the state from the files on disk")


# ---------------------------------------------------------------- paths

@contextlib.contextmanager
def exclusive_file(path: Path, *, wait: float = 120.0, stale: float = 60.0) -> Iterator[None]:
    """Hold a lock file made with O_CREAT|O_EXCL: atomic on local disks and on NFS v3+, Lustre
    and CephFS, where flock() may not reach the other machines. For short critical sections
    (milliseconds): a lock older than `stale` seconds was left by a killed holder and is taken
    over (moved aside first, so two takers cannot both win). Past `wait`: an HFDError."""
    import random
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            break
        except FileExistsError:
            pass
        if _take_stale(path, stale):
            continue
        if time.monotonic() > deadline:
            raise HFDError(f"{path} has been held for over {wait:.0f} s",
                           hint="if nothing else runs on this folder, remove that file")
        time.sleep(random.uniform(0.02, 0.1))
    with os.fdopen(fd, "w") as fh:        # who holds it, for a human looking at the folder
        fh.write(f"{os.uname().nodename} {os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _take_stale(path: Path, stale: float) -> bool:
    """Remove a lock file older than `stale` seconds; True when one was removed."""
    try:
        if time.time() - os.lstat(path).st_mtime < stale:
            return False
        aside = path.with_name(f"{path.name}.stale.{os.getpid()}.{time.monotonic_ns()}")
        os.rename(path, aside)               # one taker gets the file; the others get ENOENT
    except FileNotFoundError:
        return True
    if time.time() - os.lstat(aside).st_mtime < stale:     # a fresh lock taken meanwhile:
        with contextlib.suppress(OSError):                  # give it back (never over a new one)
            os.link(aside, path)
    os.unlink(aside)
    return True


def safe_relpath(name: str) -> str:
    """Validate a repo path before it is joined to a local folder; return it normalised."""
    if not name or "\x00" in name or "\\" in name:
        raise ValueError(f"unsafe file name from the Hub: {name!r}")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"absolute file name from the Hub refused: {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"file name from the Hub would leave the target folder: {name!r}")
    return posixpath.normpath(name)


class UnsafePathError(HFDError, ValueError):
    """A path below the target folder goes through a symlink (or is not a plain file/folder)."""


def safe_join(root: Path, name: str) -> Path:
    """root / name, refusing any name that would land outside root (see safe_relpath)."""
    return Path(os.path.join(root, safe_relpath(name)))


# Folders found real (not symlinks) in the last moment: a run checks the same few folders for
# every file many times, and an lstat of each costs (measured: the checks took a third of the
# time of a 3,000-small-file download). A folder swapped for a symlink within that second is
# the same race a check-then-open always has; the final name is always checked (and the python
# backend opens partials with O_NOFOLLOW).
_REAL_DIRS: dict[str, float] = {}
_REAL_DIR_TTL = 1.0


def safe_target(root: Path, name: str) -> Path:
    """root / name for writing, renaming or deleting: refuses names that leave root and any
    component below root that is a symlink (a symlinked folder would send the write elsewhere,
    a symlink at the final or partial name would have its target overwritten). Components that
    do not exist yet are fine. The one place this is checked."""
    path = safe_join(root, name)
    current = str(root)
    parts = safe_relpath(name).split("/")
    now = time.monotonic()
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        last = i == len(parts) - 1
        if not last and now - _REAL_DIRS.get(current, -1.0) < _REAL_DIR_TTL:
            continue
        try:
            st = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            break
        if not last and stat.S_ISDIR(st.st_mode):
            if len(_REAL_DIRS) > 50_000:
                _REAL_DIRS.clear()
            _REAL_DIRS[current] = now
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(
                f"refused to write through a symlink: {printable(os.path.relpath(current, root))} "
                f"is a symlink inside the target folder",
                hint="remove the symlink (or download into another folder)")
    return path


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(name: str) -> str:
    """A name safe to print on a terminal: control characters (escape sequences, newlines)
    shown as repr-style escapes, the rest unchanged."""
    return _CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], name)


NAME_MAX = 255       # bytes per path component on common filesystems
SIDE_FOLDER = ".hfdl"      # our partials and side files, out of the repo's namespace


def hub_name_problem(name: str) -> str | None:
    """Why a (safe_relpath-valid) Hub file name cannot be downloaded here, or None."""
    if _CONTROL_RE.search(name):
        return "the name contains control characters"
    if any(len(p.encode()) > NAME_MAX for p in name.split("/")):
        return f"a part of the name is longer than the filesystem allows ({NAME_MAX} bytes)"
    if name.split("/")[0] == SIDE_FOLDER:
        return f"{SIDE_FOLDER}/ is where this tool keeps its partial files"
    return None


CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")     # huggingface_hub's


def cache_repo_of(folder: Path) -> Path | None:
    """The repo folder (<cache>/models--ORG--NAME) when `folder` is one of its snapshots
    (<repo folder>/snapshots/<commit>), else None."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(
            CACHE_REPO_PREFIXES):
        return folder.parent.parent
    return None


def repo_folder_name(repo_id: str) -> str:
    """'gpt2' -> 'gpt2', 'org/name' -> 'org--name' (the default download folder)."""
    return repo_id.replace("/", "--")


# ---------------------------------------------------------------- hashing

HASH_CHUNK = 4 * 1024 * 1024


def git_blob_hasher(size: int) -> "hashlib._Hash":
    """A sha1 primed with git's blob header: the hash of the file equals its git oid."""
    h = hashlib.sha1()
    h.update(f"blob {size}\0".encode())
    return h


def new_hasher(kind: str, size: int) -> "hashlib._Hash":
    return hashlib.sha256() if kind == "sha256" else git_blob_hasher(size)


def hash_file(path: Path, kind: str, size: int, *, start_hasher: hashlib._Hash | None = None,
              offset: int = 0) -> str:
    """sha256 or git blob sha1 of a file, streamed in big chunks."""
    h = start_hasher or new_hasher(kind, size)
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        buf = bytearray(min(HASH_CHUNK, max(size, 1 << 16)))   # small files: small buffer
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


# ---------------------------------------------------------------- filters

def glob_match(path: str, pattern: str) -> bool:
    """fnmatch on the whole repo path; a pattern without '/' also matches the base name, and one
    starting with '/' is anchored at the repo root (`download REPO FILE` keeps FILEs that way)."""
    if pattern.startswith("/"):
        return fnmatch.fnmatchcase(path, pattern[1:])
    if fnmatch.fnmatchcase(path, pattern):
        return True
    if "/" not in pattern:
        return fnmatch.fnmatchcase(posixpath.basename(path), pattern)
    return False


def path_selected(path: str, include: Iterable[str] | None, exclude: Iterable[str] | None) -> bool:
    """Include globs (any), then exclude globs (exclude wins)."""
    include = list(include or [])
    if include and not any(glob_match(path, p) for p in include):
        return False
    return not any(glob_match(path, p) for p in (exclude or []))
