"""hf-downloader: fetch Hugging Face models and datasets with aria2c, wget or Python.

main.py parses the command line, sets up logging, dispatches to the command's handler (in
commands.py), and turns errors into one-line messages and exit statuses (utils.ExitStatus).
Nothing else lives here.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from logs import FILE_ONLY, READ_ONLY, open_log_file, setup_logging
from utils import ExitStatus, HFDError, HubError, UsageError, parse_size

if TYPE_CHECKING:         # imported when a command runs: `--help` stays fast
    import config

log = logging.getLogger("hfdl")


# ================================================================ argument parsing

# Set by main() when --json is on the command line: then every error is also a JSON document
# on stdout, argparse's usage errors included.
_json_errors = False


def report_error(message: str, hint: str | None, status: int) -> int:
    """The one way an error is shown: `error:` and `hint:` on stderr, and with --json also
    {"error", "hint", "exit_status"} on stdout for scripts. Returns the exit status."""
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    if _json_errors:
        print(json.dumps({"error": message, "hint": hint, "exit_status": int(status)}),
              flush=True)
    return int(status)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line plus a hint, exit status 2; a misspelt choice gets a
    suggestion, and a repo swallowed by --include/--exclude is named."""

    # the last value a PAT... option took (see _Patterns), for the error when the repo is missing
    swallowed: tuple[str, str] | None = None

    def error(self, message: str) -> None:  # type: ignore[override]
        if self.swallowed and message.startswith("the following arguments are required: repo"):
            option, value = self.swallowed
            what, form = ("its folder", "DIR") if option == "--hf-cache" else ("a pattern", "PAT")
            message = (f"{option} took {value!r} as {what}; put the repo first or use "
                       f"{option}={form}")
        sys.exit(report_error(message, f"see 'python {self.prog} --help'", ExitStatus.USAGE))

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            if close:
                if action.dest == "command":
                    raise argparse.ArgumentError(
                        None, f"unknown command {value!r}; did you mean {close[0]}?")
                raise argparse.ArgumentError(
                    action, f"invalid choice: {value!r}; did you mean {close[0]}?")
        super()._check_value(action, value)


