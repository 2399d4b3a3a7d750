"""hf-downloader: fetch Hugging Face models and datasets with aria2c, wget or Python.

main.py parses the command line, dispatches to one handler per command, and turns errors into
one-line messages and exit statuses (utils.ExitStatus). Nothing else lives here.
"""
from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import config
import render
from render import out, out_json, say
from task_manager import StopReason, TaskStore, cancel, normalize_id
from utils import ExitStatus, HFDError, UsageError, format_size, parse_size, repo_folder_name

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
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_margin = _number(float, lambda v: 0 < v <= 1, "a fraction above 0 and at most 1")


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
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
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
    p.add_argument("--stall-timeout", type=_positive_float, default=60.0, metavar="SEC",
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
    p.add_argument("--wait", type=_positive_float, default=30.0, metavar="SEC",
                   help="how long to wait for the running download to stop (default 30)")

    p = add("verify", "re-check the files of a task on disk (size and hash)")
    p.add_argument("task", help="task id")
    p.add_argument("--quick", action="store_true", help="check sizes only")
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


class _NoTraceback(logging.Formatter):
    """Console lines without the traceback: that goes to the log file (or --debug)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(logging.makeLogRecord({**record.__dict__, "exc_info": None,
                                                     "exc_text": None}))


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
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 << 20, backupCount=5,
                                                       encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the log at %s (%s); logging to stderr only", path, exc.strerror)
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
    log.addHandler(handler)
    return path


# ================================================================ handler helpers

@dataclass(frozen=True)
class RepoChoice:
    """The repo named on the command line, checked: what to list and from where."""
    repo_id: str
    repo_type: str
    revision: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def repo_type_of(dataset: bool, repo_type: str | None) -> str:
    if dataset and repo_type not in (None, "dataset"):
        raise UsageError(f"--dataset conflicts with --repo-type {repo_type}")
    return "dataset" if dataset else (repo_type or "model")


def _repo_choice(args: argparse.Namespace) -> RepoChoice:
    """The values that `_repo_args` added, checked."""
    import dataset_manager
    repo_id = dataset_manager.validate_repo_id(args.repo)
    return RepoChoice(repo_id, repo_type_of(args.dataset, args.repo_type), args.revision,
                      tuple(getattr(args, "include", ())), tuple(getattr(args, "exclude", ())))


def _tool_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The values that `_tool_args` added, for downloader.options_from_config."""
    return {"connections": args.connections, "jobs": args.jobs, "retries": args.retries,
            "stall_timeout": args.stall_timeout}


def _probe_endpoints(candidates: list[str], timeout: float) -> tuple[str | None, list[Any]]:
    import system_monitor           # only when probing: psutil and requests are slow to import
    return system_monitor.pick_endpoint(candidates, timeout=timeout)


def endpoint_for(cfg: config.Config, task_endpoint: str | None = None) -> str:
    """The endpoint to use (see config.resolve_endpoint); says so when it picked the mirror."""
    endpoint, note = config.resolve_endpoint(cfg, task_endpoint, probe=_probe_endpoints)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return endpoint


def target_dir(local_dir: str | None, downloads_dir: Path, repo_id: str) -> Path:
    return Path(os.path.abspath(local_dir or downloads_dir / repo_folder_name(repo_id)))


def report_refused(listing: Any) -> None:
    for name, why in listing.refused:
        print(f"warning: skipped {name!r}: {why}", file=sys.stderr)
        log.warning("refused a file name from the Hub: %r (%s)", name, why)


_RESULT_EXIT = {"completed": ExitStatus.OK, "failed": ExitStatus.FILES_FAILED,
                "cancelled": ExitStatus.CANCELLED}
_STOP_EXIT = {StopReason.INTERRUPTED: ExitStatus.INTERRUPTED,
              StopReason.TERMINATED: ExitStatus.TERMINATED,
              StopReason.DISK_FULL: ExitStatus.DISK_FULL,
              StopReason.CANCELLED: ExitStatus.CANCELLED}


def report_result(task_id: str, result: Any, as_json: bool) -> int:
    render.run_result(task_id, result, as_json)
    return report_exit(task_id, result)


def report_exit(task_id: str, result: Any) -> int:
    """The hint for a stopped or failed run, and its exit status."""
    if result.stop is StopReason.DISK_FULL:
        print(f"error: stopped before the disk filled up ({result.detail or result.reason}); "
              f"{format_size(result.bytes_missing)} still to fetch", file=sys.stderr)
        print(f"hint: free some space, then run 'python main.py resume {task_id}'",
              file=sys.stderr)
    elif result.stop in (StopReason.INTERRUPTED, StopReason.TERMINATED):
        print(f"stopped; continue with 'python main.py resume {task_id}'", file=sys.stderr)
    elif result.status == "failed":
        print(f"hint: 'python main.py resume {task_id}' tries the failed files again",
              file=sys.stderr)
    if result.stop is not None:
        return _STOP_EXIT[result.stop]
    return _RESULT_EXIT.get(result.status, ExitStatus.ERROR)


def _running_pid(store: Any, task_id: str) -> int | None:
    return store.owner_pid(task_id) if store.is_locked(task_id) else None


# ================================================================ handlers

def cmd_download(args: argparse.Namespace, cfg: config.Config) -> int:
    import dataset_manager as dm
    import downloader
    repo = _repo_choice(args)
    endpoint = endpoint_for(cfg)
    token = dm.hub_token()
    listing = dm.list_files(repo.repo_id, repo.repo_type, repo.revision, endpoint, token,
                            repo.include, repo.exclude)
    report_refused(listing)
    _require_files(listing, repo)
    if args.dry_run:
        render.file_listing(listing, args.json)
        return ExitStatus.OK
    local_dir = target_dir(args.local_dir, cfg.downloads_dir, repo.repo_id)
    req = downloader.DownloadRequest(repo.repo_id, repo.repo_type, repo.revision, local_dir,
                                     repo.include, repo.exclude, args.prune)
    opts = downloader.options_from_config(cfg, **_tool_flags(args))
    _announce(args.quiet, listing, local_dir, downloader.choose_tool(opts.tool), opts, endpoint)
    outcome = downloader.download_repo(TaskStore(cfg.metadata_dir), req, listing,
                                       endpoint=endpoint, token=token, opts=opts,
                                       reserve=cfg.get("disk_reserve"), log=log,
                                       stream=sys.stderr, quiet=args.quiet)
    dm.register(cfg.metadata_dir, listing)
    _report_sync(args.quiet, listing.commit, outcome.sync, outcome.pruned)
    return report_result(outcome.task["id"], outcome.result, args.json)


def _require_files(listing: Any, repo: RepoChoice) -> None:
    if listing.files:
        return
    if repo.include or repo.exclude:
        raise UsageError(f"no file of {repo.repo_id} matches the --include/--exclude filters",
                         hint="check the patterns; 'download REPO --dry-run' lists the files")
    raise HFDError(f"{repo.repo_id} has no files at {repo.revision}")


def _announce(quiet: bool, listing: Any, local_dir: Path, tool: str, opts: Any,
              endpoint: str) -> None:
    say(quiet, f"{listing.repo_type} {listing.repo_id} @ {listing.commit[:12]}: "
               f"{len(listing.files)} files, {format_size(listing.total_size)} -> {local_dir}")
    say(quiet, f"tool: {tool}" + (" (auto)" if opts.tool == "auto" else "") +
        f", -x {opts.connections} -j {opts.jobs}, endpoint {endpoint}")


def _report_sync(quiet: bool, commit: str, sync: Any, pruned: list[str]) -> None:
    if sync is None:
        return
    say(quiet, f"new commit {commit[:12]}: {len(sync.added)} new, {len(sync.changed)} "
               f"changed, {len(sync.removed)} removed upstream, {sync.unchanged} unchanged")
    for path in sync.removed:
        say(quiet, f"  removed upstream: {path}" +
            (" (deleted)" if path in pruned else " (kept; --prune deletes it)"))


def cmd_add_dataset(args: argparse.Namespace, cfg: config.Config) -> int:
    import dataset_manager as dm
    repo = _repo_choice(args)
    listing = dm.list_files(repo.repo_id, repo.repo_type, repo.revision, endpoint_for(cfg),
                            dm.hub_token())
    entry = dm.register(cfg.metadata_dir, listing, args.description)
    out(f"registered {repo.repo_type} {repo.repo_id} @ {listing.commit[:12]}: "
        f"{entry['file_count']} files, {format_size(entry['total_size'])}")
    return ExitStatus.OK


def cmd_list_datasets(args: argparse.Namespace, cfg: config.Config) -> int:
    import dataset_manager as dm
    render.datasets(list(dm.load_registry(cfg.metadata_dir).values()), args.json)
    return ExitStatus.OK


def _live_tasks(metadata_dir: Path, status: str | None) -> list[dict]:
    store = TaskStore(metadata_dir)
    tasks = [store.live(t) for t in store.all().values()]
    return [t for t in tasks if not status or t.get("status") == status]


def cmd_list_tasks(args: argparse.Namespace, cfg: config.Config) -> int:
    render.task_list(_live_tasks(cfg.metadata_dir, args.status), args.json)
    return ExitStatus.OK


def cmd_status(args: argparse.Namespace, cfg: config.Config) -> int:
    if not args.task:
        render.task_list(_live_tasks(cfg.metadata_dir, None), args.json)
        return ExitStatus.OK
    store = TaskStore(cfg.metadata_dir)
    task = store.live(store.get(normalize_id(args.task)))
    render.status(task, _running_pid(store, task["id"]), args.json)
    return ExitStatus.OK


def cmd_task_detail(args: argparse.Namespace, cfg: config.Config) -> int:
    from file_tracker import FileTracker
    store = TaskStore(cfg.metadata_dir)
    task = store.get(normalize_id(args.task))
    tracker = FileTracker.load(store.folder(task["id"]), task["id"])
    rows = [{"filename": f.path, "expected_size": f.size, "lfs": f.lfs,
             "expected_hash": f.expected_hash, **tracker.status[f.path]} for f in tracker.files
            if args.files == "all" or tracker.status[f.path]["status"] == args.files]
    shown = rows if args.limit == 0 else rows[:args.limit]
    if args.json:
        out_json({"task": render.task_row(task), "counts": tracker.counts, "files": shown})
        return ExitStatus.OK
    render.status(store.live(task), _running_pid(store, task["id"]), False)
    render.files(rows, shown, tracker.counts)
    return ExitStatus.OK


def cmd_config(args: argparse.Namespace, cfg: config.Config) -> int:
    render.settings(cfg.rows(), args.json)
    return ExitStatus.OK


def cmd_resume(args: argparse.Namespace, cfg: config.Config) -> int:
    import dataset_manager as dm
    import downloader
    store = TaskStore(cfg.metadata_dir)
    task = store.get(normalize_id(args.task))
    if task.get("kind") == "batch":          # continue the batch that was running
        import batch_manager as bm
        number, target = bm.resume_point(store, task["id"])
        return _run_batch(cfg, store, task, number, target, args)

    def announce(commit: str) -> None:
        say(args.quiet, f"resuming {task['id']}: {task['repo_type']} {task['repo_id']} @ "
                        f"{commit[:12]} -> {task['local_dir']}")

    outcome = downloader.resume_task(
        store, task["id"], endpoint=endpoint_for(cfg, task.get("endpoint")),
        token=dm.hub_token(), opts=downloader.options_from_config(cfg, **_tool_flags(args)),
        reserve=cfg.get("disk_reserve"), log=log, stream=sys.stderr, quiet=args.quiet,
        on_start=announce)
    return report_result(outcome.task["id"], outcome.result, args.json)


def cmd_cancel(args: argparse.Namespace, cfg: config.Config) -> int:
    outcome = cancel(
        TaskStore(cfg.metadata_dir), args.task, args.wait,
        on_asked=lambda tid, pid: out(f"asked {tid} (PID {pid or 'unknown'}) to stop..."))
    tid = outcome.task_id
    out(f"{tid} cancelled; its bytes are kept ('python main.py resume {tid}' continues it)")
    return ExitStatus.OK


def cmd_verify(args: argparse.Namespace, cfg) -> int:
    import maintenance
    from task_manager import TaskStore, normalize_id
    store = TaskStore(cfg.metadata_dir)
    task = store.get(normalize_id(args.task))
    local_dir = Path(os.path.abspath(args.local_dir)) if args.local_dir else None
    paths = None
    if task.get("kind") == "batch" or args.batch:
        import batch_manager as bm
        paths, local_dir = bm.batch_on_disk(store, task, args.batch, local_dir)
    report = maintenance.verify_task(store, task, local_dir or Path(task["local_dir"]),
                                     paths=paths, quick=args.quick)
    results, bad = report.results, report.bad
    if args.json:
        out_json({"task": task["id"], "ok": not bad, "checked": len(results),
                  "files": [{"path": r.path, "verdict": r.verdict, "detail": r.detail}
                            for r in results]})
    else:
        for r in results:
            if r.verdict != "ok" or args.verbose:
                out(f"{r.verdict.upper():14} {r.path}" + (f"  ({r.detail})" if r.detail else ""))
        kind = "sizes" if args.quick else "sizes and hashes"
        out(f"{task['id']}: {len(results) - len(bad)}/{len(results)} files OK ({kind} checked)")
        if bad:
            out(f"{len(bad)} bad files were marked for download; "
                f"'python main.py resume {task['id']}' fetches them again")
    return ExitStatus.FILES_FAILED if bad else ExitStatus.OK


def cmd_clean(args: argparse.Namespace, cfg) -> int:
    from maintenance import clean_tasks
    from task_manager import TaskStore, normalize_id
    store = TaskStore(cfg.metadata_dir)
    wanted = {normalize_id(t) for t in args.tasks}
    removed, running = clean_tasks(store, wanted, include_ended=args.all,
                                   delete_files=args.delete_files)
    for c in removed:
        note = f", {c.files_deleted} files deleted" if c.files_deleted is not None else ""
        out(f"removed {c.task_id} ({c.status}, {c.repo_id}){note}" + (f", {c.note}" if c.note else ""))
    for tid in running:
        out(f"skipped {tid}: it is running")
    for tid in sorted(wanted - set(store.all()) - {c.task_id for c in removed}):
        out(f"no task {tid}")
    if not removed:
        which = "completed" if not args.all else "completed, cancelled or failed"
        out(f"nothing to clean (no {which} tasks" + (" among those named)" if wanted else ")"))
    elif not args.delete_files:
        out("downloaded files were kept (--delete-files removes them)")
    return ExitStatus.OK


def cmd_fix_progress(args: argparse.Namespace, cfg) -> int:
    import maintenance
    from task_manager import TaskStore, normalize_id
    store = TaskStore(cfg.metadata_dir)
    if not store.index_ok():
        ids = store.rebuild_index()
        out(f"rebuilt {store.index} from {len(ids)} task folders")
    import dataset_manager as dm
    if not dm.registry_ok(cfg.metadata_dir):
        count = dm.rebuild_registry(cfg.metadata_dir, store.all().values())
        out(f"rebuilt {dm.registry_path(cfg.metadata_dir)} with {count} repos from the tasks")
    for tid in [normalize_id(t) for t in args.tasks] or sorted(store.all()):
        fix = maintenance.fix_task(store, store.get(tid))
        if fix.rebuilt:
            out(f"{tid}: file_status.json was unreadable; rebuilt from the disk")
        changed = ", ".join(f"{v} {k.replace('now_', 'now ')}" for k, v in fix.changes.items() if v)
        out(f"{tid}: {changed or 'no change'} ({fix.summary['files_done']}/"
            f"{fix.summary['files_total']} files complete, status {fix.status})")
    return ExitStatus.OK


def cmd_check_system(args: argparse.Namespace, cfg: config.Config) -> int:
    import system_monitor
    path = Path(args.path) if args.path else cfg.downloads_dir
    report = system_monitor.check_system(path, size=args.size, reserve=cfg.get("disk_reserve"),
                                         warn_percent=cfg.get("disk_warn_percent"),
                                         endpoint=endpoint_for(cfg))
    if args.json:
        out_json(report.to_json())
    else:
        out(system_monitor.format_report(report))
    return ExitStatus.OK if report.ok else ExitStatus.ERROR


# ---------------------------------------------------------------- batches

def _batch_listing(cfg: config.Config, repo: RepoChoice) -> tuple[Any, str]:
    """List a repo for the batch and analysis commands (with the filters), and its endpoint."""
    import dataset_manager as dm
    endpoint = endpoint_for(cfg)
    listing = dm.list_files(repo.repo_id, repo.repo_type, repo.revision, endpoint,
                            dm.hub_token(), repo.include, repo.exclude)
    report_refused(listing)
    if not listing.files:
        raise UsageError(f"no file of {repo.repo_id} matches the --include/--exclude filters"
                         if repo.include or repo.exclude else f"{repo.repo_id} has no files")
    return listing, endpoint


def cmd_analyze_dataset(args: argparse.Namespace, cfg: config.Config) -> int:
    import batch_planner as bp
    listing, _ = _batch_listing(cfg, _repo_choice(args))
    analysis = bp.analyze_files(listing.files, available_space=args.available_space)
    analysis.update({"repo_id": listing.repo_id, "repo_type": listing.repo_type,
                     "commit": listing.commit})
    if args.json:
        out_json(analysis)
    else:
        out(f"{listing.repo_type} {listing.repo_id} @ {listing.commit[:12]}")
        out(bp.format_analysis(analysis))
    return ExitStatus.OK


def _plan_or_reuse(args: argparse.Namespace, cfg: config.Config) -> tuple[Any, Any]:
    """The flags of plan-batch and batch-download, to batch_manager.plan_or_reuse."""
    import batch_manager as bm
    repo = _repo_choice(args)
    store = TaskStore(cfg.metadata_dir)
    identity = bm.batch_identity(repo.repo_id, repo.repo_type, repo.revision, repo.include,
                                 repo.exclude, args.available_space, args.safety_margin)
    choice = bm.plan_or_reuse(store, identity, lambda: _batch_listing(cfg, repo),
                              target_dir(args.local_dir, cfg.downloads_dir, repo.repo_id),
                              cfg.metadata_dir)
    if choice.reused:
        say(args.quiet, f"reusing the plan of {choice.task['id']} "
                        f"(pinned at {str(choice.task['commit'])[:12]})")
    return store, choice


def cmd_plan_batch(args: argparse.Namespace, cfg: config.Config) -> int:
    import batch_manager as bm
    import batch_planner as bp
    _, choice = _plan_or_reuse(args, cfg)
    task, plan = choice.task, choice.plan
    batches = bm.plan_batches_of(plan)
    if args.output:
        bm.write_plan_file(args.output, plan)
    if args.json:
        out_json({"task": task["id"], "commit": plan["commit"], "plan_id": plan["plan_id"],
                  **bp.plan_summary(batches, plan["capacity"])})
        return ExitStatus.OK
    out(bp.format_plan(batches, plan["capacity"]))
    out(f"plan saved as {task['id']} ({plan['repo_type']} {plan['repo_id']} pinned at commit "
        f"{plan['commit'][:12]})" + (f"; also written to {args.output}" if args.output else ""))
    out(f"next: python main.py batch-download {plan['repo_id']}"
        + (" --dataset" if plan["repo_type"] == "dataset" else "")
        + f" --available-space {args.available_space}   (or batch-continue {task['id']} 1)")
    return ExitStatus.OK


def cmd_batch_download(args: argparse.Namespace, cfg: config.Config) -> int:
    store, choice = _plan_or_reuse(args, cfg)
    return _run_batch(cfg, store, choice.task, 1, args.local_dir, args)


def cmd_batch_continue(args: argparse.Namespace, cfg: config.Config) -> int:
    import batch_manager as bm
    store = TaskStore(cfg.metadata_dir)
    if args.task.endswith(".json") or os.path.isfile(args.task):
        plan = bm.read_plan_file(args.task)
        local_dir = target_dir(args.local_dir, cfg.downloads_dir, plan["repo_id"])
        task = bm.task_for_plan_file(store, plan, local_dir, cfg.endpoint)
    else:
        task = store.get(normalize_id(args.task))
    return _run_batch(cfg, store, task, args.batch, args.local_dir, args)


def _run_batch(cfg: config.Config, store: Any, task: dict, number: int, local_dir: str | None,
               args: argparse.Namespace) -> int:
    """Batch N of a task onto the disk at `local_dir` (default: the task's); `args` carries
    the flags of `_tool_args` and --json/--quiet."""
    import batch_manager as bm
    import dataset_manager as dm
    import downloader
    endpoint = endpoint_for(cfg, task.get("endpoint"))
    target = Path(os.path.abspath(local_dir)) if local_dir else None
    say(args.quiet, f"{task['id']}: batch {number} of {task.get('batch_count', '?')} -> "
                    f"{target or task['local_dir']}")
    run = bm.run_batch(store, task, number, target=target, endpoint=endpoint, token=dm.hub_token(),
                       opts=downloader.options_from_config(cfg, **_tool_flags(args)),
                       reserve=cfg.get("disk_reserve"), log=log, stream=sys.stderr,
                       quiet=args.quiet)
    render.batch_run(task["id"], number, run, args.json)
    if run.result.status == "completed" and number < run.batch_count:
        say(args.quiet, f"next: swap the disk, then python main.py batch-continue {task['id']} "
                        f"{number + 1}")
    return report_exit(task["id"], run.result)


def cmd_batch_status(args: argparse.Namespace, cfg: config.Config) -> int:
    import batch_manager as bm
    store = TaskStore(cfg.metadata_dir)
    task = store.get(normalize_id(args.task))
    rows = bm.batch_rows(store, task)
    if args.json:
        out_json({"task": task["id"], "status": store.live(task)["status"], "batches": rows})
    else:
        out(bm.format_batch_rows(task, rows))
    return ExitStatus.OK


HANDLERS: dict[str, Callable[[argparse.Namespace, config.Config], int]] = {
    "download": cmd_download, "add-dataset": cmd_add_dataset, "list-datasets": cmd_list_datasets,
    "list-tasks": cmd_list_tasks, "status": cmd_status, "task-detail": cmd_task_detail,
    "config": cmd_config, "resume": cmd_resume, "cancel": cmd_cancel, "verify": cmd_verify,
    "clean": cmd_clean, "fix-progress": cmd_fix_progress, "check-system": cmd_check_system,
    "analyze-dataset": cmd_analyze_dataset, "plan-batch": cmd_plan_batch,
    "batch-download": cmd_batch_download, "batch-continue": cmd_batch_continue,
    "batch-status": cmd_batch_status,
}


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
    try:
        cfg = load_settings(args)
        log_path = setup_logging(cfg.logs_dir, args.verbose, args.quiet)
        log.debug("command: %s", args.command)
        return int(HANDLERS[args.command](args, cfg))
    except HFDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
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
