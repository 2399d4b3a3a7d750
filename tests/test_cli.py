"""The command line as users type it (issue 11): common options before or after the command, the
data folders beside main.py, and the habits of `hf download` (FILE..., suggestions for typos,
--include that leaves the repo alone, short commit shas, `-q` printing only the folder)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import main
from tests.fakehub import FakeHub
from tests.helpers import (ROOT, Cli, Result, assert_same_tree, clean_env, error_lines,
                           main_state_restored, tree_files)
from utils import ExitStatus

FILES = {"config.json": b'{"a": 1}', "vocab.json": b"{}", "merges.txt": b"m",
         "sub/config.json": b"[]", "model.bin": b"weights"}


@pytest.fixture
def inproc(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """main.main in this process, against the fake Hub, from tmp_path; main's logging handlers
    and SIGTERM handler undone after."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("HFDL_", "HF_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HFDL_DISK_RESERVE", "1M")
    with main_state_restored():
        yield tmp_path


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a command line argparse refuses (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        main.main(argv)
    assert exc.value.code == ExitStatus.USAGE
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def config_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main.main(argv) == ExitStatus.OK
    return json.loads(capsys.readouterr().out)


# ================================================================ 1. common options anywhere

def test_folder_flags_before_the_command(inproc: Path, hub: FakeHub, capsys) -> None:
    hub.add_repo("test-model", FILES)
    md, dl = inproc / "m", inproc / "d"
    code = main.main(["--metadata-dir", str(md), "--downloads-dir", str(dl), "--logs-dir",
                      str(inproc / "l"), "download", "test-model", "--tool", "python"])
    assert code == ExitStatus.OK, capsys.readouterr().err
    assert_same_tree(dl / "test-model", FILES)
    assert (md / "tasks.json").is_file() and (inproc / "l" / "download.log").is_file()


def test_the_users_recipes_verbatim(cli: Cli, hub: FakeHub, tmp_path: Path) -> None:
    """`python main.py --metadata-dir /tmp/metadata --downloads-dir /tmp/downloads download
    test-model` (under tmp_path), `-v list-tasks`, `--debug list-tasks`."""
    hub.add_repo("test-model", FILES)
    md, dl = tmp_path / "tmp" / "metadata", tmp_path / "tmp" / "downloads"
    r = cli("--metadata-dir", str(md), "--downloads-dir", str(dl), "download", "test-model")
    assert r.code == 0, r.text
    assert_same_tree(dl / "test-model", FILES)
    for flag in ("-v", "--debug"):
        r = cli(flag, "--metadata-dir", str(md), "list-tasks")
        assert r.code == 0 and "task_001" in r.out, r.text
    r = cli("-v", "list-tasks")                  # cli's own folders: no task there
    assert r.code == 0 and "task_001" not in r.out, r.text


def test_after_the_command_wins_and_equals_form(inproc: Path, capsys) -> None:
    js = config_json(["--metadata-dir", "before", "config", "--json", "--metadata-dir=after",
                      "--logs-dir=logs2"], capsys)
    assert js["metadata_dir"] == {"value": str(inproc / "after"), "source": "flag"}
    assert js["logs_dir"]["value"] == str(inproc / "logs2")
    js = config_json(["--downloads-dir=dl-before", "config", "--json"], capsys)
    assert js["downloads_dir"] == {"value": str(inproc / "dl-before"), "source": "flag"}


def test_verbose_counts_add_up_and_flags_keep_their_meaning() -> None:
    assert main.parse_args(["-v", "list-tasks", "-vv"]).verbose == 3
    assert main.parse_args(["list-tasks"]).verbose == 0
    args = main.parse_args(["-q", "--debug", "status"])
    assert args.quiet and args.debug and args.metadata_dir is None
    args = main.parse_args(["status", "-q"])
    assert args.quiet and not args.debug


def test_help_lists_the_common_options_and_stays_light() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0
    for option in ("--metadata-dir", "--downloads-dir", "--logs-dir", "-v", "-q", "--debug"):
        assert option in r.stdout, r.stdout
    # --help is fast because building the parser imports none of the heavy libraries
    probe = ("import sys, main; main.build_parser(); print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('huggingface_hub', 'requests', 'psutil', 'tqdm')))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# ================================================================ 2. folders beside main.py

def copy_of_the_tool(tmp_path: Path) -> Path:
    """main.py and its modules in a folder of their own, so its default folders are there."""
    app = tmp_path / "app"
    app.mkdir()
    for path in ROOT.glob("*.py"):
        shutil.copy2(path, app / path.name)
    return app


def run_copy(app: Path, cwd: Path, env: dict[str, str], *args: str) -> Result:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(app / "main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_default_folders_are_beside_main_py(tmp_path: Path, hub: FakeHub) -> None:
    hub.add_repo("gpt2", FILES)
    app = copy_of_the_tool(tmp_path)
    env = clean_env(tmp_path, hub.url)
    for var in ("METADATA_DIR", "DOWNLOADS_DIR", "LOGS_DIR"):
        del env[var]
    home, cron = tmp_path / "home", tmp_path / "cron"
    js = json.loads(run_copy(app, home, env, "config", "--json").out)
    for name in ("metadata", "downloads", "logs"):
        assert js[f"{name}_dir"] == {"value": str(app / name), "source": "default"}
    r = run_copy(app, home, env, "download", "gpt2", "--tool", "python")
    assert r.code == 0, r.text
    assert_same_tree(app / "downloads" / "gpt2", FILES)
    assert (app / "logs" / "download.log").is_file()
    assert not (home / "downloads").exists() and not (home / "metadata").exists()
    # a cron job started elsewhere finds the same task
    r = run_copy(app, cron, env, "list-tasks")
    assert r.code == 0 and "task_001" in r.out, r.text
    r = run_copy(app, cron, env, "status", "task_007")
    assert r.code == ExitStatus.USAGE
    assert error_lines(r) == [f"error: no task task_007 in {app / 'metadata'}"]
    # the environment and the flags still override the default
    r = run_copy(app, cron, {**env, "METADATA_DIR": str(tmp_path / "elsewhere")}, "list-tasks")
    assert r.code == 0 and "task_001" not in r.out, r.text
    js = json.loads(run_copy(app, cron, {**env, "METADATA_DIR": "x"}, "--metadata-dir", "y",
                             "config", "--json").out)
    assert js["metadata_dir"] == {"value": str(cron / "y"), "source": "flag"}


def test_no_task_names_the_metadata_folder(inproc: Path, capsys) -> None:
    md = inproc / "meta"
    assert main.main(["task-detail", "3", "--metadata-dir", str(md)]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert f"error: no task task_003 in {md}\n" in err, err


# ================================================================ 4. habits of hf download

def test_download_named_files_only(cli: Cli, hub: FakeHub) -> None:
    hub.add_repo("gpt2", FILES)
    r = cli("download", "gpt2", "config.json", "--tool", "python", "merges.txt")
    assert r.code == 0, r.text
    # exact paths: sub/config.json is not config.json
    assert_same_tree(cli.downloads / "gpt2", {p: FILES[p] for p in ("config.json", "merges.txt")})
    # the task keeps the choice: the same command again is the same task, with nothing to fetch
    r = cli("download", "gpt2", "config.json", "merges.txt", "--json")
    assert r.code == 0 and json.loads(r.out)["task"] == "task_001", r.text
    # FILEs and --include: both must hold
    r = cli("download", "gpt2", "vocab.json", "model.bin", "--include", "*.json", "--dry-run")
    assert r.code == 0 and "vocab.json" in r.out and "model.bin" not in r.out, r.text
    r = cli("download", "gpt2", "model.bin", "--include", "*.json")
    assert r.code == ExitStatus.USAGE and "none of the files" in error_lines(r)[0], r.text


def test_unknown_file_is_a_usage_error_naming_it(cli: Cli, hub: FakeHub) -> None:
    hub.add_repo("gpt2", FILES)
    r = cli("download", "gpt2", "config.json", "confg.jsn")
    assert r.code == ExitStatus.USAGE
    assert "'confg.jsn'" in error_lines(r)[0]
    assert "did you mean config.json?" in r.err
    assert not (cli.downloads / "gpt2").exists()


def test_misspelt_command_or_flag_gets_a_suggestion(capsys) -> None:
    assert usage_error(["downlaod", "gpt2"], capsys) == \
        "error: unknown command 'downlaod'; did you mean download?"
    line = usage_error(["download", "gpt2", "--inclde", "*.json"], capsys)
    assert line == "error: unrecognized option --inclde; did you mean --include?"
    line = usage_error(["--metdata-dir", "/x", "list-tasks"], capsys)
    assert "did you mean --metadata-dir?" in line
    assert "did you mean --include?" in usage_error(["download", "--inclde=*.json", "gpt2"], capsys)
    assert "did you mean aria2c?" in usage_error(["download", "gpt2", "--tool", "aria"], capsys)
    # an abbreviation argparse accepts is no typo; a word far from every option gets no guess
    assert main.parse_args(["download", "gpt2", "--incl", "*.json"]).include == ["*.json"]
    assert "did you mean" not in usage_error(["list-tasks", "--zzzzzz"], capsys)


def test_include_does_not_swallow_the_repo(cli: Cli, hub: FakeHub, capsys) -> None:
    line = usage_error(["download", "--include", "*.json", "gpt2"], capsys)
    assert line == ("error: --include took 'gpt2' as a pattern; put the repo first or use "
                    "--include=PAT")
    line = usage_error(["download", "--exclude", "*.bin", "*.txt", "org/model"], capsys)
    assert "--exclude took 'org/model'" in line
    line = usage_error(["download", "--include", "*.json"], capsys)     # no repo was given
    assert line == "error: the following arguments are required: repo"
    args = main.parse_args(["download", "gpt2", "--include", "*.json", "*.txt", "--exclude", "x"])
    assert (args.repo, args.include, args.exclude) == ("gpt2", ["*.json", "*.txt"], ["x"])
    hub.add_repo("gpt2", FILES)
    r = cli("download", "--include=*.json", "gpt2", "--include", "*.txt", "--tool", "python")
    assert r.code == 0, r.text
    assert sorted(tree_files(cli.downloads / "gpt2")) == \
        ["config.json", "merges.txt", "sub/config.json", "vocab.json"]


def test_short_commit_sha_is_a_revision(cli: Cli, hub: FakeHub) -> None:
    first = hub.add_repo("gpt2", {"config.json": b"old"})
    hub.add_commit("gpt2", {"config.json": b"new"})
    r = cli("download", "gpt2", "--revision", first[:7], "--tool", "python")
    assert r.code == 0, r.text
    assert (cli.downloads / "gpt2" / "config.json").read_bytes() == b"old"
    js = json.loads(cli("status", "task_001", "--json").out)
    assert js["commit"] == first


def test_quiet_download_prints_only_the_folder(cli: Cli, hub: FakeHub) -> None:
    hub.add_repo("gpt2", FILES)
    r = cli("download", "gpt2", "-q")
    assert r.code == 0, r.text
    assert r.out == f"{cli.downloads / 'gpt2'}\n"
    assert_same_tree(cli.downloads / "gpt2", FILES)
    r = cli("-q", "download", "gpt2", "config.json", "--local-dir", "one")
    assert r.code == 0 and r.out == f"{cli.root / 'one'}\n", r.text
    r = cli("download", "org/missing", "-q")
    assert r.code != 0 and r.out == "" and error_lines(r), r.text
