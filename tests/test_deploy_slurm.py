"""deploy/slurm on a real single-node Slurm cluster started here (Debian's munge, slurmctld and slurmd on
loopback): the generate array (each task: rf-serve on the node, its shard, the server stopped) and the finishing
job (verify, merge), checked against a single-process run of the same job, byte for byte."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from realfake.client.server import free_port, port_is_free, server_ready

from conftest import VENV_BIN, rf

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "deploy" / "slurm"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
# what a CPU-only test node can give: the scripts' GPU, core and memory requests are overridden like a user would
SMALL_NODE = ["--gres=none", "--cpus-per-task=1", "--mem=1G"]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


class Cluster:
    """munged + slurmctld + slurmd on this machine, in a private folder, on free loopback ports."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.sock"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}

    def start(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        subprocess.run(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={self.socket}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'seed'}",
            ],
            check=True,
            timeout=30,
        )
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=realfake-test",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    "SlurmUser=root",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.socket}",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "MinJobAge=600",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
                    f"RealMemory={_memory_mb() // 2} State=UNKNOWN",
                    "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
                    "",
                ]
            )
        )
        for daemon in ("slurmctld", "slurmd"):
            self.procs.append(
                subprocess.Popen(
                    [daemon, "-D", "-f", str(self.conf)],
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(self.root / "log" / f"{daemon}.stderr", "wb"),
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node did not come up (state {state!r}): {self.logs()}")

    def logs(self) -> str:
        return " | ".join(
            f"{f.name}: {f.read_text(errors='replace')[-600:]}"
            for f in sorted((self.root / "log").glob("*"))
            if f.is_file()
        )

    def run(self, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**self.env, **(env or {})})
        assert not check or r.returncode == 0, (cmd, r.stdout, r.stderr)
        return r

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        return self.run("sbatch", "--parsable", *args, env=env).stdout.strip().split(";")[0]

    def wait(self, job: str, timeout: float) -> dict[str, tuple[str, str]]:
        """Every task of the job once none is pending or running: id -> (JobState, ExitCode)."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-j", job, check=False).stdout.strip():
            assert time.monotonic() < deadline, f"job {job} still queued or running after {timeout}s"
            time.sleep(1.0)
        text = self.run("scontrol", "-o", "show", "job", job).stdout
        states = {}
        for line in text.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields["JobId"] + ("_" + fields["ArrayTaskId"] if "ArrayTaskId" in fields else "")
            states[task] = (fields["JobState"], fields["ExitCode"])
        return states

    def stop(self) -> None:
        self.run("scancel", "--full", "-u", "root", check=False)
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        subprocess.run(["munged", "--stop", f"--socket={self.socket}"], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        pytest.skip(f"Slurm or munge is not installed ({', '.join(missing)}): apt-get install munge slurmd slurmctld")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        c.stop()
        pytest.skip(f"a single-node Slurm cluster cannot start on this machine: {exc}")
    yield c
    c.stop()


def _real_folder(root: Path, per: int = 2) -> tuple[Path, Path]:
    """A small real ImageFolder of the cifar10 classes, and its captions file."""
    import json

    import numpy as np
    from PIL import Image

    from realfake.core.classes import load_classes

    rng = np.random.default_rng(0)
    captions = []
    for c in load_classes("cifar10"):
        (root / c.id).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c.id / f"{i}.jpg")
            captions.append({"image": f"{c.id}/{i}.jpg", "caption": f"a {c.name} number {i}"})
    path = root.parent / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in captions))
    return root, path


def _rows(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_slurm_array_then_finish_equals_one_process(cluster, tiny_repo, triton, tmp_path):
    """The array in Real-Fake mode (the script's default: --real, --captions, --versions), task 1 told its time
    limit is near mid-shard (USR1, what --signal=B:USR1@300 sends): it requeues itself and resumes, so the
    afterok finishing job runs. Before, a time-limited task exited 143, stayed FAILED and finish never ran."""
    from realfake.client.generate import GenerateConfig, generate_dataset

    real, captions = _real_folder(tmp_path / "real")
    reference = tmp_path / "reference"
    generate_dataset(
        GenerateConfig(
            classes="cifar10",
            out=reference,
            real=real,
            captions=captions,
            versions=2,
            steps=4,
            batch_size=2,
            urls=[triton.url],
        ),  # fmt: skip
        log=lambda _m: None,
    )
    out = tmp_path / "out"
    env = {
        "RF_REPO": str(tiny_repo), "RF_OUT": str(out), "RF_REAL": str(real), "RF_CAPTIONS": str(captions),
        "RF_VERSIONS": "2", "RF_CLASSES": "cifar10", "RF_GENERATE_ARGS": "--steps 4 --batch-size 2",
        "RF_PROGRESS_EVERY": "0",
    }  # fmt: skip
    logs = tmp_path / "slurm-out"
    logs.mkdir()
    array = cluster.sbatch(
        "--array=0-1", *SMALL_NODE, f"--output={logs}/generate-%a.out", "--open-mode=append",
        str(SLURM / "generate.sbatch"), env=env,
    )  # fmt: skip
    finish = cluster.sbatch(
        f"--dependency=afterok:{array}",
        *SMALL_NODE,
        f"--output={logs}/finish.out",
        str(SLURM / "finish.sbatch"),
        env=env,
    )
    shard1 = out / "manifest.shard-1-of-2.jsonl"
    deadline = time.monotonic() + 300
    while _rows(shard1) < 4:
        assert time.monotonic() < deadline, [f.read_text() for f in logs.glob("*.out")]
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", f"{array}_1")
    states = cluster.wait(array, timeout=400)
    outputs = {f.name: f.read_text() for f in sorted(logs.glob("*.out"))}
    assert len(states) == 2 and all(s == ("COMPLETED", "0:0") for s in states.values()), (states, outputs)
    assert cluster.wait(finish, timeout=120)[finish] == ("COMPLETED", "0:0"), outputs
    outputs = {f.name: f.read_text() for f in sorted(logs.glob("*.out"))}
    task1 = outputs["generate-1.out"]
    assert "the time limit is near; requeueing task" in task1, task1
    assert task1.count("shard 1/2 on") == 2  # it ran again, and resumed (nothing made twice: checked below)
    restarts = re.search(r"Restarts=(\d+)", cluster.run("scontrol", "show", "job", f"{array}_1").stdout)
    assert restarts and int(restarts[1]) >= 1
    assert "generate: " in task1  # the plain progress lines of an unattended task's log
    assert "40 rows in" in outputs["finish.out"] and "2 shard manifests merged" in outputs["finish.out"]

    # one manifest after the merge; the images are those of the single-process run, byte for byte
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest.jsonl"]
    made = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.glob("*/*.png")}
    assert made == {p.relative_to(reference).as_posix(): p.read_bytes() for p in reference.glob("*/*.png")}
    assert len(made) == 40
    assert _rows(out / "manifest.jsonl") == 40  # every image once
    assert rf("rf-client", "verify", str(out)).returncode == 0
    # each task stopped its server: the address it served is free again and nothing answers there
    serve_logs = sorted(Path(f"{out}.logs").glob("serve-*.log"))
    assert not (out / "logs").exists()  # nothing in the dataset that ImageFolder would take for a class
    urls = [re.search(r"^Triton ready: HTTP ([^,]+),", log.read_text(), re.M)[1] for log in serve_logs]
    assert len(urls) >= 2
    for url in urls:
        host, port = url.rsplit(":", 1)
        assert port_is_free(int(port), host) and not server_ready(url, timeout=1.0), url


def test_the_array_refuses_real_fake_mode_without_its_inputs(tmp_path):
    """Real-Fake mode is the default: a task given no RF_REAL (and no RF_TEXT_ONLY=1) stops at once, saying so."""
    env = {**os.environ, "RF_REPO": "x", "RF_OUT": str(tmp_path / "o"), "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_ARRAY_TASK_COUNT": "1"}  # fmt: skip
    r = subprocess.run(["bash", str(SLURM / "generate.sbatch")], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "set RF_REAL to the real training ImageFolder" in r.stderr
    r = subprocess.run(["bash", str(SLURM / "generate.sbatch")], env={**env, "RF_REAL": str(tmp_path)},
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode != 0 and "set RF_CAPTIONS" in r.stderr
