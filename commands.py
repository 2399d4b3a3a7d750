"""One handler per command: turn the parsed options into manager calls, render the result,
return the exit status. Managers do the work (and take the task locks); render.py prints.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import config
import render
from render import out, out_json, say
from task_manager import StopReason, Task, TaskState, TaskStore, cancel, normalize_id
from utils import (ExitStatus, HFDError, MetadataError, UsageError, format_size, printable,
                   repo_folder_name)

if TYPE_CHECKING:
    from argparse import Namespace

    from downloader import RunResult

log = logging.getLogger("hfdl")


# ================================================================ helpers

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


def repo_choice(args: Namespace, cfg: config.Config | None = None) -> RepoChoice:
    """The values that `_repo_args` added, checked. With `cfg`, a repo named without --dataset
    or --repo-type takes the type it was registered with (add-dataset --dataset)."""
    import dataset_manager
    repo_id = dataset_manager.validate_repo_id(args.repo)
    repo_type = repo_type_of(args.dataset, args.repo_type)
    if cfg is not None and not args.dataset and args.repo_type is None:
        registered = dataset_manager.registered_type(cfg.metadata_dir, repo_id)
        if registered and registered != repo_type:
            say(getattr(args, "quiet", False),
                f"note: {repo_id} is registered as a {registered}; using that "
                f"(--repo-type {repo_type} overrides)")
            repo_type = registered
    return RepoChoice(repo_id, repo_type, args.revision,
                      tuple(getattr(args, "include", ())), tuple(getattr(args, "exclude", ())))


def _tool_flags(args: Namespace) -> dict[str, Any]:
    """The flags of `_tool_args` (None: not given), for downloader.run_settings."""
    import downloader
    return {k: getattr(args, k, None) for k in downloader.RUN_FLAGS}


def _run_settings(args: Namespace, cfg: config.Config, task: Task | None) -> Any:
    """The flags given now over those the task remembers; says which remembered ones it uses."""
    import downloader
    run = downloader.run_settings(cfg, _tool_flags(args), task)
    if run.remembered:
        say(args.quiet, f"using the task's options: {downloader.flag_text(run.remembered)} "
                        f"(from {run.remembered_from})")
    return run


def _probe_endpoints(candidates: list[str], timeout: float) -> tuple[str | None, list[Any]]:
    import system_monitor           # only when probing: psutil and requests are slow to import
    return system_monitor.pick_endpoint(candidates, timeout=timeout)


def endpoint_for(cfg: config.Config, task_endpoint: str | None = None) -> str:
    """The endpoint to use (see config.resolve_endpoint); says so when it picked the mirror."""
    endpoint, note = config.resolve_endpoint(cfg, task_endpoint, probe=_probe_endpoints,
                                             has_token=config.has_token())
    if note:
        print(f"note: {note}", file=sys.stderr)
    return endpoint


def token_for(cfg: config.Config) -> str | None:
    """The token, unless the endpoint was picked without the user naming it."""
    import dataset_manager as dm
    return dm.hub_token() if config.token_allowed(cfg) else None


def target_dir(local_dir: str | None, downloads_dir: Path, repo_id: str) -> Path:
    return Path(os.path.abspath(local_dir or downloads_dir / repo_folder_name(repo_id)))


def report_refused(listing: Any) -> None:
    for name, why in listing.refused:
        log.warning("skipped %s: %s", printable(repr(name)), why)


_RESULT_EXIT = {TaskState.COMPLETED: ExitStatus.OK, TaskState.FAILED: ExitStatus.FILES_FAILED,
                TaskState.CANCELLED: ExitStatus.CANCELLED}
_STOP_EXIT = {StopReason.INTERRUPTED: ExitStatus.INTERRUPTED,
              StopReason.TERMINATED: ExitStatus.TERMINATED,
              StopReason.DISK_FULL: ExitStatus.DISK_FULL,
              StopReason.CANCELLED: ExitStatus.CANCELLED}


def report_result(task: Task, result: RunResult, as_json: bool) -> int:
    render.run_result(task, result, as_json)
    return report_exit(task.id, result)


def report_exit(task_id: str, result: RunResult) -> int:
    """The hint for a stopped or failed run, and its exit status."""
    if result.stop is StopReason.DISK_FULL:
        print(f"error: stopped before the disk filled up ({result.detail or result.reason}); "
              f"{format_size(result.bytes_missing)} still to fetch", file=sys.stderr)
        print(f"hint: free some space, then run 'python main.py resume {task_id}'",
              file=sys.stderr)
    elif result.stop in (StopReason.INTERRUPTED, StopReason.TERMINATED):
        print(f"stopped; continue with 'python main.py resume {task_id}'", file=sys.stderr)
    elif result.status is TaskState.FAILED:
        print(f"hint: 'python main.py resume {task_id}' tries the failed files again",
              file=sys.stderr)
    if result.stop is not None:
        return _STOP_EXIT[result.stop]
    return _RESULT_EXIT.get(result.status, ExitStatus.ERROR)


def _running_pid(store: TaskStore, task_id: str) -> int | None:
    return store.owner_pid(task_id) if store.is_locked(task_id) else None


# ================================================================ handlers

def cmd_download(args: Namespace, cfg: config.Config) -> int:
    import dataset_manager as dm
    import downloader
    repo = repo_choice(args, cfg)
    cache = cache_root(args, cfg)              # two targets named: said before any request
    if not args.dry_run:
        dm.load_registry(cfg.metadata_dir)     # a corrupt datasets.json fails before any download
    endpoint = endpoint_for(cfg)
    token = token_for(cfg)
    if args.files:
        listing = dm.list_files(repo.repo_id, repo.repo_type, repo.revision, endpoint, token)
        repo, listing = only_files(repo, listing, args.files)
    else:
        listing = dm.list_files(repo.repo_id, repo.repo_type, repo.revision, endpoint, token,
                                repo.include, repo.exclude)
    report_refused(listing)
    _require_files(listing, repo)
    local_dir = target_dir(args.local_dir, cfg.downloads_dir, repo.repo_id)
    if cache is not None:
        local_dir = snapshot_folder(cache, repo.repo_id, repo.repo_type, listing.commit)
    if args.dry_run:
        from file_tracker import files_on_disk
        render.file_listing(listing, files_on_disk(listing.files, local_dir), local_dir,
                            args.json)
        return ExitStatus.OK
    req = downloader.DownloadRequest(repo.repo_id, repo.repo_type, repo.revision, local_dir,
                                     repo.include, repo.exclude, args.prune)
    store = TaskStore(cfg.metadata_dir)
    run = _run_settings(args, cfg, req.find(store))
    opts = run.opts
    _announce(args.quiet, listing, local_dir, downloader.choose_tool(opts.tool), opts, endpoint)
    outcome = downloader.download_repo(store, req, listing,
                                       endpoint=endpoint, token=token, opts=opts,
                                       reserve=run.reserve, log=log,
                                       stream=sys.stderr, quiet=args.quiet,
                                       remember=("download", _tool_flags(args)))
    dm.register(cfg.metadata_dir, listing)
    render.sync_report(args.quiet, listing.commit, outcome)
    if args.quiet and not args.json:      # DIR=$(python main.py download REPO -q)
        render.quiet_result(outcome.task.id, outcome.result, local_dir)
        return report_exit(outcome.task.id, outcome.result)
    return report_result(outcome.task, outcome.result, args.json)


def cache_root(args: Namespace, cfg: config.Config) -> Path | None:
    """--hf-cache [DIR] (or HFDL_HF_CACHE): the hub cache to download into; None: a plain
    folder. The flag and --local-dir name two targets; the setting yields to --local-dir."""
    if not cfg.get("hf_cache"):
        return None
    if getattr(args, "local_dir", None):
        if cfg.source("hf_cache") == "flag":
            raise UsageError("--hf-cache and --local-dir name two targets",
                             hint="give one: the cache layout, or a plain folder")
        print("note: --local-dir wins over HFDL_HF_CACHE: a plain folder, not the hub cache "
              "(--no-hf-cache turns the setting off for one run)", file=sys.stderr)
        return None
    return Path(cfg.get("hf_cache"))


def snapshot_folder(cache: Path, repo_id: str, repo_type: str, commit: str) -> Path:
    """The folder a cache-mode task downloads into: the commit's snapshot in the hub cache."""
    import hf_cache
    return hf_cache.snapshot_dir(cache, repo_id, repo_type, commit)


