"""The handlers of the batch commands (analyze-dataset, plan-batch, batch-download,
batch-continue, batch-status): their flags to batch_manager, the result to render.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import config
import render
from commands import (RepoChoice, cache_root, repo_choice, snapshot_folder, endpoint_for,
                      report_refused, run_batch, target_dir, token_for)
from render import out, out_json, say
from task_manager import TaskStore, normalize_id
from utils import ExitStatus, UsageError

if TYPE_CHECKING:
    from argparse import Namespace

    from batch_manager import PlanChoice


def _batch_listing(cfg: config.Config, repo: RepoChoice) -> tuple[Any, str]:
    """List a repo for the batch and analysis commands (with the filters), and its endpoint."""
    import dataset_manager as dm
    endpoint = endpoint_for(cfg)
    listing = dm.list_files(repo.repo_id, repo.repo_type, repo.revision, endpoint,
                            token_for(cfg), repo.include, repo.exclude)
    report_refused(listing)
    if not listing.files:
        raise UsageError(f"no file of {repo.repo_id} matches the --include/--exclude filters"
                         if repo.include or repo.exclude else f"{repo.repo_id} has no files")
    return listing, endpoint


def cmd_analyze_dataset(args: Namespace, cfg: config.Config) -> int:
    import batch_planner as bp
    listing, _ = _batch_listing(cfg, repo_choice(args, cfg))
    analysis = bp.analyze_files(listing.files, available_space=args.available_space,
                                safety_margin=args.safety_margin)
    analysis.update({"repo_id": listing.repo_id, "repo_type": listing.repo_type,
                     "commit": listing.commit})
    if args.json:
        out_json(analysis)
    else:
        out(f"{listing.repo_type} {listing.repo_id} @ {listing.commit[:12]}")
        out(bp.format_analysis(analysis))
    return ExitStatus.OK


def _plan_or_reuse(args: Namespace, cfg: config.Config) -> tuple[TaskStore, PlanChoice]:
    """The flags of plan-batch and batch-download, to batch_manager.plan_or_reuse."""
    import batch_manager as bm
    import dataset_manager as dm
    repo = repo_choice(args, cfg)
    dm.load_registry(cfg.metadata_dir)         # a corrupt datasets.json fails before any plan
    store = TaskStore(cfg.metadata_dir)
    identity = bm.batch_identity(repo.repo_id, repo.repo_type, repo.revision, repo.include,
                                 repo.exclude, args.available_space, args.safety_margin,
                                 getattr(args, "workers", None))
    cache = cache_root(args, cfg)        # each disk holds a hub cache: the plan's snapshot
    folder: Any = (target_dir(args.local_dir, cfg.downloads_dir, repo.repo_id) if cache is None
                   else lambda commit: snapshot_folder(cache, repo.repo_id, repo.repo_type, commit))
    choice = bm.plan_or_reuse(store, identity, lambda: _batch_listing(cfg, repo), folder,
                              cfg.metadata_dir)
    if cache is not None and choice.reused:       # this disk's cache, for batch-download
        args.local_dir = str(folder(choice.task.commit))
    if choice.reused:
        say(args.quiet, f"reusing the plan of {choice.task.id} "
                        f"(pinned at {str(choice.task.commit)[:12]})")
    for tid in choice.replaced:
        say(args.quiet, f"{choice.task.id} replaces the unstarted plan {tid}")
    return store, choice


def cmd_plan_batch(args: Namespace, cfg: config.Config) -> int:
    import batch_manager as bm
    import batch_planner as bp
    if args.available_space is None and args.workers is None:
        raise UsageError("plan-batch needs --available-space SIZE (one disk at a time), "
                         "--workers N (N machines at once), or both")
    store, choice = _plan_or_reuse(args, cfg)
    task, plan = choice.task, choice.plan
    batches = plan.batches
    if args.output:
        bm.write_plan_file(args.output, plan)
    if args.json:
        out_json({"task": task.id, "commit": plan.commit, "plan_id": plan.plan_id,
                  **bp.plan_summary(batches, plan.capacity)})
        return ExitStatus.OK
    out(bp.format_plan(batches, plan.capacity))
    out(f"plan saved as {task.id} ({plan.repo_type} {plan.repo_id} pinned at commit "
        f"{plan.commit[:12]})" + (f"; also written to {args.output}" if args.output else ""))
    left = bm.unfinished_of(store, task.id, plan) if choice.reused else [1]
    if plan.workers:
        out(render.workers_next(plan, args.output))
    elif not left:
        out(f"{task.id}: all {len(batches)} batches complete")
    elif left[0] == 1 and plan.target_of(1) is None:
        out(f"next: python main.py batch-download {plan.repo_id}"
            + (" --dataset" if plan.repo_type == "dataset" else "")
            + f" --available-space {args.available_space}   (or batch-continue {task.id} 1)")
    else:
        out(f"next: {bm.next_step(task.id, plan, left, 0)}")
    return ExitStatus.OK


def cmd_batch_download(args: Namespace, cfg: config.Config) -> int:
    store, choice = _plan_or_reuse(args, cfg)
    return run_batch(cfg, store, choice.task, 1, args.local_dir, args)


def cmd_batch_continue(args: Namespace, cfg: config.Config) -> int:
    import batch_manager as bm
    store = TaskStore(cfg.metadata_dir)
    # only the flag: the task remembers its target, HFDL_HF_CACHE does not move it
    cache = cache_root(args, cfg) if cfg.source("hf_cache") == "flag" else None
    if args.task.endswith(".json") or os.path.isfile(args.task):
        plan = bm.read_plan_file(args.task)
        local_dir = (target_dir(args.local_dir, cfg.downloads_dir, plan.repo_id) if cache is None
                     else snapshot_folder(cache, plan.repo_id, plan.repo_type, plan.commit))
        endpoint = plan.endpoint if plan.endpoint and not cfg.endpoint_configured else cfg.endpoint
        task = bm.task_for_plan_file(store, plan, local_dir, endpoint)
    else:
        task = store.get(normalize_id(args.task))
    target = args.local_dir
    if cache is not None:        # the disk's hub cache, mounted here now
        target = str(snapshot_folder(cache, task.repo_id, task.repo_type, str(task.commit)))
    return run_batch(cfg, store, task, args.batch, target, args)


def cmd_batch_status(args: Namespace, cfg: config.Config) -> int:
    import batch_manager as bm
    store = TaskStore(cfg.metadata_dir)
    task = store.get(normalize_id(args.task))
    rows = bm.batch_rows(store, task)
    if args.json:
        out_json({"task": task.id, "status": store.live(task).status.value, "batches": rows})
    else:
        out(bm.format_batch_rows(task, rows))
    return ExitStatus.OK


HANDLERS: dict[str, Callable[[Namespace, config.Config], int]] = {
    "analyze-dataset": cmd_analyze_dataset, "plan-batch": cmd_plan_batch,
    "batch-download": cmd_batch_download, "batch-continue": cmd_batch_continue,
    "batch-status": cmd_batch_status,
}
