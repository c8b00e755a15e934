"""Scale-out on Dask (issue 12): real ``dask scheduler`` and ``postbox gpu-worker`` processes on 127.0.0.1, stopped
by PID; the folders stay the truth (one attempt folder per attempt, counted from the disk)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import SimpleITK as sitk
from _dask import ROOT, Cluster
from _dicomtools import dice
from _disk import Disk, tmpfs
from conftest import read_job, wait_for

from pipeline import crashpoints, phantom
from pipeline.bodylungs import segment
from pipeline.dataobject import DataObject

ALGORITHMS = [
    {"name": "sleepy", "function": "testalgos:sleepy", "default_settings": {"seconds": 0.3}},
    {"name": "timeboxed", "function": "testalgos:slow", "default_settings": {"seconds": 30}, "timeout": 1.5},
    {"name": "body-lungs", "function": "pipeline.bodylungs:segment", "outputs": ["rtstruct", "seg"],
     "default_settings": {"body_name": "body"}},
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One scheduler and two gpu-workers for the module; each test starts its own Postbox service."""
    c = Cluster(tmp_path_factory.mktemp("cluster"), algorithms=ALGORITHMS)
    try:
        yield c.start("w1", "w2")
    finally:
        c.close()


@pytest.fixture
def service(cluster: Cluster) -> Iterator[subprocess.Popen[bytes]]:
    proc = cluster.site.start()
    yield proc
    cluster.site.stop(proc)
    cluster.site.procs.remove(proc)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of the test's own, for tests that kill parts of it."""
    c = Cluster(tmp_path, max_attempts=2,
                algorithms=[*ALGORITHMS[:1], {"name": "killer", "function": "testalgos:kills_its_worker"}])
    try:
        yield c
    finally:
        c.close()


def test_the_phantom_runs_on_a_gpu_node_with_the_same_dice_as_local(cluster: Cluster, service: object,
                                                                    tmp_path: Path) -> None:
    grid = phantom.patient_position_grid("FFS", slices=24, size=96)  # not the easy axial HFS case
    series = tmp_path / "ct-series"
    phantom.write_dicom(series, grid)
    _, truth = phantom.sample(grid)
    job_id = cluster.site.cli("submit", str(series), "--algorithm", "body-lungs").stdout.strip()
    job = cluster.finished(job_id, timeout=120)
    assert job["status"] == "done", job["error"]
    job_dir = cluster.site.outbox / job_id
    [attempt] = sorted(p.name for p in (job_dir / "attempts").iterdir())
    assert attempt.startswith("01-w"), attempt  # it ran on a GPU node, not in the service
    # The same algorithm run here, as the local engine's child does, on the same input.
    local = tmp_path / "local"
    local.mkdir()
    outputs = segment([DataObject(type="DICOM", path=str(job_dir / job["inputs"][0]["path"]))], str(local),
                      {"body_name": "body"})
    by_name = {Path(o.path).name: Path(o.path) for o in outputs}
    for name in ("body", "lung_left", "lung_right"):
        remote = sitk.GetArrayFromImage(sitk.ReadImage(str(job_dir / "output" / f"{name}.nii.gz"))) > 0
        here = sitk.GetArrayFromImage(sitk.ReadImage(str(by_name[f"{name}.nii.gz"]))) > 0
        assert dice(remote, truth[name]) == pytest.approx(dice(here, truth[name]), abs=1e-12), name
        assert dice(remote, truth[name]) > 0.9, name
    kinds = {o["meta_data"].get("modality") or Path(o["path"]).suffix for o in job["outputs"]}
    assert len(job["outputs"]) >= 5, kinds  # three masks, and the RTSTRUCT and SEG written by the service


