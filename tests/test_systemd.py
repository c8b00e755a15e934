"""Postbox under systemd (issue 11): sd_notify READY=1 and STOPPING=1 from a real service, and the unit file."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Site

from pipeline.config import WorkerConfig
from pipeline.systemd import notify

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "postbox.service"


def receive(sock: socket.socket, timeout: float = 30) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket bound as systemd binds its own, and its ``$NOTIFY_SOCKET`` value (abstract: '@')."""
    name = f"postbox-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield sock, "@" + name


def test_a_started_service_says_ready_and_stopping_on_sigterm(site: Site, abstract_socket) -> None:
    sock, address = abstract_socket
    proc = site.start(env={**site.env, "NOTIFY_SOCKET": address})
    message = receive(sock).split("\n")
    # Sent once the ready file is written: systemd's "started" means what the ready file means.
    assert message[0] == "READY=1" and site.ready_file(proc).is_file()
    assert message[1].startswith("STATUS=serving: http port "), message
    proc.send_signal(signal.SIGTERM)
    assert receive(sock) == "STOPPING=1"
    assert proc.wait(timeout=30) == 0, site.service_log()


def test_notify_sends_to_a_socket_path_and_is_quiet_without_one(monkeypatch) -> None:
    folder = tempfile.mkdtemp(dir="/tmp")  # a unix socket path has at most 107 bytes: pytest's tmp_path may not
    try:
        path = os.path.join(folder, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            assert notify("READY=1", "STATUS=x") is True
            assert receive(sock, 5) == "READY=1\nSTATUS=x"
        os.unlink(path)
        assert notify("STOPPING=1") is False, "nobody listens: logged, not raised"
        monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
        assert notify("READY=1") is False
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert notify("READY=1") is False
    finally:
        shutil.rmtree(folder)


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_runs_as_its_own_user_restarts_on_failure_and_outwaits_a_stop() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert service["User"] not in ("", "root", "0")
    assert float(service["TimeoutStopSec"]) > WorkerConfig().stop_timeout
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "true", "PrivateTmp": "true"}.items():
        assert service[key] == value, key
    assert service["ReadWritePaths"] and int(service["LimitNOFILE"]) >= 4096
    assert service["ExecStart"].split()[-2:] == ["manage", "run"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (it comes with systemd; a container may have none)")
def test_systemd_analyze_verify_finds_nothing_in_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's postbox instead of the
    # documented /opt/postbox/venv one. Every other line is verified as shipped.
    program = shutil.which("postbox") or sys.executable
    text = UNIT.read_text().replace("/opt/postbox/venv/bin/postbox", program)
    assert text != UNIT.read_text()
    (tmp_path / "postbox.service").write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "postbox.service")], capture_output=True,
                          text=True, timeout=60)
    # verify exits 0 on an unknown key or a bad value too, and only says so: any output is a finding.
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


SCHEDULER_UNIT = UNIT.parent / "postbox-scheduler.service"
GPU_UNIT = UNIT.parent / "postbox-gpu-worker@.service"


def _parse(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_the_cluster_units_restart_always_and_the_scheduler_lets_the_folders_count_attempts() -> None:
    # Issue 12: a gpu-worker exits 0 when it loses its scheduler, so only Restart=always brings it back.
    gpu = _parse(GPU_UNIT)["Service"]
    assert gpu["Restart"] == "always" and gpu["User"] not in ("", "root", "0")
    assert "CUDA_VISIBLE_DEVICES=%i" in gpu["Environment"]
    argv = gpu["ExecStart"].replace("\\\n", " ").split()
    assert argv[1] == "gpu-worker" and argv[argv.index("--resources") + 1] == "GPU=1"
    assert argv[argv.index("--scheduler") + 1].startswith("tls://")
    scheduler = _parse(SCHEDULER_UNIT)["Service"]
    assert scheduler["Restart"] == "always"
    name, _, value = scheduler["Environment"].partition("=")
    assert name == "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES" and int(value) >= WorkerConfig().max_attempts
    assert "--protocol tls" in scheduler["ExecStart"] and "--tls-ca-file" in scheduler["ExecStart"]


@pytest.mark.parametrize(("unit_file", "name"), [(SCHEDULER_UNIT, "postbox-scheduler.service"),
                                                  (GPU_UNIT, "postbox-gpu-worker@0.service")])
def test_systemd_analyze_verify_finds_nothing_in_the_cluster_units(tmp_path: Path, unit_file: Path,
                                                                   name: str) -> None:
    text = unit_file.read_text()
    for program in ("postbox", "dask"):
        text = text.replace(f"/opt/postbox/venv/bin/{program}", shutil.which(program) or sys.executable)
    (tmp_path / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr
