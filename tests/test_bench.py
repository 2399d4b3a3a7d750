"""Smoke test of `python -m bench.run`: a quick run works end to end and every run's bytes are right.

Speed targets are never asserted here (timings on a shared CI machine mean nothing); only that
the benchmark runs, writes its JSON, and that no client produced wrong files.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_quick_bench_runs_and_checks_bytes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # run as documented, from the repo root (each run's folders are temporary ones of its own)
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--scenario",
                           "one-big", "many-small", "startup", "--json-out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    result = json.loads(out.read_text())
    assert {"meta", "identical", "rows", "targets", "targets_passed", "targets_total"} <= result.keys()
    assert result["identical"] is True
    rows = result["rows"]
    assert {r["scenario"] for r in rows} == {"one-big", "many-small", "startup"}
    for row in rows:
        assert {"client", "wall_s", "mb_per_s", "peak_mb", "x_faster_than_peer", "limit_mb_per_s",
                "identical", "runs"} <= row.keys()
        assert row["identical"] is True and row["runs"], row
        assert all(run["ok"] and run["code"] == 0 for run in row["runs"]), row
        assert row["peak_mb"] > 0
    clients = {r["client"] for r in rows if r["scenario"] == "many-small"}
    assert {"hf download", "default (no flags)", "aria2c -x8 -j16", "wget -x1 -j16",
            "python -x8 -j16"} <= clients
    assert rows[0]["client"] == "default (no flags)"      # our default configuration first
    assert all(isinstance(t["pass"], bool) for t in result["targets"])
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout
