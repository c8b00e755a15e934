"""Binary masks on a DICOM series to a DICOM Segmentation with highdicom (issue 5 point 2).

One segment per non-empty structure, coded with SNOMED CT where the structure is known (body, lungs) and
with a generic code otherwise, identified as produced automatically by the configured algorithm, and
referencing every image of the source series.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from pipeline.errors import InvalidInput
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
    seg = hd.seg.Segmentation(
        # Frames follow the source images one to one, both in the series' sorted order.
        source_images=list(series.headers),
        pixel_array=np.stack(arrays, axis=-1),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Postbox",
        manufacturer_model_name="Postbox",
        software_versions=f"{algorithm_name} {algorithm_version}"[:64],
        device_serial_number="0",
        series_description=(series_description or f"{algorithm_name} {algorithm_version} segmentation")[:64],
        content_label="POSTBOX",
        content_description=f"{algorithm_name} {algorithm_version}"[:64],
    )
    path = _save(seg, Path(output_file))
    log.info("SEG %s: %d segments on series %s", path.name, len(descriptions), series.series_instance_uid)
    return path
