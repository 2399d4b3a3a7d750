"""Two checkouts of the tool, A then B then A..., against one fake Hub: `python -m bench.ab A B`.

For a before/after comparison of a change (a redesign must not be slower): both checkouts
download the same repos with the same flags, every run's files are checked against the hub's
sha256, and the median wall time of each is printed with the ratio B/A.

    python -m bench.ab /path/to/old-checkout . --rounds 3 --scenario big small
    python -m bench.ab /path/to/old-checkout . --scenario defaults     # no tuning flags
    python -m bench.ab /path/to/old-checkout . --scenario eight        # eight 256 MiB, no flags
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import base_env, check_tree
from bench.scenarios import small_files
from tests.fakehub import Content, FakeHub

MB, MiB = 10**6, 1 << 20


def run(tree: str, hub: FakeHub, repo: str, args: list[str], expected: dict[str, str],
        work: str) -> tuple[float, str | None]:
    d = Path(tempfile.mkdtemp(dir=work))
    try:
        argv = [sys.executable, f"{tree}/main.py", "download", repo, *args,
                "--local-dir", str(d / "out"), "--metadata-dir", str(d / "m"),
                "--logs-dir", str(d / "l")]
        started = time.monotonic()
        proc = subprocess.run(argv, env=base_env(hub.url, d / "hf"), cwd=d, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.monotonic() - started
        bad = (f"exit {proc.returncode}: {proc.stderr[-300:]}" if proc.returncode
               else check_tree(d / "out", expected, ignore=(".cache",)))
        return wall, bad
    finally:
        shutil.rmtree(d, ignore_errors=True)


def scenario(hub: FakeHub, work: str, trees: dict[str, str], rounds: int, name: str,
             files: dict, bandwidth: float | None, latency: float, args: list[str]) -> None:
    repo = "ab/" + re.sub(r"[^a-z0-9]+", "-", f"{name} {' '.join(args)}".lower()).strip("-")
    hub.add_repo(repo, files, lfs=lambda path, size: path.endswith((".parquet", ".safetensors")))
    expected = {p: hub.file_info(repo, p).sha256 for p in files}
    hub.bandwidth_per_conn, hub.latency = bandwidth, latency
    walls: dict[str, list[float]] = {k: [] for k in trees}
    for _ in range(rounds):
        for label, tree in trees.items():
            wall, bad = run(tree, hub, repo, args, expected, work)
            if bad:
                raise SystemExit(f"{name} {label}: {bad}")
            walls[label].append(wall)
    hub.bandwidth_per_conn, hub.latency = None, 0.0
    a, b = (statistics.median(v) for v in walls.values())
    print(f"{name:26} {' '.join(args):24} A {a:7.2f} s  B {b:7.2f} s  B/A {b / a:.3f}  "
          f"runs {[round(x, 2) for x in walls['A']]} / {[round(x, 2) for x in walls['B']]}",
          flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="checkout A (e.g. before the change)")
    p.add_argument("b", help="checkout B (e.g. after it)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scenario", nargs="+", default=["big", "small"],
                   choices=["big", "small", "uncapped", "eight", "defaults"])
    args = p.parse_args()
    trees = {"A": str(Path(args.a).resolve()), "B": str(Path(args.b).resolve())}  # runs cd elsewhere
    with FakeHub() as hub, tempfile.TemporaryDirectory(prefix="hfdl-ab-") as work:
        if "big" in args.scenario:
            one = {"model.safetensors": Content(1 << 30, seed=1)}
            for tool in ("aria2c", "python"):
                scenario(hub, work, trees, args.rounds, "one 1 GiB, 20 MB/s/conn", one,
                         20 * MB, 0.05, ["--tool", tool, "-x", "16"])
        if "small" in args.scenario:
            scenario(hub, work, trees, args.rounds, "3000 small, 20 ms", small_files(3000),
                     None, 0.02, ["--tool", "python", "-j", "16"])
        if "uncapped" in args.scenario:
            four = {f"s-{i}.safetensors": Content(512 * MiB, seed=11 + i) for i in range(4)}
            scenario(hub, work, trees, args.rounds, "2 GiB in four, uncapped", four, None, 0.0,
                     ["--tool", "python", "-x", "1", "-j", "4"])
        if "eight" in args.scenario:            # eight 256 MiB files, no flags
            eight = {f"m-{i}.safetensors": Content(256 * MiB, seed=21 + i) for i in range(8)}
            scenario(hub, work, trees, args.rounds, "eight 256 MiB, 20 MB/s/conn, no flags",
                     eight, 20 * MB, 0.05, [])
        if "defaults" in args.scenario:         # what a user gets: no tuning flag at all
            one = {"model.safetensors": Content(1 << 30, seed=1)}
            scenario(hub, work, trees, args.rounds, "one 1 GiB, 20 MB/s/conn, no flags", one,
                     20 * MB, 0.05, [])
            four = {f"s-{i}.safetensors": Content(512 * MiB, seed=11 + i) for i in range(4)}
            scenario(hub, work, trees, args.rounds, "2 GiB in four, uncapped, no flags", four,
                     None, 0.0, [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
