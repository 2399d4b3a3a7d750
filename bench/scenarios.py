"""The benchmark's scenarios: the repos they serve, the clients they run and the targets they check.

Transfer scenarios (one-big, eight-medium, many-small, uncapped) alternate a tool run and a peer
(`hf download`) run; huge-listing and startup time the tool's own bookkeeping.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import statistics
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import (
    Measured,
    base_env,
    check_tree,
    hf_executable,
    run_measured,
    tail,
    tool_argv,
)
from tests.fakehub import Content, FakeHub, FileData

MB = 10**6
MiB = 1 << 20
BACKENDS = ("aria2c", "wget", "python")
PEER = "hf download"
DEFAULT = "default (no flags)"
RUN_TIMEOUT = 1800.0


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class Client:
    """What runs: the tool with its defaults (tool "": no --tool, -x, -j), the tool with a
    backend and -x/-j forced, the peer, or the curl limit."""

    kind: str                  # tool | peer | curl | step
    tool: str = ""             # "" (kind tool): the default configuration; x, j: what it picks
    x: int = 1
    j: int = 1
    label: str = ""

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind == "tool" and not self.tool:
            return DEFAULT
        if self.kind == "tool":
            return f"{self.tool} -x{self.x} -j{self.j}"
        if self.kind == "curl":
            return f"curl x{self.j} (limit)"
        return PEER


@dataclass
class Row:
    scenario: str
    client: Client
    runs: list[dict[str, Any]] = field(default_factory=list)
    nbytes: int = 0
    limit: float | None = None        # MB/s
    limit_how: str = ""
    peer_wall: float | None = None
    targets: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    @property
    def wall(self) -> float:
        return statistics.median(r["wall"] for r in self.runs)

    @property
    def mbps(self) -> float | None:
        return self.nbytes / self.wall / MB if self.nbytes else None

    @property
    def peak_mb(self) -> float:
        return max(r["peak_rss"] for r in self.runs) / MB

    @property
    def peak_pss_mb(self) -> float:
        return max(r["peak_pss"] for r in self.runs) / MB

    @property
    def ratio(self) -> float | None:
        """How many times faster than the peer (peer wall / this wall)."""
        return self.peer_wall / self.wall if self.peer_wall and self.client.kind != "peer" else None

    @property
    def pct_limit(self) -> float | None:
        return 100 * self.mbps / self.limit if self.limit and self.mbps else None

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.runs)

    def target(self, what: str, value: float | None, need: float, unit: str, at_most: bool = False) -> None:
        passed = value is not None and (value <= need if at_most else value >= need)
        self.targets.append({"scenario": self.scenario, "client": self.client.name, "target": what,
                             "value": None if value is None else round(value, 3), "unit": unit,
                             "pass": passed})

    def to_json(self) -> dict[str, Any]:
        def r(v: float | None, n: int = 3) -> float | None:
            return None if v is None else round(v, n)
        return {"scenario": self.scenario, "client": self.client.name, "kind": self.client.kind,
                "wall_s": r(self.wall), "mb_per_s": r(self.mbps, 1), "peak_mb": r(self.peak_mb, 1),
                "peak_pss_mb": r(self.peak_pss_mb, 1),
                "x_faster_than_peer": r(self.ratio, 2), "peer_wall_s": r(self.peer_wall),
                "limit_mb_per_s": r(self.limit, 1), "limit_how": self.limit_how,
                "pct_of_limit": r(self.pct_limit, 1), "bytes": self.nbytes, "identical": self.ok,
                "note": self.note, "targets": self.targets, "runs": self.runs}


@dataclass
class Bench:
    """What every scenario needs: the hub, a scratch folder, the scales and the repeat count."""

    hub: FakeHub
    work: Path
    size_scale: float
    count_scale: float
    repeat: int
    say: Callable[[str], None]

    def n(self, count: int) -> int:
        return max(1, round(count * self.count_scale))

    def size(self, nbytes: int) -> int:
        return max(1, round(nbytes * self.size_scale))

    @contextlib.contextmanager
    def run_dir(self) -> Iterator[Path]:
        """A fresh folder per run (downloads, metadata, logs, HF_HOME), deleted afterwards."""
        d = Path(tempfile.mkdtemp(prefix="run-", dir=self.work))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def env(self, d: Path) -> dict[str, str]:
        return base_env(self.hub.url, d / "hf-home")

    def measure(self, argv: list[str], d: Path, on_sample=None, timeout: float = RUN_TIMEOUT) -> Measured:
        self.hub.reset_log()
        return run_measured(argv, env=self.env(d), cwd=d, log=d / "output.log", timeout=timeout,
                            on_sample=on_sample)


def record(m: Measured, problem: str | None = None, **extra: Any) -> dict[str, Any]:
    """A run as JSON; `ok` only when it exited 0 and its files were byte-identical."""
    if m.code != 0 and problem is None:
        problem = f"exit {m.code}: {tail(m.log, 4)}"
    return {"wall": round(m.wall, 4), "peak_rss": m.peak_rss, "peak_pss": m.peak_pss, "cpu_s": round(m.cpu, 2),
            "hub_cpu_s": round(m.server_cpu, 2), "code": m.code, "ok": problem is None,
            "error": problem, **extra}


# ---------------------------------------------------------------- transfer scenarios

@dataclass
class Transfer:
    name: str
    files: dict[str, FileData]
    bandwidth: float | None          # bytes/s per connection; None: uncapped
    latency: float
    clients: list[Client]
    lfs: Callable[[str, int], bool] | None = None


def connections(c: Client, sizes: list[int]) -> int:
    """Connections a client opens at once, as its settings imply."""
    def per_file(size: int) -> int:
        if c.kind == "tool" and not c.tool:             # what auto starts big files with
            return c.x if size >= 16 * MiB else 1
        if c.kind == "tool" and c.tool == "aria2c":      # --split x, <= 16 per server, >= 1 MiB each
            return max(1, min(c.x, 16, -(-size // MiB)))
        if c.kind == "tool" and c.tool == "python" and c.x > 1 and size >= 128 * MiB:
            return c.x                                  # ranged parts from 2 x 64 MiB up
        return 1
    return sum(per_file(s) for s in sorted(sizes, reverse=True)[:c.j])


def run_tool(b: Bench, repo: str, c: Client, expected: dict[str, str]) -> dict[str, Any]:
    with b.run_dir() as d:
        forced = ["--tool", c.tool, "-x", str(c.x), "-j", str(c.j)] if c.tool else []
        argv = tool_argv("download", repo, *forced,
                         "--local-dir", str(d / "out"), "--metadata-dir", str(d / "metadata"),
                         "--logs-dir", str(d / "logs"))
        m = b.measure(argv, d)     # .cache: hf download's metadata, which we write too
        return record(m, None if m.code else check_tree(d / "out", expected, ignore=(".cache",)))


def run_peer(b: Bench, repo: str, expected: dict[str, str]) -> dict[str, Any]:
    with b.run_dir() as d:
        m = b.measure([hf_executable(), "download", repo, "--local-dir", str(d / "out")], d)
        return record(m, None if m.code else check_tree(d / "out", expected, ignore=(".cache",)))


def run_curl(b: Bench, urls: list[tuple[str, str]], parallel: int,
             expected: dict[str, str]) -> dict[str, Any]:
    """`parallel` plain curl processes, each fetching its share of the files in sequence."""
    with b.run_dir() as d:
        script = d / "curl.sh"
        lines = ["set -e"]
        for i in range(parallel):
            config = d / f"curl-{i}.cfg"
            config.write_text("".join(f'url = "{u}"\noutput = "{d / "out" / p}"\n'
                                      for u, p in urls[i::parallel]))
            lines.append(f"curl -s -L --fail --create-dirs -K '{config}' &")
        lines.append("for job in $(jobs -p); do wait $job; done")
        script.write_text("\n".join(lines) + "\n")
        m = b.measure(["bash", str(script)], d)
        return record(m, None if m.code else check_tree(d / "out", expected))


def run_transfer(b: Bench, t: Transfer) -> list[Row]:
    """Tool and peer runs alternate (tool, peer, tool, peer...); the curl limit runs first in
    each round when the link is uncapped."""
    repo = f"bench/{t.name}"
    b.say(f"[{t.name}] building the repo ({len(t.files)} files)")
    b.hub.add_repo(repo, t.files, lfs=t.lfs)
    expected = {p: b.hub.file_info(repo, p).sha256 for p in t.files}
    sizes = [b.hub.file_info(repo, p).size for p in t.files]
    b.hub.bandwidth_per_conn, b.hub.latency = t.bandwidth, t.latency
    peer = Client("peer", j=8)
    curls = ([] if t.bandwidth else
             sorted({Client("curl", j=min(c.j, len(sizes))) for c in [*t.clients, peer]}, key=lambda c: c.j))
    urls = [(f"{b.hub.url}/{repo}/resolve/main/{p}", p) for p in t.files]
    rows = {c: Row(t.name, c, nbytes=sum(sizes)) for c in [*t.clients, *curls, peer]}  # default first
    try:
        for rnd in range(b.repeat):
            for c in curls:
                b.say(f"[{t.name}] round {rnd + 1}: {c.name}")
                rows[c].runs.append(run_curl(b, urls, c.j, expected))
            for c in t.clients:
                b.say(f"[{t.name}] round {rnd + 1}: {c.name}")
                rows[c].runs.append(run_tool(b, repo, c, expected))
                _said(b, t.name, rows[c])
                b.say(f"[{t.name}] round {rnd + 1}: {PEER}")
                rows[peer].runs.append(run_peer(b, repo, expected))
                _said(b, t.name, rows[peer])
    finally:
        b.hub.bandwidth_per_conn, b.hub.latency = None, 0.0
    peer_wall = rows[peer].wall
    for c, row in rows.items():
        row.peer_wall = peer_wall
        if t.bandwidth:
            n = connections(c, sizes)
            row.limit, row.limit_how = n * t.bandwidth / MB, f"{n} conn x {t.bandwidth / MB:g} MB/s"
        elif c.kind != "curl":
            lim = rows[Client("curl", j=min(c.j, len(sizes)))]
            row.limit, row.limit_how = lim.mbps, lim.client.name
    return list(rows.values())


def _said(b: Bench, name: str, row: Row) -> None:
    r = row.runs[-1]
    b.say(f"[{name}]   {r['wall']:.2f} s, peak {r['peak_rss'] / MB:.0f} MB"
          + ("" if r["ok"] else f", FAILED: {r['error']}"))


def tools(x: int, js: tuple[int, ...], backends: tuple[str, ...] = BACKENDS) -> list[Client]:
    return [Client("tool", tool, 1 if tool == "wget" else x, j) for tool in backends for j in js]


def default(x: int, j: int) -> Client:
    """The tool as users run it, no tuning flag; x and j: what it picks for this repo (the
    header line says so), used for the limit only."""
    return Client("tool", "", x, j)


def by_tool(rows: list[Row], tool: str) -> list[Row]:
    return [r for r in rows if r.client.kind == "tool" and r.client.tool == tool]


def default_row(rows: list[Row]) -> Row:
    return by_tool(rows, "")[0]


def one_big(b: Bench) -> list[Row]:
    t = Transfer("one-big", {"model.safetensors": Content(b.size(1 << 30), seed=1)},
                 bandwidth=20 * MB, latency=0.05, clients=[default(16, 8), *tools(16, (1,))])
    rows = run_transfer(b, t)
    row = default_row(rows)
    row.target(">= 13x faster than hf", row.ratio, 13, "x")
    row.target(">= 90% of 16 conn x cap", row.pct_limit, 90, "%")
    return rows


def eight_medium(b: Bench) -> list[Row]:
    files = {f"model-{i + 1:05d}-of-00008.safetensors": Content(b.size(256 * MiB), seed=1 + i)
             for i in range(8)}
    t = Transfer("eight-medium", files, bandwidth=20 * MB, latency=0.05,
                 clients=[default(8, 8), *tools(8, (8,))])
    rows = run_transfer(b, t)
    row = default_row(rows)
    row.target(">= 3x faster than hf", row.ratio, 3, "x")
    return rows


def small_files(count: int, seed: int = 7) -> dict[str, bytes]:
    """`count` files of 1-50 KB in nested folders, cut from one random buffer."""
    rng = random.Random(seed)
    pool = rng.randbytes(8 * MiB)
    files = {}
    for i in range(count):
        size = rng.randint(1000, 50_000)
        at = rng.randrange(len(pool) - size)
        depth = "/".join(f"{c}{rng.randrange(4)}" for c in "abc"[:1 + i % 3])
        ext = (".json", ".txt", ".parquet")[i % 3]
        files[f"{depth}/part-{i:05d}{ext}"] = pool[at:at + size]
    return files


def many_small(b: Bench) -> list[Row]:
    jobs = (16, 32) if b.count_scale == 1 else (16,)     # --quick: no -j sweep
    t = Transfer("many-small", small_files(b.n(3000)), bandwidth=None, latency=0.02,
                 clients=[default(1, 32), *tools(8, jobs)],
                 lfs=lambda path, size: path.endswith(".parquet"))
    rows = run_transfer(b, t)
    row = default_row(rows)
    row.target(">= 2x faster than hf", row.ratio, 2, "x")
    return rows


def uncapped(b: Bench) -> list[Row]:
    files = {f"shard-{i}.safetensors": Content(b.size(512 * MiB), seed=11 + i) for i in range(4)}
    t = Transfer("uncapped", files, bandwidth=None, latency=0.0,
                 clients=[default(16, 8), *tools(1, (4,))])
    rows = run_transfer(b, t)
    row = default_row(rows)
    row.target(">= 1.5x faster than hf", row.ratio, 1.5, "x")
    row.target(">= 80% of the curl limit", row.pct_limit, 80, "%")
    return rows


# ---------------------------------------------------------------- huge-listing

def listing_files(count: int) -> dict[str, bytes]:
    return {f"d{i // 1000:03d}/f{i:06d}.txt": b"%d\n" % i for i in range(count)}


def _warm_listing(b: Bench, repo: str) -> None:
    """The hub builds (and caches) a tree listing on first use; the real Hub has it ready."""
    sha = b.hub.repo(repo).branches["main"]
    with urllib.request.urlopen(f"{b.hub.url}/api/models/{repo}/tree/{sha}?recursive=true") as r:
        r.read()


class StopAtFirstFile:
    """A sampler callback: when the first file request reaches the hub, SIGTERM the tool."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub, self.seen, self.at = hub, 0, None

    def __call__(self, pid: int) -> None:
        if self.at is not None:
            return
        reqs = self.hub.requests
        first = next((r for r in reqs[self.seen:] if r.kind in ("resolve", "resolve-cache", "cdn")), None)
        self.seen = len(reqs)
        if first is not None:
            self.at = first.time
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _step(b: Bench, d: Path, label: str, args: list[str], expect: str) -> Row:
    """One tool command on the big repo; its output must contain `expect`."""
    argv = tool_argv(*args, "--metadata-dir", str(d / "metadata"), "--logs-dir", str(d / "logs"))
    m = b.measure(argv, d)
    problem = None if m.code or expect in m.log.read_text(errors="replace") else f"no {expect!r} in the output"
    return Row("huge-listing", Client("step", label=label), runs=[record(m, problem)])


