"""Binary masks on a DICOM series to a DICOM Segmentation with highdicom (issue 5 point 2).

One segment per non-empty structure, coded with SNOMED CT where the structure is known (body, lungs) and
with a generic code otherwise, identified as produced automatically by the configured algorithm, and
referencing every image of the source series. highdicom builds the dataset's modules on the series' first
image; the frames of the whole series are then put in as highdicom lays them out, their pixels bit-packed
by numpy in one pass (issue 10: highdicom's own voxel checks and per-frame packing took seconds on a
200 x 512 x 512 CT).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from pipeline.errors import InvalidInput
from pipeline.writers import _encoding as enc
from pipeline.writers.rtstruct import Structure, _save, resolve_structures
from pipeline.writers.series import Series, align_mask

log = logging.getLogger(__name__)

__all__ = ["segment_codes", "write_seg"]

# Categories from CID 7150 (Segmentation Property Categories). Anatomical Structure is SCT 91723000 there,
# the code DICOM lists (123037004 is the SNOMED top concept "Body structure", which CID 7150 does not use).
_ANATOMY = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
_SPATIAL = hd.sr.CodedConcept("309825002", "SCT", "Spatial and Relational Concept")
_ABNORMAL = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")

# Known structures by normalised name. Laterality is pre-coordinated (SNOMED's "Left lung" and "Right
# lung") rather than Lung with a laterality modifier, so a reader matching on the type code alone tells
# the two lungs apart.
_KNOWN = {
    "body": (_ANATOMY, hd.sr.CodedConcept("38266002", "SCT", "Entire body")),
    "lung": (_ANATOMY, hd.sr.CodedConcept("39607008", "SCT", "Lung")),
    "lungleft": (_ANATOMY, hd.sr.CodedConcept("44029006", "SCT", "Left lung")),
    "lungright": (_ANATOMY, hd.sr.CodedConcept("3341006", "SCT", "Right lung")),
}
_ALIASES = {
    "body": "body", "external": "body", "skin": "body", "outline": "body", "bodyoutline": "body",
    "lung": "lung", "lungs": "lung", "bothlungs": "lung", "lungtotal": "lung",
    "lungleft": "lungleft", "leftlung": "lungleft", "lungl": "lungleft", "llung": "lungleft",
    "lungright": "lungright", "rightlung": "lungright", "lungr": "lungright", "rlung": "lungright",
}
# Anything else is coded by what the RT ROI Interpreted Type says it is; the name goes in SegmentLabel.
_BY_TYPE = {
    "GTV": (_ABNORMAL, hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")),
    "CTV": (_SPATIAL, hd.sr.CodedConcept("228792002", "SCT", "Clinical target volume")),
    "PTV": (_SPATIAL, hd.sr.CodedConcept("228793007", "SCT", "Planning target volume")),
    "EXTERNAL": _KNOWN["body"],
}
# The generic code: an organ (CID 7151), the usual output of an auto-segmentation model.
_GENERIC = (_ANATOMY, hd.sr.CodedConcept("91772007", "SCT", "Organ"))


def segment_codes(structure: Structure) -> tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]:
    """Segmented property category and type for a structure.

    Parameters
    ----------
    structure
        Its mask name and mapped ROI name are matched (body, external, lungs, lung_left, Lung_L, ...),
        then its RT ROI Interpreted Type (GTV, CTV, PTV, EXTERNAL).

    Returns
    -------
    tuple of highdicom.sr.CodedConcept
        ``(category, type)``.
    """
    for name in (structure.key, structure.name):
        alias = _ALIASES.get(re.sub(r"[^a-z0-9]", "", name.lower()))
        if alias:
            return _KNOWN[alias]
    return _BY_TYPE.get(structure.type, _GENERIC)


def write_seg(
    series: Series,
    masks: Mapping[str, sitk.Image | np.ndarray],
    output_file: Path,
    *,
    structures: Mapping[str, Mapping[str, Any]] | None = None,
    algorithm_name: str = "postbox",
    algorithm_version: str = "0.1",
    series_number: int = 9002,
    series_description: str | None = None,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    highdicom_frames: bool = False,
) -> Path:
    """Write masks on ``series`` as a binary DICOM Segmentation in a new series of the source study.

    Parameters
    ----------
    series
        The image series the masks were made on.
    masks
        Mask name to mask, as for :func:`~pipeline.writers.rtstruct.write_rtstruct`; one segment each,
        numbered in this order; empty masks are left out with a warning.
    output_file
        Where to write; never overwritten.
    structures
        Segment labels and display colours; see :func:`~pipeline.writers.rtstruct.resolve_structures`.
    algorithm_name, algorithm_version
        The Segment Algorithm Identification of every segment.
    series_number, series_description
        Of the new series.
    sop_instance_uid, series_instance_uid
        The file's own UIDs; new ones when not given. With a SOP Instance UID given, the one other UID the
        file mints (its Dimension Organization UID) is derived from it, so the same masks written again
        give the same instance (a job's rerun, issue 10).
    highdicom_frames
        Let highdicom check and encode every frame itself, as before issue 10: the same file, several
        times slower on a large CT; the reference that tests and ``bench/writers.py`` compare with.

    Returns
    -------
    pathlib.Path
        ``output_file``.

    Raises
    ------
    InvalidInput
        If a mask cannot be put on the series, the mapping is invalid, or every mask is empty.
    FileExistsError
        If ``output_file`` exists.
    """
    resolved = resolve_structures(list(masks), structures)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    arrays: list[np.ndarray] = []
    descriptions: list[hd.seg.SegmentDescription] = []
    for key, mask in masks.items():
        array = align_mask(series, key, mask)
        if not array.any():
            log.warning("structure %s: mask is empty, left out of the SEG", key)
            continue
        structure = resolved[key]
        category, property_type = segment_codes(structure)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=len(descriptions) + 1,
            segment_label=structure.name,
            segmented_property_category=category,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*structure.color),
        ))
        arrays.append(array)
    if not arrays:
        raise InvalidInput(f"every mask is empty ({', '.join(masks)}); there is no segment to write")
    if highdicom_frames:
        # Frames follow the source images one to one, both in the series' sorted order.
        source_images, pixel_array = list(series.headers), np.stack(arrays, axis=-1)
    else:
        # highdicom builds every module but the frames in milliseconds on the first image alone (one pixel
        # per segment); _with_frames then lays out the whole series' frames (issue 10).
        source_images, pixel_array = [series.headers[0]], _proxy_pixels(series, len(arrays))
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(series_instance_uid) if series_instance_uid else hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(sop_instance_uid) if sop_instance_uid else hd.UID(),
        instance_number=1,
        manufacturer="Postbox",
        manufacturer_model_name="Postbox",
        software_versions=f"{algorithm_name} {algorithm_version}"[:64],
        device_serial_number="0",
        series_description=(series_description or f"{algorithm_name} {algorithm_version} segmentation")[:64],
        content_label="POSTBOX",
        content_description=f"{algorithm_name} {algorithm_version}"[:64],
    )
    ds = seg if highdicom_frames else _with_frames(seg, series, arrays)
    if sop_instance_uid:
        _derive_dimension_organization_uid(ds)
    path = _save(ds, Path(output_file))
    log.info("SEG %s: %d segments on series %s", path.name, len(descriptions), series.series_instance_uid)
    return path


def _derive_dimension_organization_uid(ds: Dataset) -> None:
    """Put a Dimension Organization UID derived from the SOP Instance UID in place of highdicom's new one.

    highdicom mints it on every call; derived, a rerun of the same job writes the same instance (issue 10).
    """
    uid = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "dimension-organization"])
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in ds.get(keyword, []):
            if "DimensionOrganizationUID" in item:
                item.DimensionOrganizationUID = uid


# What highdicom (0.28, image.py and seg/sop.py) writes in each frame's Derivation Image Sequence: the frame
# is a segmentation of its source image, whose spatial locations it keeps.
_DERIVATION = hd.sr.CodedConcept.from_code(codes.cid7203.SegmentationImageDerivation)
_PURPOSE = hd.sr.CodedConcept.from_code(codes.cid7202.SourceImageForImageProcessingOperation)


def _proxy_pixels(series: Series, segments: int) -> np.ndarray:
    """A one-image pixel array with one pixel in each segment, for highdicom to build the modules on."""
    pixels = np.zeros((1, series.rows, series.columns, segments), dtype=bool)
    pixels[0, 0, 0, :] = True
    return pixels


def _with_frames(proxy: hd.seg.Segmentation, series: Series, arrays: list[np.ndarray]) -> Dataset:
    """The SEG of ``arrays`` on the whole series, from highdicom's SEG of the same segments on its first image.

    Everything that depends on the frames is put in as highdicom puts it when given the whole series (the
    reference: ``write_seg(..., highdicom_frames=True)``, compared in tests/test_writers_seg.py):

    - the frames: only those with content (highdicom's ``omit_empty_frames``), segment after segment, and
      in each segment the planes in highdicom's order, ascending along its normal (column x row
      direction); Dimension Index Values ``(segment, plane)``, the plane counted among those with content
      in any segment;
    - per frame: its source image (derivation), its Image Position Patient, and its segment number (in the
      shared functional groups instead when there is one segment);
    - every image referenced (Source Image, Referenced Series), Spacing Between Slices from all the
      positions, the 3D dimension organization for one segment on evenly spaced planes, whether segments
      overlap;
    - the pixels: the frames bit-packed with ``np.packbits(..., bitorder="little")``: a BINARY SEG holds one
      bit a pixel, the first pixel in the lowest bit of a byte, frames back to back with no padding between
      them (PS3.5 8.1.1 and 8.2), the whole padded to an even length.

    The long sequences (one item per frame or per image) are encoded as bytes (:mod:`._encoding`).
    """
    ds = Dataset()
    for elem in proxy:
        ds.add(elem)
    ds.file_meta, ds.preamble = proxy.file_meta, proxy.preamble
    headers = series.headers
    n = len(headers)

    references = [enc.element(0x00081150, "UI", enc.uid(h.SOPClassUID))  # ReferencedSOPClassUID
                  + enc.element(0x00081155, "UI", enc.uid(h.SOPInstanceUID))  # ReferencedSOPInstanceUID
                  for h in headers]
    enc.set_raw_sequence(ds, 0x00082112, references)  # SourceImageSequence
    enc.set_raw_sequence(ds, 0x00081115, [  # ReferencedSeriesSequence: ReferencedInstanceSequence, the series
        enc.sequence(0x0008114A, references) + enc.element(0x0020000E, "UI", enc.uid(series.series_instance_uid))])

    positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, image_position=h.ImagePositionPatient)
                 for h in headers]
    position_values = [[float(v) for v in p[0].ImagePositionPatient] for p in positions]
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    measures = shared.PixelMeasuresSequence[0]
    if "SpacingBetweenSlices" not in headers[0]:
        # highdicom computes it from every source position; on its one-image proxy it would say 1.0.
        spacing, _ = hd.spatial.get_volume_positions(position_values, orientation)
        if spacing is None:
            del measures.SpacingBetweenSlices
        else:
            measures.SpacingBetweenSlices = format_number_as_ds(spacing)

    content = np.array([a.reshape(n, -1).any(axis=1) for a in arrays])  # (segment, slice)
    normal = hd.spatial.get_normal_vector(orientation, index_convention=hd.spatial.VOLUME_INDEX_CONVENTION)
    planes = [int(k) for k in np.argsort(np.array(position_values) @ normal, kind="stable") if content[:, k].any()]
    frames = [(s, k) for s in range(len(arrays)) for k in planes if content[s, k]]
    if len(arrays) == 1:
        spacing, _ = hd.spatial.get_volume_positions([position_values[k] for k in np.flatnonzero(content[0])],
                                                     orientation, sort=False)
        if len(planes) > 1 and spacing is not None and spacing > 0:
            ds.DimensionOrganizationType = "3D"

    # Each plane's derivation (its source image) and position are the same bytes in each segment's frame.
    derivation = enc.sequence(0x00089215, [enc.encoded(_DERIVATION)])  # DerivationCodeSequence
    purpose = enc.sequence(0x0040A170, [enc.encoded(_PURPOSE)])  # PurposeOfReferenceCodeSequence
    plane_bytes = {}
    for number, k in enumerate(planes, 1):
        source = (references[k] + enc.element(0x0028135A, "CS", enc.text("YES"))  # SpatialLocationsPreserved
                  + purpose)
        plane_bytes[k] = (number,
                          enc.sequence(0x00089124, [enc.sequence(0x00082112, [source]) + derivation]),  # Derivation
                          enc.sequence(0x00209113, [enc.encoded(positions[k][0])]))  # PlanePositionSequence
    per_segment = "SegmentIdentificationSequence" not in shared
    per_frame = []
    for s, k in frames:
        number, derivation_image, position = plane_bytes[k]
        frame_content = enc.element(0x00209157, "UL", enc.unsigned("UL", s + 1, number))  # DimensionIndexValues
        item = derivation_image + enc.sequence(0x00209111, [frame_content]) + position  # FrameContentSequence
        if per_segment:  # SegmentIdentificationSequence: ReferencedSegmentNumber
            item += enc.sequence(0x0062000A, [enc.element(0x0062000B, "US", enc.unsigned("US", s + 1))])
        per_frame.append(item)
    enc.set_raw_sequence(ds, 0x52009230, per_frame)  # PerFrameFunctionalGroupsSequence
    ds.NumberOfFrames = len(frames)
    ds.SegmentsOverlap = "YES" if _overlap(arrays, content) else "NO"

    if (series.rows * series.columns) % 8 == 0:
        # Each frame fills whole bytes: packed frame by frame into one buffer, the same bytes as the whole
        # stack packed at once, without a copy of the masks' frames (70 MB on a 200 x 512 x 512 CT).
        packed = np.empty((len(frames), series.rows * series.columns // 8), dtype=np.uint8)
        for j, (s, k) in enumerate(frames):
            packed[j] = np.packbits(arrays[s][k], bitorder="little")
        pixel_data = packed.tobytes()
    else:
        pixel_data = np.packbits(np.stack([arrays[s][k] for s, k in frames]), bitorder="little").tobytes()
    ds.add(DataElement(0x7FE00010, "OB", pixel_data + b"\0" * (len(pixel_data) % 2)))  # PixelData
    enc.keep_raw(ds)
    return ds


def _overlap(arrays: list[np.ndarray], content: np.ndarray) -> bool:
    """Whether a pixel is in two segments, looking only at slices where several segments have content."""
    for k in np.flatnonzero(content.sum(axis=0) > 1):
        planes = [a[k] for a, has in zip(arrays, content[:, k], strict=True) if has]
        if any(np.any(a & b) for a, b in itertools.combinations(planes, 2)):
            return True
    return False