def test_never_two_jobs_on_a_worker_nor_more_than_slots_and_no_model_load(cluster: Cluster, service: object) -> None:
    before = {json.dumps(e) for e in cluster.evidence()}
    ids = [cluster.submit("sleepy", {"seconds": 0.4}, name=f"s{i}.txt") for i in range(6)]
    jobs = [cluster.finished(j) for j in ids]
    assert all(j["status"] == "done" for j in jobs), [j["error"] for j in jobs]
    runs = [e for e in cluster.evidence() if json.dumps(e) not in before]
    assert sorted(r["job"] for r in runs) == sorted(ids)  # each ran once
    by_worker: dict[int, list[dict[str, float]]] = {}
    for r in runs:
        by_worker.setdefault(r["worker"], []).append(r)
    assert len(by_worker) == 2, "both workers took jobs"
    for worker_runs in by_worker.values():
        worker_runs.sort(key=lambda r: r["start"])
        for a, b in zip(worker_runs, worker_runs[1:], strict=False):
            assert b["start"] >= a["end"], "two jobs at once on one worker"
        assert len({r["pid"] for r in worker_runs}) == 1, "a worker keeps one warm child"
    edges = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    assert peak <= 2, "more in flight than the cluster's 2 slots"
    # Warmed at the worker's start: no job pays the module's import, the first included.
    assert all(j["timings"]["load_seconds"] < 0.05 for j in jobs), [j["timings"]["load_seconds"] for j in jobs]
    imports = (cluster.site.evidence / "imports.log").read_text().split()
    assert all(imports.count(str(r["pid"])) == 1 for r in runs)


def test_the_gpu_takes_the_next_job_while_the_service_writes_the_last_ones_dicom(tmp_path: Path) -> None:
    # One worker, and a SEG that takes 3 s to write on the service: the worker is not held meanwhile.
    (tmp_path / "site").mkdir()
    c = Cluster(tmp_path / "site", algorithms=ALGORITHMS[2:3])
    try:
        c.start("w1")
        c.site.start(env={**c.site.env, "POSTBOX_DELAY_AT": "seg=3"})
        ids = []
        for i in range(2):
            series = tmp_path / f"ct-{i}"
            phantom.write_dicom(series, phantom.axial_grid(slices=16, size=64))
            ids.append(c.site.cli("submit", str(series), "--algorithm", "body-lungs").stdout.strip())
        first, second = sorted((c.finished(j, timeout=90) for j in ids), key=lambda m: m["timings"]["claimed"])
        assert first["status"] == second["status"] == "done", (first["error"], second["error"])
        assert second["timings"]["algorithm_started"] < first["timings"]["finished"] - 1.0
    finally:
        c.close()


def test_a_remote_timeout_fails_only_its_job(cluster: Cluster, service: object) -> None:
    slow = cluster.submit("timeboxed", name="slow.txt")
    quick = cluster.submit("sleepy", {"seconds": 0.1}, name="quick.txt")
    job = cluster.finished(slow, timeout=30)
    assert job["status"] == "failed"
    assert "timed out after 1.5 s" in job["error"], job["error"]
    assert cluster.finished(quick)["status"] == "done"
    assert sorted(cluster.worker_names()) == ["w1", "w2"]  # the node killed only the child
    again = cluster.submit("sleepy", {"seconds": 0.1}, name="after.txt")
    assert cluster.finished(again)["status"] == "done"


def test_cluster_status_lists_workers_and_drain_waits_for_the_running_job(cluster: Cluster, service: object) -> None:
    rows = cluster.status()
    assert sorted((r["name"], r["slots"], r["drained"]) for r in rows) == [("w1", 1, False), ("w2", 1, False)]
    assert all(r["resources"] == {"GPU": 1.0} for r in rows)
    job = cluster.submit("sleepy", {"seconds": 2.0}, name="long.txt")
    busy = wait_for(lambda: [r for r in cluster.status() if job in r["running"]], 30, what="the job on a worker")
    node = busy[0]["name"]
    drain = subprocess.Popen([*cluster.site.cli_argv(), "cluster", "drain", node], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=cluster.site.env)
    try:
        out, err = drain.communicate(timeout=60)
    finally:
        if drain.poll() is None:
            drain.kill()
    assert drain.returncode == 0, err
    assert (cluster.site.outbox / job / "job.yaml").is_file(), "drain returned before the running job ended"
    assert f"{node} is drained and idle" in out
    try:
        rows = {r["name"]: r for r in cluster.status()}
        assert rows[node]["drained"] and not rows[node]["running"]
        text = cluster.site.cli("cluster", "status").stdout
        assert node in text and "yes" in text
        ids = [cluster.submit("sleepy", {"seconds": 0.1}, name=f"d{i}.txt") for i in range(3)]
        for j in ids:
            assert cluster.finished(j)["status"] == "done"
            [attempt] = list((cluster.site.outbox / j / "attempts").iterdir())
            assert f"-{node}-" not in attempt.name, "a job went to the drained node"
    finally:
        cluster.site.cli("cluster", "resume", node)
    assert not {r["name"]: r for r in cluster.status()}[node]["drained"]


