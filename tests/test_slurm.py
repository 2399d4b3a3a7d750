"""A plan's batches as a Slurm array job, on a real single-node Slurm (issue 15 point 3).

The fixture starts munged, slurmctld and slurmd on this machine (Debian's `slurm-wlm` and `munge`,
installed by .ci/run), with their config, key, state and spool under a tmp folder and their own
ports; the array job runs contrib/slurm/download-array.sbatch as a user would submit it."""
from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehub import Content, content_sha256
from tests.helpers import ROOT, clean_env, sha256_file, tool_processes, wait_for

SCRIPT = ROOT / "contrib" / "slurm" / "download-array.sbatch"
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel")
TOKEN = "hf_slurm_test_token_0123456789"

SLURM_CONF = """\
ClusterName=hfdl-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/socket
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# As on sites that do not requeue by default: the job script's --requeue is what allows it.
JobRequeue=0
KillWait=2
MinJobAge=600
# 4 CPUs on any machine (the config wins over the hardware): the 4 downloads run at once.
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 RealMemory=100 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slurm:
    """munged + slurmctld + slurmd on localhost, and the client commands pointed at them."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        munge = self.dir / "munge"
        munge.mkdir(mode=0o700)
        (munge / "key").write_bytes(os.urandom(1024))
        (munge / "key").chmod(0o400)
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir()
        (self.dir / "slurm.conf").write_text(SLURM_CONF.format(
            dir=self.dir, user=getpass.getuser(), ctld_port=free_port(), d_port=free_port()))
        self.daemon("munged", "-F", "--force", f"--key-file={munge}/key", f"--socket={munge}/socket",
                    f"--pid-file={munge}/pid", f"--seed-file={munge}/seed", f"--log-file={munge}/log")
        assert wait_for(lambda: (munge / "socket").exists(), 10), self.logs()
        self.daemon("slurmctld", "-D")
        self.daemon("slurmd", "-D", "-N", "localhost")
        assert wait_for(lambda: self.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip() == "idle",
                        30, 0.2), self.logs()

    def daemon(self, *argv: str) -> None:
        with open(self.dir / f"{argv[0]}.out", "wb") as out:
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL))

    def stop(self) -> None:
        if self.procs[1:]:   # jobs outlive slurmd (slurmstepd is on its own): cancel them first
            self.run("scancel", "--full", "--user", getpass.getuser())
            wait_for(lambda: not self.run("squeue", "-h").stdout.strip(), 15, 0.2)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=30, check=False, **kw)

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str]) -> str:
        r = self.run("sbatch", "--parsable", *args, cwd=cwd, env={**env, "SLURM_CONF": self.env["SLURM_CONF"]})
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    def tasks(self, array_job: str) -> dict[int, dict[str, str]]:
        """The array's tasks by index: JobState, Restarts, ExitCode..., from `scontrol show job`."""
        r = self.run("scontrol", "show", "job", "-o", array_job)
        assert r.returncode == 0, r.stderr
        rows = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in r.stdout.splitlines()]
        return {int(row["ArrayTaskId"]): row for row in rows if row.get("ArrayTaskId", "").isdigit()}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.dir.glob("*.out")) + sorted(self.dir.glob("*.log")))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} not found): "
                    "apt-get install slurm-wlm munge (.ci/run does)", pytrace=False)
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------- the dataset and its result

def corpus() -> dict[str, Content]:
    """12 files in 4 folders of ~1.2 MB: 4 batches of 1500K disks."""
    return {f"data/part-{i // 3}/shard-{i:03d}.parquet": Content(400_000 + 1_000 * i, 300 + i)
            for i in range(12)}


def files_in(data: Path) -> list[tuple[str, Path]]:
    """(repo path, file) for every file under data/, whether the batches share one folder or
    each has its own (run-batch.sh decides): a folder holding a tool marker is a batch target."""
    roots = {p.parent for p in data.rglob(".hf-downloader*")}
    found = [(p.relative_to(root).as_posix(), p) for root in roots for p in root.rglob("*")
             if p.is_file() and not p.name.startswith(".hf-downloader")
             and "/.cache/huggingface/" not in "/" + p.relative_to(root).as_posix()]
    stray = [p for p in data.rglob("*") if p.is_file() and not p.name.startswith(".hf-downloader")
             and not any(root in p.parents for root in roots)]
    assert not stray, f"files outside every batch folder: {stray}"
    return found


def assert_every_file_once(data: Path, files: dict[str, Content]) -> None:
    found = files_in(data)
    names = sorted(name for name, _ in found)
    assert names == sorted(files), names        # each exactly once, no partial or temp file
    for name, path in found:
        assert sha256_file(path) == content_sha256(files[name]), name


# ---------------------------------------------------------------- the test

def partial_bytes(data: Path, path: str) -> int:
    """The bytes of `path`'s partial files under data/ (the other tasks rename and remove theirs
    while this looks)."""
    total = 0
    try:
        for p in data.rglob(Path(path).name + ".*.incomplete"):
            total += p.stat().st_size
    except FileNotFoundError:
        return 0
    return total


