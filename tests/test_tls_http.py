"""The HTTP door over TLS (issue 9): one started service with ``http.tls``, from the certificates that
``postbox manage certs`` makes, driven by our client, ``postbox send --verify``, PlatiPy's own client, and
attackers who never finish (or never start) a handshake."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from _http import HttpSite, check_masks, http_site
from _sockets import MB, connect, is_open, rss
from test_abuse_http import Trickle

from facade.client import Client
from pipeline import phantom
from pipeline.tls import make_certificates

REPO = Path(__file__).resolve().parents[1]
PLATIPY_PYTHON = Path(os.environ.get("POSTBOX_PLATIPY_PYTHON", REPO / ".ci" / ".venv-platipy" / "bin" / "python"))
GRID = phantom.axial_grid(slices=16, size=64)




@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[HttpSite]:
    # A deadline longer than the attack test and a cap above it: every attacking connection is really held.
    site = http_site(tmp_path_factory.mktemp("https"), worker={"processes": 1},
                     http={"max_upload_mb": 8, "tls": {"cert": str(certs / "server.pem"),
                                                       "key": str(certs / "server-key.pem")},
                           "header_timeout": 60, "max_connections_per_address": 100})
    site.alice = site.key("alice")
    site.start_http()
    site.url = site.url.replace("http://", "https://")
    yield site
    site.close()


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantom.write_nifti(tmp_path_factory.mktemp("ct") / "ct.nii.gz", grid=GRID)


def _port(srv: HttpSite) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def test_the_client_round_trips_over_https_checking_the_server_against_the_ca(
        srv: HttpSite, certs: Path, ct: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on many hospital machines: requests would let it override a verify set on the session.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    with Client("127.0.0.1", _port(srv), srv.alice, "body-lungs", verify=str(certs / "ca.pem")) as client:
        assert client.base_url.startswith("https://")
        dataset = client.add_dataset()
        client.add_data_object(dataset, file_path=ct)
        assert list(client.run_algorithm(dataset))[-1]["state"] == "SUCCESS"
        files = client.download_output_objects(dataset, tmp_path / "out")
    check_masks([f for f in files if f.name.endswith(".nii.gz")], GRID)


def test_a_server_not_signed_by_the_given_ca_is_refused(srv: HttpSite, tmp_path: Path) -> None:
    other = make_certificates(tmp_path / "other", ["127.0.0.1"])[0]
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(f"{srv.url}/api/health", verify=str(other), timeout=10)


def test_plain_http_is_refused_on_the_tls_port(srv: HttpSite, certs: Path) -> None:
    res = requests.get(f"http://127.0.0.1:{_port(srv)}/api/health", timeout=10)
    assert res.status_code == 400 and "serves HTTPS only" in res.json()["error"]
    # ... and the door goes on serving TLS.
    assert requests.get(f"{srv.url}/api/health", verify=str(certs / "ca.pem"), timeout=10).status_code == 200


def test_postbox_send_with_verify(srv: HttpSite, certs: Path, ct: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "facade.cli", "send", str(ct), "--algorithm", "body-lungs",
                           "--port", str(_port(srv)), "--verify", str(certs / "ca.pem"), "--out", "out"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "POSTBOX_API_KEY": srv.alice, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    check_masks(sorted((tmp_path / "out").glob("*.nii.gz")), GRID)


PLATIPY_SCRIPT = textwrap.dedent('''
    # PlatiPy's own client as installed from PyPI, unmodified, over HTTPS with the deployment's CA.
    import sys
    from platipy.client import PlatiPyClient

    host, port, api_key, algorithm_name, ct_path, output_path, ca = sys.argv[1:]
    client = PlatiPyClient(host, int(port), api_key, algorithm_name, verify=ca)
    dataset = client.add_dataset(timeout=2)
    client.add_data_object(dataset, file_path=ct_path)
    for status in client.run_algorithm(dataset, config=client.get_default_settings()):
        print(status)
    client.download_output_objects(dataset, output_path=output_path)
''')


@pytest.mark.skipif(os.environ.get("POSTBOX_NO_PLATIPY") == "1", reason="POSTBOX_NO_PLATIPY=1: PlatiPy client skipped")
def test_platipys_own_client_over_https(srv: HttpSite, certs: Path, ct: Path, tmp_path: Path) -> None:
    assert PLATIPY_PYTHON.exists(), f"no PlatiPy venv at {PLATIPY_PYTHON}: run bash .ci/install"
    script = tmp_path / "client.py"
    script.write_text(PLATIPY_SCRIPT)
    proc = subprocess.run([str(PLATIPY_PYTHON), str(script), "127.0.0.1", str(_port(srv)), srv.alice, "body-lungs",
                           str(ct), str(tmp_path / "out"), str(certs / "ca.pem")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_masks(sorted((tmp_path / "out").iterdir()), GRID)


def _health(srv: HttpSite, ca: Path) -> bool:
    """One probe over HTTPS, on a new connection: answered 200 within 2 s."""
    start = time.monotonic()
    try:
        ok = requests.get(f"{srv.url}/api/health", verify=str(ca), timeout=2).status_code == 200
    except requests.RequestException:
        return False
    return ok and time.monotonic() - start < 2


def test_silent_sockets_and_a_trickled_handshake_leave_https_answering(srv: HttpSite, certs: Path) -> None:
    # cheroot's own TLS makes the handshake in its accept thread: one silent socket stalled every accept.
    port = _port(srv)
    silent = [connect(port, "127.0.0.2") for _ in range(64)]
    slow = [connect(port, "127.0.0.3") for _ in range(32)]  # a TLS ClientHello is never a byte at a time
    trickle = Trickle(slow)
    try:
        probes: list[bool] = []
        while trickle.sent < 4 or len(probes) < 20:
            probes.append(_health(srv, certs / "ca.pem"))
    finally:
        trickle.stop()
        held = [is_open(s) for s in silent]
        for sock in silent + slow:
            sock.close()
    assert sum(probes) / len(probes) >= 0.9, f"{sum(probes)} of {len(probes)} probes answered within 2 s"
    assert all(held), "the guard holds every silent connection while it waits for a handshake"


def test_huge_headers_over_tls_are_refused_without_memory(srv: HttpSite, certs: Path) -> None:
    pid = next(p.pid for p in srv.procs if p.poll() is None)
    before = rss(pid)["VmRSS"]
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    for _ in range(4):  # four headers of up to 100 MB each, as the attack in issue 9
        with socket.create_connection(("127.0.0.1", _port(srv)), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: postbox\r\nX-Padding: ")
            sent = 0
            try:
                while sent < 100 * MB:
                    sock.sendall(b"a" * MB)
                    sent += MB
            except OSError:
                pass  # closed by the server once it refused
            try:
                status = sock.recv(4096)
            except OSError:
                status = b""
        assert status.startswith(b"HTTP/1.1 431 ") or status == b"", status[:80]
        assert sent < 100 * MB, "the server read on past its limit"
    grown = rss(pid)["VmHWM"] - before
    assert grown < 100 * MB, f"RSS grew by {grown / MB:.0f} MB"