def only_files(repo: RepoChoice, listing: Any, files: list[str]) -> tuple[RepoChoice, Any]:
    """`download REPO FILE...`: those exact paths, still filtered by --include/--exclude; the
    choice carries them as root-anchored patterns, so the task (and its resume) keeps them."""
    import dataclasses

    import dataset_manager as dm
    include, listing = dm.select_files(listing, files, repo.include, repo.exclude)
    return dataclasses.replace(repo, include=include), listing


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
    say(quiet, tool_line(tool, opts, endpoint, [f.size for f in listing.files]))


def tool_line(tool: str, opts: Any, endpoint: str, sizes: list[int] | None = None) -> str:
    """The tool and its settings, as chosen for these file sizes when not given (auto)."""
    from fetcher import settings_text
    return (f"tool: {tool}" + (" (auto)" if opts.tool == "auto" else "") +
            f", {settings_text(tool, opts, sizes)}, endpoint {endpoint}")


def cmd_add_dataset(args: Namespace, cfg: config.Config) -> int:
    import dataset_manager as dm
    repo = repo_choice(args)
    listing = dm.list_files(repo.repo_id, repo.repo_type, repo.revision, endpoint_for(cfg),
                            token_for(cfg))
    entry = dm.register(cfg.metadata_dir, listing, args.description)
    out(f"registered {repo.repo_type} {repo.repo_id} @ {listing.commit[:12]}: "
        f"{entry['file_count']} files, {format_size(entry['total_size'])}")
    return ExitStatus.OK


