"""The job-folder protocol in process: a failure at any step leaves nothing half-done (issue 8).

Each step of the protocol has a named crash point (pipeline/crashpoints.py). tests/test_crashpoints.py kills
a real process there; here the same points raise an OSError instead, the way a failed write would, so each
step's failure is checked in a few milliseconds: the job is either untouched or whole, and recover() or
the door's own retry finishes it once.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import jobs
from pipeline.dataobject import DataObject
from pipeline.errors import DamagedManifest, InvalidInput

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-0.1.0-job"


class Boxes:
    def __init__(self, root: Path) -> None:
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.inbox.mkdir()
        self.outbox.mkdir()
        self.recorded: list[tuple[str, str, str]] = []

    # The protocol's JobIndex: what it records, in order.
    def record_job(self, manifest: jobs.JobManifest, location: str) -> None:
        self.recorded.append((manifest.id, manifest.status.value, location))

    def staging(self) -> list[str]:
        staging = self.inbox / jobs.STAGING
        return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []

    def jobs_in(self, box: Path) -> list[str]:
        return jobs.scan(box)


@pytest.fixture
def boxes(tmp_path: Path) -> Boxes:
    return Boxes(tmp_path)


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload.txt"
    p.write_text("input")
    return p


def fail_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Make the step at crash point ``point`` fail as a full disk would (a fault we cannot place exactly)."""

    def crash_point(name: str) -> None:
        if name == point:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobs, "crash_point", crash_point)


