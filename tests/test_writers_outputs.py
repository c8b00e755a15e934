"""write_dicom_outputs: UIDs derived from the job (issue 10), and the seconds of each step.

Its checks and refusals are tested in test_writers_check.py.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from _dicomtools import dciodvfy_errors
from pydicom.uid import UID

from pipeline import phantom
from pipeline.writers.outputs import STEPS, output_uids, write_dicom_outputs

Series = tuple[Path, dict[str, Path]]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    grid = phantom.axial_grid(slices=12, size=64)
    root = tmp_path_factory.mktemp("series")
    phantom.write_dicom(root / "ct", grid)
    return root / "ct", phantom.write_masks_nifti(root / "masks", grid)


def minted(path: Path, source: set[str]) -> dict[str, str]:
    """Every UID in the file, by where it sits (``tag path``), that does not come from the source series."""
    ds = pydicom.dcmread(path)
    # ImplementationClassUID names the software that wrote the file: the same in every file it writes.
    found = {"file meta " + str(e.keyword): str(e.value) for e in ds.file_meta
             if e.VR == "UI" and e.keyword != "ImplementationClassUID"}

    def walk(dataset: pydicom.Dataset, where: str) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                for k, item in enumerate(elem.value):
                    walk(item, f"{where}{elem.keyword}[{k}].")
            elif elem.VR == "UI" and elem.value and str(elem.value) not in source:
                found[where + str(elem.keyword)] = str(elem.value)

    walk(ds, "")
    return found


def source_uids(series_dir: Path) -> set[str]:
    """Every UID of the source series (its instances, series, study, frame of reference) and of the standard."""
    uids: set[str] = set()
    for path in series_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids |= {str(e.value) for e in ds.iterall() if e.VR == "UI"}
    return uids


def write(series: Series, out: Path, seed: str | None) -> dict[str, dict[str, str]]:
    series_dir, masks = series
    result = write_dicom_outputs(series_dir, masks, out, kinds=("rtstruct", "seg"), uid_seed=seed)
    standard = {str(v) for v in vars(pydicom.uid).values() if isinstance(v, UID)}
    known = source_uids(series_dir) | standard
    # SOP classes, transfer syntaxes and coding schemes are the standard's, not minted by the writers.
    return {p.name: {k: v for k, v in minted(p, known).items() if not v.startswith("1.2.840.10008.")}
            for p in result.files}


def test_the_same_seed_gives_the_same_uids_and_another_seed_other_ones(series: Series, tmp_path: Path) -> None:
    first = write(series, tmp_path / "a", "20261125T190012-3fa2b9c1/in-1")
    again = write(series, tmp_path / "b", "20261125T190012-3fa2b9c1/in-1")
    other = write(series, tmp_path / "c", "20261125T190013-00000000/in-1")

    for name in ("rtstruct.dcm", "seg.dcm"):
        uids = first[name]
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "file meta MediaStorageSOPInstanceUID"):
            assert keyword in uids, (name, sorted(uids))
        assert uids["SOPInstanceUID"] == uids["file meta MediaStorageSOPInstanceUID"]
        assert all(UID(v).is_valid for v in uids.values()), uids
        # Every UID the writers mint, not only the two asked for (the SEG's Dimension Organization UID).
        assert again[name] == uids, name
        assert set(other[name].values()).isdisjoint(uids.values()), name
    rt, seg = first["rtstruct.dcm"], first["seg.dcm"]
    assert {rt["SOPInstanceUID"], rt["SeriesInstanceUID"], seg["SOPInstanceUID"], seg["SeriesInstanceUID"]} == {
        *output_uids("20261125T190012-3fa2b9c1/in-1", "rtstruct"),
        *output_uids("20261125T190012-3fa2b9c1/in-1", "seg")}, "four UIDs, one each"
    assert any("DimensionOrganizationUID" in k for k in seg), sorted(seg)
    for path in (tmp_path / "a").iterdir():
        assert dciodvfy_errors(path) == []


def test_without_a_seed_each_write_mints_new_uids(series: Series, tmp_path: Path) -> None:
    first = write(series, tmp_path / "a", None)
    again = write(series, tmp_path / "b", None)
    for name in ("rtstruct.dcm", "seg.dcm"):
        assert set(first[name].values()).isdisjoint(again[name].values()), name


def test_each_step_is_timed(series: Series, tmp_path: Path) -> None:
    series_dir, masks = series
    both = write_dicom_outputs(series_dir, masks, tmp_path / "both", kinds=("rtstruct", "seg"))
    assert list(both.seconds) == list(STEPS) and all(s > 0 for s in both.seconds.values()), both.seconds
    seg = write_dicom_outputs(series_dir, masks, tmp_path / "seg", kinds=("seg",))
    assert list(seg.seconds) == ["read", "seg"], seg.seconds