def wait_states(slurm: Slurm, job: str, want: dict[int, set[str]], timeout: float = 40) -> dict:
    def reached() -> bool:
        tasks = slurm.tasks(job)
        return all(tasks.get(i, {}).get("JobState") in states for i, states in want.items())
    ok = wait_for(reached, timeout, 0.2)
    tasks = slurm.tasks(job)
    assert ok, (tasks, slurm.logs())
    return tasks


def test_an_array_job_fetches_every_batch_once_and_resumes_a_cancelled_or_requeued_task(
        slurm, cli, hub, tmp_path):
    files = corpus()
    hub.add_repo("org/corpus", files, repo_type="dataset", private=True)
    hub.add_token(TOKEN)
    shared = tmp_path / "shared"
    (shared / "logs").mkdir(parents=True)
    plan = shared / "plan.json"
    r = cli("plan-batch", "org/corpus", "--dataset", "--workers", "4", "--output",
            str(plan), env={"HF_TOKEN": TOKEN})
    assert r.code == 0, r.text
    batches = [b["paths"] for b in json.loads(plan.read_text())["batches"]]
    assert len(batches) == 4
    # A file of batch 2 and one of batch 3 stop after 150 KB: those tasks are mid-transfer when
    # task 2 is cancelled (scancel, then submitted again) and task 3 requeued (as on preemption).
    stalled = {2: batches[1][1], 3: batches[2][1]}
    faults = {i: hub.add_fault("stall", path, after_bytes=150_000, seconds=60) for i, path in stalled.items()}
    env = {**clean_env(tmp_path, hub.url), "HF_TOKEN": TOKEN, "PYTHON": sys.executable}
    submit = ["--output", f"{shared}/logs/batch-%a.out", str(SCRIPT), str(plan), str(shared)]

    job = slurm.sbatch("--array=1-4", *submit, cwd=ROOT, env=env)   # the checkout: the submit dir

    def mid_transfer(path: str) -> bool:     # the server stalls and the first bytes are on disk
        return any(rq.file == path and rq.fault == "stall" and rq.bytes_sent >= 150_000
                   for rq in list(hub.requests)) and partial_bytes(shared / "data", path) > 0
    assert wait_for(lambda: all(mid_transfer(p) for p in stalled.values()), 30), slurm.logs()
    assert slurm.run("scancel", f"{job}_2").returncode == 0
    assert slurm.run("scontrol", "requeue", f"{job}_3").returncode == 0
    tasks = wait_states(slurm, job, {1: {"COMPLETED"}, 4: {"COMPLETED"}, 2: {"CANCELLED"},
                                     3: {"PENDING"}})
    assert tasks[3]["Restarts"] == "1"
    # Slurm holds a requeued job for a while (BeginTime); a test cannot wait that long.
    assert slurm.run("scontrol", "update", f"jobid={job}_3", "StartTime=now").returncode == 0
    # Batch 2 again, as a new job, from elsewhere: the checkout is found through HFDL_CHECKOUT.
    again = slurm.sbatch("--array=2", *submit, cwd=tmp_path, env={**env, "HFDL_CHECKOUT": str(ROOT)})
    wait_states(slurm, job, {3: {"COMPLETED"}})
    wait_states(slurm, again, {2: {"COMPLETED"}})
    assert all(f.fired == 1 for f in faults.values())

    assert_every_file_once(shared / "data", files)
    # the whole result, from a machine with no task records
    r = cli("verify", "--plan", str(plan), "--local-dir", str(shared / "data"))
    assert r.code == 0, r.text
    for path in stalled.values():                 # the second try continued from the bytes on disk
        last = [rq for rq in hub.requests if rq.file == path and rq.kind == "cdn"][-1]
        assert last.status == 206 and int((last.range or "=0").split("=")[1].split("-")[0]) > 0, last
    assert not tool_processes(str(shared)), tool_processes(str(shared))
    logs = {p.name: p.read_text() for p in (shared / "logs").glob("batch-*.out")}
    assert sorted(logs) == [f"batch-{i}.out" for i in range(1, 5)]
    assert "attempt 2" in logs["batch-3.out"] and "attempt 1" in logs["batch-3.out"]  # appended
    assert logs["batch-2.out"].count("attempt 1") == 2 and "CANCELLED" in logs["batch-2.out"]
    for p in shared.rglob("*"):
        assert not p.is_file() or TOKEN not in p.read_text(errors="replace"), p


def test_a_task_that_cannot_run_its_batch_is_marked_failed(slurm, tmp_path):
    shared = tmp_path / "shared"
    (shared / "logs").mkdir(parents=True)
    job = slurm.sbatch("--array=1", "--output", f"{shared}/logs/batch-%a.out", str(SCRIPT),
                       str(shared / "no-plan.json"), str(shared), cwd=ROOT, env=os.environ.copy())
    tasks = wait_states(slurm, job, {1: {"FAILED"}}, 20)
    assert tasks[1]["ExitCode"] == "2:0"
    log = (shared / "logs" / "batch-1.out").read_text()
    assert log.startswith(f"error: no plan file at {shared}/no-plan.json"), log
