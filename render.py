"""What the commands print: text tables for people, JSON documents for scripts (--json).

Results go to stdout, diagnostics to stderr. These functions take plain values and decide
nothing; main.py chooses what to show and the exit status.
"""
from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from utils import format_duration, format_size, printable

if TYPE_CHECKING:
    from batch_manager import BatchRun
    from fetcher import RunResult
    from task_manager import Task


def out(text: str = "") -> None:
    print(text, flush=True)


def out_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str), flush=True)


def say(quiet: bool, text: str) -> None:
    """Diagnostics go to stderr, so stdout stays clean for --json."""
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def file_listing(listing: Any, on_disk: dict[str, str], local_dir: Any, as_json: bool) -> None:
    """`download --dry-run`: the files (sorted), which are already on disk (`on_disk`: path ->
    "hash" or "size", what was checked), what is left to fetch, and the target folder."""
    files = sorted(listing.files, key=lambda f: f.path)
    todo = [f for f in files if f.path not in on_disk]
    todo_bytes = sum(f.size for f in todo)
    if as_json:
        out_json({"repo_id": listing.repo_id, "repo_type": listing.repo_type,
                  "commit": listing.commit, "local_dir": str(local_dir),
                  "total_size": listing.total_size, "file_count": len(files),
                  "to_download_count": len(todo), "to_download_bytes": todo_bytes,
                  "files": [{"path": f.path, "size": f.size, "lfs": f.lfs,
                             "on_disk": f.path in on_disk, "checked": on_disk.get(f.path)}
                            for f in files]})
        return
    for f in files:
        mark = f"on disk ({on_disk[f.path]} checked)" if f.path in on_disk else ""
        out(f"{mark:24}{format_size(f.size):>12}  {f.path}")
    out(f"{len(files)} files, {format_size(listing.total_size)} "
        f"({listing.total_size} bytes) at commit {listing.commit}")
    out(f"{len(todo)} files ({format_size(todo_bytes)}, {todo_bytes} bytes) to download "
        f"out of {len(files)}, into {local_dir}")


def task_row(t: Task) -> dict[str, Any]:
    record = t.to_json()             # a key the record lacks shows as null, as it always did
    return {k: record.get(k) for k in ("id", "status", "reason", "repo_type", "repo_id",
                                       "revision", "commit", "local_dir", "files_done",
                                       "files_failed", "files_total", "bytes_done",
                                       "bytes_total", "tool", "created_at", "updated_at")}


def live_fields(t: Task, live: dict[str, Any] | None) -> dict[str, Any]:
    """The live keys of status/list-tasks --json: from the running process's status file when
    the task runs, else the recorded counters (bytes of finished files, no speed)."""
    if not live:
        return {"live": False, "bytes_on_disk": t.bytes_done, "speed_bps": None,
                "eta_seconds": None, "last_byte_at": None, "in_flight": []}
    return {"live": True, **{k: live.get(k) for k in (
        "bytes_on_disk", "speed_bps", "eta_seconds", "last_byte_at", "in_flight", "updated_at")}}


def _done_bytes(t: Task, live: dict[str, Any] | None) -> int:
    return int(live.get("bytes_on_disk") or 0) if live else t.bytes_done


def _pct(t: Task, live: dict[str, Any] | None = None) -> str:
    total = t.bytes_total
    return f"{100.0 * _done_bytes(t, live) / total:5.1f}%" if total else "  -  "


def _speed(live: dict[str, Any]) -> str:
    return (f"{format_size(live.get('speed_bps') or 0)}/s, "
            f"ETA {format_duration(live.get('eta_seconds'))}")


def status_line(t: Task, live: dict[str, Any] | None) -> str:
    """One line per interval of `status --watch` off a terminal (cron, a pipe, a log)."""
    line = (f"{t.id} {t.status.value}: {format_size(_done_bytes(t, live))} / "
            f"{format_size(t.bytes_total)} ({_pct(t, live).strip()})")
    if live:
        line += (f", {live.get('files_done', t.files_done)}/{t.files_total} files, "
                 f"{_speed(live)}, {len(live.get('in_flight') or [])} in flight, "
                 f"last byte {live.get('last_byte_at') or 'none yet'}")
    else:
        line += f", {t.files_done}/{t.files_total} files" + (f" ({t.reason})" if t.reason else "")
    return line


