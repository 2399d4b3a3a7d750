"""Running one client command and measuring it: wall time, peak RSS of its process tree, CPU.

Also the checks every run must pass (byte-identical files) and the environment each client gets.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.helpers import DATA_DIRS, sha256_file

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EVERY = 0.05


@dataclass
class Measured:
    """One finished command."""

    code: int
    wall: float           # seconds from spawn to exit
    peak_rss: int         # bytes: the largest sum of RSS over the process tree
    peak_pss: int         # bytes: the same with PSS (shared pages split, so a fork is not counted twice)
    cpu: float            # user+sys seconds of the process and the children it waited for
    server_cpu: float     # user+sys seconds of this process (the fake hub) meanwhile
    log: Path             # stdout and stderr
    started: float        # time.time() at spawn, to compare with the hub's request times


def tree_memory(proc: psutil.Process) -> tuple[int, int, int]:
    """(RSS, PSS) summed over a process and all its descendants (vanished ones count 0), and the
    root's own peak RSS so far (VmHWM), which a short-lived command may reach between samples."""
    rss = pss = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
        with open(f"/proc/{proc.pid}/status") as f:
            hwm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except (psutil.Error, OSError):
        return 0, 0, 0
    for p in procs:
        try:
            mem = p.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = rss + mem.rss, pss + mem.pss
    return rss, pss, hwm


class _Sampler(threading.Thread):
    """Samples the tree RSS every ~50 ms and runs `on_sample(pid)` (which may stop the run)."""

    def __init__(self, pid: int, on_sample: Callable[[int], None] | None) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.started = time.perf_counter()
        self.on_sample = on_sample
        self.peak_rss = self.peak_pss = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            rss, pss, hwm = tree_memory(self.proc)
            self.peak_rss = max(self.peak_rss, rss, hwm)
            self.peak_pss = max(self.peak_pss, pss)
            if self.on_sample:
                self.on_sample(self.proc.pid)
            # Denser at first: a command that ends in 0.1 s would otherwise get two samples.
            self.done.wait(SAMPLE_EVERY if time.perf_counter() - self.started > 0.5 else 0.01)


def run_measured(argv: list[str], *, env: dict[str, str], cwd: Path, log: Path, timeout: float,
                 on_sample: Callable[[int], None] | None = None) -> Measured:
    """Run argv to its end (killed after `timeout`), sampling memory; the exit is reaped here
    with wait4 so the wall time is exact and the CPU of the whole tree is known. (wait4's
    ru_maxrss is not used: after fork+exec it still holds this process's RSS.)"""
    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2])
    with open(log, "wb") as out:
        epoch, started = time.time(), time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    sampler = _Sampler(proc.pid, on_sample)
    sampler.start()
    killer = threading.Timer(timeout, _kill_tree, (proc.pid,))
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    except BaseException:           # ^C or SIGTERM: take the client's whole tree down with us
        _kill_tree(proc.pid)
        raise
    finally:
        killer.cancel()
        sampler.done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    _kill_tree(proc.pid)         # helpers a crashed client left behind
    return Measured(code=proc.returncode, wall=wall,
                    peak_rss=sampler.peak_rss, peak_pss=sampler.peak_pss,
                    cpu=usage.ru_utime + usage.ru_stime,
                    server_cpu=sum(me.cpu_times()[:2]) - cpu0, log=log, started=epoch)


def _kill_tree(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------- environments and commands

def base_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    """No proxy, no token, no setting of ours or of huggingface_hub from the outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().endswith("_PROXY") and not k.startswith(("HF_", "HFDL_"))
           and k not in DATA_DIRS and k != "PYTHONDONTWRITEBYTECODE"}
    # Python caches bytecode as users run it (this VM sets PYTHONDONTWRITEBYTECODE: every run
    # would compile the tool's modules again, ~0.15 s that no user pays).
    # our data folders beside HF_HOME, in the run's folder (their default is beside main.py)
    env.update({var: str(hf_home.parent / name) for var, name in DATA_DIRS.items()})
    env.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"})
    return env


def tool_argv(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


def hf_executable() -> str:
    """The `hf` script of this interpreter (a pyenv shim would add ~0.1 s of bash to every run)."""
    beside = Path(sys.executable).parent / "hf"
    if beside.exists():
        return str(beside)
    import shutil
    found = shutil.which("hf")
    if not found:
        raise SystemExit("error: the peer `hf` (huggingface_hub's CLI) is not installed")
    return found


# ---------------------------------------------------------------- checking the bytes

def check_tree(root: Path, expected: dict[str, str], ignore: tuple[str, ...] = ()) -> str | None:
    """None when `root` holds exactly the expected files (path -> sha256), else what is wrong.
    Folders named in `ignore` (the peer's `.cache/huggingface`) are skipped."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(rel_dir, d)) not in ignore]
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
            found[rel] = Path(dirpath, name)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        return f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]})"
    bad = [p for p, sha in expected.items() if sha256_file(found[p]) != sha]
    if bad:
        return f"{len(bad)} files differ from the hub's bytes (e.g. {bad[:2]})"
    return None