def cmd_list_datasets(args: Namespace, cfg: config.Config) -> int:
    import dataset_manager as dm
    render.datasets(list(dm.load_registry(cfg.metadata_dir).values()), args.json)
    return ExitStatus.OK


def cmd_list_tasks(args: Namespace, cfg: config.Config) -> int:
    from live_status import task_table, task_views
    task_table(task_views(TaskStore(cfg.metadata_dir), args.status), args.json)
    return ExitStatus.OK


def cmd_status(args: Namespace, cfg: config.Config) -> int:
    """`status [TASK] [--watch [SECONDS]]`: --watch shows it again every SECONDS until the task
    (or every task) stops running; Ctrl-C ends it too (130, as everywhere)."""
    from live_status import status_frame, watch, watch_args
    every, task = watch_args(args.watch, args.task)
    task_id, store = normalize_id(task) if task else None, TaskStore(cfg.metadata_dir)
    if every is None:
        sys.stdout.write(status_frame(store, task_id, args.json)[0])
        return ExitStatus.OK
    watch(lambda: status_frame(store, task_id, args.json), every, sys.stdout)
    return ExitStatus.OK


def cmd_task_detail(args: Namespace, cfg: config.Config) -> int:
    from file_tracker import FileTracker
    store = TaskStore(cfg.metadata_dir)
    task = store.get(normalize_id(args.task))
    tracker = FileTracker.load(store.folder(task.id), task.id)
    rows = [{"filename": f.path, "expected_size": f.size, "lfs": f.lfs,
             "expected_hash": f.expected_hash, **tracker.status[f.path]} for f in tracker.files
            if args.files == "all" or tracker.status[f.path]["status"] == args.files]
    shown = rows if args.limit == 0 else rows[:args.limit]
    if args.json:
        out_json({"task": render.task_row(task), "counts": tracker.counts, "files": shown})
        return ExitStatus.OK
    render.status(store.live(task), _running_pid(store, task.id), False)
    render.files(rows, shown, tracker.counts)
    return ExitStatus.OK


