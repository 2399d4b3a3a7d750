"""Helpers shared by the test modules and the benchmark, each written once.

Only the standard library and the fake Hub are imported here (no pytest), so bench/ can use these
too and they can be called from any process.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fakehub import Content, FakeHub, content_sha256

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("aria2c", "wget", "python")
# The tool's settings of where it writes, and their default folders (beside main.py). A test's
# environment may hold them (conftest's autouse fixture sets them); a `main.py` subprocess gets
# its own, under tmp_path (`clean_env`), or it would write into the repo's folders.
DATA_DIRS = {"METADATA_DIR": "metadata", "DOWNLOADS_DIR": "downloads", "LOGS_DIR": "logs"}


# ---------------------------------------------------------------- running main.py

@dataclass
class Result:
    """One finished `python main.py ...`."""

    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


class Cli:
    """Runs main.py in its own data folders under tmp_path, against the fake Hub."""

    def __init__(self, tmp_path: Path, hub: FakeHub) -> None:
        self.root = tmp_path
        self.hub = hub
        self.env = clean_env(tmp_path, hub.url)

    def popen(self, *args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=self.root,
                                env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kw)

    def __call__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
                 check_traceback: bool = True) -> Result:
        proc = self.popen(*args, env=env)
        out, err = proc.communicate(timeout=timeout)
        result = Result(proc.returncode, out, err)
        if check_traceback:
            assert "Traceback" not in result.text, result.text
        return result

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata"


def error_lines(r: Result) -> list[str]:
    """The `error:` lines; exactly one, and no traceback anywhere."""
    assert "Traceback" not in r.text, r.text
    lines = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.err
    return lines


def clean_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    """The caller's environment without proxies or settings of ours or huggingface_hub's; the
    data folders are tmp_path/metadata, tmp_path/downloads and tmp_path/logs."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().endswith("_PROXY") and not k.startswith(("HF_", "HFDL_"))
           and k not in DATA_DIRS}
    env.update({var: str(tmp_path / name) for var, name in DATA_DIRS.items()})
    env.update({
        "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
        "HFDL_RETRY_BASE_DELAY": "0.05", "HFDL_DISK_RESERVE": "1M", "PYTHONUNBUFFERED": "1",
    })
    return env


# ---------------------------------------------------------------- files and their bytes

def file_states(task_folder: Path) -> dict[str, dict[str, Any]]:
    """Every file's status entry of a task, read as the tool reads file_status.json (the file
    itself holds only what differs from the defaults)."""
    from file_tracker import FileTracker
    return dict(FileTracker.load(task_folder, task_folder.name).status)


def file_rows(task_folder: Path) -> list[dict[str, Any]]:
    """file_list.json's rows as dicts (the file holds them as lists under "columns")."""
    import json
    data = json.loads((task_folder / "file_list.json").read_text())
    return [dict(zip(data["columns"], row)) for row in data["files"]]


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def size_of(data: bytes | Content) -> int:
    """The size of a repo file as given to `FakeHub.add_repo`."""
    return data.size if isinstance(data, Content) else len(data)


HF_LOCAL_META = "/.cache/huggingface/"     # hf download --local-dir's metadata, which we write too


def tree_files(root: Path) -> dict[str, Path]:
    """The files under root, without hf's metadata folders (root may hold several targets)."""
    return {name: p for p in root.rglob("*") if p.is_file()
            if HF_LOCAL_META not in "/" + (name := p.relative_to(root).as_posix())}


def assert_same_tree(folder: Path, files: dict[str, bytes | Content]) -> None:
    """Every repo file at its final name, byte-identical, and nothing else (no partial left)."""
    got = tree_files(folder)
    assert sorted(got) == sorted(files), sorted(got)
    for path, p in got.items():
        assert sha256_file(p) == content_sha256(files[path]), path


# ---------------------------------------------------------------- processes and time

def wait_for(pred: Callable[[], bool], timeout: float = 20.0, step: float = 0.05) -> bool:
    """Polls `pred` until it holds or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def tool_processes(*markers: str) -> list[str]:
    """Command lines of live aria2c/wget processes holding one of the markers (a tmp path, a pid)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            # the state follows the ")" closing the command name, which may itself hold spaces
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if cmd.startswith(("aria2c", "wget")) and state != "Z" and any(m in cmd for m in markers):
            found.append(cmd)
    return found


# ---------------------------------------------------------------- real small disks

def _sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "4m", *, read_only: bool = False,
          mode: str | None = None) -> Iterator[Path]:
    """A real small tmpfs at `folder`, unmounted on exit. A failed mount fails the test: these
    tests need root, and CI runs as root."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",mode={mode}" if mode else "")
    res = _sh("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder))
    if res.returncode:
        raise AssertionError(f"mount -t tmpfs on {folder} failed: "
                             f"{res.stderr.strip() or res.returncode}")
    try:
        if read_only:
            res = _sh("mount", "-o", "remount,ro", str(folder))
            if res.returncode:
                raise AssertionError(f"remount,ro of {folder} failed: {res.stderr.strip()}")
        yield folder
    finally:
        if _sh("umount", str(folder)).returncode:
            _sh("umount", "-l", str(folder))


@contextlib.contextmanager
def main_state_restored() -> Iterator[None]:
    """main.main() run in this process installs logging handlers and a SIGTERM handler, and sets
    logging.raiseExceptions: undo all of it afterwards."""
    hfdl = logging.getLogger("hfdl")
    handlers, level = list(hfdl.handlers), hfdl.level
    sigterm = signal.getsignal(signal.SIGTERM)
    raise_exceptions = logging.raiseExceptions
    try:
        yield
    finally:
        for handler in hfdl.handlers:
            if handler not in handlers:
                hfdl.removeHandler(handler)
                handler.close()
        hfdl.setLevel(level)
        signal.signal(signal.SIGTERM, sigterm)
        logging.raiseExceptions = raise_exceptions

