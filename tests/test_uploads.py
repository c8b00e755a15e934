"""Upload handling without a server: zips, multipart (safe names: tests/test_checks.py)."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from facade._zipstream import zip_stream
from facade.uploads import ClientGone, TooLarge, read_multipart, unpack_dicom_zip
from pipeline import phantom
from pipeline.errors import InvalidInput


def _zip(path: Path, entries: dict[str, bytes], link: str = "") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name == link:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    return path


def test_unpack_refuses_before_writing_anything(tmp_path: Path) -> None:
    cases = [
        ({"ok.dcm": b"x", "../evil": b"x"}, "", InvalidInput, "outside the archive"),
        ({"ok.dcm": b"x", "link": b"/etc/passwd"}, "link", InvalidInput, "symbolic link"),
        ({f"{i}.dcm": b"x" for i in range(11)}, "", TooLarge, "11 entries; the limit is 10"),
        ({"big.bin": b"\0" * 2000}, "", TooLarge, "unpacks to 0.002 MB"),
    ]
    for i, (entries, link, kind, problem) in enumerate(cases):
        dest = tmp_path / f"out-{i}"
        with pytest.raises(kind, match=problem):
            unpack_dicom_zip(_zip(tmp_path / f"{i}.zip", entries, link), dest, max_entries=10, max_bytes=1000)
        assert not dest.exists()


def test_a_zip_whose_sizes_lie_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "lies.zip", {"a.bin": b"\0" * 5000})
    data = bytearray(archive.read_bytes())
    # Make both headers of the entry claim 10 bytes unpacked (a zip bomb's trick).
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(sig)
        data[at + offset:at + offset + 4] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="more than 0.001 MB|cannot be read"):
        unpack_dicom_zip(archive, tmp_path / "out", max_entries=10, max_bytes=1000)


def test_unpack_a_series_flattened(tmp_path: Path) -> None:
    files = phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=3, size=16))
    archive = tmp_path / "ct.zip"
    with open(archive, "wb") as fh:
        for chunk in zip_stream(((f, f"a/b/{f.name}") for f in files), compress=True):
            fh.write(chunk)
    info = unpack_dicom_zip(archive, tmp_path / "out", max_entries=10, max_bytes=10**6)
    assert info is not None and info["instances"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f.name for f in files)
    assert unpack_dicom_zip(_zip(tmp_path / "t.zip", {"a.txt": b"x"}), tmp_path / "o2", max_entries=10,
                            max_bytes=100) is None


def _body(file_data: bytes, boundary: str = "b") -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="dataset"\r\n\r\n7\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file_data"; filename="ct.nii.gz"\r\n\r\n'
            ).encode() + file_data + f"\r\n--{boundary}--\r\n".encode()


def test_read_multipart(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5000
    body = _body(payload)
    upload = read_multipart(io.BytesIO(body), "multipart/form-data; boundary=b", len(body), tmp_path,
                            max_file=10**7)
    assert upload.fields == {"dataset": "7"} and upload.filename == "ct.nii.gz" and upload.size == len(payload)
    assert upload.path is not None and upload.path.read_bytes() == payload


def test_read_multipart_refusals(tmp_path: Path) -> None:
    body = _body(b"x" * 1000)
    two_files = _body(b"x").replace(b"--b--", b'--b\r\nContent-Disposition: form-data; name="other"; '
                                              b'filename="y"\r\n\r\ny\r\n--b--')
    cases = [
        (body, len(body), "multipart/form-data; boundary=b", 999, TooLarge, "over the upload limit"),
        (body[:-20], len(body), "multipart/form-data; boundary=b", 10**6, ClientGone, "stopped sending"),
        (body[:-20], len(body) - 20, "multipart/form-data; boundary=b", 10**6, InvalidInput, "does not parse"),
        (body, len(body), "application/json", 10**6, InvalidInput, "must be multipart/form-data"),
        (two_files, None, "multipart/form-data; boundary=b", 10**6, InvalidInput, "only one file"),
    ]
    for i, (data, length, ctype, limit, kind, problem) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        with pytest.raises(kind, match=problem):
            read_multipart(io.BytesIO(data), ctype, length, folder, max_file=limit)