def cmd_config(args: Namespace, cfg: config.Config) -> int:
    rows: list[dict[str, Any]] = [
        {**r, "typed": cfg.get(r["name"])} if r["name"] != "token" else r for r in cfg.rows()]
    render.settings(rows, args.json)
    return ExitStatus.OK


def cmd_resume(args: Namespace, cfg: config.Config) -> int:
    import downloader
    store = TaskStore(cfg.metadata_dir)
    task = store.get(normalize_id(args.task))
    if task.kind == "batch":          # continue the unfinished batch whose disk is mounted
        import batch_manager as bm
        point = bm.resume_point(store, task.id)
        if point.number is None:
            say(args.quiet, f"{task.id}: all {point.batch_count} batches complete")
            return ExitStatus.OK
        return run_batch(cfg, store, task, point.number, point.target, args, remember=False)

    endpoint = endpoint_for(cfg, task.endpoint)
    run = _run_settings(args, cfg, task)
    opts = run.opts

    def announce(commit: str, sizes: list[int]) -> None:
        say(args.quiet, f"resuming {task.id}: {task.repo_type} {task.repo_id} @ "
                        f"{commit[:12]} -> {task.local_dir}")
        say(args.quiet, tool_line(downloader.choose_tool(opts.tool), opts, endpoint, sizes))

    outcome = downloader.resume_task(
        store, task.id, endpoint=endpoint,
        token=token_for(cfg), opts=opts,
        reserve=run.reserve, log=log, stream=sys.stderr, quiet=args.quiet,
        on_start=announce)
    return report_result(outcome.task, outcome.result, args.json)


def cmd_cancel(args: Namespace, cfg: config.Config) -> int:
    outcome = cancel(
        TaskStore(cfg.metadata_dir), args.task, args.wait,
        on_asked=lambda tid, pid: out(f"asked {tid} (PID {pid or 'unknown'}) to stop..."))
    tid = outcome.task_id
    out(f"{tid} cancelled; its bytes are kept ('python main.py resume {tid}' continues it)")
    return ExitStatus.OK


def cmd_verify(args: Namespace, cfg) -> int:
    import maintenance
    from task_manager import TaskStore, normalize_id
    if args.plan or not args.task:
        return _verify_plan(args, cfg)
    store = TaskStore(cfg.metadata_dir)
    task = store.get(normalize_id(args.task))
    local_dir = Path(os.path.abspath(args.local_dir)) if args.local_dir else None
    paths = None
    if task.kind == "batch" or args.batch:
        import batch_manager as bm
        paths, local_dir = bm.batch_on_disk(store, task, args.batch, local_dir)
    report = maintenance.verify_task(store, task, local_dir or Path(task.local_dir),
                                     paths=paths, quick=args.quick, fix=args.fix)
    results, bad = report.results, report.bad
    if args.json:
        out_json({"task": task.id, "ok": not bad, "checked": len(results),
                  "files": [{"path": r.path, "verdict": r.verdict, "detail": r.detail}
                            for r in results],
                  "moved": [{"path": p, "to": a} for p, a in report.moved]})
    else:
        for r in results:
            if r.verdict != "ok" or args.verbose:
                out(f"{r.verdict.upper():14} {printable(r.path)}"
                    + (f"  ({r.detail})" if r.detail else ""))
        kind = "sizes" if args.quick else "sizes and hashes"
        out(f"{task.id}: {len(results) - len(bad)}/{len(results)} files OK ({kind} checked)")
        for path, aside in report.moved:
            out(f"moved {printable(path)} aside to {printable(aside)}")
        changed = [r for r in bad if r.verdict != "missing"]
        if changed and not args.fix:
            out(f"{len(changed)} changed files were left as they are; 'python main.py verify "
                f"{task.id} --fix' moves them aside (NAME.hfdl-modified-TIME), else resume "
                f"replaces them")
        if bad:
            again = (f"batch-continue {task.id} {args.batch} --local-dir {local_dir}"
                     if paths is not None else f"resume {task.id}")
            out(f"{len(bad)} bad files were marked for download; "
                f"'python main.py {again}' fetches them again")
    return ExitStatus.FILES_FAILED if bad else ExitStatus.OK


