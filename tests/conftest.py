"""Fixtures shared by the test modules; the helpers they call are in tests/helpers.py."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehub import FakeHub
from tests.helpers import DATA_DIRS, ROOT, Cli

# The repo's own data folders: a test must never write there (its data goes under tmp_path).
REPO_DATA_DIRS = tuple(ROOT / name for name in DATA_DIRS.values())


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as h:
        yield h


@pytest.fixture
def cli(tmp_path: Path, hub: FakeHub) -> Cli:
    return Cli(tmp_path, hub)


def _repo_data() -> set[Path]:
    return {p for folder in REPO_DATA_DIRS if folder.is_dir() for p in folder.iterdir()}


@pytest.fixture(autouse=True)
def dont_write_to_the_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-process code run by a test writes under tmp_path, and nothing new appears in the repo's
    ./metadata, ./downloads or ./logs (pre-commit's `dont_write_to_home_directory`)."""
    for var, name in DATA_DIRS.items():
        monkeypatch.setenv(var, str(tmp_path / name))
    before = _repo_data()
    yield
    new = sorted(map(str, _repo_data() - before))
    assert not new, f"the test wrote into the repo's data folders: {new}"
