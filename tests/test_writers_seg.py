"""DICOM SEG writer: one coded segment per structure, frames on the right source images, dciodvfy clean."""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from _dicomtools import dciodvfy_errors, dice, make_series

from pipeline import phantom
from pipeline.errors import InvalidInput
from pipeline.phantom import Grid
from pipeline.writers import read_series, write_seg
from pipeline.writers.rtstruct import PALETTE, Structure
from pipeline.writers.seg import segment_codes

NAMES = phantom.structure_names()


def read_back(path: Path, series_dir: Path, grid: Grid) -> tuple[hd.seg.Segmentation, dict[str, np.ndarray]]:
    """Segment label -> mask on ``grid``, frames placed by the source image each one references."""
    seg = hd.seg.segread(path)
    positions = grid.slice_positions()
    uids = []
    for k in range(len(positions)):
        # The source image of slice k, found from the headers alone.
        for file in series_dir.glob("*.dcm"):
            ds = pydicom.dcmread(file, stop_before_pixels=True)
            if np.allclose(np.array(ds.ImagePositionPatient, float), positions[k], atol=0.01):
                uids.append(ds.SOPInstanceUID)
                break
    numbers = [d.SegmentNumber for d in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers)
    return seg, {d.SegmentLabel: pixels[..., i].astype(bool) for i, d in enumerate(seg.SegmentSequence)}


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> tuple[Grid, Path, dict[str, np.ndarray]]:
    grid = phantom.axial_grid(slices=24, size=96)
    series_dir, masks = make_series(tmp_path_factory.mktemp("axial"), grid)
    return grid, series_dir, masks


def test_round_trip_codes_and_dciodvfy(axial, tmp_path: Path) -> None:
    grid, series_dir, masks = axial
    path = write_seg(read_series(series_dir), masks, tmp_path / "seg.dcm", algorithm_name="bodylungs",
                     algorithm_version="1.2")
    seg, back = read_back(path, series_dir, grid)
    for name in NAMES:
        assert dice(back[name], masks[name]) >= 0.97, name
    types = {d.SegmentLabel: d.SegmentedPropertyTypeCodeSequence[0].CodeValue for d in seg.SegmentSequence}
    assert types == {"body": "38266002", "lung_left": "44029006", "lung_right": "3341006"}
    for description in seg.SegmentSequence:
        assert description.SegmentAlgorithmType == "AUTOMATIC"
        assert description.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        [algorithm] = description.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("bodylungs", "1.2")
    assert seg.SegmentationType == "BINARY"
    assert dciodvfy_errors(path) == []


def test_references_the_source_series_in_its_study(axial, tmp_path: Path) -> None:
    _, series_dir, masks = axial
    seg = pydicom.dcmread(write_seg(read_series(series_dir), masks, tmp_path / "seg.dcm"))
    source = pydicom.dcmread(next(series_dir.glob("*.dcm")), stop_before_pixels=True)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series_dir.glob("*.dcm")}
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    [series] = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == uids
    assert seg.Manufacturer == "Postbox"


def uneven_grid() -> Grid:
    """Axial, 2.5 mm then 7.5 mm then 1.25 mm slices across the lungs."""
    offsets = ([2.5 * k for k in range(8)] + [20 + 7.5 * k for k in range(6)]
               + [65 + 1.25 * k for k in range(8)])
    base = phantom.axial_grid(slices=len(offsets), size=64)
    middle = (offsets[0] + offsets[-1]) / 2
    return Grid(base.origin[:2] + (-middle,), base.row_direction, base.column_direction, base.pixel_spacing,
                base.rows, base.columns, tuple(offsets))


GEOMETRIES = {
    "reversed": (lambda: phantom.axial_grid(slices=24, size=64), "HFS", "reversed"),
    "FFS": (lambda: phantom.patient_position_grid("FFS", slices=24, size=64), "FFS", "reversed"),
    "HFP": (lambda: phantom.patient_position_grid("HFP", slices=24, size=64), "HFP", "stored"),
    "sagittal": (lambda: phantom.oblique_grid("sagittal", slices=20, size=64, slice_thickness=15.0), "HFS",
                 "stored"),
    "tilted": (lambda: phantom.oblique_grid("tilted", slices=24, size=64), "HFS", "stored"),
    "uneven": (uneven_grid, "HFS", "stored"),
}