def _verify_plan(args: Namespace, cfg: config.Config) -> int:
    """verify --plan FILE: every file of a plan in one folder, from the plan alone."""
    import batch_manager as bm
    if not args.plan or args.task or args.batch or args.fix:
        raise UsageError("verify takes a task id, or --plan FILE (with --local-dir) instead",
                         hint="--plan checks a plan's files without task records: no task id, "
                              "--batch or --fix with it")
    plan = bm.read_plan_file(args.plan)
    local_dir = target_dir(args.local_dir, cfg.downloads_dir, plan.repo_id)
    if not local_dir.is_dir():
        raise HFDError(f"{local_dir} is not a folder",
                       hint="give the folder the plan's batches went to with --local-dir")
    checked = bm.verify_plan(plan, local_dir, quick=args.quick)
    render.plan_verify(args.plan, plan, local_dir, checked, args.quick, args.json, args.verbose)
    return ExitStatus.FILES_FAILED if any(r.verdict != "ok" for _, r in checked) else ExitStatus.OK


def cmd_clean(args: Namespace, cfg) -> int:
    from maintenance import clean_tasks
    from task_manager import TaskStore, normalize_id
    store = TaskStore(cfg.metadata_dir)
    wanted = {normalize_id(t) for t in args.tasks}
    if args.plans:
        return _clean_plans(store, wanted)
    removed, running = clean_tasks(store, wanted, include_ended=args.all,
                                   delete_files=args.delete_files)
    for c in removed:
        note = f", {c.files_deleted} files deleted" if c.files_deleted is not None else ""
        if c.kept:
            note += f", kept {len(c.kept)} files changed since download"
        out(f"removed {c.task_id} ({c.status}, {c.repo_id}){note}" + (f", {c.note}" if c.note else ""))
        for path in c.kept:
            out(f"  kept {printable(path)}")
    for tid in running:
        out(f"skipped {tid}: it is running")
    for tid in sorted(wanted - set(store.all()) - {c.task_id for c in removed}):
        out(f"no task {tid} in {store.root}")
    if not removed:
        which = "completed" if not args.all else "completed, cancelled or failed"
        out(f"nothing to clean (no {which} tasks" + (" among those named)" if wanted else ")"))
    elif not args.delete_files:
        out("downloaded files were kept (--delete-files removes them)")
    return ExitStatus.OK


def _clean_plans(store: TaskStore, wanted: set[str]) -> int:
    """clean --plans: the batch plans that were made and never started."""
    import batch_manager as bm
    plans = [t for t in bm.unstarted_plans(store) if not wanted or t.id in wanted]
    removed = bm.remove_unstarted(store, plans)
    for t in plans:
        if t.id in removed:
            out(f"removed {t.id} (unstarted plan of {t.repo_type} {t.repo_id}, "
                + (f"{format_size(t.available_space)} disks)" if t.available_space
                   else f"{t.extra.get('workers')} workers)"))
        else:
            out(f"skipped {t.id}: it started meanwhile")
    for tid in sorted(wanted - {t.id for t in plans}):
        out(f"kept {tid}: not an unstarted plan" if tid in store.all()
            else f"no task {tid} in {store.root}")
    if not removed:
        out("nothing to clean (no unstarted plans" + (" among those named)" if wanted else ")"))
    return ExitStatus.OK