def test_sigterm_of_the_service_kills_the_remote_child_and_the_attempt_does_not_count(cluster: Cluster) -> None:
    proc = cluster.site.start()
    try:
        job = cluster.submit("sleepy", {"seconds": 20}, name="stopped.txt")
        wait_for(lambda: [r for r in cluster.status() if job in r["running"]], 30, what="the job on a worker")
        assert cluster.site.stop(proc) == 0
    finally:
        cluster.site.procs.remove(proc)
    manifest = read_job(cluster.site.inbox / job)
    assert manifest["status"] == "pending" and manifest["attempts"] == 0, manifest
    [attempt] = list((cluster.site.inbox / job / "attempts").iterdir())
    assert (attempt / "interrupted").exists()
    wait_for(lambda: not any(r["running"] for r in cluster.status()), 10, what="the remote child to be killed")
    assert not [e for e in cluster.evidence() if e["job"] == job], "the algorithm ran to its end after the stop"
    proc = cluster.site.start()
    try:
        wait_for(lambda: [r for r in cluster.status() if job in r["running"]], 30, what="the job to run again")
    finally:
        cluster.site.stop(proc)
        cluster.site.procs.remove(proc)
    assert read_job(cluster.site.inbox / job)["status"] == "pending"
    shutil.rmtree(cluster.site.inbox / job)  # its 20 s are not for the next tests' services


def test_a_service_killed_after_promoting_an_attempt_runs_the_job_again_once(cluster: Cluster) -> None:
    proc = cluster.site.start(env={**cluster.site.env, crashpoints.ENV: "attempt.promoted"})
    job = cluster.submit("sleepy", {"seconds": 0.1}, name="promoted.txt")
    try:
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        cluster.site.procs.remove(proc)
    assert (cluster.site.inbox / job / "work" / "mask.txt").is_file()  # promoted, not finished
    proc = cluster.site.start()
    try:
        manifest = cluster.finished(job)
    finally:
        cluster.site.stop(proc)
        cluster.site.procs.remove(proc)
    assert manifest["status"] == "done", manifest["error"]
    first, second = sorted((cluster.site.outbox / job / "attempts").iterdir())
    assert manifest["attempts"] == 2 and not (first / "interrupted").exists()
    assert (cluster.site.outbox / job / "output" / "mask.txt").read_text() == f"{job} {second.name}"


def test_a_killed_service_is_restarted_and_the_stale_attempt_finishes_only_in_its_folder(cluster: Cluster) -> None:
    proc = cluster.site.start()
    job = cluster.submit("sleepy", {"seconds": 3.0}, name="stale.txt")
    wait_for(lambda: [r for r in cluster.status() if job in r["running"]], 30, what="the job on a worker")
    cluster.site.stop(proc, signal.SIGKILL)
    cluster.site.procs.remove(proc)
    proc = cluster.site.start()
    try:
        manifest = cluster.finished(job)
    finally:
        cluster.site.stop(proc)
        cluster.site.procs.remove(proc)
    assert manifest["status"] == "done", manifest["error"]
    folders = sorted((cluster.site.outbox / job / "attempts").iterdir())
    assert len(folders) == 2 and (folders[0] / "interrupted").exists(), [p.name for p in folders]
    assert manifest["attempts"] == 1  # the stale one was stopped by the new service before its own started
    assert (cluster.site.outbox / job / "output" / "mask.txt").read_text().endswith(folders[1].name)