# --- staging and commit ------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["stage", "commit.manifest", "commit.renamed"])
def test_a_submit_that_fails_at_any_step_leaves_nothing_or_a_whole_job(boxes: Boxes, payload: Path, point: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fail_at(monkeypatch, point)
    with pytest.raises(OSError, match="No space left"):
        jobs.submit(boxes.inbox, [payload], algorithm="noop", index=boxes)
    if point == "commit.renamed":
        # Past the rename the job exists whole; the failure came after, and it stays (never half-removed).
        [job_id] = boxes.jobs_in(boxes.inbox)
        assert jobs.read_manifest(boxes.inbox / job_id).inputs[0].path == "input/payload.txt"
    else:
        assert boxes.jobs_in(boxes.inbox) == [] and boxes.staging() == [], "a refused submit leaves nothing"
    monkeypatch.undo()
    assert jobs.recover(boxes.inbox, boxes.outbox, index=boxes) == ([], 0)


def test_a_refused_input_leaves_nothing(boxes: Boxes, tmp_path: Path) -> None:
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(InvalidInput, match="broken.dcm: DICOM file has no SeriesInstanceUID"):
        jobs.submit(boxes.inbox, [bad], index=boxes)
    assert boxes.jobs_in(boxes.inbox) == [] and boxes.staging() == [] and boxes.recorded == []


def test_a_commit_is_recorded_in_the_index_by_the_protocol_itself(boxes: Boxes, payload: Path) -> None:
    manifest = jobs.submit(boxes.inbox, [payload], algorithm="noop", index=boxes)
    assert boxes.recorded == [(manifest.id, "pending", "inbox")]


def test_a_commit_finished_by_another_process_is_not_an_error(boxes: Boxes, payload: Path) -> None:
    sdir = jobs.stage(boxes.inbox)
    manifest = jobs.JobManifest(id=sdir.name, inputs=jobs.place_inputs([payload], sdir / jobs.INPUT))
    jobs.write_manifest(sdir, manifest)
    # Another service's recover() commits it first (two services on one inbox) ...
    assert jobs.recover(boxes.inbox, boxes.outbox) == ([sdir.name], 0)
    # ... and this one's own commit, a moment later, finds it done.
    assert jobs.commit(boxes.inbox, sdir, manifest, index=boxes) == boxes.inbox / sdir.name
    assert boxes.jobs_in(boxes.inbox) == [sdir.name] and boxes.staging() == []


def test_recover_knows_each_state_of_a_staging_folder(boxes: Boxes, payload: Path) -> None:
    staging = boxes.inbox / jobs.STAGING
    # Complete, with the node's receiving.json still there: committed, the receiving record gone.
    complete = jobs.stage(boxes.inbox)
    (complete / jobs.RECEIVING).write_text("{}")
    shutil.copy(payload, complete / jobs.INPUT / "a.txt")
    jobs.write_manifest(complete, jobs.JobManifest(id=complete.name, inputs=[
        jobs.InputRecord(id="in-1", type="FILE", path="input/a.txt")]))
    # Receiving: the DICOM node resumes it; recover leaves it alone.
    receiving = jobs.stage(boxes.inbox)
    (receiving / jobs.RECEIVING).write_text("{}")
    # A hand drop half way to a job: rebuilt from the item.
    dropped = staging / jobs.new_job_id()
    (dropped / jobs.DROPPED).mkdir(parents=True)
    shutil.copy(payload, dropped / jobs.DROPPED / "drop.txt")
    # Inputs only: a door writing it now (left alone); one whose door died long ago with nothing in it
    # (removed); one with files in it, as 0.1.0's DICOM commit left acknowledged series (kept, set aside).
    writing = jobs.stage(boxes.inbox)
    abandoned = jobs.stage(boxes.inbox)
    lost = jobs.stage(boxes.inbox)
    (lost / jobs.INPUT / "series-1").mkdir()
    (lost / jobs.INPUT / "series-1" / "1.2.3.dcm").write_bytes(b"acknowledged")
    old = time.time() - jobs.ABANDONED_SECONDS - 60
    for path in (abandoned, abandoned / jobs.INPUT, *lost.rglob("*"), lost):
        os.utime(path, (old, old))
    # A damaged job.yaml: set aside as failed in the outbox, the damaged bytes kept.
    damaged = jobs.stage(boxes.inbox)
    (damaged / jobs.JOB_FILE).write_text("id: [unclosed")

    committed, left = jobs.recover(boxes.inbox, boxes.outbox, index=boxes)
    assert sorted(committed) == sorted([complete.name, dropped.name]) and left == 0
    assert not (boxes.inbox / complete.name / jobs.RECEIVING).exists()
    assert jobs.read_manifest(boxes.inbox / dropped.name).inputs[0].path == "input/drop.txt"
    assert boxes.staging() == sorted([receiving.name, writing.name])
    assert (boxes.outbox / damaged.name / "job.yaml.damaged").read_text() == "id: [unclosed"
    aside = jobs.read_manifest(boxes.outbox / damaged.name)
    assert aside.status == jobs.JobStatus.FAILED and "job.yaml was damaged" in (aside.error or "")
    assert (boxes.outbox / lost.name / "input" / "series-1" / "1.2.3.dcm").read_bytes() == b"acknowledged"
    kept = jobs.read_manifest(boxes.outbox / lost.name)
    assert kept.status == jobs.JobStatus.FAILED and "abandoned in the staging area" in (kept.error or "")


# --- claiming, attempts and finishing ----------------------------------------------------------------


def _pending(boxes: Boxes, payload: Path) -> str:
    return jobs.submit(boxes.inbox, [payload], algorithm="noop", index=boxes).id


def test_claim_sets_a_damaged_job_aside_once_and_frees_its_lock(boxes: Boxes, payload: Path) -> None:
    job_id = _pending(boxes, payload)
    (boxes.inbox / job_id / jobs.JOB_FILE).write_bytes(b"\xff\xfe: [")
    assert jobs.claim(boxes.inbox, boxes.outbox, job_id, index=boxes) is None
    assert boxes.jobs_in(boxes.inbox) == [] and boxes.jobs_in(boxes.outbox) == [job_id]
    assert (boxes.outbox / job_id / "job.yaml.damaged").read_bytes() == b"\xff\xfe: ["
    assert boxes.recorded[-1] == (job_id, "failed", "outbox")
    lock = jobs.try_lock(jobs.lock_path(boxes.inbox, job_id))
    assert lock is not None, "the lock is released after setting the job aside"
    lock.release()


def test_claim_is_exclusive_and_gives_up_on_a_job_that_left(boxes: Boxes, payload: Path) -> None:
    job_id = _pending(boxes, payload)
    first = jobs.claim(boxes.inbox, boxes.outbox, job_id)
    assert first is not None
    assert jobs.claim(boxes.inbox, boxes.outbox, job_id) is None
    first.release()
    shutil.rmtree(boxes.inbox / job_id)
    assert jobs.claim(boxes.inbox, boxes.outbox, job_id) is None


def test_a_lock_that_cannot_be_taken_raises_for_that_job_alone(boxes: Boxes, payload: Path) -> None:
    job_id = _pending(boxes, payload)
    jobs.lock_path(boxes.inbox, job_id).mkdir(parents=True)  # a folder where the lock file should be
    with pytest.raises(OSError, match="Is a directory"):
        jobs.claim(boxes.inbox, boxes.outbox, job_id)
    other = _pending(boxes, payload)
    claim = jobs.claim(boxes.inbox, boxes.outbox, other)
    assert claim is not None
    claim.release()


@pytest.mark.parametrize("point", ["claim", "start_attempt", "finish.manifest", "finish.moved"])
def test_a_worker_step_that_fails_leaves_a_job_that_runs_again_or_is_finished(
        boxes: Boxes, payload: Path, point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = _pending(boxes, payload)
    fail_at(monkeypatch, point)
    with pytest.raises(OSError, match="No space left"):
        claim = jobs.claim(boxes.inbox, boxes.outbox, job_id, index=boxes)
        assert claim is not None
        try:
            jobs.start_attempt(claim)
            out = claim.work_dir / "result.txt"
            out.write_text("result")
            records = jobs.collect_outputs(claim, [DataObject(type="FILE", path=str(out))])
            jobs.finish(claim, boxes.outbox, records)
        finally:
            claim.release()
    monkeypatch.undo()
    where = boxes.outbox if point == "finish.moved" else boxes.inbox
    assert [j for j in (boxes.jobs_in(boxes.inbox) + boxes.jobs_in(boxes.outbox))] == [job_id]
    manifest = jobs.read_manifest(where / job_id)
    expected = {"claim": "pending", "start_attempt": "running"}.get(point, "done")
    assert manifest.status.value == expected
    if point == "finish.manifest":
        # Written as done, still in the inbox: the next claim only completes the move.
        assert (boxes.inbox / job_id / "output" / "result.txt").read_text() == "result"


def test_requeue_gives_a_running_job_back_uncounted_and_clean(boxes: Boxes, payload: Path) -> None:
    job_id = _pending(boxes, payload)
    claim = jobs.claim(boxes.inbox, boxes.outbox, job_id)
    assert claim is not None
    jobs.start_attempt(claim)
    (claim.work_dir / "half.txt").write_text("half")
    jobs.requeue(claim, "the worker is stopping")
    claim.release()
    manifest = jobs.read_manifest(boxes.inbox / job_id)
    assert (manifest.status, manifest.attempts) == (jobs.JobStatus.PENDING, 0)
    assert not (boxes.inbox / job_id / jobs.WORK).exists()
    claim = jobs.claim(boxes.inbox, boxes.outbox, job_id)
    assert claim is not None
    jobs.start_attempt(claim, counted=False)  # given back for a full disk without writing it down
    assert claim.manifest.attempts == 0 and claim.manifest.warnings == []
    claim.release()


# --- the manifest ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"id": "../x"}, "is not of the form"),
    ({"status": "lost"}, "'lost' is not a valid JobStatus"),
    ({"attempts": -1}, "attempts must be a whole number"),
    ({"inputs": [{"id": "in-1", "type": "FILE", "path": "../../etc/passwd"}]}, "leaves the job folder"),
    ({"inputs": [{"id": "in-1", "type": "PDF", "path": "input/a"}]}, "type must be DICOM or FILE"),
    ({"outputs": [{"id": "out-1", "type": "FILE", "path": "/abs"}]}, "leaves the job folder"),
    ({"delivery": {"destinations": [{"host": "h"}]}}, "needs exactly host, port and ae_title"),
    ({"sends": {"TPS": {"status": "maybe"}}}, "'maybe' is not a valid SendStatus"),
])
def test_a_manifest_is_valid_once_built(change: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        jobs.JobManifest.from_dict({"id": jobs.new_job_id(), **change})


def test_a_damaged_job_yaml_reads_as_damaged_manifest_naming_the_job(tmp_path: Path) -> None:
    job_dir = tmp_path / jobs.new_job_id()
    job_dir.mkdir()
    for text in ("id: [", "just text", "id: not-a-job-id", "- a list"):
        (job_dir / jobs.JOB_FILE).write_text(text)
        with pytest.raises(DamagedManifest, match=f"job {job_dir.name}: job.yaml is damaged"):
            jobs.read_manifest(job_dir)


def test_round_trip_keeps_every_typed_field(payload: Path) -> None:
    m = jobs.JobManifest(id=jobs.new_job_id(), inputs=[jobs.series_input(1, "series-1", "1.2.3", 12, gate=[])],
                         outputs=[jobs.OutputRecord(id="out-1", type="DICOM", path="output/rtstruct.dcm",
                                                    parent="in-1")],
                         delivery=jobs.Delivery(destinations=["TPS", {"host": "h", "port": 104, "ae_title": "X"}]))
    m.sends = m.delivery.plan(m.outputs)
    m.sends["TPS"].files["output/rtstruct.dcm"] = jobs.now_iso()
    again = jobs.JobManifest.from_dict(yaml.safe_load(yaml.safe_dump(m.to_dict())))
    assert again == m
    assert again.sends["TPS"].missing == [] and again.sends["X@h:104"].missing == ["output/rtstruct.dcm"]
    assert again.sends["X@h:104"].target == {"host": "h", "port": 104, "ae_title": "X"}
    assert again.sending


def test_a_job_yaml_written_by_0_1_0_still_reads_typed() -> None:
    m = jobs.read_manifest(LEGACY)
    assert "extra" not in m.to_dict()
    assert m.delivery.destinations == ["tps"] and m.delivery.structures["body"]["name"] == "External"
    assert m.checks["in-1"] == {"body": 1.0, "lung_left": 1.0, "lung_right": 1.0}
    assert m.inputs[0].gate == [] and "gate" not in m.inputs[0].meta_data
    state = m.sends["tps"]
    assert state.status == jobs.SendStatus.PENDING and state.attempts == 3
    assert state.missing == ["output/rtstruct.dcm", "output/seg.dcm"], "0.1.0 kept no state per file: all go"
