"""The DICOM node under abuse without a key (issue 9), on a real service with real sockets on 127.0.0.x.

Silent connections, an address that keeps connecting, PDUs declaring 4 GiB, and a deflate bomb: a CT
instance with 1 GiB of zeros in a private element before the attributes the node reads, deflated to 1 MB
(built once per run). Attackers connect from 127.0.0.2, so the per-address cap does not stop the allowed
peer on 127.0.0.1. Memory is the service's own RSS from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import pydicom
import pytest
from _sockets import MB, connect, is_open, rss
from conftest import Site, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from pipeline import phantom
from pipeline.tls import make_certificates

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # Debian's dcmtk leaves Nagle on otherwise and crawls
OUT_OF_RESOURCES = 0xA700








def start(site: Site, **dicom: Any) -> tuple[Any, int]:
    site.write_config(http={"enabled": False},
                      dicom={"enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 60, **dicom})
    proc = site.start()
    return proc, site.port


def echoscu(port: int, calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/echoscu", "-aet", calling, "-aec", "POSTBOX", "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=30)


def echo_from(address: str, port: int) -> bool:
    """A C-ECHO by pynetdicom from ``address``: whether it was answered Success."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="POSTBOX", bind_address=(address, 0))
    try:
        return bool(assoc.is_established) and assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release() if assoc.is_established else None
        ae.shutdown()


def test_silent_connections_leave_room_for_an_allowed_ae(site: Site, sockets: list[socket.socket]) -> None:
    # 40 silent sockets, 10 associations allowed: the guard holds them, none takes an association's place.
    _, port = start(site, allowed_ae_titles=["ECHOSCU"], associate_timeout=30, max_connections_per_address=64)
    silent = [connect(port) for _ in range(40)]
    sockets += silent
    started = time.monotonic()
    proc = echoscu(port)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 5
    assert all(is_open(s) for s in silent), "held by the guard, not dropped"


def test_an_address_that_keeps_connecting_is_capped(site: Site, sockets: list[socket.socket]) -> None:
    _, port = start(site, allowed_ae_titles=["ECHOSCU"], associate_timeout=1, max_connections_per_address=4)
    attack = [connect(port) for _ in range(10)]
    sockets += attack
    wait_for(lambda: sum(not is_open(s) for s in attack) >= 6, 5, what="the 6 over the cap closed at once")
    assert echoscu(port).returncode == 0, "another address is served meanwhile"
    wait_for(lambda: not any(is_open(s) for s in attack), 5, what="the rest closed after associate_timeout")
    wait_for(lambda: echo_from("127.0.0.2", port), 5, what="the address served again once its connections went")


def test_a_pdu_declaring_4_gib_is_refused_before_it_is_read(site: Site) -> None:
    proc, port = start(site, allowed_ae_titles=["ECHOSCU"])
    before = rss(proc.pid)["VmRSS"]
    with connect(port, "127.0.0.1") as sock:
        sent = 0
        try:
            sock.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFFF))  # an A-ASSOCIATE-RQ of 4 GiB
            block = bytes(MB)
            while sent < 256 * MB:
                sock.sendall(block)
                sent += len(block)
        except OSError:
            pass
        try:
            reply = sock.recv(16)
        except OSError:
            reply = b""
    assert reply[:1] in (b"\x07", b""), f"an A-ABORT or a closed connection, not {reply!r}"
    assert sent < 64 * MB, f"{sent / MB:.0f} MB were taken before the refusal"

    # After the association too, for an allowed AE: a P-DATA-TF declaring 4 GiB aborts it unread.
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="POSTBOX")
    try:
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        try:
            raw.sendall(b"\x04\x00" + struct.pack(">L", 0xFFFFFFFF) + bytes(16 * MB))
        except OSError:
            pass
        wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 5, what="the association to be aborted")
    finally:
        ae.shutdown()
    grown = rss(proc.pid)["VmHWM"] - before
    assert grown < 50 * MB, f"RSS grew by {grown / MB:.0f} MB"
    assert echoscu(port).returncode == 0
    # An attack is a warning for the operator, not an ERROR (pynetdicom logged one for a PDU cut short).
    assert "over dicom.max_pdu_mb" in site.service_log()
    assert [line for line in site.service_log().splitlines() if " ERROR " in line] == []


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _part10(meta: FileMetaDataset, deflated: bytes) -> bytes:
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue() + deflated


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CT instance whose private element (0009,1000) is 1 GiB of zeros, deflated to 1 MB (built once)."""
    return deflate_bomb(tmp_path_factory.mktemp("bomb"))


def deflate_bomb(folder: Path) -> Path:
    [path] = phantom.write_dicom(folder / "ct", phantom.axial_grid(slices=1, size=16))
    ds = pydicom.dcmread(path)
    ds.add_new(0x00090010, "LO", "POSTBOX TEST")
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    # Streamed: the elements before it, its header, the zeros 16 MiB at a time, the elements after it.
    parts = [z.compress(_encode(Dataset({e.tag: e for e in ds if e.tag < 0x00091000}))),
             z.compress(struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, 1 << 30))]
    block = bytes(16 * MB)
    parts += [z.compress(block) for _ in range((1 << 30) // len(block))]
    parts += [z.compress(_encode(Dataset({e.tag: e for e in ds if e.tag > 0x00091000}))), z.flush()]
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    target = folder / "bomb.dcm"
    target.write_bytes(_part10(meta, b"".join(parts)))
    return target


def deflated_ct(folder: Path) -> Path:
    """An ordinary CT slice, deflated."""
    [path] = phantom.write_dicom(folder / "ok", phantom.axial_grid(slices=1, size=16))
    ds = pydicom.dcmread(path)
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    target = folder / "deflated.dcm"
    target.write_bytes(_part10(meta, z.compress(_encode(ds)) + z.flush()))
    return target


def store(port: int, *paths: Path) -> list[int]:
    """C-STORE each file as it is on disk (deflated bytes sent as they are), the statuses answered."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="POSTBOX")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()
        ae.shutdown()


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom sends a file's encoded data set as it is, in pieces, instead of decoding and re-encoding it.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def staged_instances(site: Site) -> list[Path]:
    return sorted(site.inbox.glob(".staging/*/input/series-1/*.dcm"))