def test_kill_9_of_a_worker_mid_job_completes_once_elsewhere_with_two_attempts(fresh: Cluster) -> None:
    fresh.start("w1", "w2")
    fresh.site.start()
    job = fresh.submit("sleepy", {"seconds": 3.0}, name="victim.txt")
    busy = wait_for(lambda: [r for r in fresh.status() if job in r["running"]], 30, what="the job on a worker")
    victim = busy[0]["name"]
    fresh.kill_worker(victim)
    manifest = fresh.finished(job)
    assert manifest["status"] == "done", manifest["error"]
    assert manifest["attempts"] == 2
    folders = sorted(p.name for p in (fresh.site.outbox / job / "attempts").iterdir())
    assert [f.split("-")[1] for f in folders] == [victim, "w2" if victim == "w1" else "w1"], folders
    assert (fresh.site.outbox / job / "output" / "mask.txt").read_text() == f"{job} {folders[1]}"
    assert [e["attempt"] for e in fresh.evidence() if e["job"] == job] == [folders[1]], "finished more than once"
    assert any("did not finish" in w for w in manifest["warnings"]), manifest["warnings"]


def test_kill_9_of_the_scheduler_mid_job_then_a_restart_completes_every_job_once(fresh: Cluster) -> None:
    fresh.start("w1", "w2")
    service = fresh.site.start()
    ids = [fresh.submit("sleepy", {"seconds": 2.0}, name=f"j{i}.txt") for i in range(3)]
    wait_for(lambda: sum(bool(fresh.running(j)) for j in ids) == 2, 30, what="two jobs running")
    fresh.kill_scheduler()
    # The workers close when they lose their scheduler (exit 0); systemd would start all three again.
    for name in ("w1", "w2"):
        assert fresh.workers[name].wait(timeout=30) == 0, fresh.log_of(name)[-2000:]
    health = f"http://127.0.0.1:{fresh.site.doors(service)['http']['port']}/api/health"
    down = wait_for(lambda: (lambda h: h if h["status"] == "degraded" else None)(requests.get(health, timeout=5)
                                                                                  .json()), 10, what="degraded")
    [problem] = down["problems"]
    assert problem.startswith("dask scheduler out of reach: jobs wait"), down
    fresh.start_scheduler()
    fresh.start_worker("w1", wait=False)
    fresh.start_worker("w2", wait=False)
    manifests = [fresh.finished(j, timeout=90) for j in ids]
    assert requests.get(health, timeout=5).json()["status"] == "ok"
    assert [m["status"] for m in manifests] == ["done"] * 3, [m["error"] for m in manifests]
    done = [e["job"] for e in fresh.evidence()]
    assert sorted(done) == sorted(ids), "a job finished more than once, or not at all"
    assert all(m["attempts"] == 1 for m in manifests), [m["attempts"] for m in manifests]


@pytest.mark.parametrize("allowed_failures", [2, 1], ids=["folders-decide", "dask-gives-up-first"])
def test_an_algorithm_that_kills_its_worker_fails_after_max_attempts(fresh: Cluster, allowed_failures: int) -> None:
    # allowed-failures >= max_attempts (as shipped): the third run finds two attempt folders and refuses; below
    # it, Dask's KilledWorker comes first and reads the same.
    fresh.allowed_failures = allowed_failures
    fresh.start("w1", "w2")
    fresh.site.start()
    job = fresh.submit("killer", name="killer.txt")
    # systemd's Restart=always brings each killed worker back; the attempts are counted from the folders.
    def supervise() -> bool:
        for name, proc in list(fresh.workers.items()):
            if proc.poll() is not None:
                fresh.start_worker(name, wait=False)
        return (fresh.site.outbox / job / "job.yaml").is_file()

    wait_for(supervise, 60, what="the job to end")
    manifest = fresh.finished(job, timeout=60)
    assert manifest["status"] == "failed"
    assert manifest["error"].startswith("failed after 2 attempt(s)"), manifest["error"]
    assert manifest["attempts"] == 2
    assert len(list((fresh.site.outbox / job / "attempts").iterdir())) == 2