@pytest.mark.parametrize("kind", list(GEOMETRIES))
def test_frames_on_the_right_images_for_other_geometries(kind: str, tmp_path: Path) -> None:
    make_grid, position, order = GEOMETRIES[kind]
    grid = make_grid()
    series_dir, masks = make_series(tmp_path, grid, patient_position=position, order=order)
    path = write_seg(read_series(series_dir), masks, tmp_path / "seg.dcm")
    _, back = read_back(path, series_dir, grid)
    for name in NAMES:
        assert dice(back[name], masks[name]) >= 0.97, (kind, name)
    assert dciodvfy_errors(path) == []


def test_hole_and_two_components_per_slice(axial, tmp_path: Path) -> None:
    grid, series_dir, _ = axial
    rows, columns = np.mgrid[: grid.rows, : grid.columns]
    distance = np.hypot(rows - 48, columns - 48)
    ring = np.zeros(grid.shape, bool)
    ring[6:18] = (distance < 30) & (distance >= 12)
    pair = np.zeros(grid.shape, bool)
    pair[6:18] = (np.hypot(rows - 48, columns - 20) < 9) | (np.hypot(rows - 48, columns - 76) < 9)
    masks = {"ring": ring, "pair": pair}
    path = write_seg(read_series(series_dir), masks, tmp_path / "seg.dcm")
    _, back = read_back(path, series_dir, grid)
    for name, mask in masks.items():
        assert dice(back[name], mask) >= 0.97, name


