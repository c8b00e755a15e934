"""The one entry the job pipeline calls: masks and their source series to checked DICOM files."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydicom.uid import generate_uid

from pipeline.crashpoints import delay_point
from pipeline.errors import InvalidInput
from pipeline.writers.check import DEFAULT_MIN_DICE, check_rtstruct
from pipeline.writers.rtstruct import resolve_structures, write_rtstruct
from pipeline.writers.seg import write_seg
from pipeline.writers.series import align_masks, read_series

log = logging.getLogger(__name__)

__all__ = ["KINDS", "STEPS", "DicomOutputs", "OutputUIDs", "output_uids", "write_dicom_outputs"]

KINDS = ("rtstruct", "seg")
#: What :attr:`DicomOutputs.seconds` times: reading the series and the masks onto it, writing the RTSTRUCT,
#: its check-back, writing the SEG.
STEPS = ("read", "rtstruct", "check", "seg")
_FILE_NAMES = {"rtstruct": "rtstruct.dcm", "seg": "seg.dcm"}


class OutputUIDs(NamedTuple):
    """The UIDs of one output file (None: the writer mints new ones)."""

    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None


def output_uids(seed: str | None, kind: str) -> OutputUIDs:
    """The SOP Instance and Series Instance UIDs of one output, derived from ``seed`` (issue 10).

    A rerun of a job (the service killed after an output left) writes and sends the same instances
    again, which a PACS or planning system stores once, instead of a second, different RTSTRUCT. The UIDs
    are pydicom's ``generate_uid`` with ``seed``, ``kind`` and the attribute as its entropy: valid UIDs
    under pydicom's root, the same for the same seed, and unrelated from one seed or kind to another.

    Parameters
    ----------
    seed
        What makes the outputs a job's own: its id and the input series', ``"<job id>/<series id>"``; None
        for new UIDs.
    kind
        ``"rtstruct"`` or ``"seg"``.

    Returns
    -------
    OutputUIDs
        ``sop_instance_uid`` and ``series_instance_uid``, as the writers take them.
    """
    if seed is None:
        return OutputUIDs()
    return OutputUIDs(sop_instance_uid=generate_uid(entropy_srcs=[seed, kind, "sop"]),
                      series_instance_uid=generate_uid(entropy_srcs=[seed, kind, "series"]))


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
    seconds
        Wall-clock seconds of each step of :data:`STEPS` that ran (issue 10: where the time goes between
        the algorithm's end and the results at the destination).
    """

    files: list[Path]
    check: dict[str, float]
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


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
    uid_seed: str | None = None,
    on_written: Callable[[Path], None] | None = None,
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
    uid_seed
        Derive each file's SOP Instance and Series Instance UIDs from this (:func:`output_uids`), so that
        writing the same job's outputs again gives the same instances; new UIDs when not given.
    on_written
        Called with each file once it is final and will be kept: the RTSTRUCT once its check has passed,
        the SEG after that (issue 10: the RTSTRUCT may be sent while the SEG is still being written).

    Returns
    -------
    DicomOutputs
        The files written, the check-back Dice per structure, the structures left out as empty, and the
        seconds each step took.

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
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    series = read_series(Path(series_dir))
    aligned = align_masks(series, masks)
    skipped = [name for name, array in aligned.items() if not np.any(array)]
    seconds["read"] = time.perf_counter() - started
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        if (out_dir / _FILE_NAMES[kind]).exists():
            raise FileExistsError(f"{out_dir / _FILE_NAMES[kind]} exists; Postbox never overwrites an output")

    files: list[Path] = []
    check: dict[str, float] = {}
    # Issue 10: the SEG is written in a thread while the RTSTRUCT is written and checked; numpy, OpenCV and
    # the file writes release the GIL. If the RTSTRUCT's check fails, the SEG is removed once written.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postbox-seg")
    seg_written: Future[Path] | None = None
    try:
        if "seg" in kinds:
            uids = output_uids(uid_seed, "seg")
            seg_written = pool.submit(_timed, seconds, "seg", _write_seg, series, aligned,
                                      out_dir / _FILE_NAMES["seg"], structures=structures,
                                      algorithm_name=algorithm_name, algorithm_version=algorithm_version,
                                      sop_instance_uid=uids.sop_instance_uid,
                                      series_instance_uid=uids.series_instance_uid)
        if "rtstruct" in kinds:
            staged = out_dir / f".{generate_uid()}.rtstruct.dcm"
            try:
                started = time.perf_counter()
                uids = output_uids(uid_seed, "rtstruct")
                write_rtstruct(series, aligned, staged, structures=structures, algorithm_name=algorithm_name,
                               algorithm_version=algorithm_version, sop_instance_uid=uids.sop_instance_uid,
                               series_instance_uid=uids.series_instance_uid)
                seconds["rtstruct"] = time.perf_counter() - started
                started = time.perf_counter()
                check = check_rtstruct(staged, series, aligned, min_dice,
                                       names={key: s.name for key, s in resolved.items()})
                seconds["check"] = time.perf_counter() - started
                files.append(out_dir / _FILE_NAMES["rtstruct"])
                os.replace(staged, files[-1])
                if on_written is not None:
                    on_written(files[-1])  # checked: it may leave now, while the SEG is still being written
            finally:
                staged.unlink(missing_ok=True)
        if seg_written is not None:
            files.append(seg_written.result())  # after the RTSTRUCT: the files keep their order
            if on_written is not None:
                on_written(files[-1])
    except BaseException:
        pool.shutdown(wait=True)  # the SEG, if being written, is finished before it is removed
        if seg_written is not None and not seg_written.cancelled() and seg_written.exception() is None:
            files.append(seg_written.result())
        for path in files:
            path.unlink(missing_ok=True)
        raise
    finally:
        pool.shutdown(wait=True)
    log.info("DICOM outputs %s written to %s; check-back Dice %s", [f.name for f in files], out_dir,
             ", ".join(f"{k} {v:.4f}" for k, v in check.items()) or "not run")
    # In the order of STEPS, whichever of the RTSTRUCT and the SEG (in its thread) finished first.
    return DicomOutputs(files=files, check=check, skipped=skipped,
                        seconds={step: seconds[step] for step in STEPS if step in seconds})


def _timed(seconds: dict[str, float], step: str, write: Callable[..., Path], *args: Any, **kwargs: Any) -> Path:
    """``write(*args, **kwargs)``, its wall-clock seconds recorded under ``step`` once it has succeeded."""
    started = time.perf_counter()
    path = write(*args, **kwargs)
    seconds[step] = time.perf_counter() - started
    return path


def _write_seg(*args: Any, **kwargs: Any) -> Path:
    delay_point("seg")  # tests only: a slow SEG, to see the RTSTRUCT leave before it
    return write_seg(*args, **kwargs)
