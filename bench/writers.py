"""Benchmark: where the time goes between an algorithm's end and its DICOM outputs (issue 10).

The three masks of the bundled algorithm (body, left and right lung; the phantom's exact truth, or
``--masks bodylungs`` to run the algorithm itself) on a CT phantom of each size. Each step is timed on its
own, median of ``--repeats`` after one warm-up run, beside a reference doing the same job:

- RTSTRUCT write: Postbox's writer from the masks on the read series; reference rt-utils (its time includes
  reading the series, which it always does), if installed;
- check-back: the RTSTRUCT rasterised back onto the series and compared with the masks; reference rt-utils'
  reader, which rasterises the same file;
- SEG write: frames bit-packed with numpy into the dataset highdicom builds; reference highdicom encoding
  every frame itself (``write_seg(..., highdicom_frames=True)``, the writer as it was before issue 10);
- finish: ``write_dicom_outputs`` from the series folder and the NIfTI masks as a job gives them: reading
  both, RTSTRUCT, check-back and SEG (target: well within 1 s on 200 x 512 x 512);
- preview (issue 11): the job's contour preview PNG as the service draws it after the sends, from the series
  folder and the RTSTRUCT (reading the series' headers and pixels, rasterising the RTSTRUCT onto it, drawing
  three panels with matplotlib's Agg; target: under 1 s on 200 x 512 x 512), and its drawing alone, from
  the CT and the masks already on the series grid.

A second table shows the outputs are still valid: dciodvfy errors, highdicom's reading of the SEG against
the masks, and the lowest check-back Dice. ``--profile`` prints cProfile's top functions of the finish on
the largest size.

Run: ``python bench/writers.py [--sizes 40x128 200x512] [--repeats 3] [--masks truth|bodylungs] [--profile]``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# bench/pipeline.py (the job pipeline's benchmark) would shadow the pipeline package for a script run from
# this folder: put the repository root in the folder's place.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import highdicom as hd  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from pipeline import phantom, preview  # noqa: E402
from pipeline.writers import (  # noqa: E402
    Series,
    check_rtstruct,
    read_series,
    write_dicom_outputs,
    write_rtstruct,
    write_seg,
)
from pipeline.writers.series import align_masks  # noqa: E402

STEPS = ("RTSTRUCT write", "check-back", "SEG write", "finish (write_dicom_outputs)",
         "preview (series + RTSTRUCT to PNG)", "preview drawing (arrays on the grid)")
REFERENCES = ("rt-utils", "rt-utils reader", "highdicom frames", "-", "-", "-")


@dataclass
class Case:
    """One phantom size: its series, masks as NIfTI files and as arrays on the series."""

    label: str
    series_dir: Path
    nifti: dict[str, Path]
    series: Series
    masks: dict[str, np.ndarray]
    times: dict[tuple[str, str], float] = field(default_factory=dict)
    valid: dict[str, str] = field(default_factory=dict)


def _median_time(fn: Callable[[int], object], repeats: int) -> float:
    fn(-1)  # warm-up: imports, highdicom's tables, first-touch memory
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _case(work: Path, slices: int, size: int, masks_from: str) -> Case:
    label = f"{slices}x{size}x{size}"
    folder = work / label
    grid = phantom.axial_grid(slices=slices, size=size)
    series_dir = folder / "ct"
    phantom.write_dicom(series_dir, grid)
    if masks_from == "bodylungs":
        from pipeline import bodylungs

        images = bodylungs.segment_image(sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir))))
        nifti = {}
        (folder / "masks").mkdir()
        for name, image in images.items():
            nifti[name] = folder / "masks" / f"{name}.nii.gz"
            sitk.WriteImage(image, str(nifti[name]), useCompression=True)
    else:
        nifti = phantom.write_masks_nifti(folder / "masks", grid)
    series = read_series(series_dir)
    return Case(label, series_dir, nifti, series, align_masks(series, nifti))


def _rt_utils() -> object | None:
    try:
        import rt_utils
    except ImportError:
        return None
    return rt_utils


def _rt_utils_write(case: Case, out: Path) -> None:
    from rt_utils import RTStructBuilder

    rtstruct = RTStructBuilder.create_new(dicom_series_path=str(case.series_dir))
    for name, mask in case.masks.items():
        # rt-utils takes (rows, columns, slices) with slices sorted along the normal, as ours are.
        rtstruct.add_roi(mask=np.transpose(mask, (1, 2, 0)), name=name)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Writing file to ..."
        rtstruct.save(str(out))


def _rt_utils_read(case: Case, path: Path) -> None:
    from rt_utils import RTStructBuilder

    rtstruct = RTStructBuilder.create_from(dicom_series_path=str(case.series_dir), rt_struct_path=str(path))
    for name in case.masks:
        rtstruct.get_roi_mask_by_name(name)


def _dciodvfy_errors(path: Path) -> str:
    if shutil.which("dciodvfy") is None:
        return "n/a"
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return str(sum(line.startswith("Error") for line in (result.stdout + result.stderr).splitlines()))


def _seg_matches(case: Case, path: Path) -> str:
    """Whether highdicom reads back exactly the (non-empty) masks, frame by source image."""
    seg = hd.seg.segread(path)
    uids = [s.sop_instance_uid for s in case.series.slices]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[d.SegmentNumber for d in seg.SegmentSequence])
    expected = np.stack([m for m in case.masks.values() if m.any()], axis=-1)
    return "identical" if np.array_equal(pixels.astype(bool), expected) else "DIFFERENT"


def measure(case: Case, work: Path, repeats: int) -> None:
    """Fill ``case.times`` (step, "postbox" or "reference") and ``case.valid``."""
    out = work / f"out-{case.label}"
    out.mkdir()
    series, masks = case.series, case.masks

    def path(kind: str, i: int) -> Path:
        return out / f"{kind}{i}.dcm"

    rt_utils = _rt_utils()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rt-utils' and pydicom's deprecation chatter
        t = case.times
        t["RTSTRUCT write", "postbox"] = _median_time(lambda i: write_rtstruct(series, masks, path("rs", i)),
                                                      repeats)
        rtstruct = path("rs", 0)
        t["check-back", "postbox"] = _median_time(lambda i: check_rtstruct(rtstruct, series, masks), repeats)
        t["SEG write", "postbox"] = _median_time(lambda i: write_seg(series, masks, path("seg", i)), repeats)
        t["SEG write", "reference"] = _median_time(
            lambda i: write_seg(series, masks, path("hdseg", i), highdicom_frames=True), repeats)
        t["finish (write_dicom_outputs)", "postbox"] = _median_time(
            lambda i: write_dicom_outputs(case.series_dir, case.nifti, out / f"finish{i}", kinds=("rtstruct", "seg")),
            repeats)
        t["preview (series + RTSTRUCT to PNG)", "postbox"] = _median_time(
            lambda i: preview.series_preview(case.series_dir, rtstruct=rtstruct), repeats)
        ct, slope, intercept = preview.series_pixels(series)
        geometry = preview.Geometry.of_series(series)
        outlines = [preview.Structure(name, color, mask) for (name, mask), color
                    in zip(masks.items(), ((255, 128, 0), (0, 200, 255), (255, 0, 255)), strict=False)]
        t["preview drawing (arrays on the grid)", "postbox"] = _median_time(
            lambda i: preview.render(ct, geometry, outlines, slope=slope, intercept=intercept), repeats)
        if rt_utils is not None:
            t["RTSTRUCT write", "reference"] = _median_time(lambda i: _rt_utils_write(case, path("rtu", i)),
                                                            repeats)
            t["check-back", "reference"] = _median_time(lambda i: _rt_utils_read(case, rtstruct), repeats)
    check = check_rtstruct(rtstruct, series, masks)
    case.valid = {
        "dciodvfy errors, RTSTRUCT": _dciodvfy_errors(rtstruct),
        "dciodvfy errors, SEG": _dciodvfy_errors(path("seg", 0)),
        "SEG read back by highdicom": _seg_matches(case, path("seg", 0)),
        "lowest check-back Dice": f"{min(check.values()):.4f}",
    }


def profile(case: Case, work: Path, top: int = 25) -> str:
    """cProfile's top functions of the finish and, as cProfile sees only the calling thread, of the SEG."""
    text = io.StringIO()
    for label, run in (
        ("the finish (write_dicom_outputs; its SEG thread is not in it)",
         lambda: write_dicom_outputs(case.series_dir, case.nifti, work / "profiled", kinds=("rtstruct", "seg"))),
        ("the SEG (write_seg)", lambda: write_seg(case.series, case.masks, work / "profiled-seg.dcm")),
    ):
        profiler = cProfile.Profile()
        profiler.enable()
        run()
        profiler.disable()
        print(f"cProfile of {label} on {case.label}:", file=text)
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def table(cases: list[Case]) -> str:
    head = "| step | " + " | ".join(f"{c.label} | reference" for c in cases) + " | reference is |"
    rule = "|---|" + "---|---|" * len(cases) + "---|"
    lines = [head, rule]
    for step, reference in zip(STEPS, REFERENCES, strict=True):
        cells = []
        for c in cases:
            ours, ref = c.times.get((step, "postbox")), c.times.get((step, "reference"))
            ratio = f" ({ref / ours:.1f}x)" if ours and ref else ""
            cells += [_ms(ours), _ms(ref) + ratio]
        if reference.startswith("rt-utils") and _rt_utils() is None:
            reference = "rt-utils (not installed)"
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {reference} |")
    lines += ["", "| output check | " + " | ".join(c.label for c in cases) + " |",
              "|---|" + "---|" * len(cases)]
    for key in cases[0].valid:
        lines.append(f"| {key} | " + " | ".join(c.valid[key] for c in cases) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["40x128", "200x512"],
                        help="SLICESxSIZE phantoms (default: 40x128 200x512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--masks", choices=("truth", "bodylungs"), default="truth",
                        help="the phantom's exact masks, or those of the bundled algorithm run on it")
    parser.add_argument("--profile", action="store_true", help="cProfile the finish on the largest size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # rt-utils' calls of pydicom's deprecated API

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size in args.sizes:
            slices, pixels = (int(v) for v in size.lower().split("x"))
            case = _case(work, slices, pixels, args.masks)
            measure(case, work, args.repeats)
            cases.append(case)
        print(f"DICOM outputs of {len(cases[0].masks)} masks ({', '.join(cases[0].masks)}, {args.masks}) on a "
              f"CT phantom; median of {args.repeats} after a warm-up; reference: speed-up shown in brackets")
        print()
        print(table(cases))
        if args.profile:
            print()
            print(profile(cases[-1], work))
    finish = cases[-1].times["finish (write_dicom_outputs)", "postbox"]
    drawn = cases[-1].times["preview (series + RTSTRUCT to PNG)", "postbox"]
    print()
    print(f"finish on {cases[-1].label}: {finish:.2f} s (target: well within 1 s)")
    print(f"preview on {cases[-1].label}: {drawn:.2f} s (target: under 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