def test_mapped_label_and_colour_and_generic_code(axial, tmp_path: Path) -> None:
    _, series_dir, masks = axial
    structures: dict[str, dict[str, object]] = {"lung_left": {"name": "Lung_L", "color": [0, 255, 255]},
                                                "body": {"name": "External"}}
    heart = np.zeros_like(masks["body"])
    heart[10:14, 40:50, 44:52] = True  # a structure the writer has no code for
    extra = {"heart": heart}
    seg = hd.seg.segread(write_seg(read_series(series_dir), {**masks, **extra}, tmp_path / "seg.dcm",
                                   structures=structures))
    by_label = {d.SegmentLabel: d for d in seg.SegmentSequence}
    assert set(by_label) == {"External", "Lung_L", "lung_right", "heart"}
    assert by_label["Lung_L"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "44029006"
    expected = hd.color.CIELabColor.from_rgb(0, 255, 255).value
    assert tuple(by_label["Lung_L"].RecommendedDisplayCIELabValue) == tuple(expected)
    generic = by_label["heart"].SegmentedPropertyTypeCodeSequence[0]
    assert generic.CodeValue == "91772007"  # Organ: the generic code, the name in SegmentLabel


def test_segment_codes_by_name_and_type() -> None:
    def code(key: str, name: str, roi_type: str = "ORGAN") -> str:
        return str(segment_codes(Structure(key, name, PALETTE[0], roi_type))[1].value)

    assert code("lungs", "Lungs") == "39607008"
    assert code("x", "Lung_R") == "3341006"
    assert code("outline", "BODY", "EXTERNAL") == "38266002"
    assert code("tumour", "GTV_1", "GTV") == "108369006"
    assert code("ptv", "PTV_50", "PTV") == "228793007"
    assert code("liver", "Liver") == "91772007"


def test_empty_masks(axial, tmp_path: Path, caplog) -> None:
    _, series_dir, masks = axial
    empty = np.zeros_like(masks["body"])
    with caplog.at_level(logging.WARNING, logger="pipeline.writers.seg"):
        seg = hd.seg.segread(write_seg(read_series(series_dir), {"empty": empty, "body": masks["body"]},
                                       tmp_path / "seg.dcm"))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["body"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    with pytest.raises(InvalidInput, match="every mask is empty"):
        write_seg(read_series(series_dir), {"empty": empty}, tmp_path / "none.dcm")


def test_not_binary_refused(axial, tmp_path: Path) -> None:
    _, series_dir, masks = axial
    with pytest.raises(InvalidInput, match="'lungs' is not binary"):
        labels = masks["lung_left"] + 2 * masks["lung_right"].astype(int)
        write_seg(read_series(series_dir), {"lungs": labels}, tmp_path / "seg.dcm")
    assert not list(tmp_path.iterdir())


# Issue 10: highdicom builds the modules on one image and the frames are laid out and bit-packed by numpy.
# The file must be the one highdicom writes when it checks and encodes every frame itself.
MINTED = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime"}


def differences(fast: pydicom.Dataset, reference: pydicom.Dataset, where: str = "") -> list[str]:
    """Where two datasets differ, element by element and item by item, but for the times they were made."""
    found = []
    keywords = {e.keyword for e in fast} | {e.keyword for e in reference}
    for keyword in sorted(keywords - MINTED - {"PixelData"}):
        if keyword not in fast or keyword not in reference:
            found.append(f"{where}{keyword} only in the {'fast' if keyword in fast else 'reference'} SEG")
            continue
        a, b = fast[keyword], reference[keyword]
        if a.VR == "SQ" and b.VR == "SQ":
            if len(a.value) != len(b.value):
                found.append(f"{where}{keyword}: {len(a.value)} items, highdicom {len(b.value)}")
                continue
            for k, (x, y) in enumerate(zip(a.value, b.value, strict=True)):
                found += differences(x, y, f"{where}{keyword}[{k}].")
        elif (a.VR, a.value) != (b.VR, b.value):
            found.append(f"{where}{keyword}: {a.VR} {a.value!r}, highdicom {b.VR} {b.value!r}")
    return found


def gapped(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The body alone with three empty slices in it: one segment, frames on uneven planes."""
    body = masks["body"].copy()
    body[8:11] = False
    return {"body": body}


def odd_sized_uneven_grid() -> Grid:
    """:func:`uneven_grid` with 37 x 37 pixels of 10.8 mm: frames of 1369 bits, not whole bytes."""
    grid = uneven_grid()
    return Grid(grid.origin, grid.row_direction, grid.column_direction, (10.8, 10.8), 37, 37,
                grid.slice_offsets)


CASES = {
    "tilted, three segments": (lambda: phantom.oblique_grid("tilted", slices=24, size=48), "stored", dict),
    "sagittal, lungs only": (lambda: phantom.oblique_grid("sagittal", slices=20, size=48, slice_thickness=15.0),
                             "reversed", lambda m: {k: m[k] for k in ("lung_left", "lung_right")}),
    "coronal, one segment with a gap": (lambda: phantom.oblique_grid("coronal", slices=20, size=48), "stored",
                                        gapped),
    "uneven, frames of 37 x 37 pixels": (odd_sized_uneven_grid, "stored", dict),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_seg_is_highdicoms_own(case: str, tmp_path: Path) -> None:
    make_grid, order, select = CASES[case]
    series_dir, truth = make_series(tmp_path, make_grid(), order=order)
    masks = select(truth)
    series = read_series(series_dir)
    uids = {"sop_instance_uid": hd.UID(), "series_instance_uid": hd.UID()}
    fast = write_seg(series, masks, tmp_path / "fast.dcm", **uids)
    reference = write_seg(series, masks, tmp_path / "highdicom.dcm", highdicom_frames=True, **uids)

    # highdicom reads the masks back exactly, each frame on the image it references.
    seg = hd.seg.segread(fast)
    pixels = seg.get_pixels_by_source_instance([s.sop_instance_uid for s in series.slices],
                                               segment_numbers=list(range(1, len(masks) + 1)))
    assert np.array_equal(pixels.astype(bool), np.stack(list(masks.values()), axis=-1))
    assert dciodvfy_errors(fast) == []
    # And the file is highdicom's, element for element and bit for bit (highdicom pads odd pixel data
    # with an ASCII "0", this writer with a NUL).
    a, b = pydicom.dcmread(fast), pydicom.dcmread(reference)
    assert differences(a, b) == []
    assert len(a.PixelData) == len(b.PixelData) and a.PixelData[:-1] == b.PixelData[:-1]
    # Only the frames with content are stored.
    assert int(a.NumberOfFrames) == sum(int(m.any(axis=(1, 2)).sum()) for m in masks.values())
