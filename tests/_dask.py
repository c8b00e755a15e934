"""A real Dask cluster on 127.0.0.1 for the tests (issue 12): ``dask scheduler`` and ``postbox gpu-worker`` processes,
each its own process group, killed by PID as an operator (or a power cut) would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Site, read_job, wait_for

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A scheduler, named gpu-workers and a Postbox site whose config uses them (``engine.kind: dask``)."""

    def __init__(self, root: Path, *, max_attempts: int = 3, allowed_failures: int | None = None,
                 algorithms: list[dict[str, Any]] | None = None) -> None:
        self.site = Site(root)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        # The shipped scheduler unit sets allowed-failures >= max_attempts: the folders decide, not Dask's counter.
        self.allowed_failures = max_attempts if allowed_failures is None else allowed_failures
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.scheduler_args: list[str] = []  # TLS options, for a tls:// scheduler
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._logs = 0
        self.site.config["algorithms"] += algorithms or []
        self.site.write_config(worker={"max_attempts": max_attempts, "job_timeout": 60},
                               engine={"kind": "dask", "dask": {"scheduler": self.address, "refresh_seconds": 0.5,
                                                                 "grace": 5}})

    @property
    def env(self) -> dict[str, str]:
        return dict(self.site.env, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                                if p))

    def _log(self, name: str) -> Any:
        self._logs += 1
        return open(self.site.root / f"{name}-{self._logs}.log", "wb")

    def log_of(self, name: str) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.site.root.glob(f"{name}-*.log")))

    # -- processes --

    def start_scheduler(self) -> None:
        env = dict(self.env, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=str(self.allowed_failures))
        self.scheduler = subprocess.Popen(
            # `dask scheduler`, run by this very Python (a version manager's shim could pick another one).
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-dashboard",
             *self.scheduler_args],
            stdout=self._log("scheduler"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        wait_for(lambda: _listening(self.port) or self.scheduler.poll() is not None, 30,  # type: ignore[union-attr]
                 what="the scheduler to listen")
        assert self.scheduler.poll() is None, self.log_of("scheduler")[-2000:]

    def start_worker(self, name: str, env: dict[str, str] | None = None, *, wait: bool = True) -> None:
        argv = [sys.executable, "-m", "facade.cli", "gpu-worker", "--scheduler", self.address, "--config",
                str(self.site.config_path), "--resources", "GPU=1", "--nthreads", "2", "--name", name]
        self.workers[name] = subprocess.Popen(argv, stdout=self._log(name), stderr=subprocess.STDOUT,
                                              env={**self.env, **(env or {})}, cwd=ROOT, start_new_session=True)
        if wait:
            self.wait_warm(name)
            wait_for(lambda: name in self.worker_names(), 30, what=f"{name} on the scheduler")

    def wait_warm(self, name: str) -> None:
        """Wait until the worker's last start has warmed every Python algorithm (its log says so)."""
        algs = [a["name"] for a in self.site.config["algorithms"] if "function" in a]
        proc = self.workers[name]
        log = sorted(self.site.root.glob(f"{name}-*.log"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))[-1]
        wait_for(lambda: proc.poll() is not None or all(f"algorithm {a}: warm on {name}" in log.read_text()
                                                         for a in algs), 30, what=f"gpu-worker {name} to be warm")
        assert proc.poll() is None, log.read_text()[-3000:]

    def start(self, *workers: str) -> Cluster:
        self.start_scheduler()
        for name in workers:
            self.start_worker(name, wait=False)
        for name in workers:
            self.wait_warm(name)
        return self

    def kill_worker(self, name: str) -> None:
        """``kill -9`` of the worker's process group (the worker and its algorithm's child)."""
        proc = self.workers[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        os.killpg(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.wait(timeout=10)

    def worker_names(self) -> list[str]:
        return [w["name"] for w in self.status()]

    def status(self) -> list[dict[str, Any]]:
        out = self.site.cli("cluster", "status", "--json", timeout=60)
        return list(json.loads(out.stdout))

    def close(self) -> None:
        for proc in [*self.site.procs, *self.workers.values(), *([self.scheduler] if self.scheduler else [])]:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
            proc.wait(timeout=10)

    # -- jobs --

    def submit(self, algorithm: str, settings: dict[str, Any] | None = None, *, name: str = "ct.txt") -> str:
        src = self.site.root / "drops" / name
        src.parent.mkdir(exist_ok=True)
        src.write_text("a scan")
        args = ["submit", str(src), "--algorithm", algorithm]
        if settings:
            args += ["--settings", json.dumps(settings)]
        return self.site.cli(*args).stdout.strip()

    def finished(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until the job is in the outbox; its job.yaml."""
        job_dir = self.site.outbox / job_id
        wait_for(lambda: (job_dir / "job.yaml").is_file(), timeout, what=f"job {job_id} in the outbox")
        return read_job(job_dir)

    def evidence(self, name: str = "sleepy.log") -> list[dict[str, Any]]:
        path = self.site.evidence / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def running(self, job_id: str) -> bool:
        """Whether a job in the inbox has an attempt folder (its attempt has started)."""
        folder = self.site.inbox / job_id / "attempts"
        return folder.is_dir() and any(folder.iterdir())


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False

