"""Shared by the DICOM output tests: dicom3tools' validator, Dice, and a phantom series with its truth."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from pipeline import phantom
from pipeline.phantom import Grid

NAMES = phantom.structure_names()


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dicom3tools' ``dciodvfy`` prints for ``path`` (it must be installed: no skipping)."""
    tool = shutil.which("dciodvfy")
    assert tool is not None, "dciodvfy is missing: apt-get install -y dicom3tools (bash .ci/install does)"
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def make_series(folder: Path, grid: Grid, **kwargs: object) -> tuple[Path, dict[str, np.ndarray]]:
    """A phantom CT series in ``folder/ct`` and its exact truth masks (body and lungs)."""
    series_dir = folder / "ct"
    phantom.write_dicom(series_dir, grid, **kwargs)  # type: ignore[arg-type]
    _, truth = phantom.sample(grid, noise=0.0)
    return series_dir, {name: truth[name] for name in NAMES}
