"""A real Spark standalone cluster on loopback: a master and two workers, each
its own JVM (started with pyspark's bin/spark-class; 1 core, 1.5 GB each), and
the nightly job submitted to it through the real launcher (./spark-submit.sh:
the --py-files zip, spark.pyspark.python). Two runs (the first, full, and one
incremental night) per training backend: horovod (horovod.spark.run, one rank
per executor) and torch (TorchDistributor, local_mode=False). Checked: the
ledger, the checkpoints (verified against it), and that the two ranks ran in
different executor JVMs from the code Spark shipped, not a copy the machine
happens to have installed.

Anything the job assumes about one JVM (driver-local paths, module state, files
only the driver sees) fails here; the cluster is stopped by PID and its logs
are kept under build/test-logs/ when a test of this module fails.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REAL_DATA, ROOT, make_config
from deltarec.lake import open_lake
from deltarec.lake.ledger import Ledger
from deltarec.train.checkpoint import verify_checkpoint

WORKERS = 2
WORKER_MEMORY = "1536m"
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def _jvm_env() -> dict[str, str]:
    """The cluster JVMs' environment: no PYTHONPATH and no DELTAREC_ settings,
    so executors can only import deltarec from what the job ships (--py-files)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("DELTAREC")}
    env.update(SPARK_HOME=str(_spark_home()), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               SPARK_NO_DAEMONIZE="1")
    return env


@dataclass
class Standalone:
    url: str
    ui: str
    logs: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def state(self) -> dict:
        with urllib.request.urlopen(f"{self.ui}/json/", timeout=5) as r:
            return json.load(r)

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        # workers first (each stops its executors), then the master; by PID only
        for name in sorted(self.procs, key=lambda n: n == "master"):
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def _spark_class(cls: str, *args: str, log: Path) -> subprocess.Popen:
    # spark-class execs java: the Popen's pid is the JVM's
    with open(log, "wb") as out:
        return subprocess.Popen([str(_spark_home() / "bin" / "spark-class"), cls, *args], env=_jvm_env(),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("standalone")
    logs = base / "logs"
    logs.mkdir()
    port, ui_port = _free_port(), _free_port()
    c = Standalone(f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}", logs)
    failed_before = request.session.testsfailed
    try:
        c.procs["master"] = _spark_class("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                         "--port", str(port), "--webui-port", str(ui_port), log=logs / "master.log")
        for w in range(WORKERS):
            c.procs[f"worker{w}"] = _spark_class(
                "org.apache.spark.deploy.worker.Worker", c.url, "--host", "127.0.0.1", "--port", str(_free_port()),
                "--webui-port", str(_free_port()), "--cores", "1", "--memory", WORKER_MEMORY,
                "--work-dir", str(base / f"work{w}"), log=logs / f"worker{w}.log")
        deadline, alive = time.monotonic() + START_TIMEOUT_S, 0
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in c.procs.items() if p.poll() is not None}
            assert not dead, f"cluster JVMs exited: {dead}\n{c.log_tails()}"
            try:
                alive = c.state().get("aliveworkers", 0)
            except OSError:
                alive = 0
            if alive == WORKERS:
                break
            time.sleep(1)
        assert alive == WORKERS, f"{alive} of {WORKERS} workers registered in {START_TIMEOUT_S}s\n{c.log_tails()}"
        c.started_s = round(START_TIMEOUT_S - (deadline - time.monotonic()), 1)
        yield c
    finally:
        c.stop()
        if request.session.testsfailed > failed_before:
            kept = ROOT / "build" / "test-logs" / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.copytree(base, kept, ignore=shutil.ignore_patterns("*.jar", "*.zip"), dirs_exist_ok=True)
            print(f"\ncluster logs (master, workers, executors' stdout/stderr) kept in {kept}", file=sys.stderr)


# make_config's tiny settings as --set flags; two ranks, one per executor
TINY = ["lake.engine=delta-rs", "train.num_proc=2", "train.progress=false", "train.batch_size=256",
        "features.user_buckets=2048", "features.item_buckets=1024", "model.embedding_dim=8", "model.hidden=[16]",
        "spark.shuffle_partitions=2", "spark.driver_memory=1g", "demo.enabled=true", "demo.max_days=3",
        "demo.nights=1", f"demo.data_path={REAL_DATA}"]


def _submit(cluster: Standalone, lake_root: Path, backend: str) -> subprocess.CompletedProcess:
    args = ["./spark-submit.sh", "--master", cluster.url, "--executor-memory", "1g", "jobs/nightly.py"]
    for o in [f"lake.root={lake_root}", f"train.backend={backend}", *TINY]:
        args += ["--set", o]
    # the driver, like the executors, gets deltarec from the shipped zip only
    env = {k: v for k, v in _jvm_env().items() if k != "SPARK_NO_DAEMONIZE"}
    if "DELTAREC_VENV" in os.environ:
        env["DELTAREC_VENV"] = os.environ["DELTAREC_VENV"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    (cluster.logs / f"driver-{backend}.log").write_text(f"{done.stdout}\n--- stderr\n{done.stderr}")
    return done


@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_nights_on_a_standalone_cluster(cluster, tmp_path, backend):
    if not REAL_DATA.is_file():
        pytest.skip(f"real Online Retail data not found at {REAL_DATA}")
    lake_root = tmp_path / "lake"
    t = time.perf_counter()
    done = _submit(cluster, lake_root, backend)
    seconds = time.perf_counter() - t
    assert done.returncode == 0, (f"spark-submit exited {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
                                  f"stderr:\n{done.stderr[-6000:]}\n{cluster.log_tails()}")
    line = next((ln for ln in done.stderr.splitlines() if ln.startswith("+ ")), "")
    assert f"--master {cluster.url} " in line and "/build/deltarec.zip " in line, line

    lake = open_lake(make_config(lake_root).lake)
    ledger = Ledger(lake)
    runs = ledger.runs("ranking")
    assert [(r.source_first, r.source_last) for r in runs] == [(0, 1), (2, 2)]
    assert ledger.watermark("ranking") == lake.version("behavior_events") == 2
    assert runs[1].parent_run_id == runs[0].run_id and runs[1].strategy == "incremental"
    # each night's examples: Parquet parts the executors wrote, committed by the driver in one transaction
    written = [m for _, m in lake.commit_metadata("training_examples")]
    assert [(m["run_id"], m["writer"]) for m in written] == [(r.run_id, "executors") for r in runs], written
    for r in runs:
        verify_checkpoint(r.checkpoint_path, r.checkpoint_sha256)  # written by rank 0 on an executor
        train = r.metrics["train"]
        assert train["backend"] == backend and train["world_size"] == 2
        ranks = train["ranks"]
        assert sorted(x["rank"] for x in ranks) == [0, 1]
        executors = {x["executor_id"] for x in ranks}
        jvms = {x["executor_pid"] for x in ranks}
        # two executor JVMs (not the driver's, not one executor twice), none of them the cluster's daemons
        assert len(executors) == 2 and None not in executors and "driver" not in executors, ranks
        assert len(jvms) == 2 and not jvms & {p.pid for p in cluster.procs.values()}, ranks
        assert all(x["examples"] > 0 for x in ranks), ranks
        # each rank imported deltarec from the zip Spark shipped to its executor
        for x in ranks:
            assert "deltarec.zip" in x["code"] and not x["code"].startswith(str(ROOT / "lib")), x
    print(f"\n{backend}: two runs on the standalone cluster in {seconds:.1f}s "
          f"(cluster up in {cluster.started_s}s); ranks {[(x['rank'], x['executor_id']) for x in ranks]}",
          file=sys.stderr)
