"""The attempt folders of a job on a Dask cluster (issue 12), on real files: what counts, and what is promoted."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import attempts


@pytest.fixture
def job(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox" / "20261201T000000-0123abcd"
    folder.mkdir(parents=True)
    (folder / "job.yaml").write_text("id: x\n")
    return folder


def test_attempts_number_up_count_from_folders_and_ignore_garbage(job: Path) -> None:
    first = attempts.begin(job, "w1", 3)
    assert first.name.startswith("01-w1-") and (first / "work").is_dir()
    (job / "attempts" / "notes.txt").write_text("an operator's note")  # garbage beside the attempts
    (job / "attempts" / "junk").mkdir()
    (job / "attempts" / "07-not-a-folder").write_text("")
    second = attempts.begin(job, "node/with:odd chars", 3)
    assert second.name.startswith("02-node_with_odd_chars-")  # never a path separator from a node's name
    attempts.interrupt(second)
    assert [p.name for p in attempts.folders(job)] == [first.name, second.name]
    assert attempts.counted(job) == 1  # the interrupted one does not count
    attempts.begin(job, "w1", 3)
    attempts.begin(job, "w1", 3)
    with pytest.raises(attempts.AttemptsUsed, match="3 attempt"):
        attempts.begin(job, "w1", 3)
    assert len(attempts.folders(job)) == 4


def test_a_late_attempt_of_a_job_that_left_the_inbox_makes_nothing(job: Path) -> None:
    gone = job.parent / "moved-away"
    job.rename(gone)
    with pytest.raises(attempts.StaleAttempt, match="no longer in the inbox"):
        attempts.begin(job, "w1", 3)
    assert not job.exists()  # the job folder is not made again under the inbox


def test_only_a_manifest_that_matches_the_files_is_promoted(job: Path) -> None:
    attempt = attempts.begin(job, "w1", 3)
    (attempt / "work" / "masks").mkdir()
    (attempt / "work" / "masks" / "body.nii.gz").write_bytes(b"mask")
    (attempt / "work" / "rt.dcm").write_bytes(b"dicom")
    (attempt / "job.log").write_text("model says hello\n")
    manifest = attempts.describe(attempt, [{"path": str(attempt / "work" / "masks"), "type": "FILE"},
                                           {"path": "rt.dcm", "type": "DICOM"}])
    assert [o["path"] for o in manifest["outputs"]] == ["masks", "rt.dcm"]
    assert sorted(f["path"] for f in manifest["files"]) == ["masks/body.nii.gz", "rt.dcm"]
    attempts.verify(attempt, manifest)
    (attempt / "work" / "rt.dcm").write_bytes(b"DICOM")  # same size, other bytes
    with pytest.raises(attempts.AttemptMismatch, match="differs from what the attempt reported"):
        attempts.verify(attempt, manifest)
    (attempt / "work" / "rt.dcm").unlink()
    with pytest.raises(attempts.AttemptMismatch, match="rt.dcm is missing"):
        attempts.verify(attempt, manifest)
    (attempt / "work" / "rt.dcm").write_bytes(b"dicom")
    work = attempts.promote(job, attempt, job / "job.log")
    assert (work / "masks" / "body.nii.gz").read_bytes() == b"mask" and not (attempt / "work").exists()
    assert "model says hello" in (job / "job.log").read_text()


def test_an_output_outside_the_attempts_working_folder_is_refused(job: Path, tmp_path: Path) -> None:
    attempt = attempts.begin(job, "w1", 3)
    elsewhere = tmp_path / "scratch.nii.gz"
    elsewhere.write_bytes(b"x")
    with pytest.raises(attempts.AttemptMismatch, match="outside the job's working folder"):
        attempts.describe(attempt, [{"path": str(elsewhere), "type": "FILE"}])
    with pytest.raises(attempts.AttemptMismatch, match="does not exist"):
        attempts.describe(attempt, [{"path": "missing.nii.gz", "type": "FILE"}])
