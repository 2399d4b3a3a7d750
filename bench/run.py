"""Benchmark: this tool (aria2c, wget, python backends) against `hf download`, on a fake Hub.

    python -m bench.run                         # every scenario, full size (several minutes)
    python -m bench.run --quick                 # 1/16 sizes and counts (under a minute)
    python -m bench.run --scenario one-big many-small --repeat 3 --json-out /tmp/r.json

Run from the repo root, so that `bench.*`, `tests.fakehub` and the tool's modules import by name.

Prints a table (median wall time, MB/s, peak RSS of the process tree, x faster than hf, the
known limit) and each target with PASS/FAIL; writes the same as JSON. Exits 1 when a run
failed or its files were not byte-identical to the hub's; missed speed targets do not change
the exit status. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.scenarios import SCENARIOS, Bench, FakeHub, Row

HERE = Path(__file__).resolve().parent
# --quick: sizes shrink more than counts, so the single-connection peer runs stay short.
QUICK_SIZES, QUICK_COUNTS = 1 / 64, 1 / 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the tool against `hf download` on a fake Hub.")
    p.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS),
                   metavar="NAME", help="scenarios to run: " + ", ".join(SCENARIOS) + " (default all)")
    p.add_argument("--quick", action="store_true", help="1/64 sizes, 1/32 file counts (under a minute)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="rounds per scenario; the table shows medians (default 1)")
    p.add_argument("--json-out", type=Path, default=HERE / "results" / "latest.json", metavar="PATH",
                   help="where to write the results (default bench/results/latest.json)")
    return p.parse_args(argv)


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def table(rows: list[Row]) -> str:
    head = ["scenario", "client", "runs", "wall s", "MB/s", "peak MB", "PSS MB", "vs hf", "limit MB/s",
            "% limit", "bytes ok", "targets"]
    body = []
    for r in rows:
        marks = "; ".join(f"{t['target']}: {'PASS' if t['pass'] else 'FAIL'}" for t in r.targets)
        body.append([r.scenario, r.client.name, str(len(r.runs)), fmt(r.wall, ".2f"), fmt(r.mbps, ".1f"),
                     fmt(r.peak_mb, ".0f"), fmt(r.peak_pss_mb, ".0f"), fmt(r.ratio, ".2f", "x"),
                     fmt(r.limit, ".0f") + (f" ({r.limit_how})" if r.limit_how else ""),
                     fmt(r.pct_limit, ".0f", "%"), "yes" if r.ok else "NO", marks])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def target_lines(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        for t in r.targets:
            value = fmt(t["value"], ".2f", " " + t["unit"])
            out.append(f"{'PASS' if t['pass'] else 'FAIL'}  {t['scenario']:13} {t['client']:38} "
                       f"{t['target']}: {value}")
    return out


def _terminated(*_: object) -> None:
    raise KeyboardInterrupt     # so the running client is killed and the scratch folder removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    sizes, counts = (QUICK_SIZES, QUICK_COUNTS) if args.quick else (1.0, 1.0)
    rows: list[Row] = []
    started = time.time()
    with FakeHub() as hub, tempfile.TemporaryDirectory(prefix="hfdl-bench-") as work:
        bench = Bench(hub, Path(work), sizes, counts, max(1, args.repeat), say)
        say(f"fake hub {hub.url} (in-process), cdn {hub.cdn_url}, scratch {work}")
        for name in args.scenario:
            rows.extend(SCENARIOS[name](bench))
    print(table(rows))
    print()
    print("\n".join(target_lines(rows)))
    targets = [t for r in rows for t in r.targets]
    identical = all(r.ok for r in rows)
    result = {
        "meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick, "size_scale": sizes,
                 "count_scale": counts,
                 "repeat": args.repeat, "scenarios": args.scenario, "hub": "in-process",
                 "seconds": round(time.time() - started, 1), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "machine": platform.platform()},
        "identical": identical,
        "targets_passed": sum(t["pass"] for t in targets), "targets_total": len(targets),
        "rows": [r.to_json() for r in rows],
        "targets": targets,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['targets_passed']}/{len(targets)} targets passed; "
          f"{'all runs byte-identical' if identical else 'SOME RUNS FAILED OR DIFFER'}; "
          f"results in {args.json_out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
