"""N workers against 1 on the same `plan-batch --workers N` plan: `python -m bench.workers`.

The fake Hub caps each connection (`--cap` bytes/s); every worker runs `contrib/run-batch.sh
PLAN I SHARED -x1 -j1`, so each holds one connection and N workers multiply the throughput
as N machines would. "1 worker" runs the N batches one after another; "N workers" starts them
at once. Each run gets a fresh shared folder, checked afterwards with `verify --plan`.

    python -m bench.workers --workers 4 --files 16 --size 3000000 --cap 1000000
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import base_env
from tests.fakehub import Content, FakeHub

ROOT = Path(__file__).resolve().parent.parent


def run(env: dict[str, str], plan: Path, shared: Path, workers: int, parallel: bool,
        tool: str) -> float:
    def argv(i: int) -> list[str]:
        return ["sh", str(ROOT / "contrib" / "run-batch.sh"), str(plan), str(i), str(shared),
                "-x1", "-j1", "--tool", tool, "-q"]
    started = time.monotonic()
    if parallel:
        procs = [subprocess.Popen(argv(i), env=env) for i in range(1, workers + 1)]
        codes = [p.wait() for p in procs]
    else:
        codes = [subprocess.call(argv(i), env=env) for i in range(1, workers + 1)]
    elapsed = time.monotonic() - started
    if codes != [0] * workers:
        raise SystemExit(f"a worker failed: exit statuses {codes}")
    check = subprocess.run([sys.executable, str(ROOT / "main.py"), "verify", "--plan", str(plan),
                            "--local-dir", str(shared / "data")], env=env, capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise SystemExit(f"verify --plan found bad files:\n{check.stdout}{check.stderr}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--size", type=int, default=3_000_000, help="bytes per file")
    ap.add_argument("--cap", type=int, default=1_000_000, help="bytes/s per connection")
    ap.add_argument("--tool", default="python")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        with FakeHub() as hub:
            files = {f"data/shard-{i:03d}.bin": Content(a.size, i) for i in range(a.files)}
            hub.add_repo("bench/corpus", files, repo_type="dataset")
            env = {**base_env(hub.url, work / "hf-home"), "PYTHON": sys.executable}
            plan = work / "plan.json"
            subprocess.run([sys.executable, str(ROOT / "main.py"), "plan-batch", "bench/corpus",
                            "--dataset", "--workers", str(a.workers), "--output", str(plan), "-q"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            hub.bandwidth_per_conn = a.cap
            times: dict[bool, list[float]] = {False: [], True: []}
            for n in range(a.rounds):
                for parallel in (False, True):
                    shared = work / f"shared-{n}-{int(parallel)}"
                    times[parallel].append(run(env, plan, shared, a.workers, parallel, a.tool))
                    shutil.rmtree(shared)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, many = min(times[False]), min(times[True])
    total = a.files * a.size
    print(f"{total / 1e6:.0f} MB in {a.workers} batches, {a.cap / 1e6:g} MB/s per connection, "
          f"--tool {a.tool} -x1 -j1 per worker")
    print(f"1 worker (batches in turn): {one:.1f} s; {a.workers} workers at once: {many:.1f} s; "
          f"ratio {one / many:.2f} (ideal {a.workers}: {total / a.cap:.0f} s vs "
          f"{total / a.cap / a.workers:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
