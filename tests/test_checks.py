"""The input checks every door shares (pipeline/checks.py): tables of edge cases, as Bottle's test_filename."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from pipeline import checks
from pipeline.errors import InvalidInput

SERIES_UID = "1.2.826.0.1.3680043.8.498.1"

# --- safe names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "safe"), [
    ("ct.nii.gz", "ct.nii.gz"),
    ("../x", "x"),
    ("../../etc/passwd", "passwd"),
    ("a/../b.txt", "b.txt"),
    ("./x", "x"),
    ("/abs/path/ct.nii", "ct.nii"),
    ("/etc/passwd", "passwd"),
    ("C:\\Users\\me\\ct.nii", "ct.nii"),
    ("..\\..\\boot.ini", "boot.ini"),
    ("\\\\server\\share\\ct.nii", "ct.nii"),
    (".bashrc", "bashrc"),
    ("~lock", "lock"),
    ("#autosave#.txt", "autosave#.txt"),
    ("a\x00b\nc.txt", "abc.txt"),
    ("a\x7fb\x1b[31m.txt", "ab[31m.txt"),
    ("evil\u202etxt.exe", "eviltxt.exe"),  # a right-to-left override (category Cf) goes
    ("  spaced name.txt  ", "spaced name.txt"),
    ("trailing.", "trailing"),
    ("Ünïcödé.nii", "Ünïcödé.nii"),
    ("Cafe\u0301.nii", "Caf\u00e9.nii"),  # decomposed (as macOS sends it) becomes composed
    ("a" * 200, "a" * 200),
])
def test_safe_name(name: str, safe: str) -> None:
    assert checks.safe_name(name) == safe


@pytest.mark.parametrize(("name", "problem"), [
    ("", "no usable base name"),
    (".", "no usable base name"),
    ("..", "no usable base name"),
    ("/", "no usable base name"),
    ("dir/", "no usable base name"),
    ("...", "no usable base name"),
    ("\x00\x01\n", "no usable base name"),
    (" . ", "no usable base name"),
    ("x.part", "temporary or partial"),
    ("x.crdownload", "temporary or partial"),
    ("x.TMP", "temporary or partial"),
    ("x~", "temporary or partial"),
    ("Thumbs.db", "temporary or partial"),
    ("a" * 201, "longer than 200 bytes"),
    ("\u00e9" * 101, "longer than 200 bytes"),  # 101 characters, 202 bytes: the limit is in bytes
])
def test_unusable_names(name: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        checks.safe_name(name)


@pytest.mark.parametrize(("name", "ignored"), [
    (".hidden", True),
    (".staging", True),
    ("~$report.docx", True),
    ("#draft#", True),
    ("scan.dcm.part", True),
    ("scan.PARTIAL", True),
    ("scan.crdownload", True),
    ("notes.txt~", True),
    (".notes.txt.swp", True),
    ("Thumbs.db", True),
    ("scan.dcm", False),
    ("1.2.840.113619.2.55.dcm", False),
    ("thumbs.db.txt", False),
    ("part", False),
])
def test_is_ignored(name: str, ignored: bool) -> None:
    assert checks.is_ignored(name) is ignored


# --- UIDs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uid", [
    "0",
    "1.2.840.10008.1.2.1",
    SERIES_UID,
    "1.2.840.113619.2.55.3.0",
    "1.2.840.0113619.02",  # leading zeros: PS3.5 forbids them, modalities send them; taken (module docstring)
    "1." + "2" * 62,  # 64 characters
])
def test_uids_taken(uid: str) -> None:
    assert checks.is_uid(uid)
    assert checks.check_uid(uid, "seriesUID") == uid


@pytest.mark.parametrize("uid", [
    "",
    ".",
    "..",
    "1..2",  # an empty component
    ".1.2",  # a leading dot: "<uid>.dcm" would be a hidden file, which the pipeline ignores
    "1.2.",
    "1." + "2" * 63,  # 65 characters
    "../1.2",
    "1.2/3",
    "1.2\\3",
    " 1.2",
    "1.2 ",
    "1.2\n",
    "1.2\x00",
    "1.2.a",
    "-1.2",
    "1,2",
    "\u00b2.1",  # a superscript two: str.isdigit() says yes
    "\uff11.\uff12",  # fullwidth digits
    "\u0661.\u0662",  # Arabic-Indic digits
])
def test_uids_refused(uid: str) -> None:
    assert not checks.is_uid(uid)
    with pytest.raises(InvalidInput, match=r"^seriesUID must be a DICOM UID \(digits and dots, at most 64\)"):
        checks.check_uid(uid, "seriesUID")


# --- JSON objects -----------------------------------------------------------------------------------


def test_json_object() -> None:
    assert checks.json_object('{"label": "first", "n": 1, "nested": {"a": [1]}}', "config") == {
        "label": "first", "n": 1, "nested": {"a": [1]}}
    assert checks.json_object("{}", "config") == {}


@pytest.mark.parametrize(("text", "problem"), [
    ("[1, 2]", "^meta_data must be a JSON object$"),
    ("null", "^meta_data must be a JSON object$"),
    ('"text"', "^meta_data must be a JSON object$"),
    ("1", "^meta_data must be a JSON object$"),
    ("true", "^meta_data must be a JSON object$"),
    ("", "^meta_data is not JSON: "),
    ("{not json", "^meta_data is not JSON: "),
    ("{'single': 'quotes'}", "^meta_data is not JSON: "),
    ('{"a": 1} trailing', "^meta_data is not JSON: "),
    ("[" * 100_000, "^meta_data is nested too deeply$"),
    ('{"a": ' * 100_000, "^meta_data is nested too deeply$"),
])
def test_not_a_json_object(text: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        checks.json_object(text, "meta_data")


def test_json_object_names_what_it_holds() -> None:
    with pytest.raises(InvalidInput, match="^config must be a JSON object of the algorithm's settings$"):
        checks.json_object("[]", "config", holding="the algorithm's settings")


# --- DICOM sniffing ---------------------------------------------------------------------------------


def _dataset(series_uid: str | None = SERIES_UID) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    return ds


@pytest.fixture
def dicom_file(tmp_path: Path) -> Path:
    path = tmp_path / "ct.dcm"
    pydicom.dcmwrite(path, _dataset(), enforce_file_format=True)
    return path


def test_a_dicom_file_with_preamble(dicom_file: Path) -> None:
    assert checks.looks_like_dicom(dicom_file)
    assert checks.looks_like_dicom(dicom_file.read_bytes())
    assert checks.looks_like_dicom(dicom_file.read_bytes()[:132])
    assert checks.dicom_series_uid(dicom_file) == SERIES_UID


def test_a_dicom_file_by_content_not_by_name(dicom_file: Path) -> None:
    renamed = dicom_file.rename(dicom_file.with_name("scan.bin"))
    assert checks.dicom_series_uid(renamed) == SERIES_UID


def test_a_dicom_file_without_preamble_is_a_plain_file(dicom_file: Path, tmp_path: Path) -> None:
    # The same file meta and data set without the 128-byte preamble and "DICM", as some old tools write
    # it: not sniffed as DICOM, so it becomes a FILE input rather than a series.
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(dicom_file.read_bytes()[132:])
    assert pydicom.dcmread(bare, force=True).SeriesInstanceUID == SERIES_UID  # it is DICOM all the same
    assert not checks.looks_like_dicom(bare)
    assert checks.dicom_series_uid(bare) is None


@pytest.mark.parametrize("data", [
    b"",
    b"DICM",
    b"\0" * 131,
    b"\0" * 128 + b"DIC",
    b"\0" * 128 + b"dicm",
    b"DICM" + b"\0" * 128,
    b"\0" * 127 + b"DICM",
    b"GIF89a" + os.urandom(500),
])
def test_not_dicom(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(data)
    assert not checks.looks_like_dicom(data)
    assert not checks.looks_like_dicom(path)
    assert checks.dicom_series_uid(path) is None


def test_what_cannot_be_read_is_not_dicom(tmp_path: Path) -> None:
    assert not checks.looks_like_dicom(tmp_path)
    assert not checks.looks_like_dicom(tmp_path / "missing.dcm")
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)  # opening it would wait for a writer for ever
    assert not checks.looks_like_dicom(fifo)
    assert checks.dicom_series_uid(fifo) is None


def _deflated_garbage() -> bytes:
    """File meta saying the data set is deflated, then bytes that do not inflate."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = DicomBytesIO()
    write_file_meta_info(out, meta)
    return out.getvalue() + b"not deflated"


@pytest.mark.parametrize(("tail", "problem"), [
    (b"garbage", "^broken.dcm: DICOM file has no SeriesInstanceUID$"),
    (_deflated_garbage(), r"^broken.dcm: DICOM file does not parse \(Error -3 while decompressing"),
])
def test_a_file_that_claims_dicom_must_parse(tail: bytes, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + tail)
    assert checks.looks_like_dicom(path)
    with pytest.raises(InvalidInput, match=problem):
        checks.dicom_series_uid(path)


def test_a_dicom_file_without_series_uid(tmp_path: Path) -> None:
    path = tmp_path / "noseries.dcm"
    pydicom.dcmwrite(path, _dataset(series_uid=None), enforce_file_format=True)
    with pytest.raises(InvalidInput, match="^noseries.dcm: DICOM file has no SeriesInstanceUID$"):
        checks.dicom_series_uid(path)