def cmd_fix_progress(args: Namespace, cfg) -> int:
    import maintenance
    from task_manager import TaskStore, normalize_id
    store = TaskStore(cfg.metadata_dir)
    if not store.index_ok():
        notes: list[str] = []
        ids = store.rebuild_index(maintenance.recover_record(
            store, lambda repo_id: target_dir(None, cfg.downloads_dir, repo_id)), notes)
        out(f"rebuilt {store.index} from {len(ids)} task folders")
        for note in notes:
            if ": dropped: " in note:
                print(f"warning: {note}", file=sys.stderr)
            else:
                out(note)
    import dataset_manager as dm
    if not dm.registry_ok(cfg.metadata_dir):
        count = dm.rebuild_registry(cfg.metadata_dir, store.all().values())
        out(f"rebuilt {dm.registry_path(cfg.metadata_dir)} with {count} repos from the tasks")
    unfixable: list[MetadataError] = []
    for tid in [normalize_id(t) for t in args.tasks] or sorted(store.all()):
        try:
            fix = maintenance.fix_task(store, store.get(tid))
        except MetadataError as exc:        # file_list.json: what the Hub listed, not rebuildable
            unfixable.append(exc)
            print(f"error: {tid}: {exc}", file=sys.stderr)
            continue
        if fix.rebuilt:
            out(f"{tid}: file_status.json was unreadable; rebuilt from the disk")
        changed = ", ".join(f"{v} {k.replace('now_', 'now ')}" for k, v in fix.changes.items() if v)
        out(f"{tid}: {changed or 'no change'} ({fix.summary['files_done']}/"
            f"{fix.summary['files_total']} files complete, status {fix.status.value})")
    if unfixable:
        print(f"hint: {unfixable[0].hint}", file=sys.stderr)
        return ExitStatus.ERROR
    return ExitStatus.OK


def cmd_check_system(args: Namespace, cfg: config.Config) -> int:
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


# ---------------------------------------------------------------- batches (shared with resume)

def run_batch(cfg: config.Config, store: TaskStore, task: Task, number: int, local_dir: str | None,
               args: Namespace, remember: bool = True) -> int:
    """Batch N of a task onto the disk at `local_dir` (default: the task's); `args` carries
    the flags of `_tool_args` and --json/--quiet; with `remember` the task keeps those given."""
    import batch_manager as bm
    endpoint = endpoint_for(cfg, task.endpoint)
    settings = _run_settings(args, cfg, task)
    target = Path(os.path.abspath(local_dir)) if local_dir else None
    count = "?" if task.batch_count is None else task.batch_count
    say(args.quiet, f"{task.id}: batch {number} of {count} -> {target or task.local_dir}")
    run = bm.run_batch(store, task, number, target=target, endpoint=endpoint, token=token_for(cfg),
                       opts=settings.opts, reserve=settings.reserve, log=log,
                       stream=sys.stderr, quiet=args.quiet, force=getattr(args, "force", False),
                       remember=(args.command, _tool_flags(args)) if remember else None)
    render.batch_run(task.id, number, run, args.json)
    if run.result.status is TaskState.COMPLETED:
        if run.next_step:
            say(args.quiet, f"next: {run.next_step}")
        else:
            say(args.quiet, f"{task.id}: all {run.batch_count} batches complete")
    return report_exit(task.id, run.result)


HANDLERS: dict[str, Callable[[Namespace, config.Config], int]] = {
    "download": cmd_download, "add-dataset": cmd_add_dataset, "list-datasets": cmd_list_datasets,
    "list-tasks": cmd_list_tasks, "status": cmd_status, "task-detail": cmd_task_detail,
    "config": cmd_config, "resume": cmd_resume, "cancel": cmd_cancel, "verify": cmd_verify,
    "clean": cmd_clean, "fix-progress": cmd_fix_progress, "check-system": cmd_check_system,
    }