class _Patterns(argparse.Action):
    """--include/--exclude PAT...: values add up over repeated flags, and the parser remembers the
    value most likely to be a swallowed repo (`download --include '*.json' gpt2`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        values = list(values)
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *values])
        # a repo id has no glob characters; a lone glob is no swallowed repo
        plain = [v for v in values[1:] or values if not any(c in v for c in "*?[")]
        if isinstance(parser, Parser) and plain:
            parser.swallowed = (option_string or "--include", plain[0])


class _CacheDir(argparse.Action):
    """--hf-cache [DIR]: remembers DIR, which may be a swallowed repo (`download --hf-cache gpt2`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        if isinstance(parser, Parser) and values != self.const:
            parser.swallowed = ("--hf-cache", str(values))


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


def _folder(text: str) -> str:
    """A folder given on the command line; one that is not UTF-8 (a Latin-1 name, say) could not
    be recorded in the JSON metadata or shown, so it is refused up front."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise argparse.ArgumentTypeError(f"the path is not valid UTF-8: {shown}") from None
    return text


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(f"{exc} ({exc.hint})") from None


def _common(after: bool) -> Parser:
    """The options every command takes, before the command or after it. After it, their defaults
    are SUPPRESS so that one given before survives, and one given in both places is the later;
    -v counts are added up (main.parse_args)."""
    common = Parser(add_help=False)
    g = common.add_argument_group("common options (before or after the command)")

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after else value

    g.add_argument("--metadata-dir", type=_folder, default=default(None),
                   help="task records (env METADATA_DIR; default: metadata/ beside main.py)")
    g.add_argument("--downloads-dir", type=_folder, default=default(None),
                   help="download root (env DOWNLOADS_DIR; default: downloads/ beside main.py)")
    g.add_argument("--logs-dir", type=_folder, default=default(None),
                   help="log folder (env LOGS_DIR; default: logs/ beside main.py)")
    g.add_argument("-v", "--verbose", action="count", default=default(0),
                   dest="verbose_after" if after else "verbose", help="more detail on stderr")
    g.add_argument("-q", "--quiet", action="store_true", default=default(False),
                   help="no progress output (download: print only the folder on stdout)")
    g.add_argument("--debug", action="store_true", default=default(False),
                   help="show tracebacks of unexpected errors")
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
        # several values run up to the next option; --include=PAT takes exactly one
        p.add_argument("--include", nargs="+", action=_Patterns, default=[], metavar="PAT",
                       help="only repo paths matching these globs (e.g. '*.json'; "
                            "'/PATH': that exact path)")
        p.add_argument("--exclude", nargs="+", action=_Patterns, default=[], metavar="PAT",
                       help="skip repo paths matching these globs (exclude wins)")


def _tool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tool", choices=("auto", "aria2c", "wget", "python"),
                   help="download tool (env HFDL_TOOL; default auto: the python transport, "
                        "the fastest measured)")
    p.add_argument("-x", "--connections", type=_positive_int, metavar="N",
                   help="connections per file (default auto: 1 for small files; 16 for a big "
                        "one, doubled while its throughput grows, up to 32)")
    p.add_argument("-j", "--jobs", type=_positive_int, metavar="N",
                   help="files at once (default auto: 32 for repos of mostly small files, else 8)")
    p.add_argument("--retries", type=_non_negative_int, metavar="N",
                   help="retries per file after the first try (default 5)")
    p.add_argument("--stall-timeout", type=_seconds, metavar="SEC",
                   help="a file with no new byte for this long is retried (default 60)")
    p.add_argument("--reserve", type=_size, metavar="SIZE",
                   help="free space always kept (env HFDL_DISK_RESERVE; default 1G)")


def _cache_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--hf-cache", nargs="?", const="1", metavar="DIR", action=_CacheDir,
                       help="into the Hugging Face hub cache at DIR (default: the one "
                            "huggingface_hub uses), where transformers, diffusers and vLLM find "
                            "it offline")
    group.add_argument("--no-hf-cache", action="store_true",
                       help="not into the hub cache, whatever HFDL_HF_CACHE says")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> Parser:
    common = _common(after=True)
    parser = Parser(prog="main.py", description="Download Hugging Face models and datasets "
                    "with aria2c, wget or Python; resumable, verified, batchable.",
                    parents=[_common(after=False)])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    p = add("download", "download a repo (resumes the same download if it exists)")
    _repo_args(p)
    p.add_argument("files", nargs="*", default=[], metavar="FILE",
                   help="only these files (exact repo paths, as in 'hf download gpt2 config.json')")
    _tool_args(p)
    p.add_argument("--local-dir", type=_folder, help="target folder (default: DOWNLOADS_DIR/ORG--NAME)")
    _cache_args(p)
    p.add_argument("--dry-run", action="store_true", help="list files and sizes; download nothing")
    p.add_argument("--prune", action="store_true",
                   help="delete the files this task downloaded that the current commit "
                        "no longer lists (unchanged ones only)")
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
    p.add_argument("--watch", nargs="?", const="2", default=None,
                   metavar="SECONDS", help="show it again every SECONDS (default 2) until the "
                                           "task stops running: in place on a terminal, a line "
                                           "per interval otherwise")
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
    p.add_argument("task", nargs="?", help="task id")
    p.add_argument("--plan", type=_folder, metavar="FILE",
                   help="instead of a task: check every file of this plan (plan-batch --output) "
                        "in --local-dir, needing no task records (e.g. after a cluster run)")
    p.add_argument("--quick", action="store_true", help="check sizes only")
    p.add_argument("--fix", action="store_true",
                   help="move changed files aside (NAME.hfdl-modified-TIME) so resume fetches "
                        "them again (default: report them and leave them)")
    p.add_argument("--batch", type=_positive_int, metavar="N",
                   help="batch task: check batch N on the disk mounted now")
    p.add_argument("--local-dir", type=_folder, help="batch task: where that disk is now (default: where "
                                       "the batch was downloaded); --plan: the folder to check")
    _json_arg(p)

    p = add("clean", "remove the records of finished tasks (files stay unless --delete-files)")
    p.add_argument("tasks", nargs="*", metavar="TASK", help="only these tasks")
    p.add_argument("--all", action="store_true", help="also cancelled and failed tasks")
    p.add_argument("--delete-files", action="store_true",
                   help="also delete the downloaded files of the removed tasks")
    p.add_argument("--plans", action="store_true",
                   help="instead: remove the batch plans that were made and never started")

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
    p.add_argument("--safety-margin", type=_margin, default=0.9, metavar="F",
                   help="as for plan-batch: fill each disk to at most this fraction (default 0.9)")
    _json_arg(p)

    def batch_plan_args(p: argparse.ArgumentParser, disk_required: bool = True) -> None:
        p.add_argument("--available-space", type=_size, required=disk_required, metavar="SIZE",
                       help="the size of one disk (e.g. 10T)")
        p.add_argument("--safety-margin", type=_margin, default=0.9, metavar="F",
                       help="fill each disk to at most this fraction (default 0.9)")
        p.add_argument("--local-dir", type=_folder, help="target folder (default: DOWNLOADS_DIR/ORG--NAME)")
        _cache_args(p)

    p = add("plan-batch", "split a repo into batches, one per disk (--available-space) or per "
                          "worker (--workers); save the plan")
    _repo_args(p)
    batch_plan_args(p, disk_required=False)
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="N batches of about equal bytes, to run at once on N machines or "
                        "processes (each within --available-space when given: then N x k "
                        "batches, k rounds)")
    p.add_argument("--output", type=_folder, metavar="FILE", help="also write the plan as a self-contained file")
    _json_arg(p)

    p = add("batch-download", "plan (or reuse the plan) and download batch 1")
    _repo_args(p)
    batch_plan_args(p)
    _tool_args(p)
    p.add_argument("--force", action="store_true",
                   help="write the batch even onto a disk whose marker holds another batch")
    _json_arg(p)

    p = add("batch-continue", "download batch N onto the disk now at the target")
    p.add_argument("task", help="batch task id, or a plan file written by plan-batch --output")
    p.add_argument("batch", type=_positive_int, help="batch number")
    p.add_argument("--local-dir", type=_folder, help="target folder (default: the task's)")
    _cache_args(p)
    p.add_argument("--force", action="store_true",
                   help="write batch N even onto a disk whose marker holds another batch "
                        "(a warning instead of a refusal)")
    p.add_argument("--endpoint", help="Hub or mirror URL (default: the task's, or HF_ENDPOINT)")
    _tool_args(p)
    _json_arg(p)

    p = add("batch-status", "per batch: state, files and bytes done, and which disk it went to")
    p.add_argument("task", help="batch task id")
    _json_arg(p)
    return parser


def _known_options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def _misspelt_option(parser: Parser, argv: list[str]) -> str | None:
    """The first --option that is neither an option of the command nor an abbreviation of one,
    when one of them is close to it: the error says which one was meant."""
    commands: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands = dict(action.choices)
    known = _known_options(parser)
    command = next((a for a in argv if a in commands), None)
    if command:
        known += _known_options(commands[command])
    for token in argv:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if not name.startswith("--") or any(k.startswith(name) for k in known):
            continue
        close = difflib.get_close_matches(name, sorted(set(known)), n=1)
        if close:
            return f"unrecognized option {name}; did you mean {close[0]}?"
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with the common options merged from before and after the command."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    typo = _misspelt_option(parser, argv)
    if typo:
        parser.error(typo)
    args, extras = parser.parse_known_args(argv)
    if args.command == "download":      # FILEs after an option: `download gpt2 -q config.json`
        args.files = [*args.files, *(e for e in extras if not e.startswith("-"))]
        extras = [e for e in extras if e.startswith("-")]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    args.verbose += vars(args).pop("verbose_after", 0)
    return args


# ================================================================ setup

def load_settings(args: argparse.Namespace) -> config.Config:
    import config
    flags = {"metadata_dir": args.metadata_dir, "downloads_dir": args.downloads_dir,
             "logs_dir": args.logs_dir, "endpoint": getattr(args, "endpoint", None),
             "tool": getattr(args, "tool", None), "disk_reserve": getattr(args, "reserve", None),
             "disk_warn_percent": getattr(args, "disk_warn_percent", None),
             "no_mirror": True if getattr(args, "no_mirror", False) else None,
             "hf_cache": "off" if getattr(args, "no_hf_cache", False)
             else getattr(args, "hf_cache", None)}
    return config.load_config(flags)



# ================================================================ entry point

class Terminated(BaseException):
    """SIGTERM outside a download run (inside one, the run stops itself cleanly)."""


def _on_sigterm(*_: object) -> None:
    raise Terminated()


def _token_allowed(cfg: config.Config) -> bool:
    import config
    return config.token_allowed(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    global _json_errors
    argv = list(sys.argv[1:] if argv is None else argv)
    _json_errors = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    args = parse_args(argv)
    import signal
    signal.signal(signal.SIGTERM, _on_sigterm)
    log_path = None
    cfg: config.Config | None = None
    try:
        cfg = load_settings(args)
        log_path = setup_logging(cfg.logs_dir, args.verbose, args.quiet,
                                 to_file=args.command not in READ_ONLY)
        log.debug("command: %s", args.command)
        from commands import HANDLERS
        handler = HANDLERS.get(args.command)
        if handler is None:            # the batch commands have a module of their own
            from batch_commands import HANDLERS as BATCH_HANDLERS
            handler = BATCH_HANDLERS[args.command]
        return int(handler(args, cfg))
    except HFDError as exc:
        hint = exc.hint
        if cfg is not None and isinstance(exc, HubError) and not _token_allowed(cfg):
            hint = (f"your token was not sent to {cfg.endpoint}, which you did not name; "
                    f"to send it there, add --endpoint {cfg.endpoint}")
        # an expected error (unknown repo, no task, task locked): one line, no traceback
        log.error("%s (exit %d)", exc, exc.exit_status, extra=FILE_ONLY)
        return report_error(str(exc), hint, exc.exit_status)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _json_stop("interrupted", ExitStatus.INTERRUPTED)
    except Terminated:
        print("terminated", file=sys.stderr)
        return _json_stop("terminated", ExitStatus.TERMINATED)
    except BrokenPipeError:
        return int(ExitStatus.OK)
    except OSError as exc:
        folder = _metadata_folder_of(exc, cfg)
        if folder is None or args.debug:
            return _unexpected(exc, args, log_path, cfg)
        log.error("cannot write the metadata folder %s: %s", folder, _os_reason(exc),
                  extra=FILE_ONLY)
        return report_error(f"cannot write the metadata folder {folder}: {_os_reason(exc)}",
                            "make it writable, or point --metadata-dir (env METADATA_DIR) "
                            "elsewhere", ExitStatus.ERROR)
    except Exception as exc:
        return _unexpected(exc, args, log_path, cfg)


def _json_stop(what: str, status: int) -> int:
    """^C or SIGTERM outside a run: stderr says it in one word; --json gets the document too."""
    if _json_errors:
        print(json.dumps({"error": what, "hint": None, "exit_status": int(status)}), flush=True)
    return int(status)


def _metadata_folder_of(exc: OSError, cfg: config.Config | None) -> Path | None:
    """The metadata folder when `exc` is about a file in it (a read-only or unreadable folder)."""
    if cfg is None or not exc.filename or exc.errno not in _FOLDER_ERRNOS:
        return None
    folder = Path(os.path.abspath(cfg.metadata_dir))
    path = Path(os.path.abspath(os.fsdecode(exc.filename)))
    return folder if path == folder or folder in path.parents else None


_FOLDER_ERRNOS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "no space left on device",
                  errno.EDQUOT: "disk quota exceeded"}


def _os_reason(exc: OSError) -> str:
    return _FOLDER_ERRNOS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()


def _unexpected(exc: BaseException, args: argparse.Namespace, log_path: Path | None,
                cfg: config.Config | None) -> int:
    """A bug: the traceback goes to the log (or, with --debug, to the terminal); a read-only
    command opens the log for it."""
    if log_path is None and cfg is not None and args.command in READ_ONLY:
        log_path = open_log_file(cfg.logs_dir)
    log.error("unexpected error", exc_info=exc, extra=FILE_ONLY)
    if args.debug:
        raise exc
    where = log_path or "the log (no log file could be written)"
    return report_error(f"unexpected {type(exc).__name__}: {exc}",
                        f"this is a bug; the traceback is in {where} (or run with --debug)",
                        ExitStatus.INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