@pytest.mark.usefixtures("chunked_send")
def test_a_deflate_bomb_over_the_limit_is_refused_and_never_stored(site: Site, bomb: Path, tmp_path: Path) -> None:
    proc, port = start(site, max_instance_mb=64)
    before = rss(proc.pid)["VmRSS"]
    assert store(port, bomb, deflated_ct(tmp_path)) == [OUT_OF_RESOURCES, 0x0000]
    grown = rss(proc.pid)["VmHWM"] - before
    assert grown < 200 * MB, f"RSS grew by {grown / MB:.0f} MB"
    [stored] = staged_instances(site)  # the ordinary slice only
    assert stored.name == f"{pydicom.dcmread(tmp_path / 'deflated.dcm').SOPInstanceUID}.dcm"
    assert "over 64 MB once inflated" in site.service_log()


@pytest.mark.usefixtures("chunked_send")
def test_the_default_limits_refuse_a_deflate_bomb_by_its_ratio(site: Site, bomb: Path, tmp_path: Path) -> None:
    proc, port = start(site)  # dicom.max_instance_mb 2048 would take 1 GiB; 1,000 times its size is a bomb
    before = rss(proc.pid)["VmRSS"]
    assert store(port, bomb, deflated_ct(tmp_path)) == [OUT_OF_RESOURCES, 0x0000]
    grown = rss(proc.pid)["VmHWM"] - before
    assert grown < 200 * MB, f"RSS grew by {grown / MB:.0f} MB"
    assert len(staged_instances(site)) == 1, "the ordinary slice only"
    assert "dicom.max_deflate_ratio" in site.service_log()


@pytest.mark.usefixtures("chunked_send")
def test_a_deflated_instance_under_the_limit_is_read_in_flat_memory(site: Site, bomb: Path) -> None:
    # Both limits raised: 1 GiB inflated is allowed, and inflated in steps, never held.
    proc, port = start(site, max_deflate_ratio=2000)
    before = rss(proc.pid)["VmRSS"]
    assert store(port, bomb) == [0x0000]
    grown = rss(proc.pid)["VmHWM"] - before
    assert grown < 200 * MB, f"RSS grew by {grown / MB:.0f} MB"
    [stored] = staged_instances(site)
    data = bomb.read_bytes()
    meta_end = 144 + struct.unpack_from("<I", data, 140)[0]  # after (0002,0000), the meta's group length
    assert stored.read_bytes().endswith(data[meta_end:]), "stored as received, deflated"


@pytest.mark.usefixtures("chunked_send")
def test_the_pdu_cap_and_the_deflate_limit_hold_over_tls(site: Site, bomb: Path, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    make_certificates(certs, ["127.0.0.1"])
    proc, port = start(site, max_instance_mb=64,
                       tls={"cert": str(certs / "server.pem"), "key": str(certs / "server-key.pem")})
    client = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    before = rss(proc.pid)["VmRSS"]
    with connect(port, "127.0.0.1") as raw, client.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sent = 0
        try:
            sock.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFFF))  # an A-ASSOCIATE-RQ of 4 GiB, encrypted
            block = bytes(MB)
            while sent < 256 * MB:
                sock.sendall(block)
                sent += len(block)
        except OSError:
            pass
    assert sent < 64 * MB, f"{sent / MB:.0f} MB were taken before the refusal"

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="POSTBOX", tls_args=(client, "127.0.0.1"))
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(path).Status) for path in (bomb, deflated_ct(tmp_path))]
    finally:
        assoc.release()
        ae.shutdown()
    assert statuses == [OUT_OF_RESOURCES, 0x0000]
    grown = rss(proc.pid)["VmHWM"] - before
    assert grown < 200 * MB, f"RSS grew by {grown / MB:.0f} MB"
    assert len(staged_instances(site)) == 1, "the ordinary slice only"
