"""hf-downloader: fetch Hugging Face models and datasets with aria2c, wget or Python.

main.py parses the command line, sets up logging, dispatches to the command's handler (in
commands.py), and turns errors into one-line messages and exit statuses (utils.ExitStatus).
Nothing else lives here.
"""
from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import config
from commands import HANDLERS
from utils import ExitStatus, HFDError, HubError, UsageError, parse_size, strip_query

log = logging.getLogger("hfdl")


# ================================================================ argument parsing

class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line plus a hint, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ExitStatus.USAGE, f"error: {message}\nhint: see 'python {self.prog} --help'\n")


def _number(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str):
    """An argparse type: convert, check the range, or say what was expected."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a whole number of at least 1")
_non_negative_int = _number(int, lambda v: v >= 0, "a whole number of at least 0")
_margin = _number(float, lambda v: 0 < v <= 1, "a fraction above 0 and at most 1")
# inf or 1e300 seconds would overflow the waits (or wait for ever): a day is plenty
_seconds = _number(float, lambda v: 0 < v <= 86400,
                   "a number of seconds above 0 and at most 86400 (a day)")


def _revision(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a branch, tag or commit, got an empty string")
    return text


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(f"{exc} ({exc.hint})") from None


def _common() -> Parser:
    common = Parser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--metadata-dir", help="task records (env METADATA_DIR; default ./metadata)")
    g.add_argument("--downloads-dir", help="download root (env DOWNLOADS_DIR; default ./downloads)")
    g.add_argument("--logs-dir", help="log folder (env LOGS_DIR; default ./logs)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more detail on stderr")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    g.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return common


def _repo_args(p: argparse.ArgumentParser, *, filters: bool = True) -> None:
    p.add_argument("repo", help="repo id: NAME or ORG/NAME (e.g. gpt2)")
    p.add_argument("--dataset", action="store_true", help="the repo is a dataset")
    p.add_argument("--repo-type", choices=("model", "dataset", "space"),
                   help="model (default), dataset or space")
    p.add_argument("--revision", default="main", type=_revision, help="branch, tag or commit (default: main)")
    p.add_argument("--endpoint", help="Hub or mirror URL (env HF_ENDPOINT)")
    p.add_argument("--no-mirror", action="store_true",
                   help="never switch to the mirror by itself")
    if filters:
        p.add_argument("--include", nargs="+", action="extend", default=[], metavar="PAT",
                       help="only repo paths matching these globs (e.g. '*.json')")
        p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PAT",
                       help="skip repo paths matching these globs (exclude wins)")


def _tool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tool", choices=("auto", "aria2c", "wget", "python"),
                   help="download tool (env HFDL_TOOL; default auto: aria2c, else wget, else python)")
    p.add_argument("-x", "--connections", type=_positive_int, default=8, metavar="N",
                   help="connections per file (default 8)")
    p.add_argument("-j", "--jobs", type=_positive_int, default=8, metavar="N",
                   help="files at once (default 8; 16-32 for repos of many small files)")
    p.add_argument("--retries", type=_non_negative_int, default=5, metavar="N",
                   help="retries per file after the first try (default 5)")
    p.add_argument("--stall-timeout", type=_seconds, default=60.0, metavar="SEC",
                   help="a file with no new byte for this long is retried (default 60)")
    p.add_argument("--reserve", type=_size, metavar="SIZE",
                   help="free space always kept (env HFDL_DISK_RESERVE; default 1G)")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> Parser:
    common = _common()
    parser = Parser(prog="main.py", description="Download Hugging Face models and datasets "
                    "with aria2c, wget or Python; resumable, verified, batchable.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    p = add("download", "download a repo (resumes the same download if it exists)")
    _repo_args(p)
    _tool_args(p)
    p.add_argument("--local-dir", help="target folder (default: DOWNLOADS_DIR/ORG--NAME)")
    p.add_argument("--dry-run", action="store_true", help="list files and sizes; download nothing")
    p.add_argument("--prune", action="store_true",
                   help="delete local files that the new commit removed")
    _json_arg(p)

    p = add("add-dataset", "register a repo (checks that it exists) without downloading")
    _repo_args(p, filters=False)
    p.add_argument("--description", default=None, help="a note for list-datasets")

    p = add("list-datasets", "list registered repos")
    _json_arg(p)

    p = add("list-tasks", "list download tasks")
    p.add_argument("--status", help="only tasks in this state")
    _json_arg(p)

    p = add("status", "progress of one task, or of all tasks")
    p.add_argument("task", nargs="?", help="task id (e.g. task_001)")
    _json_arg(p)

    p = add("task-detail", "one task with its files")
    p.add_argument("task", help="task id")
    p.add_argument("--files", choices=("all", "pending", "downloading", "completed", "failed"),
                   default="all", help="which files to list (default all)")
    p.add_argument("--limit", type=_non_negative_int, default=50,
                   help="at most this many files (0: all; default 50)")
    _json_arg(p)

    p = add("config", "effective settings and where each came from")
    p.add_argument("--endpoint", help="as for download")
    p.add_argument("--tool", help="as for download")
    p.add_argument("--reserve", type=_size, help="as for download")
    p.add_argument("--disk-warn-percent", help="warn when the disk is this full (default 90)")
    _json_arg(p)

    p = add("resume", "continue an interrupted, paused, cancelled or failed task")
    p.add_argument("task", help="task id (e.g. task_001)")
    p.add_argument("--endpoint", help="Hub or mirror URL (default: the task's, or HF_ENDPOINT)")
    _tool_args(p)
    _json_arg(p)

    p = add("cancel", "stop a running task (from another terminal) and mark it cancelled")
    p.add_argument("task", help="task id")
    p.add_argument("--wait", type=_seconds, default=30.0, metavar="SEC",
                   help="how long to wait for the running download to stop (default 30)")

    p = add("verify", "re-check the files of a task on disk (size and hash)")
    p.add_argument("task", help="task id")
    p.add_argument("--quick", action="store_true", help="check sizes only")
    p.add_argument("--fix", action="store_true",
                   help="move changed files aside (NAME.hfdl-modified-TIME) so resume fetches "
                        "them again (default: report them and leave them)")
    p.add_argument("--batch", type=_positive_int, metavar="N",
                   help="batch task: check batch N on the disk mounted now")
    p.add_argument("--local-dir", help="batch task: where that disk is now (default: where "
                                       "the batch was downloaded)")
    _json_arg(p)

    p = add("clean", "remove the records of finished tasks (files stay unless --delete-files)")
    p.add_argument("tasks", nargs="*", metavar="TASK", help="only these tasks")
    p.add_argument("--all", action="store_true", help="also cancelled and failed tasks")
    p.add_argument("--delete-files", action="store_true",
                   help="also delete the downloaded files of the removed tasks")

    p = add("fix-progress", "rebuild per-file status and counters from the files on disk")
    p.add_argument("tasks", nargs="*", metavar="TASK", help="only these tasks (default: all)")

    p = add("check-system", "disk space, write permission, endpoint, CPU and memory")
    p.add_argument("--path", help="folder to check (default: the downloads folder)")
    p.add_argument("--size", type=_size, default=0, metavar="SIZE",
                   help="bytes you plan to download (e.g. 500G)")
    p.add_argument("--endpoint", help="Hub or mirror URL (env HF_ENDPOINT)")
    p.add_argument("--reserve", type=_size, metavar="SIZE", help="free space always kept")
    p.add_argument("--disk-warn-percent", help="warn when the disk is this full (default 90)")
    _json_arg(p)

    p = add("analyze-dataset", "sizes per folder and extension, largest files, histogram")
    _repo_args(p)
    p.add_argument("--available-space", type=_size, metavar="SIZE",
                   help="also say how many disks of this size it takes")
    _json_arg(p)

    def batch_plan_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--available-space", type=_size, required=True, metavar="SIZE",
                       help="the size of one disk (e.g. 10T)")
        p.add_argument("--safety-margin", type=_margin, default=0.9, metavar="F",
                       help="fill each disk to at most this fraction (default 0.9)")
        p.add_argument("--local-dir", help="target folder (default: DOWNLOADS_DIR/ORG--NAME)")

    p = add("plan-batch", "split a repo into batches that each fit on one disk; save the plan")
    _repo_args(p)
    batch_plan_args(p)
    p.add_argument("--output", metavar="FILE", help="also write the plan as a self-contained file")
    _json_arg(p)

    p = add("batch-download", "plan (or reuse the plan) and download batch 1")
    _repo_args(p)
    batch_plan_args(p)
    _tool_args(p)
    _json_arg(p)

    p = add("batch-continue", "download batch N onto the disk now at the target")
    p.add_argument("task", help="batch task id, or a plan file written by plan-batch --output")
    p.add_argument("batch", type=_positive_int, help="batch number")
    p.add_argument("--local-dir", help="target folder (default: the task's)")
    p.add_argument("--endpoint", help="Hub or mirror URL (default: the task's, or HF_ENDPOINT)")
    _tool_args(p)
    _json_arg(p)

    p = add("batch-status", "per batch: state, files and bytes done, and which disk it went to")
    p.add_argument("task", help="batch task id")
    _json_arg(p)
    return parser


# ================================================================ setup

def load_settings(args: argparse.Namespace) -> config.Config:
    flags = {"metadata_dir": args.metadata_dir, "downloads_dir": args.downloads_dir,
             "logs_dir": args.logs_dir, "endpoint": getattr(args, "endpoint", None),
             "tool": getattr(args, "tool", None), "disk_reserve": getattr(args, "reserve", None),
             "disk_warn_percent": getattr(args, "disk_warn_percent", None),
             "no_mirror": True if getattr(args, "no_mirror", False) else None}
    return config.load_config(flags)


class _NoQuery(logging.Formatter):
    """Lines whose URLs carry no query string: signed links must not be readable in a log."""

    def format(self, record: logging.LogRecord) -> str:
        return strip_query(super().format(record))


class _NoTraceback(_NoQuery):
    """Console lines without the traceback: that goes to the log file (or --debug)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(logging.makeLogRecord({**record.__dict__, "exc_info": None,
                                                     "exc_text": None}))


