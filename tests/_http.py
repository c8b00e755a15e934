"""Helpers for the HTTP tests: a running Postbox site with its HTTP door, keys, and the phantom's truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from conftest import Site

from pipeline import phantom
from pipeline.bodylungs import DEFAULT_SETTINGS
from pipeline.phantom import Grid

BODY_LUNGS = {"name": "body-lungs", "function": "pipeline.bodylungs:segment", "default_settings": DEFAULT_SETTINGS}


class HttpSite(Site):
    """A Site whose service also serves HTTP on a free port of 127.0.0.1."""

    url = ""
    alice = ""  # API keys, made by the fixture that starts the site
    bob = ""

    def start_http(self) -> str:
        proc = self.start()
        self.url = f"http://127.0.0.1:{self.doors(proc)['http']['port']}"
        return self.url

    def key(self, name: str) -> str:
        return self.cli("manage", "key", "--add", name).stdout.strip()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def http_site(root: Path, **config: Any) -> HttpSite:
    site = HttpSite(root)
    site.config["algorithms"].append(dict(BODY_LUNGS))
    site.write_config(**config)
    return site


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def check_masks(files: list[Path], grid: Grid, *, minimum: float = 0.9) -> dict[str, float]:
    """Each downloaded mask (body, lung_left, lung_right) matches the phantom's truth on its own geometry."""
    _, truth = phantom.sample(grid, noise=0)
    masks = {f.name.split(".")[0]: f for f in files if f.name.endswith(".nii.gz")}
    assert sorted(masks) == ["body", "lung_left", "lung_right"], files
    scores = {}
    for name, path in masks.items():
        mask = sitk.ReadImage(str(path))
        reference = phantom.to_sitk(grid, truth[name])
        expected = sitk.Resample(reference, mask, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        scores[name] = dice(sitk.GetArrayFromImage(mask).astype(bool), sitk.GetArrayFromImage(expected).astype(bool))
        assert scores[name] > minimum, f"{name}: Dice {scores[name]:.3f}"
    return scores
