"""The completeness gate: a DICOM series runs only when it is one whole volume.

Every door's DICOM input passes here before its algorithm runs (design.md: a series that is not whole is
never run silently). One geometry (orientation, size, frame of reference, no duplicate position) comes
from the series reader; this module adds what a volume needs on top: positions evenly spaced with no gap
where slices are missing, and the image count the images themselves announce.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import InvalidInput

log = logging.getLogger(__name__)

# A step this much longer than the usual one is not rounding: slices are missing or spacing changes.
_STEP_TOLERANCE = 0.05  # relative
_AXES = ("x", "y", "z")


def problems(series_dir: Path) -> list[str]:
    """What keeps the series in ``series_dir`` from being one whole volume; empty when it is.

    Raises
    ------
    InvalidInput
        When the series is not one geometry at all (mixed orientations or sizes, another frame of
        reference, a position twice): running it is never an option.
    """
    from .writers.series import read_series  # pydicom and SimpleITK: only needed for DICOM jobs

    if not _has_images(series_dir):
        return []  # an RTSTRUCT or other non-image object has no volume to check
    series = read_series(series_dir)
    found: list[str] = []
    offsets = series.offsets
    axis = _axis_name(series.normal)
    if len(offsets) >= 3:
        steps = np.diff(offsets)
        step = _usual_step(steps)
        for k, gap in enumerate(steps):
            if abs(gap - step) <= _STEP_TOLERANCE * step:
                continue
            missing = gap / step - 1
            where = f"between {axis}={offsets[k]:.1f} and {axis}={offsets[k + 1]:.1f}"
            if gap > step and abs(missing - round(missing)) <= _STEP_TOLERANCE * max(1.0, missing):
                n = int(round(missing))
                found.append(f"gap {where}: {n} slice{'s' if n > 1 else ''} missing")
            else:
                found.append(f"uneven spacing {where}: {gap:.2f} mm where the series steps {step:.2f} mm")
    announced = _announced_count(series.headers)
    if announced is not None and announced > len(offsets):
        found.append(f"{len(offsets)} of the {announced} images announced (ImagesInAcquisition) have arrived")
    return found


def summary(found: list[str], most: int = 3) -> str:
    """The problems in one line, the first few named (an uneven series can have dozens)."""
    text = "; ".join(found[:most])
    return text + (f"; and {len(found) - most} more" if len(found) > most else "")


def check(series_dir: Path) -> None:
    """Raise InvalidInput naming the problems of the series, or return when it is whole."""
    found = problems(series_dir)
    if found:
        raise InvalidInput("incomplete series: " + summary(found))


def _has_images(series_dir: Path) -> bool:
    import pydicom

    for path in sorted(p for p in Path(series_dir).rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Modality"])
        except Exception:  # not DICOM: the series reader reports it if it matters
            continue
        if "Rows" in ds and ds.get("Modality") not in ("RTSTRUCT", "SEG", "RTDOSE", "RTPLAN", "SR"):
            return True
    return False


def _usual_step(steps: np.ndarray) -> float:
    # The most common step (rounded to 0.01 mm) is the series' own; a median would be pulled by gaps.
    counts = Counter(np.round(steps, 2).tolist())
    return float(max(counts.items(), key=lambda kv: (kv[1], -kv[0]))[0])


def _axis_name(normal: np.ndarray) -> str:
    k = int(np.argmax(np.abs(normal)))
    return _AXES[k] if abs(normal[k]) > 0.999 else "position"


def _announced_count(headers: tuple) -> int | None:
    values = {int(h.ImagesInAcquisition) for h in headers if h.get("ImagesInAcquisition") not in (None, "")}
    # Only a count every image agrees on is a promise; scanners differ on what an acquisition spans.
    if len(values) == 1 and all(h.get("ImagesInAcquisition") not in (None, "") for h in headers):
        return values.pop()
    return None