def _private_open(path: str, flags: int) -> int:
    """Log files are ours alone (0600), also one a run before this rule made readable."""
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        pass
    return fd


class _PrivateLog(logging.handlers.RotatingFileHandler):
    """The rotated log, every file of it created 0600."""

    def _open(self):  # type: ignore[no-untyped-def]
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                    opener=_private_open)


def setup_logging(logs_dir: Path, verbose: int, quiet: bool) -> Path | None:
    """A rotated DEBUG log file per data folder; WARNING (minus 10 per -v) on stderr."""
    log.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR if quiet else max(logging.DEBUG, logging.WARNING - 10 * verbose))
    console.setFormatter(_NoTraceback("%(levelname)s: %(message)s"))
    log.addHandler(console)
    logging.raiseExceptions = False      # a full disk must not print "--- Logging error ---"
    path = Path(logs_dir) / "download.log"
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler = _PrivateLog(path, maxBytes=10 << 20, backupCount=5, encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the log at %s (%s); logging to stderr only", path, exc.strerror)
        return None
    handler.setFormatter(_NoQuery("%(asctime)s %(process)d %(levelname)s %(message)s"))
    log.addHandler(handler)
    return path


# ================================================================ entry point

class Terminated(BaseException):
    """SIGTERM outside a download run (inside one, the run stops itself cleanly)."""


def _on_sigterm(*_: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import signal
    signal.signal(signal.SIGTERM, _on_sigterm)
    log_path = None
    cfg: config.Config | None = None
    try:
        cfg = load_settings(args)
        log_path = setup_logging(cfg.logs_dir, args.verbose, args.quiet)
        log.debug("command: %s", args.command)
        return int(HANDLERS[args.command](args, cfg))
    except HFDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        hint = exc.hint
        if cfg is not None and not config.token_allowed(cfg) and isinstance(exc, HubError):
            hint = (f"your token was not sent to {cfg.endpoint}, which you did not name; "
                    f"to send it there, add --endpoint {cfg.endpoint}")
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        log.debug("error: %s", exc, exc_info=True)
        return int(exc.exit_status)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitStatus.INTERRUPTED)
    except Terminated:
        print("terminated", file=sys.stderr)
        return int(ExitStatus.TERMINATED)
    except BrokenPipeError:
        return int(ExitStatus.OK)
    except Exception as exc:
        log.error("unexpected error", exc_info=True)
        if args.debug:
            raise
        where = log_path or "the log (no log file could be written)"
        print(f"error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"hint: this is a bug; the traceback is in {where} (or run with --debug)",
              file=sys.stderr)
        return int(ExitStatus.INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