@pytest.mark.parametrize("point", ["remote.before_child", "remote.outputs_written", "remote.before_return"])
def test_a_gpu_node_killed_at_each_crash_point_reruns_the_attempt_once(fresh: Cluster, point: str) -> None:
    fresh.start_scheduler()
    fresh.start_worker("crashing", env={crashpoints.ENV: point})
    fresh.site.start()
    job = fresh.submit("sleepy", {"seconds": 0.2}, name="crash.txt")
    assert fresh.workers["crashing"].wait(timeout=30) == -signal.SIGKILL
    assert read_job(fresh.site.inbox / job)["status"] == "running"  # the service holds it and waits
    fresh.start_worker("sound")
    manifest = fresh.finished(job)
    assert manifest["status"] == "done", manifest["error"]
    assert manifest["attempts"] == 2
    first, second = sorted((fresh.site.outbox / job / "attempts").iterdir())
    assert "-crashing-" in first.name and "-sound-" in second.name
    assert (fresh.site.outbox / job / "output" / "mask.txt").read_text() == f"{job} {second.name}"
    assert sorted(p.name for p in (fresh.site.outbox / job / "output").iterdir()) == ["mask.txt"]


@pytest.mark.parametrize(("engine", "message"), [
    ({"kind": "dask", "dask": {"scheduler": "tcp://10.1.2.3:8786"}}, "needs tls://"),
    ({"kind": "dask"}, "needs the scheduler's address"),
    ({"kind": "cloud"}, "must be local or dask"),
    ({"kind": "dask", "dask": {"scheduler": "tcp://127.0.0.1:8786", "slots": 0}}, "must be auto or a whole number"),
    ({"kind": "dask", "dask": {"scheduler": "tcp://127.0.0.1:8786", "transfer": "engine"}}, "must be shared"),
    ({"kind": "dask", "dask": {"scheduler": "tls://10.1.2.3:8786"}}, "needs tls with ca, cert and key"),
    ({"kind": "dask", "dask": {"scheduler": "tcp://127.0.0.1:8786", "resources": {"GPU": 0}}}, "positive number"),
])
def test_config_errors_exit_2(tmp_path: Path, engine: dict[str, object], message: str) -> None:
    shutil.copy(ROOT / "tests" / "algos" / "testalgos.py", tmp_path / "testalgos.py")
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"engine": engine, "default_algorithm": "noop", "dicom": {"enabled": False},
                                  "algorithms": [{"name": "noop", "function": "testalgos:noop"}]}))
    for argv in (["manage", "run"], ["gpu-worker", "--scheduler", "tcp://127.0.0.1:1"], ["cluster", "status"]):
        proc = subprocess.run([sys.executable, "-m", "facade.cli", "--config", str(config), *argv],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert message in proc.stderr, (argv, proc.stderr)


def test_gpu_worker_refuses_a_plain_scheduler_off_this_machine(tmp_path: Path) -> None:
    shutil.copy(ROOT / "tests" / "algos" / "testalgos.py", tmp_path / "testalgos.py")
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"default_algorithm": "noop", "dicom": {"enabled": False},
                                  "algorithms": [{"name": "noop", "function": "testalgos:noop"}]}))
    for argv, message in ((["--scheduler", "tcp://10.1.2.3:8786", "--config", str(config)], "needs tls://"),
                          (["--scheduler", "tcp://127.0.0.1:1"], "needs the Postbox config.yaml"),
                          (["--scheduler", "tcp://127.0.0.1:1", "--config", str(config), "--resources", "GPU"],
                           "must look like NAME=N")):
        proc = subprocess.run([sys.executable, "-m", "facade.cli", "gpu-worker", *argv], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert message in proc.stderr, (argv, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "facade.cli", "--config", str(config), "cluster", "status"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "is local: there is no cluster" in proc.stderr, proc.stderr


def test_a_tls_cluster_runs_jobs_and_refuses_a_client_of_another_ca(tmp_path: Path, certs: Path,
                                                                     other_certs: Path) -> None:
    c = Cluster(tmp_path, algorithms=ALGORITHMS[:1])
    c.address = f"tls://127.0.0.1:{c.port}"
    tls = {"ca": str(certs / "ca.pem"), "cert": str(certs / "node.pem"), "key": str(certs / "node-key.pem")}
    c.site.write_config(engine={"kind": "dask", "dask": {"scheduler": c.address, "tls": tls,
                                                         "refresh_seconds": 0.5}})
    c.scheduler_args = ["--protocol", "tls", "--tls-ca-file", tls["ca"], "--tls-cert", tls["cert"],
                        "--tls-key", tls["key"]]
    try:
        c.start("w1")
        c.site.start()
        job = c.submit("sleepy", {"seconds": 0.1})
        manifest = c.finished(job)
        assert manifest["status"] == "done", manifest["error"]
        assert [r["name"] for r in c.status()] == ["w1"]
        # A client whose certificate another CA signed is refused by the scheduler.
        c.site.write_config(engine={"kind": "dask", "dask": {
            "scheduler": c.address, "tls": {"ca": str(other_certs / "ca.pem"), "cert": str(other_certs / "node.pem"),
                                            "key": str(other_certs / "node-key.pem")}}})
        out = c.site.cli("cluster", "status", check=False, timeout=120)
        assert out.returncode == 1, out.stdout
        assert "w1" not in out.stdout
    finally:
        c.close()


def test_a_hung_gpu_node_fails_its_job_at_the_services_own_deadline(fresh: Cluster) -> None:
    # SIGSTOP of a node's whole process group: it neither answers nor kills its child, nor does Dask notice (its
    # worker-ttl is minutes). The service's own deadline, job_timeout + engine.dask.grace, ends the job.
    fresh.site.write_config(worker={"job_timeout": 2}, engine={"dask": {**fresh.site.config["engine"]["dask"],
                                                                        "grace": 1}})
    fresh.start("w1")
    fresh.site.start()
    job = fresh.submit("sleepy", {"seconds": 30}, name="hung.txt")
    wait_for(lambda: fresh.running(job), 30, what="the attempt to start")
    os.killpg(fresh.workers["w1"].pid, signal.SIGSTOP)
    try:
        manifest = fresh.finished(job, timeout=30)
        # The operator's view does not hang on it either: the node is listed, its jobs unknown.
        [row] = fresh.status()
        assert row["name"] == "w1" and row["answered"] is False
    finally:
        os.killpg(fresh.workers["w1"].pid, signal.SIGCONT)
    assert manifest["status"] == "failed"
    assert manifest["error"].startswith("timed out after 2 s (worker.job_timeout, plus engine.dask.grace"), \
        manifest["error"]


def test_a_full_disk_met_on_a_gpu_node_gives_the_job_back_uncounted(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        c = _cluster_on(disk, tmp_path / "site")
        try:
            c.start("w1")
            proc = c.site.start()
            port = c.site.doors(proc)["http"]["port"]
            disk.fill(keep=2 << 20)
            job = c.submit("fill", {"mb": 8}, name="big.txt")
            wait_for(lambda: any(p.startswith("disk full") for p in requests.get(
                f"http://127.0.0.1:{port}/api/health", timeout=5).json()["problems"]), 30, what="disk full")
            manifest = wait_for(lambda: (lambda m: m if m["status"] == "pending" else None)(
                read_job(c.site.inbox / job)), 30, what="the job given back")
            assert manifest["attempts"] == 0
            assert all((p / "interrupted").exists() for p in (c.site.inbox / job / "attempts").iterdir())
            disk.empty()
            manifest = c.finished(job)
            assert manifest["status"] == "done" and manifest["attempts"] == 1, manifest
            assert (c.site.outbox / job / "output" / "ballast.bin").stat().st_size == 8 << 20
        finally:
            c.close()


def _cluster_on(disk: Disk, root: Path) -> Cluster:
    """A cluster whose job folders and index are on ``disk`` (the service's log and evidence are not)."""
    root.mkdir()
    c = Cluster(root, algorithms=[{"name": "fill", "function": "testalgos:fill", "default_settings": {"mb": 1}}])
    c.site.inbox, c.site.outbox = disk.root / "inbox", disk.root / "outbox"
    c.site.inbox.mkdir()
    c.site.outbox.mkdir()
    c.site.write_config(inbox=str(c.site.inbox), outbox=str(c.site.outbox), database=str(disk.root / "db.json"),
                        worker={"disk_full_backoff_max": 0.5, "stop_timeout": 5})
    return c
