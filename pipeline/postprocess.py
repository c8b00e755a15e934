"""After an algorithm: turn its NIfTI masks on a DICOM input into RTSTRUCT/SEG (issue 5, point 3).

A simple algorithm returns masks only; when its input was a DICOM series, the job gets the DICOM outputs
listed in the algorithm's ``outputs`` too, written on that series' geometry and checked before they
are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import AlgorithmConfig
from .dataobject import DataObject

log = logging.getLogger(__name__)

_MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def mask_name(obj: DataObject) -> str:
    """A structure's name: the algorithm's ``meta_data["name"]``, else the file name without its suffix."""
    name = obj.meta_data.get("name")
    if isinstance(name, str) and name:
        return name
    base = Path(obj.path).name
    for suffix in _MASK_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def add_dicom_outputs(alg: AlgorithmConfig, inputs: list[DataObject], outputs: list[DataObject],
                      work_dir: Path, *, structures: Mapping[str, Any] | None = None,
                      log_line: Any = None) -> tuple[list[DataObject], dict[str, dict[str, float]]]:
    """Append RTSTRUCT/SEG data objects for each DICOM input whose outputs include masks.

    Returns the outputs (the algorithm's, then the DICOM ones) and the check-back Dice per input and
    structure. Raises InvalidInput (from the writers) when masks cannot go on the series or the check fails.
    """
    if not alg.outputs or not any(d.type == "DICOM" for d in inputs):
        return outputs, {}
    from .writers.outputs import write_dicom_outputs  # pydicom/highdicom/cv2: only for DICOM jobs

    added: list[DataObject] = []
    checks: dict[str, dict[str, float]] = {}
    for series in (d for d in inputs if d.type == "DICOM"):
        masks = {mask_name(o): Path(o.path) for o in _masks(outputs) if o.parent and o.parent.id == series.id}
        if not masks and len([d for d in inputs if d.type == "DICOM"]) == 1:
            # An algorithm that does not set parents: its masks belong to the only series there is.
            masks = {mask_name(o): Path(o.path) for o in _masks(outputs) if o.parent is None}
        if not masks:
            continue
        result = write_dicom_outputs(
            Path(series.path), masks, work_dir / f"dicom-{series.id}", kinds=tuple(alg.outputs),
            structures={**alg.structures, **(structures or {})}, min_dice=alg.min_dice, algorithm_name=alg.name,
        )
        checks[str(series.id)] = result.check
        if log_line is not None:
            log_line(f"DICOM outputs for {series.id}: {', '.join(f.name for f in result.files)}; check-back Dice "
                     + (", ".join(f"{k} {v:.4f}" for k, v in result.check.items()) or "not run")
                     + (f"; empty, left out: {', '.join(result.skipped)}" if result.skipped else ""))
        for path in result.files:
            kind = "rtstruct" if path.name.startswith("rtstruct") else "seg"
            added.append(DataObject(type="DICOM", path=str(path), parent=series,
                                    meta_data={"kind": kind, "name": f"{series.id}-{path.name}"}))
    return outputs + added, checks


def _masks(outputs: list[DataObject]) -> list[DataObject]:
    return [o for o in outputs if o.type == "FILE" and o.path.lower().endswith(_MASK_SUFFIXES)]
