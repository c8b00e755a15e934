"""Benchmark: masks to RTSTRUCT with Postbox's writer and with rt-utils, on the same phantom and masks.

Three structures (body, left and right lung) on a 512x512x200 CT phantom. For each writer: time from the
series folder and the masks to the file on disk (best of ``--repeats``), the Dice of each structure
rasterised back onto the CT (pixel-centre fill, :func:`pipeline.writers.check.rasterise_rtstruct`; rt-utils'
own reader as a second opinion), and the number of ``Error`` lines dciodvfy reports. Target (issue 5): at
least 2x as fast as rt-utils at equal or better Dice, with no dciodvfy error.

Run: ``python bench/rtstruct.py [--slices 200] [--size 512] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

# bench/pipeline.py (the job pipeline's benchmark) would shadow the pipeline package for a script run from
# this folder: put the repository root in the folder's place.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from pipeline import phantom  # noqa: E402
from pipeline.writers.check import dice, rasterise_rtstruct  # noqa: E402
from pipeline.writers.rtstruct import write_rtstruct  # noqa: E402
from pipeline.writers.series import Series, read_series  # noqa: E402

log = logging.getLogger(__name__)


def _best_time(fn: Callable[[int], Path], repeats: int) -> tuple[float, Path]:
    best, path = float("inf"), Path()
    for i in range(repeats):
        start = time.perf_counter()
        path = fn(i)
        best = min(best, time.perf_counter() - start)
    return best, path


def _runner(
    writer: Callable[[Path, dict[str, np.ndarray], Path], Path],
    series_dir: Path,
    masks: dict[str, np.ndarray],
    stem: Path,
) -> Callable[[int], Path]:
    return lambda i: writer(series_dir, masks, stem.with_name(f"{stem.name}{i}.dcm"))


def _ours(series_dir: Path, masks: dict[str, np.ndarray], out: Path) -> Path:
    series = read_series(series_dir)
    return write_rtstruct(series, masks, out)


def _rt_utils(series_dir: Path, masks: dict[str, np.ndarray], out: Path) -> Path:
    from rt_utils import RTStructBuilder

    rtstruct = RTStructBuilder.create_new(dicom_series_path=str(series_dir))
    for name, mask in masks.items():
        # rt-utils takes (rows, columns, slices) with slices sorted along the normal, as ours are.
        rtstruct.add_roi(mask=np.transpose(mask, (1, 2, 0)), name=name)
    rtstruct.save(str(out))
    return out


def _subpixel_fill(polygon: np.ndarray, shape: tuple[int, int], s: int) -> np.ndarray:
    """Even-odd fill of one polygon ((n, 2) column, row) sampled s x s times per pixel, shape (R*s, C*s)."""
    x, y = polygon[:, 0], polygon[:, 1]
    x2, y2 = np.roll(x, -1), np.roll(y, -1)
    height, width = shape[0] * s, shape[1] * s
    # Sample j of a row or column sits at (j + 0.5) / s - 0.5 in pixel coordinates.
    first = np.clip(np.ceil((np.minimum(y, y2) + 0.5) * s - 0.5), 0, height).astype(int)
    stop = np.clip(np.ceil((np.maximum(y, y2) + 0.5) * s - 0.5), 0, height).astype(int)
    counts = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(len(x)), counts)
    rows = np.repeat(first, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    v = (rows + 0.5) / s - 0.5
    xs = x[edge] + (v - y[edge]) * (x2[edge] - x[edge]) / (y2[edge] - y[edge])
    toggle_at = np.clip(np.floor((xs + 0.5) * s - 0.5) + 1, 0, width).astype(int)
    toggles = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(toggles, (rows, toggle_at), 1)
    return (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)


def _subpixel_dice(path: Path, series: Series, masks: dict[str, np.ndarray], s: int = 4) -> list[float]:
    """Dice of the polygons against the masks' pixel squares, both sampled s x s times per pixel.

    The geometric agreement a planning system with partial-volume rasterisation sees: contours through
    the centres of boundary pixels lose half a pixel on every side, contours along the pixel edges do not.
    """
    import pydicom

    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    polygons: dict[str, dict[int, list[np.ndarray]]] = {}
    for roi in ds.ROIContourSequence:
        per_slice = polygons.setdefault(names[int(roi.ReferencedROINumber)], {})
        for contour in roi.ContourSequence:
            k = series.index_of(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            columns, rows, _ = series.patient_to_pixel(k, np.array(contour.ContourData, float).reshape(-1, 3))
            per_slice.setdefault(k, []).append(np.column_stack([columns, rows]))
    figures = []
    for name, mask in masks.items():
        both = total = 0
        for k in range(mask.shape[0]):
            fine = np.zeros((mask.shape[1] * s, mask.shape[2] * s), dtype=bool)
            for polygon in polygons.get(name, {}).get(k, []):
                fine ^= _subpixel_fill(polygon, mask.shape[1:], s)
            truth = np.repeat(np.repeat(mask[k], s, axis=0), s, axis=1)
            both += np.count_nonzero(fine & truth)
            total += np.count_nonzero(fine) + np.count_nonzero(truth)
        figures.append(2 * both / total if total else 1.0)
    return figures


def _rt_utils_dice(series_dir: Path, path: Path, masks: dict[str, np.ndarray]) -> list[float]:
    from rt_utils import RTStructBuilder

    rtstruct = RTStructBuilder.create_from(dicom_series_path=str(series_dir), rt_struct_path=str(path))
    return [dice(np.transpose(rtstruct.get_roi_mask_by_name(name), (2, 0, 1)), mask)
            for name, mask in masks.items()]


def _dciodvfy_errors(path: Path) -> int | None:
    if shutil.which("dciodvfy") is None:
        return None
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return sum(line.startswith("Error") for line in (result.stdout + result.stderr).splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    grid = phantom.axial_grid(slices=args.slices, size=args.size)
    _, truth = phantom.sample(grid, noise=0.0)
    masks = {name: truth[name] for name in phantom.structure_names()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        series_dir = work / "ct"
        phantom.write_dicom(series_dir, grid)
        series: Series = read_series(series_dir)

        rows = []
        for label, writer in (("postbox", _ours), ("rt-utils", _rt_utils)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rt-utils' pydicom deprecation chatter
                seconds, path = _best_time(_runner(writer, series_dir, masks, work / label), args.repeats)
                rasterised = rasterise_rtstruct(path, series)
                centre = [dice(rasterised.get(name, np.zeros(series.shape, bool)), mask)
                          for name, mask in masks.items()]
                second = _rt_utils_dice(series_dir, path, masks)
            subpixel = _subpixel_dice(path, series, masks)
            errors = _dciodvfy_errors(path)
            rows.append((label, seconds, subpixel, centre, second, errors, path.stat().st_size))

    names = list(masks)
    print(f"RTSTRUCT of {len(names)} structures ({', '.join(names)}) on a "
          f"{args.size}x{args.size}x{args.slices} CT phantom, best of {args.repeats}")
    print()
    print(f"Dice per structure ({', '.join(names)}): sub-pixel = polygon against the pixel squares, 4x4 "
          "samples a pixel; centre fill = Postbox's check-back; rt-utils = rt-utils' own reader")
    print()
    print("| writer   | time (s) | Dice, sub-pixel | Dice, centre fill | Dice, rt-utils reader "
          "| dciodvfy errors | file (MB) |")
    print("|---|---|---|---|---|---|---|")

    def figures(values: list[float]) -> str:
        return " / ".join(f"{d:.4f}" for d in values)

    for label, seconds, subpixel, centre, second, errors, size in rows:
        print(f"| {label:8} | {seconds:8.2f} | {figures(subpixel)} | {figures(centre)} | {figures(second)} | "
              f"{errors if errors is not None else 'n/a'} | {size / 1e6:.1f} |")
    speedup = rows[1][1] / rows[0][1]
    print()
    print(f"speed-up of postbox over rt-utils: {speedup:.1f}x")
    ok = (speedup >= 2 and min(rows[0][2]) >= min(rows[1][2]) and min(rows[0][3]) >= min(rows[1][3])
          and rows[0][5] in (0, None))
    print("target (>= 2x as fast, Dice >= rt-utils' sub-pixel and centre fill, no dciodvfy error):",
          "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
