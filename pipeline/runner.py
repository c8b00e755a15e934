"""Run one job's algorithm in a child process with a timeout (rq's work horse), warm or cold.

A Python algorithm runs in ``python -m pipeline._child``, which may stay alive between jobs
(``worker.keep_warm``) so a model loads once; a command-line algorithm runs as its own process group.
Whatever goes wrong in the child (exception, timeout, crash) becomes an AlgorithmFailed for its job only.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .checks import looks_like_dicom
from .config import AlgorithmConfig
from .dataobject import DataObject
from .errors import AlgorithmFailed, DiskFull, PostboxError
from .health import free_bytes, is_disk_full_errno

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
# A command that fails while its filesystem has less than this free most likely failed for want of space.
_NEARLY_FULL = 1 << 20


class PoolClosed(PostboxError):
    """The pool is closed: the worker is stopping, so a job is given back rather than started."""


def describe_exit(returncode: int | None) -> str:
    """How a process ended, in words (rq records how its work horse died)."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit code {returncode}"


class Child:
    """One ``pipeline._child`` process serving jobs of one algorithm."""

    def __init__(self, alg: AlgorithmConfig) -> None:
        self.alg = alg
        self.jobs = 0
        env = dict(os.environ, POSTBOX_PARENT_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
        package_root = _PACKAGE_ROOT
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline._child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            close_fds=True,
            # Not the service's own folder: a pipeline.py there would shadow the package in the child.
            cwd=package_root,
        )
        self._buffer = b""
        log.debug("algorithm %s: child %d started", alg.name, self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, job_id: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one job and wait for its reply; AlgorithmFailed on timeout or death."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.jobs += 1
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            raise AlgorithmFailed(job_id, f"algorithm process died ({describe_exit(self.proc.poll())})") from None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.kill()
                    raise AlgorithmFailed(job_id, f"timed out after {timeout:g} s (worker.job_timeout); "
                                                  "its process was killed")
                try:
                    if not sel.select(remaining):
                        continue
                    chunk = os.read(fd, 65536)
                except OSError as exc:
                    self.kill()
                    raise AlgorithmFailed(job_id, "lost the algorithm process's reply channel "
                                                  f"({exc.strerror or type(exc).__name__})") from None
                if not chunk:
                    self.proc.wait()
                    raise AlgorithmFailed(job_id, f"algorithm process died ({describe_exit(self.proc.returncode)})")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self.kill()
            raise AlgorithmFailed(job_id, "the algorithm process answered garbage on its reply channel: "
                                          f"{line[:80]!r}") from None

    def signal_kill(self) -> None:
        """SIGKILL the process only: its job's thread, reading its pipe, sees it die and cleans up.

        Closing the pipes from another thread would pull the file descriptor from under that read (EBADF, or
        worse, a number already reused), and the job would fail instead of being given back.
        """
        if self.proc.poll() is None:
            self.proc.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def close(self) -> None:
        """Let the child end by closing its stdin; kill it if it does not."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class ChildPool:
    """Idle warm children per algorithm; a busy child belongs to the job running in it."""

    def __init__(self, *, keep_warm: bool, max_jobs_per_child: int) -> None:
        self.keep_warm = keep_warm
        self.max_jobs_per_child = max_jobs_per_child
        self._idle: dict[str, list[Child]] = {}
        self._busy: set[Child] = set()
        self._lock = threading.Lock()
        self._closed = False

    def take(self, alg: AlgorithmConfig) -> Child:
        with self._lock:
            if self._closed:
                raise PoolClosed("the worker is stopping")
            idle = self._idle.get(alg.name, [])
            while idle:
                child = idle.pop()
                if child.alive() and child.alg == alg:
                    self._busy.add(child)
                    return child
                child.kill()
            child = Child(alg)
            self._busy.add(child)
            return child

    def give_back(self, child: Child) -> None:
        with self._lock:
            self._busy.discard(child)
            keep = (self.keep_warm and not self._closed and child.alive()
                    and child.jobs < self.max_jobs_per_child)
            if keep:
                self._idle.setdefault(child.alg.name, []).append(child)
                return
        child.close()

    def discard(self, child: Child) -> None:
        with self._lock:
            self._busy.discard(child)
        child.kill()

    def close(self) -> None:
        """Stop every child, busy ones included (their jobs are given back by the worker)."""
        with self._lock:
            self._closed = True
            idle = [c for children in self._idle.values() for c in children]
            busy = list(self._busy)
            self._idle.clear()
        for child in idle:
            child.kill()
        for child in busy:
            child.signal_kill()  # its job's thread discards it (run_python), closing its pipes there


def run_python(pool: ChildPool, alg: AlgorithmConfig, job_id: str, inputs: list[DataObject], working_dir: Path,
               settings: dict[str, Any], log_path: Path, timeout: float) -> tuple[list[DataObject], dict[str, float]]:
    """Run a Python algorithm in a (possibly warm) child; returns outputs and timings."""
    request = {
        "module": alg.module, "attr": alg.attr, "search_path": alg.search_path,
        "data_objects": [{"type": d.type, "path": d.path, "meta_data": d.meta_data, "id": d.id} for d in inputs],
        "working_dir": str(working_dir), "settings": settings, "log_path": str(log_path),
    }
    child = pool.take(alg)
    try:
        reply = child.run(job_id, request, timeout)
    except BaseException:
        pool.discard(child)
        raise
    pool.give_back(child)
    if not reply.get("ok"):
        if is_disk_full_errno(reply.get("errno")):
            # The algorithm's own write met a full disk: the job waits for space, its attempt not counted.
            raise DiskFull(f"the algorithm of job {job_id}: {reply.get('error')}")
        raise AlgorithmFailed(job_id, reply.get("error", "the algorithm failed"))
    by_id = {d.id: d for d in inputs}
    outputs = [DataObject(type=o["type"], path=o["path"], meta_data=o.get("meta_data") or {}, id=o.get("id"),
                          parent=by_id.get(o.get("parent"))) for o in reply["outputs"]]
    timings = {"algorithm_started": reply["started"], "algorithm_ended": reply["ended"],
               "load_seconds": reply["load_seconds"]}
    return outputs, timings


def run_command(alg: AlgorithmConfig, job_id: str, input_dir: Path, working_dir: Path, settings: dict[str, Any],
                log_path: Path, timeout: float,
                stop: threading.Event | None = None) -> tuple[list[DataObject], dict[str, float]]:
    """Run a command-line algorithm; every entry it writes to ``{output}`` becomes an output."""
    out_dir = working_dir / "output"
    out_dir.mkdir(exist_ok=True)
    settings_file = working_dir / "settings.json"
    settings_file.write_text(json.dumps(settings), encoding="utf-8")
    values = {"input": str(input_dir), "output": str(out_dir), "settings": str(settings_file),
              "working_dir": str(working_dir), "job_id": job_id}
    try:
        argv = [arg.format(**values) for arg in alg.command or ()]
    except (KeyError, IndexError, ValueError) as exc:
        raise AlgorithmFailed(job_id, f"command has an unknown placeholder {exc} "
                                      f"(known: {', '.join('{' + k + '}' for k in values)})") from None
    with open(log_path, "ab") as logfh:
        logfh.write(f"$ {shlex.join(argv)}\n".encode())
        logfh.flush()
        started = time.time()
        exe = argv[0]
        if not ((working_dir / exe).is_file() if os.sep in exe else shutil.which(exe)):
            raise AlgorithmFailed(job_id, f"command {exe!r} cannot start: not found")
        env = dict(os.environ, POSTBOX_PARENT_PID=str(os.getpid()))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            # Through the _exec shim, so the command dies with this worker (a SIGKILL included).
            proc = subprocess.Popen([sys.executable, "-m", "pipeline._exec", *argv], stdin=subprocess.DEVNULL,
                                    stdout=logfh, stderr=subprocess.STDOUT, cwd=working_dir, env=env,
                                    start_new_session=True)
        except OSError as exc:
            raise AlgorithmFailed(job_id, f"command {argv[0]!r} cannot start: {exc.strerror}") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                proc.wait(timeout=0.05 if stop is not None else max(0.0, deadline - time.monotonic()))
                break
            except subprocess.TimeoutExpired:
                if (stop is not None and stop.is_set()) or time.monotonic() >= deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    if stop is not None and stop.is_set():
                        raise AlgorithmFailed(job_id, "interrupted: the worker is stopping") from None
                    raise AlgorithmFailed(job_id, f"timed out after {timeout:g} s; its process group was killed") \
                        from None
    ended = time.time()
    if proc.returncode != 0:
        if free_bytes(working_dir) < _NEARLY_FULL:
            raise DiskFull(f"the command of job {job_id} failed ({describe_exit(proc.returncode)}) "
                           "with its filesystem full")
        raise AlgorithmFailed(job_id, f"command {argv[0]!r} failed ({describe_exit(proc.returncode)})")
    outputs = [DataObject(type="DICOM" if looks_like_dicom(p) else "FILE", path=str(p))
               for p in sorted(out_dir.iterdir()) if not p.name.startswith(".")]
    return outputs, {"algorithm_started": started, "algorithm_ended": ended, "load_seconds": 0.0}

