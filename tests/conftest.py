"""Shared fixtures: a Postbox in a temp folder, run as a real process; polls with deadlines, no sleeps."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.service import ReadyFile

HERE = Path(__file__).resolve().parent
ALGOS = HERE / "algos" / "testalgos.py"


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        threading.Event().wait(interval)  # a poll interval, not synchronisation


def read_job(job_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((job_dir / "job.yaml").read_text())


def outbox_jobs(outbox: Path) -> list[Path]:
    return sorted(p for p in outbox.iterdir() if (p / "job.yaml").is_file())


class Site:
    """A Postbox installation in a temp folder: config.yaml, the test algorithms, inbox, outbox."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.evidence = root / "evidence"
        self.evidence.mkdir()
        self.inbox.mkdir()
        self.outbox.mkdir()
        self.config_path = root / "config.yaml"
        shutil.copy(ALGOS, root / "testalgos.py")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = 0  # the DICOM node's port, once a service with the node has started
        self.config: dict[str, Any] = {
            "worker": {"settle_seconds": 0.3, "rescan_seconds": 1, "job_timeout": 60},
            "default_algorithm": "noop",
            "dicom": {"enabled": False},
            "http": {"port": 0},  # any free port (the service log says which): sites never collide
            "algorithms": [
                {"name": "noop", "function": "testalgos:noop", "default_settings": {"label": "x", "n": 1}},
                {"name": "slow", "function": "testalgos:slow", "default_settings": {"seconds": 30}},
                {"name": "raises", "function": "testalgos:raises"},
                {"name": "suicide", "function": "testalgos:suicide"},
                {"name": "bad-output", "function": "testalgos:bad_output"},
                {"name": "junk", "function": "testalgos:returns_junk"},
            ],
        }
        self.write_config()

    def write_config(self, **changes: Any) -> Path:
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(self.config.get(key), dict):
                self.config[key] = {**self.config[key], **value}
            else:
                self.config[key] = value
        self.config_path.write_text(yaml.safe_dump(self.config))
        return self.config_path

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, POSTBOX_TEST_EVIDENCE=str(self.evidence))

    def cli_argv(self) -> list[str]:
        return [sys.executable, "-m", "facade.cli", "--config", str(self.config_path)]

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.cli_argv(), *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"postbox {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def launch(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``postbox manage run`` without waiting for it."""
        log = open(self.root / f"service-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "facade.cli", "--config", str(self.config_path),
                                 "manage", "run"], stdout=log, stderr=subprocess.STDOUT, env=env or self.env)
        self.procs.append(proc)
        return proc

    def start(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``postbox manage run`` and wait for its ready file (the worker watches, the doors listen)."""
        proc = self.launch(env)
        wait_for(lambda: self.ready_file(proc).is_file() or proc.poll() is not None, 30,
                 what="the service to be ready")
        assert proc.poll() is None, self.service_log()
        if "dicom" in (doors := self.doors(proc)):
            self.port = doors["dicom"]["port"]  # dicom.port 0: the node took a free port
        return proc

    def ready_file(self, proc: subprocess.Popen[bytes]) -> Path:
        return ReadyFile.path_for(self.inbox, proc.pid)

    def doors(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        """The doors a started service listens on, and their ports, from its ready file."""
        import json

        return json.loads(self.ready_file(proc).read_text())["doors"]

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=30)

    def service_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("service-*.log")))

    def done(self, n: int, timeout: float = 30) -> list[Path]:
        """Wait until ``n`` jobs are in the outbox; return them."""
        return wait_for(lambda: (lambda js: js if len(js) >= n else None)(outbox_jobs(self.outbox)), timeout,
                        what=f"{n} job(s) in the outbox")

    def runs(self) -> list[dict[str, Any]]:
        import json

        path = self.evidence / "runs.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    for proc in s.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads behind (watchdog's conftest does the same)."""
    before = set(threading.enumerate())
    yield
    leaked = wait_for_quiet(before)
    assert not leaked, f"threads leaked: {leaked}"


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves a child process running (a service, a dcmtk peer, an algorithm).

    Processes of module-wide fixtures exist before the test starts and are not counted.
    """
    before = set(_children())
    yield
    leaked = wait_for_children_gone(before)
    assert not leaked, f"child processes leaked: {leaked}"


def _children() -> list[str]:
    me = os.getpid()
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(stat.parent.name)
    return found


def wait_for_children_gone(before: set[str], timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in _children() if pid not in before]
        if not left or time.monotonic() > deadline:
            return [f"{pid}: {(Path('/proc') / pid / 'cmdline').read_bytes().replace(bytes(1), b' ').decode()[:80]}"
                    for pid in left if (Path("/proc") / pid).exists()]
        threading.Event().wait(0.05)


def wait_for_quiet(before: set[threading.Thread]) -> list[str]:
    deadline = time.monotonic() + 5
    while True:
        leaked = [t.name for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
        if not leaked or time.monotonic() > deadline:
            return leaked
        threading.Event().wait(0.02)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA with a server certificate for localhost and 127.0.0.1, and a client certificate."""
    from pipeline.tls import make_certificates

    folder = tmp_path_factory.mktemp("certs")
    make_certificates(folder, ["localhost", "127.0.0.1"])
    return folder


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA: its certificates must be refused."""
    from pipeline.tls import make_certificates

    folder = tmp_path_factory.mktemp("other")
    make_certificates(folder, ["localhost", "127.0.0.1"])
    return folder


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test opens (an attacker's): closed when it ends, whatever it asserted."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()