def huge_listing(b: Bench) -> list[Row]:
    counts = [b.n(10_000), b.n(30_000), b.n(100_000)]
    rows: list[Row] = []
    for n in counts:
        b.hub.add_repo(f"bench/listing-{n}", listing_files(n))
        _warm_listing(b, f"bench/listing-{n}")
    big, files = f"bench/listing-{counts[-1]}", listing_files(counts[-1])
    expected = {p: b.hub.file_info(big, p).sha256 for p in files}
    k = f"{counts[-1] // 1000}k" if counts[-1] >= 1000 else str(counts[-1])
    create_rows = [_create(b, n) for n in counts]
    with b.run_dir() as d:
        rows.append(_step(b, d, f"download --dry-run ({k})", ["download", big, "--dry-run"],
                          f"{len(files)} files"))
        rows[-1].target("dry-run < 15 s", rows[-1].wall, 15, "s", at_most=True)
        rows.extend(create_rows)
        rows[-1].target("task creation < 15 s", rows[-1].wall, 15, "s", at_most=True)
        b.say(f"[huge-listing] writing {len(files)} files to adopt")
        _write_files(d / "out", files)
        adopt = _step(b, d, f"download, files already on disk ({k})",
                      ["download", big, "--local-dir", str(d / "out")], "completed")
        adopt.note = "lists, creates the task, checks every file on disk, fetches nothing"
        fetched = b.hub.count(path_contains="/resolve")
        problem = check_tree(d / "out", expected, ignore=(".cache",)) or \
            (f"{fetched} files fetched" if fetched else None)
        adopt.runs[0].update(ok=adopt.runs[0]["ok"] and problem is None, error=adopt.runs[0]["error"] or problem)
        rows.append(adopt)
        rows.append(_step(b, d, f"status task_001 ({k})", ["status", "task_001"],
                          f"{len(files)}/{len(files)} done"))
        rows[-1].target("status < 1 s", rows[-1].wall, 1, "s", at_most=True)
        rows.append(_step(b, d, f"resume task_001, finished ({k})", ["resume", "task_001"], "completed"))
        rows[-1].target("resume of a finished task < 5 s", rows[-1].wall, 5, "s", at_most=True)
    peak_row = max(rows, key=lambda r: r.peak_mb)
    peak_row.target("peak memory < 150 MB (all huge-listing steps)", peak_row.peak_mb, 150, "MB", at_most=True)
    create_rows[-1].target("creation time linear in N (<= 1.25 x the line through the smaller N)",
                           _linearity(create_rows), 1.25, "x", at_most=True)
    return rows


