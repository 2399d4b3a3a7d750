"""Many workers, one plan (issue 15): plan-batch --workers, batches run at once into one shared
folder (each with its own records), verify --plan, and the Kubernetes Indexed Job, whose
container command is run here as the pods would run it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fakehub import Content
from tests.helpers import ROOT, assert_same_tree, error_lines, wait_for

MANIFEST = ROOT / "contrib" / "k8s" / "download-indexed-job.yaml"
RUN_BATCH = "/opt/hf-downloader/contrib/run-batch.sh"
MARKER = ".hf-downloader-batch.json"


def pod_spec() -> dict:
    job = yaml.safe_load(MANIFEST.read_text())
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    return job


def pod_command() -> str:
    """The container's command line: sh -c 'exec run-batch.sh PLAN $((INDEX + 1)) SHARED ...'."""
    container = pod_spec()["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"] and len(container["args"]) == 1
    return container["args"][0]


def start_pod(cli, index: int, shared: Path, *extra: str) -> subprocess.Popen:
    """Pod `index` of the Indexed Job, on this machine: the PVC at `shared`, the code at ROOT."""
    line = pod_command().replace("/opt/hf-downloader", str(ROOT)).replace("/shared", str(shared))
    return subprocess.Popen(["/bin/sh", "-c", " ".join([line, *extra])], cwd=ROOT,
                            env={**cli.env, "JOB_COMPLETION_INDEX": str(index),
                                 "PYTHON": sys.executable},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in out + err, out + err
    return proc.returncode, out + err


def plan_for(cli, workers: int, files: dict, shared: Path) -> dict:
    cli.hub.add_repo("org/corpus", files, repo_type="dataset")
    shared.mkdir()
    r = cli("plan-batch", "org/corpus", "--dataset", "--workers", str(workers),
            "--output", str(shared / "plan.json"))
    assert r.code == 0 and "contrib/run-batch.sh" in r.out, r.text
    return json.loads((shared / "plan.json").read_text())


def shared_tree(data: Path, files: dict) -> None:
    """Every file once, byte-identical, no partial at a final path; the marker holds them all."""
    assert (data / MARKER).is_file() and not (data / (MARKER + ".lock")).exists()
    os.replace(data / MARKER, data.parent / MARKER)
    try:
        assert_same_tree(data, files)
    finally:
        os.replace(data.parent / MARKER, data / MARKER)


def test_four_pods_share_one_folder_and_verify_plan_checks_the_whole(cli, hub, tmp_path):
    files = {f"data/part-{i % 3}/shard-{i:03d}.bin": Content(90_000 + 1_000 * i, i)
             for i in range(16)}
    files["README.md"] = b"# corpus\n"
    shared = tmp_path / "shared"
    plan = plan_for(cli, 4, files, shared)
    assert plan["workers"] == 4 and plan["endpoint"] == hub.url and len(plan["batches"]) == 4
    assert all(f["sha256"] or f["blob_id"] for f in plan["files"]) and plan["commit"]
    hub.bandwidth_per_conn = 400_000                 # about a second each: the four overlap
    pods = [start_pod(cli, i, shared) for i in range(4)]
    results = [finish(p) for p in pods]
    assert [code for code, _ in results] == [0] * 4, results
    data = shared / "data"
    shared_tree(data, files)
    marker = json.loads((data / MARKER).read_text())
    assert sorted(e["batch"] for e in marker["batches"]) == [1, 2, 3, 4]
    # each file fetched by one worker only (a retry on a loaded machine resumes, not restarts)
    total = sum(len(v) if isinstance(v, bytes) else v.size for v in files.values())
    assert total <= sum(hub.bytes_served(p) for p in files) < 1.5 * total
    assert sorted(os.listdir(shared / "meta")) == [f"batch-{i}" for i in range(1, 5)]

    # from any machine, no task records: a fresh metadata folder
    r = cli("verify", "--plan", str(shared / "plan.json"), "--local-dir", str(data),
            env={"METADATA_DIR": str(tmp_path / "elsewhere")})
    assert r.code == 0 and "17/17 files OK" in r.out, r.text
    gone, cut = "data/part-1/shard-004.bin", "data/part-2/shard-014.bin"
    (data / gone).unlink()
    with open(data / cut, "r+b") as fh:
        fh.truncate(10)
    r = cli("verify", "--plan", str(shared / "plan.json"), "--local-dir", str(data), "--json",
            env={"METADATA_DIR": str(tmp_path / "elsewhere")})
    report = json.loads(r.out)
    batch_of = {p: b["number"] for b in plan["batches"] for p in b["paths"]}
    assert r.code == 3 and not report["ok"] and report["checked"] == 17
    assert {(b["path"], b["verdict"], b["batch"]) for b in report["bad"]} == {
        (gone, "missing", batch_of[gone]), (cut, "size mismatch", batch_of[cut])}
    # what the guide says to do: run those indexes again; the others' files stay untouched
    before = {p: os.stat(data / p).st_mtime_ns for p in files if p not in (gone, cut)}
    again = [start_pod(cli, n - 1, shared) for n in report["bad_batches"]]
    assert [finish(p)[0] for p in again] == [0] * len(again)
    shared_tree(data, files)
    assert {p: os.stat(data / p).st_mtime_ns for p in before} == before
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").rglob("*.json"))
    # one task's clean --delete-files takes its own batch's files only, not the others'
    r = cli("--metadata-dir", str(shared / "meta" / "batch-1"), "clean", "--all", "--delete-files")
    assert r.code == 0, r.text
    r = cli("verify", "--plan", str(shared / "plan.json"), "--local-dir", str(data), "--json")
    assert r.code == 3 and json.loads(r.out)["bad_batches"] == [1], r.text
    assert {b["path"] for b in json.loads(r.out)["bad"]} == set(plan["batches"][0]["paths"])


def test_a_pod_killed_mid_transfer_resumes_its_batch(cli, hub, tmp_path):
    files = {f"shard-{i}.bin": Content(600_000, 40 + i) for i in range(3)}
    shared = tmp_path / "shared"
    plan_for(cli, 3, files, shared)
    hub.bandwidth_per_conn = 300_000                 # two seconds a file
    pods = [start_pod(cli, i, shared, "-x1", "-j1") for i in range(3)]
    partials = shared / "data" / ".hfdl" / "partial"
    assert wait_for(lambda: any(p.name.startswith("shard-1.bin") and p.stat().st_size > 0
                                for p in partials.glob("*.incomplete")), timeout=20)
    os.kill(pods[1].pid, signal.SIGKILL)             # exec'd: the pod's process is main.py
    code, _ = finish(pods[1])
    assert code == -signal.SIGKILL
    assert [finish(pods[i])[0] for i in (0, 2)] == [0, 0]
    assert not (shared / "data" / "shard-1.bin").exists()      # never a partial at a final name
    assert finish(start_pod(cli, 1, shared, "-x1", "-j1"))[0] == 0
    shared_tree(shared / "data", files)
    served = hub.bytes_served("shard-1.bin")
    assert served < 2 * 600_000                      # resumed, not started over from scratch
    r = cli("verify", "--plan", str(shared / "plan.json"), "--local-dir", str(shared / "data"))
    assert r.code == 0, r.text


def test_the_manifest_runs_run_batch_sh_with_the_index_plus_one_and_a_secret_token():
    job = pod_spec()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert pod_command().split() == ["exec", RUN_BATCH, "/shared/plan.json",
                                     '"$((JOB_COMPLETION_INDEX', '+', '1))"', "/shared", "-q"]
    token = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
    assert token and set(token[0]) == {"name", "valueFrom"}
    assert token[0]["valueFrom"]["secretKeyRef"]["key"]
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == "/shared"
    claim = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["persistentVolumeClaim"]
    assert claim["claimName"]
    assert "hf_" not in MANIFEST.read_text().replace("hf_...", "")
    # the Slurm array runs the very same command line (contrib/slurm, issue 15 point 3)
    sbatch = ROOT / "contrib" / "slurm" / "download-array.sbatch"
    if sbatch.exists():
        assert "contrib/run-batch.sh" in sbatch.read_text()


def test_run_batch_sh_and_the_new_flags_refuse_bad_input_in_one_line(cli, hub, tmp_path):
    script = str(ROOT / "contrib" / "run-batch.sh")
    for args in ([], ["plan.json", "0", str(tmp_path)], ["plan.json", "x1", str(tmp_path)]):
        r = subprocess.run(["/bin/sh", script, *args], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    hub.add_repo("org/m", {"a.bin": b"a" * 100, "b.bin": b"b" * 900})
    r = cli("plan-batch", "org/m")
    assert r.code == 2 and "--workers" in error_lines(r)[0]
    assert hub.count() == 0                          # refused before asking the Hub
    r = cli("plan-batch", "org/m", "--workers", "2", "--available-space", "500")
    assert r.code == 2 and "bigger than one disk" in error_lines(r)[0]
    r = cli("verify")
    assert r.code == 2 and "--plan" in error_lines(r)[0]
    r = cli("verify", "--plan", str(tmp_path / "plan.json"), "--batch", "1")
    assert r.code == 2 and error_lines(r)
    r = cli("plan-batch", "org/m", "--workers", "2", "--output", str(tmp_path / "p.json"))
    assert r.code == 0, r.text
    r = cli("verify", "--plan", str(tmp_path / "p.json"), "--local-dir", str(tmp_path / "no"))
    assert r.code == 1 and "is not a folder" in error_lines(r)[0]
    for cmd in (["verify", "--plan", str(tmp_path / "absent.json"), "--local-dir", str(tmp_path)],
                ["batch-continue", str(tmp_path / "absent.json"), "1"]):
        r = cli(*cmd)                 # the user's file: no "metadata" wording, no fix-progress hint
        assert r.code == 1 and "plan file" in error_lines(r)[0] and "fix-progress" not in r.err
    hub.reset_log()
    r = cli("download", "org/m", "--hf-cache", str(tmp_path / "c"), "--local-dir", str(tmp_path / "d"))
    assert r.code == 2 and "two targets" in error_lines(r)[0] and hub.count() == 0


def test_the_guide_runs_by_hand_exactly_what_run_batch_sh_runs():
    script = (ROOT / "contrib" / "run-batch.sh").read_text()
    line = script[script.index('exec "${PYTHON:-python3}" "$main"'):].replace("\\\n", " ")
    words = line.splitlines()[0].split()[3:]           # after exec python main.py
    assert words[-1] == '"$@"'
    expanded = " ".join(w.strip('"').replace("$shared", "/shared/hf").replace("$batch", "2")
                        .replace("$plan", "/shared/hf/plan.json") for w in words[:-1])
    guide = " ".join((ROOT / "BATCH_DOWNLOAD_GUIDE.md").read_text().replace("\\\n", " ").split())
    assert f"python main.py {expanded}" in guide
