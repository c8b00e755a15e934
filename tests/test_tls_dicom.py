"""DICOM over TLS at the node (issue 9): dcmtk's echoscu and storescu with ``+tls`` against a real service.

The node gives its TLS context to the guard, which makes each handshake without blocking, under
``dicom.associate_timeout``, and hands pynetdicom an SSLSocket. Certificates are made once for the module:
one CA for the node and its clients, and a second, unrelated CA whose client certificate must be refused.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import Site, outbox_jobs, read_job, wait_for
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pipeline import phantom
from pipeline.guard import Limits
from pipeline.nodeguard import ASSOCIATE_RQ_LIMIT, GuardedServer
from pipeline.tls import TlsFiles

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # Debian's dcmtk leaves Nagle on otherwise and crawls






@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ct") / "ct"
    phantom.write_dicom(folder, phantom.axial_grid(slices=12, size=32))
    return folder


def start(site: Site, certs: Path, **dicom: Any) -> int:
    """A service whose DICOM node serves TLS only, requiring a client certificate from ``certs``' CA."""
    site.write_config(http={"enabled": False}, dicom={
        "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 30, "complete_on_release": True,
        "tls": {"cert": str(certs / "server.pem"), "key": str(certs / "server-key.pem"),
                "ca": str(certs / "ca.pem"), "require_client_cert": True}, **dicom})
    site.start()
    return site.port


def tls_args(certs: Path, client: Path | None) -> list[str]:
    """dcmtk's TLS options: our client certificate from ``client`` (none: ``+tla``), the node checked by ``certs``."""
    mine = ["+tls", str(client / "client-key.pem"), str(client / "client.pem")] if client else ["+tla"]
    return [*mine, "+cf", str(certs / "ca.pem")]


def dcmtk(tool: str, port: int, tls: list[str] | None, calling: str, *args: str) -> subprocess.CompletedProcess[str]:
    """dcmtk's ``tool`` against the node, with connection and ACSE timeouts so that a refusal never hangs."""
    path = f"/usr/bin/{tool}"  # not a Python package's script of the same name earlier on PATH
    assert os.access(path, os.X_OK), f"dcmtk's {tool} is missing: apt-get install -y dcmtk"
    argv = [path, *(tls or []), "-to", "5", "-ta", "5", "-aet", calling, "-aec", "POSTBOX", *args[:-1],
            "127.0.0.1", str(port), *args[-1:]]
    return subprocess.run(argv, capture_output=True, text=True, env=DCMTK_ENV, stdin=subprocess.DEVNULL, timeout=60)


def echoscu(port: int, tls: list[str] | None = None, calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return dcmtk("echoscu", port, tls, calling)


def storescu(port: int, folder: Path, tls: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return dcmtk("storescu", port, tls, "STORESCU", "+sd", "+r", str(folder))


def nothing_received(site: Site) -> bool:
    """No staging folder, no job in the inbox or the outbox."""
    return (not list(site.inbox.glob(".staging/*")) and not [p for p in site.inbox.iterdir()
                                                               if not p.name.startswith(".")]
            and not outbox_jobs(site.outbox))


def test_echoscu_and_storescu_over_tls_make_a_job(site: Site, certs: Path, series: Path) -> None:
    port = start(site, certs)
    mine = tls_args(certs, certs)
    echo = echoscu(port, mine)
    assert echo.returncode == 0, echo.stderr
    sent = storescu(port, series, mine)
    assert sent.returncode == 0, sent.stderr
    [job_dir] = site.done(1)
    job = read_job(job_dir)
    assert job["status"] == "done", job.get("error")
    assert job["inputs"][0]["meta_data"]["instances"] == 12
    assert job["sender"]["calling_ae"] == "STORESCU"


@pytest.mark.parametrize("client", ["another CA", "no certificate"])
def test_a_client_certificate_not_from_the_ca_is_refused(site: Site, certs: Path, other_certs: Path, series: Path,
                                                         client: str) -> None:
    port = start(site, certs)
    theirs = tls_args(certs, other_certs if client == "another CA" else None)
    assert echoscu(port, theirs).returncode != 0
    assert storescu(port, series, theirs).returncode != 0
    assert nothing_received(site)
    assert echoscu(port, tls_args(certs, certs)).returncode == 0, "the node still serves its own clients"


def test_plain_dicom_is_refused_by_a_tls_node(site: Site, certs: Path, series: Path) -> None:
    port = start(site, certs)
    assert echoscu(port).returncode != 0
    assert storescu(port, series).returncode != 0
    assert nothing_received(site)


def is_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed nor reset the connection (the node sends nothing to consume)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        # TLS reads take no MSG_PEEK; a read there also takes in TLS 1.3's session tickets.
        return sock.recv(1, 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_PEEK) != b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


def test_the_guard_holds_under_tls(site: Site, certs: Path, sockets: list[socket.socket]) -> None:
    # 40 silent connections, 10 associations allowed: 20 say nothing at all, 20 make their TLS handshake
    # and then say nothing. The guard holds them all; an allowed AE is answered at once.
    port = start(site, certs, allowed_ae_titles=["ECHOSCU"], associate_timeout=30, max_connections_per_address=20)
    client = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    client.load_cert_chain(str(certs / "client.pem"), str(certs / "client-key.pem"))
    for _ in range(20):
        sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)))
        raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.3", 0))
        sockets.append(client.wrap_socket(raw, server_hostname="127.0.0.1"))
    started = time.monotonic()
    proc = echoscu(port, tls_args(certs, certs))
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 5
    assert all(is_open(s) for s in sockets), "held by the guard, not dropped"
    assert echoscu(port, tls_args(certs, certs), calling="INTRUDER").returncode != 0, "not an allowed AE title"


def test_a_peer_that_stalls_inside_a_pdu_over_tls_is_dropped_after_the_network_timeout(certs: Path) -> None:
    # The kernel's SO_RCVTIMEO does not end a blocking TLS read (Python reads again on SSL_ERROR_WANT_READ), so
    # the node's TLS sockets take Python's timeout: here network_timeout is 1 s, in a node of this process.
    ae = AE(ae_title="POSTBOX")
    ae.network_timeout = 1
    ae.add_supported_context(Verification)
    limits = Limits(timeout=5, max_bytes=ASSOCIATE_RQ_LIMIT, max_per_address=4)
    files = TlsFiles(cert=certs / "server.pem", key=certs / "server-key.pem", ca=certs / "ca.pem",
                     require_client_cert=True)
    server = cast(GuardedServer, ae.make_server(("127.0.0.1", 0), server_class=GuardedServer, limits=limits,
                                                max_pdu=1 << 20, tls=files.server_context()))
    serving = threading.Thread(target=server.serve, name="test-guarded-server")
    serving.start()
    peer = AE(ae_title="ECHOSCU")
    peer.add_requested_context(Verification)
    try:
        mine = TlsFiles(cert=certs / "client.pem", key=certs / "client-key.pem", ca=certs / "ca.pem")
        assoc = peer.associate("127.0.0.1", server.server_address[1], ae_title="POSTBOX",
                               tls_args=(mine.client_context(), "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000, "served over TLS"
        # A P-DATA-TF PDU declaring 100 bytes, of which 10 come: the node waits inside it, then gives up.
        assoc.dul.socket.send(b"\x04\x00" + struct.pack(">L", 100) + bytes(10))  # type: ignore[union-attr]
        started = time.monotonic()
        wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 10, what="the node to drop the association")
        assert time.monotonic() - started < 5
    finally:
        peer.shutdown()
        server.stop()
        serving.join(10)
