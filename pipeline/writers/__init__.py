"""Masks and their source series to DICOM files a planning system accepts: RTSTRUCT and SEG (issue 5)."""

from __future__ import annotations

from pipeline.writers.check import check_rtstruct, dice, rasterise_rtstruct
from pipeline.writers.outputs import DicomOutputs, write_dicom_outputs
from pipeline.writers.rtstruct import (
    Structure,
    convert_nifti,
    mask_contours,
    resolve_structures,
    write_rtstruct,
)
from pipeline.writers.seg import write_seg
from pipeline.writers.series import Series, Slice, align_mask, load_mask, read_series

__all__ = [
    "DicomOutputs",
    "Series",
    "Slice",
    "Structure",
    "align_mask",
    "check_rtstruct",
    "convert_nifti",
    "dice",
    "load_mask",
    "mask_contours",
    "rasterise_rtstruct",
    "read_series",
    "resolve_structures",
    "write_dicom_outputs",
    "write_rtstruct",
    "write_seg",
]
