"""Shared fixtures: a fake Hub per test and a runner for `python main.py ...` as a subprocess."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fakehub import FakeHub  # noqa: E402

TOOLS = ("aria2c", "wget", "python")


@pytest.fixture
def hub():
    with FakeHub() as h:
        yield h


@dataclass
class Result:
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

    def popen(self, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=self.root,
                                env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kw)

    def __call__(self, *args: str, env: dict | None = None, timeout: float = 120,
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


def clean_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.upper().endswith("_PROXY") and not k.startswith(("HF_", "HFDL_"))}
    env.update({
        "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
        "HFDL_RETRY_BASE_DELAY": "0.05", "HFDL_DISK_RESERVE": "1M", "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture
def cli(tmp_path, hub) -> Cli:
    return Cli(tmp_path, hub)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
