"""Algorithms for the tests: each leaves evidence on disk of what it did."""

import json
import os
import signal
import time
from pathlib import Path

from pipeline import DataObject

EVIDENCE = Path(os.environ.get("POSTBOX_TEST_EVIDENCE", "/tmp"))
LOADED_AT = time.time()
# One line per import: proves whether a warm child loaded the module once.
with open(EVIDENCE / "imports.log", "a") as fh:
    fh.write(f"{os.getpid()}\n")


def _record(name: str, data_objects, working_dir) -> None:
    with open(EVIDENCE / "runs.log", "a") as fh:
        # The child's parent is the service that runs the job: shows which of several services took it.
        fh.write(json.dumps({"alg": name, "pid": os.getpid(), "service": os.getppid(),
                             "job": Path(working_dir).parent.name, "start": time.time(),
                             "inputs": [d.path for d in data_objects]}) + "\n")


def noop(data_objects, working_dir, settings):
    _record("noop", data_objects, working_dir)
    out = Path(working_dir) / "result.txt"
    out.write_text(json.dumps({"settings": settings, "inputs": [d.path for d in data_objects]}))
    print("noop ran")
    return [DataObject(type="FILE", path=str(out), parent=data_objects[0])]


def slow(data_objects, working_dir, settings):
    _record("slow", data_objects, working_dir)
    deadline = time.time() + settings.get("seconds", 30)
    marker = Path(working_dir) / "partial-output.txt"
    marker.write_text("half done")
    while time.time() < deadline:
        time.sleep(0.05)  # not a wait: the model's own work, a long job to crash, time out or cap
    with open(EVIDENCE / "ends.log", "a") as fh:
        fh.write(f"{Path(working_dir).parent.name} {time.time()}\n")
    return [DataObject(type="FILE", path=str(marker), parent=data_objects[0])]


def raises(data_objects, working_dir, settings):
    print("about to fail")
    raise ValueError("the model found no CT in the input")


def suicide(data_objects, working_dir, settings):
    os.kill(os.getpid(), signal.SIGKILL)


def bad_output(data_objects, working_dir, settings):
    return [DataObject(type="FILE", path=str(Path(working_dir) / "missing.nii.gz"))]


def returns_junk(data_objects, working_dir, settings):
    return "not a list"


VERSION = 1  # a test edits this line to prove an edited module reaches the next job


def versioned(data_objects, working_dir, settings):
    """Records its run and the module's VERSION; raises when ``settings["fail"]``: a warm child's afterlife."""
    _record("versioned", data_objects, working_dir)
    out = Path(working_dir) / "version.txt"
    out.write_text(str(VERSION))
    if settings.get("fail"):
        raise ValueError("asked to fail")
    return [DataObject(type="FILE", path=str(out), parent=data_objects[0])]


def echo_series(data_objects, working_dir, settings):
    """Hands two instances of its input series back as DICOM outputs: results to send, without a model."""
    _record("echo_series", data_objects, working_dir)
    outputs = []
    for src in sorted(Path(data_objects[0].path).glob("*.dcm"))[:2]:
        dest = Path(working_dir) / src.name
        dest.write_bytes(src.read_bytes())
        outputs.append(DataObject(type="DICOM", path=str(dest), parent=data_objects[0]))
    return outputs


def lungs(data_objects, working_dir, settings):
    """The bundled body and lung masks, each run recorded: masks for the pipeline's RTSTRUCT and SEG."""
    from pipeline.bodylungs import segment

    _record("lungs", data_objects, working_dir)
    return segment(data_objects, working_dir, {})


def fill(data_objects, working_dir, settings):
    """Write ``settings["mb"]`` MB of zeros into the working folder: a full disk meets it with ENOSPC."""
    _record("fill", data_objects, working_dir)
    out = Path(working_dir) / "ballast.bin"
    chunk = bytes(1 << 20)
    with open(out, "wb") as fh:
        for _ in range(int(settings.get("mb", 1))):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return [DataObject(type="FILE", path=str(out), parent=data_objects[0])]


def fill_to_the_brim(data_objects, working_dir, settings):
    """Write up to ``settings["mb"]`` MB and return it even if ENOSPC cut it short: its output takes the
    last free byte, so the worker's own writes after it (job.yaml) meet the full disk."""
    import errno

    _record("fill_to_the_brim", data_objects, working_dir)
    out = Path(working_dir) / "ballast.bin"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(int(settings.get("mb", 1))):
            os.write(fd, bytes(1 << 20))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return [DataObject(type="FILE", path=str(out), parent=data_objects[0])]


def shifted(data_objects, working_dir, settings):
    """The bundled body and lung masks moved ~5 mm along each axis, geometry kept: the RTSTRUCT matches the
    masks (the check-back passes) but not the anatomy, which only ``postbox selftest`` can tell (issue 11)."""
    import SimpleITK as sitk
    from scipy import ndimage

    from pipeline.bodylungs import segment

    _record("shifted", data_objects, working_dir)
    outputs = segment(data_objects, working_dir, {})
    for out in outputs:
        image = sitk.ReadImage(out.path)
        array = sitk.GetArrayFromImage(image)
        # Voxels per 5 mm, in array order (z, y, x): at least one voxel along each axis.
        steps = [max(1, round(settings.get("mm", 5.0) / s)) for s in reversed(image.GetSpacing())]
        moved = sitk.GetImageFromArray(ndimage.shift(array, steps, order=0, cval=0).astype(array.dtype))
        moved.CopyInformation(image)
        sitk.WriteImage(moved, out.path)
    return outputs


def _job_of(working_dir) -> tuple[str, str]:
    """The job id and the attempt (on a Dask cluster: ``<job>/attempts/<attempt>/work``; else ``<job>/work``)."""
    parent = Path(working_dir).parent
    if parent.parent.name == "attempts":
        return parent.parent.parent.name, parent.name
    return parent.name, ""


def sleepy(data_objects, working_dir, settings):
    """Sleeps ``seconds`` and records where and when it ran (the GPU node's worker is the child's parent)."""
    job, attempt = _job_of(working_dir)
    start = time.time()
    time.sleep(settings.get("seconds", 0.3))  # not a wait: the model's own work
    out = Path(working_dir) / "mask.txt"
    out.write_text(f"{job} {attempt}")
    with open(EVIDENCE / "sleepy.log", "a") as fh:
        fh.write(json.dumps({"job": job, "attempt": attempt, "pid": os.getpid(), "worker": os.getppid(),
                             "start": start, "end": time.time()}) + "\n")
    return [DataObject(type="FILE", path=str(out), parent=data_objects[0])]


def kills_its_worker(data_objects, working_dir, settings):
    """Kills the process that runs it (a GPU node's worker): a driver crash that takes the node down."""
    job, attempt = _job_of(working_dir)
    with open(EVIDENCE / "killer.log", "a") as fh:
        fh.write(json.dumps({"job": job, "attempt": attempt, "worker": os.getppid()}) + "\n")
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(30)  # not a wait: dies with its parent meanwhile
