"""The one entry the job pipeline calls: masks and their source series to checked DICOM files."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from pipeline.errors import InvalidInput
from pipeline.writers.check import DEFAULT_MIN_DICE, check_rtstruct
from pipeline.writers.rtstruct import resolve_structures, write_rtstruct
from pipeline.writers.seg import write_seg
from pipeline.writers.series import align_masks, read_series

log = logging.getLogger(__name__)

__all__ = ["KINDS", "DicomOutputs", "write_dicom_outputs"]

KINDS = ("rtstruct", "seg")
_FILE_NAMES = {"rtstruct": "rtstruct.dcm", "seg": "seg.dcm"}


@dataclass
class DicomOutputs:
    """What :func:`write_dicom_outputs` wrote.

    Parameters
    ----------
    files
        The DICOM files written: the RTSTRUCT first, then the SEG.
    check
        Check-back Dice per mask name for the RTSTRUCT (empty when no RTSTRUCT was asked for); every
        figure is at least the ``min_dice`` asked for.
    skipped
        Mask names left out because they were empty.
    """

    files: list[Path]
    check: dict[str, float]
    skipped: list[str] = field(default_factory=list)


def write_dicom_outputs(
    series_dir: Path,
    masks: Mapping[str, Path],
    out_dir: Path,
    *,
    kinds: Sequence[str] = ("rtstruct",),
    structures: Mapping[str, Mapping[str, Any]] | None = None,
    min_dice: float = DEFAULT_MIN_DICE,
    algorithm_name: str = "postbox",
    algorithm_version: str = "0.1",
) -> DicomOutputs:
    """Write an algorithm's masks as DICOM on their source series, the RTSTRUCT checked before it is kept.

    The RTSTRUCT is written under a hidden temporary name in ``out_dir``, rasterised back onto the series
    and compared with its masks, and renamed to ``rtstruct.dcm`` only if every structure reaches
    ``min_dice``; otherwise it is removed and the call fails with the figures (issue 5 point 5).

    Parameters
    ----------
    series_dir
        The job's input series folder.
    masks
        Structure name (typically the file stem, ``lung_left``) to a mask file SimpleITK reads.
    out_dir
        Folder to write into (created if missing): ``rtstruct.dcm`` and/or ``seg.dcm``.
    kinds
        Which outputs: ``"rtstruct"``, ``"seg"``.
    structures
        Name, colour and RT ROI Interpreted Type per mask name, each optional:
        ``{lung_left: {name: Lung_L, color: [0, 255, 255], type: ORGAN}}``.
    min_dice
        The lowest check-back Dice accepted for any structure of the RTSTRUCT.
    algorithm_name, algorithm_version
        Identify the algorithm in the files.

    Returns
    -------
    DicomOutputs
        The files written, the check-back Dice per structure, and the structures left out as empty.

    Raises
    ------
    InvalidInput
        For an unknown kind, an invalid structure mapping, a series that is not one geometry, a mask that
        is unreadable, not binary or cannot be put on the series, masks that are all empty, or an RTSTRUCT
        whose check-back Dice is below ``min_dice`` for some structure (naming each with its figure).
    FileExistsError
        If an output file already exists in ``out_dir``.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise InvalidInput(f"unknown DICOM output kind(s) {unknown}; choose from {', '.join(KINDS)}")
    if not 0.0 <= min_dice <= 1.0:
        raise InvalidInput(f"min_dice must be between 0 and 1, not {min_dice}")
    # Check names, colours and types before any slow work, so a bad mapping fails at once.
    resolved = resolve_structures(list(masks), structures)
    series = read_series(Path(series_dir))
    aligned = align_masks(series, masks)
    skipped = [name for name, array in aligned.items() if not np.any(array)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        if (out_dir / _FILE_NAMES[kind]).exists():
            raise FileExistsError(f"{out_dir / _FILE_NAMES[kind]} exists; Postbox never overwrites an output")

    files: list[Path] = []
    check: dict[str, float] = {}
    try:
        # The RTSTRUCT first: if its check fails, no SEG of the same masks is left behind either.
        if "rtstruct" in kinds:
            staged = out_dir / f".{generate_uid()}.rtstruct.dcm"
            try:
                write_rtstruct(series, aligned, staged, structures=structures, algorithm_name=algorithm_name,
                               algorithm_version=algorithm_version)
                check = check_rtstruct(staged, series, aligned, min_dice,
                                       names={key: s.name for key, s in resolved.items()})
                files.append(out_dir / _FILE_NAMES["rtstruct"])
                os.replace(staged, files[-1])
            finally:
                staged.unlink(missing_ok=True)
        if "seg" in kinds:
            files.append(write_seg(series, aligned, out_dir / _FILE_NAMES["seg"], structures=structures,
                                   algorithm_name=algorithm_name, algorithm_version=algorithm_version))
    except BaseException:
        for path in files:
            path.unlink(missing_ok=True)
        raise
    log.info("DICOM outputs %s written to %s; check-back Dice %s", [f.name for f in files], out_dir,
             ", ".join(f"{k} {v:.4f}" for k, v in check.items()) or "not run")
    return DicomOutputs(files=files, check=check, skipped=skipped)