def _create(b: Bench, n: int) -> Row:
    """Time from spawn to the first file request of a new `download` (then SIGTERM)."""
    b.say(f"[huge-listing] task creation with {n} files")
    stopper = StopAtFirstFile(b.hub)
    with b.run_dir() as d:
        m = b.measure(tool_argv("download", f"bench/listing-{n}", "--local-dir", str(d / "out"),
                                "--metadata-dir", str(d / "metadata"), "--logs-dir", str(d / "logs")),
                      d, stopper)
        at = None if stopper.at is None else round(stopper.at - m.started, 3)
        problem = None
        if at is None or m.code not in (0, 143):          # 143: stopped on purpose
            problem = f"no file request or exit {m.code}: {tail(m.log, 3)}"
        # The row's time is the time to the first file request; the process's own is kept too.
        run = {**record(m), "ok": problem is None, "error": problem, "to_first_request": at,
               "process_wall": round(m.wall, 4), "wall": at if at is not None else m.wall}
    row = Row("huge-listing", Client("step", label=f"create task, {n} files"), runs=[run])
    row.note = "wall = spawn to the first file request (listing + task creation); then SIGTERM"
    return row


def _linearity(rows: list[Row]) -> float | None:
    """The biggest N's time over the straight line through the two smaller ones: about 1 when
    the time grows linearly in N (the fixed start-up cost cancels out), more when it is worse."""
    (n1, t1), (n2, t2), (n3, t3) = [(_n(r), r.runs[0]["to_first_request"]) for r in rows]
    if None in (t1, t2, t3):
        return None
    return t3 / (t1 + (t2 - t1) * (n3 - n1) / (n2 - n1))


