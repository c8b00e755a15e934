"""After an algorithm: turn its NIfTI masks on a DICOM input into RTSTRUCT/SEG (issue 5, point 3).

A simple algorithm returns masks only; when its input was a DICOM series, the job gets the DICOM outputs
listed in the algorithm's ``outputs`` too, written on that series' geometry and checked before they
are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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


#: job.yaml's ``timings`` key of each step that writes the DICOM outputs (``writers.outputs.STEPS``), in
#: seconds, summed over the job's series (issue 10: where the time goes after the algorithm's end).
TIMINGS = {"read": "dicom_read_seconds", "rtstruct": "rtstruct_seconds", "check": "check_seconds",
           "seg": "seg_seconds"}


@dataclass
class AddedOutputs:
    """What :func:`add_dicom_outputs` returns.

    Parameters
    ----------
    outputs
        The algorithm's outputs, then the DICOM ones written.
    checks
        Check-back Dice per input series and structure.
    timings
        Seconds each step took, under its job.yaml ``timings`` key (:data:`TIMINGS`); empty if none ran.
    """

    outputs: list[DataObject]
    checks: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def add_dicom_outputs(alg: AlgorithmConfig, inputs: list[DataObject], outputs: list[DataObject],
                      work_dir: Path, *, job_id: str | None = None, structures: Mapping[str, Any] | None = None,
                      log_line: Any = None, on_written: Callable[[Path], None] | None = None) -> AddedOutputs:
    """Append RTSTRUCT/SEG data objects for each DICOM input whose outputs include masks.

    With ``job_id``, each file's UIDs derive from it and the series' id, so that a rerun of the job writes
    (and sends) the same instances again (issue 10). ``on_written`` is called with each file as soon as it
    is final: the RTSTRUCT once checked, the SEG once the RTSTRUCT's check has passed. Raises InvalidInput
    (from the writers) when masks cannot go on the series or the check fails.
    """
    if not alg.outputs or not any(d.type == "DICOM" for d in inputs):
        return AddedOutputs(outputs)
    from .writers.outputs import write_dicom_outputs  # pydicom/highdicom/cv2: only for DICOM jobs

    # An algorithm that writes its own RTSTRUCT (PlatiPy's convert_nifti) gets no second, automatic one:
    # a planning system would receive both.
    own = _own_kinds(outputs)
    kinds = tuple(k for k in alg.outputs if k not in own)
    if own & set(alg.outputs):
        note = (f"the algorithm returned its own {', '.join(sorted(k.upper() for k in own))}: "
                f"no automatic {', '.join(k.upper() for k in alg.outputs if k in own)} written")
        log.info("job %s: %s", job_id, note)
        if log_line is not None:
            log_line(note)
    if not kinds:
        return AddedOutputs(outputs)

    added: list[DataObject] = []
    checks: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for series in (d for d in inputs if d.type == "DICOM"):
        masks = {mask_name(o): Path(o.path) for o in _masks(outputs) if o.parent and o.parent.id == series.id}
        if not masks and len([d for d in inputs if d.type == "DICOM"]) == 1:
            # An algorithm that does not set parents: its masks belong to the only series there is.
            masks = {mask_name(o): Path(o.path) for o in _masks(outputs) if o.parent is None}
        if not masks:
            continue
        result = write_dicom_outputs(
            Path(series.path), masks, work_dir / f"dicom-{series.id}", kinds=kinds,
            structures={**alg.structures, **(structures or {})}, min_dice=alg.min_dice, algorithm_name=alg.name,
            uid_seed=f"{job_id}/{series.id}" if job_id else None, on_written=on_written,
        )
        checks[str(series.id)] = result.check
        for step, seconds in result.seconds.items():
            timings[TIMINGS[step]] = timings.get(TIMINGS[step], 0.0) + seconds
        if log_line is not None:
            log_line(f"DICOM outputs for {series.id}: {', '.join(f.name for f in result.files)}; check-back Dice "
                     + (", ".join(f"{k} {v:.4f}" for k, v in result.check.items()) or "not run")
                     + (f"; empty, left out: {', '.join(result.skipped)}" if result.skipped else ""))
        for path in result.files:
            kind = "rtstruct" if path.name.startswith("rtstruct") else "seg"
            added.append(DataObject(type="DICOM", path=str(path), parent=series,
                                    meta_data={"kind": kind, "name": f"{series.id}-{path.name}"}))
    return AddedOutputs(outputs + added, checks, timings)


def _own_kinds(outputs: list[DataObject]) -> set[str]:
    """The output kinds (``rtstruct``, ``seg``) among the algorithm's own DICOM outputs, by their Modality."""
    import pydicom

    found: set[str] = set()
    for o in outputs:
        if o.type != "DICOM":
            continue
        path = Path(o.path)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["Modality"])
            except Exception:  # not DICOM after all, or unreadable: not one of ours to skip for
                continue
            kind = _MODALITY_KINDS.get(str(ds.get("Modality", "")).upper())
            if kind is not None:
                found.add(kind)
    return found


_MODALITY_KINDS = {"RTSTRUCT": "rtstruct", "SEG": "seg"}


def _masks(outputs: list[DataObject]) -> list[DataObject]:
    return [o for o in outputs if o.type == "FILE" and o.path.lower().endswith(_MASK_SUFFIXES)]