def _filters(t: Task) -> str:
    parts = [f"include {' '.join(t.include)}"] if t.include else []
    return ", ".join(parts + ([f"exclude {' '.join(t.exclude)}"] if t.exclude else []))


def task_list(tasks: list[Task], as_json: bool,
              running: dict[str, int | None] | None = None,
              lives: dict[str, dict[str, Any] | None] | None = None) -> None:
    """Tasks, each with a second line telling tasks of one repo apart: folder, revision, filters;
    a running task shows its live bytes (partials included), speed and ETA."""
    running, lives = running or {}, lives or {}
    if as_json:
        out_json([{**task_row(t), "running_pid": running.get(t.id),
                   **live_fields(t, lives.get(t.id))} for t in tasks])
        return
    if not tasks:
        out("no tasks")
        return
    out(f"{'TASK':9} {'STATUS':10} {'DONE':>6} {'FILES':>11} {'SIZE':>11}  REPO")
    for t in tasks:
        live = lives.get(t.id)
        out(f"{t.id:9} {t.status.value:10} {_pct(t, live):>6} "
            f"{live.get('files_done', t.files_done) if live else t.files_done:>5}/"
            f"{t.files_total:<5} "
            f"{format_size(t.bytes_total):>11}  {t.repo_id}"
            + (" (dataset)" if t.repo_type == "dataset" else "")
            + (f" @ {t.revision}" if t.revision and t.revision != "main" else ""))
        details = [f"-> {t.local_dir}"] + ([_filters(t)] if t.include or t.exclude else [])
        if running.get(t.id):
            details.append(f"PID {running[t.id]}")
        if live:
            details.append(f"{format_size(_done_bytes(t, live))} on disk, {_speed(live)}")
        out(" " * 10 + "  ".join(details))


def status(task: Task, running_pid: int | None, as_json: bool,
           live: dict[str, Any] | None = None) -> None:
    """One task (as TaskStore.live sees it) and the process running it, if any; `live`: the
    running process's status file (bytes with partials, speed, ETA, files in flight)."""
    row = {**task_row(task), "running_pid": running_pid, **live_fields(task, live)}
    if as_json:
        out_json(row)
        return
    out(f"{task.id}: {task.status.value}" + (f" ({task.reason})" if task.reason else ""))
    out(f"  repo:   {task.repo_type} {task.repo_id} @ {task.revision} "
        f"({str(task.commit)[:12]})")
    out(f"  folder: {task.local_dir}")
    done = live.get("files_done", task.files_done) if live else task.files_done
    out(f"  files:  {done}/{task.files_total} done, {task.files_failed} failed")
    out(f"  bytes:  {format_size(_done_bytes(task, live))} / "
        f"{format_size(task.bytes_total)} ({_pct(task, live).strip()})"
        + (" on disk, partial files included" if live else ""))
    if live:
        out(f"  speed:  {format_size(live.get('speed_bps') or 0)}/s over the last minute, "
            f"ETA {format_duration(live.get('eta_seconds'))}; last byte at "
            f"{live.get('last_byte_at') or 'none yet'}")
        flying = live.get("in_flight") or []
        out(f"  in flight: {len(flying)} files")
        for f in flying[:10]:
            out(f"    {format_size(f.get('bytes') or 0):>11} / {format_size(f.get('size') or 0):<11}"
                f" {f.get('path')}")
    if running_pid:
        out(f"  running in PID {running_pid}")