def _n(row: Row) -> int:
    return int(row.client.label.split()[2])


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


# ---------------------------------------------------------------- startup

def startup(b: Bench) -> list[Row]:
    rows = []
    times = max(5, b.repeat)
    with b.run_dir() as d:
        _make_tasks(d / "metadata", 50)
        common = ("--metadata-dir", str(d / "metadata"), "--logs-dir", str(d / "logs"))
        cases = [("python main.py --help", tool_argv("--help"), "download"),
                 ("hf --help (peer)", [hf_executable(), "--help"], "download"),
                 ("python main.py list-tasks (50 tasks)", tool_argv("list-tasks", *common),
                  "task_050"),
                 ("python main.py status task_050 (50 tasks)",
                  tool_argv("status", "task_050", *common), "task_050")]
        for label, argv, expect in cases:
            b.measure(argv, d)                       # warm the .pyc and page caches
            row = Row("startup", Client("peer" if "peer" in label else "step", label=label))
            row.runs = [_checked(b.measure(argv, d), expect) for _ in range(times)]
            rows.append(row)
    rows.append(_first_byte(b, times))
    help_row, peer_row, list_row, status_row, first_row = rows
    help_row.peer_wall = peer_row.wall
    help_row.target("--help < 0.15 s", help_row.wall, 0.15, "s", at_most=True)
    list_row.target("list-tasks with 50 tasks < 0.3 s", list_row.wall, 0.3, "s", at_most=True)
    status_row.target("status < 0.15 s", status_row.wall, 0.15, "s", at_most=True)
    first_row.target("first file request < 0.3 s", first_row.wall, 0.3, "s", at_most=True)
    return rows