def files(rows: list[dict], shown: list[dict], counts: dict[str, int]) -> None:
    out("  counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    out("")
    out(f"{'STATUS':12} {'SIZE':>11} {'TRIES':>5}  FILE")
    for r in shown:
        out(f"{r['status']:12} {format_size(r['expected_size']):>11} {r.get('attempts', 0):>5}  "
            f"{r['filename']}" + (f"  [{r['error']}]" if r.get("error") else ""))
    if len(rows) > len(shown):
        out(f"... {len(rows) - len(shown)} more (--limit 0 shows all)")


def batch_run(task_id: str, number: int, run: BatchRun, as_json: bool) -> None:
    # run.warnings were logged (shown once, as `warning:` lines) when the batch started
    p = run.progress
    if as_json:
        out_json({"task": task_id, "batch": number, "status": run.result.status.value,
                  "reason": run.result.reason, "target": run.target, **p})
        return
    reason = ("already complete; nothing to fetch" if run.result.already_complete
              and run.result.status.value == "completed" else run.result.reason)
    out(f"{task_id} batch {number}/{run.batch_count}: {run.result.status.value}"
        + (f" ({reason})" if reason else "")
        + f": {p['files_done']}/{p['files_total']} files, {format_size(p['bytes_done'])} of "
          f"{format_size(p['bytes_total'])} in {run.target}")
    for path, error in run.result.failures[:20]:
        out(f"  failed: {path}: {error}")


def workers_next(plan: Any, output: str | None) -> str:
    """plan-batch --workers: how to run the batches at once."""
    count = len(plan.batches)
    rounds = (f" ({-(-count // plan.workers)} rounds of {plan.workers})" if count > plan.workers
              else "")
    if not output:
        return (f"next: write the plan to a file (--output plan.json) and run batches 1 to "
                f"{count}{rounds} at once, each: python main.py --metadata-dir ITS_OWN "
                f"batch-continue plan.json N --local-dir SHARED")
    return (f"next: run batches 1 to {count}{rounds} at once, each with its own --metadata-dir: "
            f"contrib/run-batch.sh {output} N SHARED_DIR, or sbatch --array=1-{count}"
            + (f"%{plan.workers}" if rounds else "")
            + f" contrib/slurm/download-array.sbatch {output} SHARED_DIR; then python main.py "
              f"verify --plan {output} --local-dir SHARED_DIR/data")


def plan_verify(source: str, plan: Any, local_dir: Any, checked: list[tuple[int, Any]],
                quick: bool, as_json: bool, verbose: bool) -> None:
    """verify --plan: the bad files with their batch, a total, the batches to run again."""
    bad = [(n, r) for n, r in checked if r.verdict != "ok"]
    again = sorted({n for n, _ in bad})
    if as_json:
        out_json({"plan": source, "plan_id": plan.plan_id, "commit": plan.commit,
                  "local_dir": str(local_dir), "ok": not bad, "checked": len(checked),
                  "bad_batches": again,
                  "bad": [{"path": r.path, "batch": n, "verdict": r.verdict, "detail": r.detail}
                          for n, r in bad]})
        return
    for n, r in checked:
        if r.verdict != "ok" or verbose:
            out(f"{r.verdict.upper():14} {printable(r.path)}  (batch {n})"
                + (f"  ({r.detail})" if r.detail else ""))
    kind = "sizes" if quick else "sizes and hashes"
    out(f"{plan.repo_id} @ {plan.commit[:12]}: {len(checked) - len(bad)}/{len(checked)} files "
        f"OK in {local_dir} ({kind} checked)")
    if again:
        out(f"batches to run again: {', '.join(map(str, again))} (each: python main.py "
            f"batch-continue {source} N --local-dir {local_dir}, with that batch's "
            f"--metadata-dir)")
    if any(r.verdict == "hash mismatch" for _, r in bad):
        out("delete the files with a wrong hash first: a rerun keeps a finished file of the "
            "right size")


def run_result(task: Task, result: RunResult, as_json: bool) -> None:
    """The outcome of a download or resume run (fetcher.RunResult) of `task`."""
    done_before = result.already_complete and result.status.value == "completed"
    if as_json:
        out_json({"task": task.id, "repo_id": task.repo_id, "repo_type": task.repo_type,
                  "revision": task.revision, "commit": task.commit, "local_dir": task.local_dir,
                  "status": result.status.value, "reason": result.reason,
                  "files_total": result.files_total, "files_done": result.files_done,
                  "files_failed": result.files_failed, "bytes_done": result.bytes_done,
                  "bytes_fetched": result.bytes_fetched, "elapsed": round(result.elapsed, 3),
                  "failures": [{"path": p, "error": e} for p, e in result.failures],
                  "already_complete": done_before})
        return
    reason = "already complete; nothing to fetch" if done_before else result.reason
    out(f"{task.id}: {result.status.value}" + (f" ({reason})" if reason else "") +
        f": {result.files_done}/{result.files_total} files, {format_size(result.bytes_done)}"
        f" on disk, {format_size(result.bytes_fetched)} fetched in {result.elapsed:.1f} s")
    for path, error in result.failures[:20]:
        out(f"  failed: {path}: {error}")


def quiet_result(task_id: str, result: RunResult, local_dir: Any) -> None:
    """`download -q`: the folder on stdout when it completed, else only the outcome on stderr."""
    if result.status.value == "completed":
        out(str(local_dir))
        return
    print(f"{task_id}: {result.status.value}" + (f" ({result.reason})" if result.reason else "")
          + f": {result.files_done}/{result.files_total} files", file=sys.stderr, flush=True)
    for path, error in result.failures[:20]:
        print(f"  failed: {path}: {error}", file=sys.stderr, flush=True)


def datasets(entries: list[dict], as_json: bool) -> None:
    """`list-datasets`: the registered repos."""
    if as_json:
        out_json(entries)
        return
    if not entries:
        out("no repos registered yet ('add-dataset REPO' or 'download REPO' adds one)")
        return
    out(f"{'TYPE':8} {'REPO':45} {'FILES':>7} {'SIZE':>12}  COMMIT        DESCRIPTION")
    for d in entries:
        out(f"{d['repo_type']:8} {d['repo_id']:45} {d.get('file_count', 0):>7} "
            f"{format_size(d.get('total_size', 0)):>12}  {str(d.get('commit', ''))[:12]:13} "
            f"{d.get('description', '')}")


def _json_value(value: Any) -> Any:
    """A setting as scripts want it: numbers, booleans and lists as such, the rest as text."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return str(value)


def settings(rows: list[dict[str, Any]], as_json: bool) -> None:
    """`config`: each setting, its value and where it came from (`typed`: the value itself)."""
    if as_json:
        out_json({r["name"]: {"value": _json_value(r.get("typed", r["value"])),
                              "source": r["source"]} for r in rows})
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        value = r["value"]
        if r["name"] == "disk_reserve":
            value = f"{format_size(int(value))} ({value} bytes)"
        elif r["name"] == "disk_warn_percent":
            value = f"{value}%"
        source = f"[{r['source']}]" if r["source"] else ""
        out(f"{r['name']:{width}}  {value}  {source}")


_PRUNE_HINT = "the same download with --prune deletes {}, now or on any later run"


def sync_report(quiet: bool, commit: str, outcome: Any) -> None:
    """The new commit, if any, and what became of the files removed upstream: deleted by
    --prune, kept (a file changed since, or no --prune yet), or never downloaded."""
    sync, pruned, kept, prunable = outcome.sync, outcome.pruned, outcome.kept, outcome.prunable
    removed = sync.removed if sync else []
    if sync is not None:
        say(quiet, f"new commit {commit[:12]}: {len(sync.added)} new, {len(sync.changed)} "
                   f"changed, {len(removed)} removed upstream, {sync.unchanged} unchanged")
    for path in removed:
        what = ("deleted" if path in pruned else f"kept: {kept[path]}" if path in kept else
                "kept; " + _PRUNE_HINT.format("it") if path in prunable else
                "not downloaded; nothing to delete")
        say(quiet, f"  removed upstream: {path} ({what})")
    for path in pruned:
        if path not in removed:
            say(quiet, f"  pruned: {path} (removed upstream at an earlier commit)")
    for path, why in kept.items():
        if path not in removed:
            say(quiet, f"  kept: {path} ({why})")
    left = [p for p in prunable if p not in removed]
    if left:
        say(quiet, f"note: {len(left)} files removed upstream are still in the folder "
                   f"(e.g. {left[0]}); " + _PRUNE_HINT.format("them"))