def _first_byte(b: Bench, times: int) -> Row:
    """`download` of a 13-file repo with no flags: spawn to the first file request."""
    repo = "bench/thirteen"
    b.hub.add_repo(repo, {f"file-{i:02d}.json": b"{}" * (100 + i) for i in range(13)})
    row = Row("startup", Client("step", label="download, 13 files: to the first file request"))
    row.note = "wall = spawn to the first file request (resolve, list, task files, preflight)"
    for i in range(times + 1):                   # the first run warms the caches
        with b.run_dir() as d:                   # measure() resets the hub's request log
            m = b.measure(tool_argv("download", repo, "--local-dir", str(d / "out"),
                                    "--metadata-dir", str(d / "metadata"),
                                    "--logs-dir", str(d / "logs")), d)
        first = next((r.time for r in b.hub.requests
                      if r.kind in ("resolve", "resolve-cache", "cdn")), None)
        at = None if first is None else round(first - m.started, 4)
        if i:
            problem = None if at is not None and m.code == 0 else \
                f"no file request or exit {m.code}: {tail(m.log, 3)}"
            row.runs.append({**record(m), "ok": problem is None, "error": problem,
                             "process_wall": round(m.wall, 4),
                             "wall": at if at is not None else m.wall})
    return row


def _checked(m: Measured, expect: str) -> dict[str, Any]:
    text = m.log.read_text(errors="replace")
    return record(m, None if m.code or expect in text else f"no {expect!r} in the output")


def _make_tasks(metadata: Path, count: int) -> None:
    """Tasks as `download` leaves them, written with the project's own TaskStore."""
    from task_manager import TaskStore
    store = TaskStore(metadata)
    for i in range(count):
        task = store.create({"kind": "download", "repo_id": f"org/model-{i}", "repo_type": "model",
                             "revision": "main", "local_dir": f"/data/model-{i}", "include": [],
                             "exclude": [], "commit": f"{i:040x}", "files_total": 12,
                             "bytes_total": 5 << 30})
        store.update(task.id, status="completed", files_done=12, bytes_done=5 << 30, tool="aria2c")


SCENARIOS: dict[str, Callable[[Bench], list[Row]]] = {
    "one-big": one_big, "eight-medium": eight_medium, "many-small": many_small,
    "uncapped": uncapped, "huge-listing": huge_listing, "startup": startup,
}
