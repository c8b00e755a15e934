"""The DICOM node against peers we did not write (dcmtk's echoscu, storescu, storescp) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import Site, outbox_jobs, read_job, wait_for
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from pipeline import phantom

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # Debian's dcmtk leaves Nagle on otherwise and crawls


def dcmtk(tool: str) -> str:
    path = f"/usr/bin/{tool}"  # not a Python package's script of the same name earlier on PATH
    assert os.access(path, os.X_OK), f"dcmtk's {tool} is missing: apt-get install -y dcmtk"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def node(site: Site) -> Site:
    site.write_config(dicom={"enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0})
    return site


def storescu(site: Site, *paths: Path, calling: str = "STORESCU", called: str = "POSTBOX",
             check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([dcmtk("storescu"), "-aet", calling, "-aec", called, "+sd", "+r", "127.0.0.1",
                           str(site.port), *map(str, paths)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def ct(tmp_path: Path, name: str = "ct", slices: int = 12, **kw: object) -> list[Path]:
    return phantom.write_dicom(tmp_path / name, phantom.axial_grid(slices=slices, size=32), **kw)  # type: ignore[arg-type]


def test_echoscu(node: Site) -> None:
    node.start()
    proc = subprocess.run([dcmtk("echoscu"), "-aec", "POSTBOX", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert node.cli("manage", "echo", "127.0.0.1", str(node.port), "POSTBOX").returncode == 0


def test_series_sent_by_storescu_becomes_one_job_with_every_instance(node: Site, tmp_path: Path) -> None:
    files = ct(tmp_path)
    uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    node.start()
    storescu(node, tmp_path / "ct", calling="CT_SCANNER")
    [job_dir] = node.done(1)
    job = read_job(job_dir)
    assert job["status"] == "done", job["error"]
    assert job["source"] == "dicom"
    assert job["sender"]["calling_ae"] == "CT_SCANNER" and job["sender"]["called_ae"] == "POSTBOX"
    assert job["sender"]["address"] == "127.0.0.1"
    assert job["inputs"][0]["meta_data"]["series_instance_uid"] == uid
    received = sorted(p.name for p in (job_dir / "input" / "series-1").iterdir())
    assert received == sorted(f"{pydicom.dcmread(f).SOPInstanceUID}.dcm" for f in files)


def test_split_over_two_parallel_associations_and_sent_twice_is_still_one_job(node: Site, tmp_path: Path) -> None:
    files = ct(tmp_path, slices=16)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, tmp_path / ("a" if i % 2 else "b") / f.name)
    node.write_config(dicom={"series_timeout": 2.0})
    node.start()
    procs = [subprocess.Popen([dcmtk("storescu"), "-aec", "POSTBOX", "+sd", "127.0.0.1", str(node.port),
                               str(tmp_path / half)], env=DCMTK_ENV) for half in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    storescu(node, tmp_path / "ct")  # the whole series again, within the timeout: replaces, no duplicates
    [job_dir] = node.done(1)
    assert len(list((job_dir / "input" / "series-1").iterdir())) == 16
    assert read_job(job_dir)["inputs"][0]["meta_data"]["instances"] == 16
    assert node.stop(node.procs[0]) == 0, "the service (node included) stops cleanly on SIGTERM"
    assert len(outbox_jobs(node.outbox)) == 1


def test_two_series_in_one_association_give_two_jobs(node: Site, tmp_path: Path) -> None:
    ct(tmp_path, "one", slices=5)
    ct(tmp_path, "two", slices=7)
    node.start()
    storescu(node, tmp_path / "one", tmp_path / "two")
    jobs = node.done(2)
    counts = sorted(read_job(j)["inputs"][0]["meta_data"]["instances"] for j in jobs)
    assert counts == [5, 7]


def test_route_by_called_ae_title_picks_its_algorithm(node: Site, tmp_path: Path) -> None:
    node.write_config(dicom={"routes": [
        {"called_ae": "LUNGS", "algorithm": "noop", "settings": {"label": "routed-by-ae"}},
        {"match": {"Modality": "MR"}, "algorithm": "raises"},
    ]})
    ct(tmp_path)
    node.start()
    storescu(node, tmp_path / "ct", called="LUNGS")
    storescu(node, tmp_path / "ct", called="POSTBOX", calling="OTHER")
    jobs = {read_job(j)["sender"]["called_ae"]: read_job(j) for j in node.done(2)}
    assert jobs["LUNGS"]["settings"] == {"label": "routed-by-ae"}
    assert jobs["POSTBOX"]["settings"] == {}  # no route matched: default_algorithm with its defaults
    assert jobs["POSTBOX"]["algorithm"] == "noop"


def test_ae_not_on_the_allow_list_is_rejected(node: Site, tmp_path: Path) -> None:
    node.write_config(dicom={"allowed_ae_titles": ["TPS"]})
    ct(tmp_path)
    node.start()
    refused = storescu(node, tmp_path / "ct", calling="INTRUDER", check=False)
    assert refused.returncode != 0 and "Rejected" in refused.stderr + refused.stdout
    storescu(node, tmp_path / "ct", calling="TPS")
    [job_dir] = node.done(1)
    assert read_job(job_dir)["sender"]["calling_ae"] == "TPS"


def test_association_aborted_mid_series_still_forms_one_job(node: Site, tmp_path: Path) -> None:
    files = ct(tmp_path, slices=8)
    node.write_config(dicom={"incomplete": "run"})
    node.start()
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="POSTBOX")
    assert assoc.is_established
    for f in files[:5]:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
    assoc.abort()
    [job_dir] = node.done(1)
    job = read_job(job_dir)
    assert job["inputs"][0]["meta_data"]["instances"] == 5
    assert any("5 of the 8 images announced" in w for w in job["warnings"])


def test_malformed_instance_is_refused_and_leaves_nothing(node: Site, tmp_path: Path) -> None:
    node.start()
    ae = AE(ae_title="BROKEN")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="POSTBOX")
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PatientName = "No^Series"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC000
    staging = node.inbox / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == []
    assert [p for p in node.inbox.iterdir() if not p.name.startswith(".")] == []


@pytest.mark.parametrize("mode", ["fail", "run"])
def test_series_with_a_slice_missing_fails_naming_the_gap_or_runs(node: Site, tmp_path: Path, mode: str) -> None:
    files = ct(tmp_path, slices=10)
    z = sorted(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files)
    middle = next(f for f in files if float(pydicom.dcmread(f).ImagePositionPatient[2]) == z[5])
    middle.unlink()
    node.write_config(dicom={"incomplete": mode})
    node.start()
    storescu(node, tmp_path / "ct")
    [job_dir] = node.done(1, timeout=30)
    job = read_job(job_dir)
    gap = f"gap between z={z[4]:.1f} and z={z[6]:.1f}: 1 slice missing"
    if mode == "fail":
        assert job["status"] == "failed" and gap in job["error"]
    else:
        assert job["status"] == "done" and any(gap in w for w in job["warnings"])
    assert "holding for another" in node.service_log()


def test_no_patient_name_or_id_in_log_or_folder_names(node: Site, tmp_path: Path) -> None:
    ct(tmp_path, patient_name="Doe^Jane", patient_id="MRN-12345")
    node.start()
    storescu(node, tmp_path / "ct")
    [job_dir] = node.done(1)
    text = node.service_log() + (job_dir / "job.log").read_text()
    names = " ".join(str(p.relative_to(node.root)) for p in node.root.rglob("*"))
    for secret in ("Doe", "Jane", "MRN-12345"):
        assert secret not in text and secret not in names
    assert str(read_job(job_dir)["inputs"][0]["meta_data"]["series_instance_uid"]) in node.service_log()


def bundled_with_destination(site: Site, dest_port: int) -> None:
    site.config["algorithms"].append({"name": "body-lungs", "function": "pipeline.bodylungs:segment",
                                      "outputs": ["rtstruct", "seg"], "default_settings": {"body_name": "body"}})
    site.write_config(default_algorithm="body-lungs", dicom={
        "destinations": {"TPS": {"host": "127.0.0.1", "port": dest_port, "ae_title": "TPS"}},
        "routes": [{"algorithm": "body-lungs", "destinations": ["TPS"],
                    "structures": {"lung_left": {"name": "Lung_L", "color": [0, 255, 255]}}}],
        "send_backoff_max": 1.0})


def start_storescp(port: int, out: Path) -> subprocess.Popen[bytes]:
    out.mkdir(exist_ok=True)
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", "TPS", "-od", str(out), str(port)], env=DCMTK_ENV)
    wait_for(lambda: subprocess.run([dcmtk("echoscu"), "-aec", "TPS", "127.0.0.1", str(port)],
                                    capture_output=True, env=DCMTK_ENV).returncode == 0, 20, 0.1)
    return proc


def modalities(folder: Path) -> list[str]:
    return sorted(pydicom.dcmread(p).Modality for p in folder.iterdir() if p.is_file())


def test_storescp_destination_receives_rtstruct_and_seg(node: Site, tmp_path: Path) -> None:
    dest_port = free_port()
    bundled_with_destination(node, dest_port)
    scp = start_storescp(dest_port, tmp_path / "received")
    try:
        phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=16, size=64))
        node.start()
        storescu(node, tmp_path / "ct")
        [job_dir] = node.done(1, timeout=60)
        wait_for(lambda: read_job(job_dir)["sends"]["TPS"]["status"] == "sent", 30)
        assert modalities(tmp_path / "received") == ["RTSTRUCT", "SEG"]
        rt = next(pydicom.dcmread(p) for p in (tmp_path / "received").iterdir() if p.name.startswith("RS"))
        assert "Lung_L" in [r.ROIName for r in rt.StructureSetROISequence]  # the route's own mapping
        assert "TPS" in node.cli("status", job_dir.name).stdout
    finally:
        scp.kill()
        scp.wait()


def test_destination_down_then_up_is_delivered_also_after_a_restart(node: Site, tmp_path: Path) -> None:
    dest_port = free_port()
    bundled_with_destination(node, dest_port)
    phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=16, size=64))
    service = node.start()
    storescu(node, tmp_path / "ct")
    [job_dir] = node.done(1, timeout=60)
    wait_for(lambda: read_job(job_dir)["sends"]["TPS"]["attempts"] >= 2, 30)
    state = read_job(job_dir)["sends"]["TPS"]
    assert state["status"] == "pending" and "no association" in state["error"]
    node.stop(service)  # the node goes down with the send still pending
    scp = start_storescp(dest_port, tmp_path / "received")
    try:
        node.start()  # a restart resumes the pending send
        wait_for(lambda: read_job(job_dir)["sends"]["TPS"]["status"] == "sent", 30)
        assert modalities(tmp_path / "received") == ["RTSTRUCT", "SEG"]
    finally:
        scp.kill()
        scp.wait()


def test_gives_up_after_the_retry_time_and_keeps_the_outputs(node: Site, tmp_path: Path) -> None:
    bundled_with_destination(node, free_port())
    node.write_config(dicom={"send_retry_seconds": 1.0})
    phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=12, size=48))
    node.start()
    storescu(node, tmp_path / "ct")
    [job_dir] = node.done(1, timeout=60)
    wait_for(lambda: read_job(job_dir)["sends"]["TPS"]["status"] == "failed", 30)
    assert "gave up after" in read_job(job_dir)["sends"]["TPS"]["error"]
    assert len(list((job_dir / "output").rglob("*.dcm"))) == 2


@pytest.mark.parametrize(("flag", "syntax"), [("-xi", "1.2.840.10008.1.2"), ("-xd", "1.2.840.10008.1.2.1.99")])
def test_transfer_syntaxes_are_stored_as_received(node: Site, tmp_path: Path, flag: str, syntax: str) -> None:
    ct(tmp_path, slices=4)
    node.write_config(dicom={"incomplete": "run"})
    node.start()
    proc = subprocess.run([dcmtk("storescu"), flag, "-aec", "POSTBOX", "+sd", "127.0.0.1", str(node.port),
                           str(tmp_path / "ct")], capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [job_dir] = node.done(1)
    stored = list((job_dir / "input" / "series-1").iterdir())
    assert len(stored) == 4
    assert {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in stored} == {syntax}
    assert read_job(job_dir)["status"] == "done"


def test_complete_on_release_and_a_late_instance_starts_a_new_job(node: Site, tmp_path: Path) -> None:
    import time

    files = ct(tmp_path, slices=6)
    node.write_config(dicom={"series_timeout": 5.0, "complete_on_release": True, "incomplete": "run"})
    node.start()
    storescu(node, tmp_path / "ct")
    released = time.time()
    [first] = node.done(1, timeout=20)
    assert read_job(first)["timings"]["committed"] - released < 2.0, "completed at release, not after 5 s"
    (tmp_path / "late").mkdir()
    shutil.copy(files[2], tmp_path / "late" / files[2].name)
    storescu(node, tmp_path / "late")  # the series is a job already: this one starts another
    jobs = node.done(2, timeout=30)
    late = next(j for j in jobs if j != first)
    assert read_job(first)["inputs"][0]["meta_data"]["instances"] == 6
    assert read_job(late)["inputs"][0]["meta_data"]["instances"] == 1
    assert any("1 of the 6 images" in w for w in read_job(late)["warnings"])


def test_address_not_on_the_allow_list_is_refused(node: Site, tmp_path: Path) -> None:
    node.write_config(dicom={"allowed_hosts": ["192.0.2.10"]})  # a documentation address: never us
    ct(tmp_path)
    node.start()
    refused = storescu(node, tmp_path / "ct", check=False)
    assert refused.returncode != 0
    node.write_config(dicom={"allowed_hosts": ["127.0.0.1"]})
    node.stop(node.procs[0])
    node.start()
    storescu(node, tmp_path / "ct")
    node.done(1)
    assert "refused (not in dicom.allowed_hosts)" in node.service_log()


def test_unrouted_series_is_ignored_when_configured(node: Site, tmp_path: Path) -> None:
    node.write_config(dicom={"unrouted": "ignore", "routes": [{"called_ae": "LUNGS", "algorithm": "noop"}]})
    ct(tmp_path, "a", slices=4)
    node.start()
    storescu(node, tmp_path / "a", called="OTHER")  # stored (success) but no route: nothing runs
    storescu(node, tmp_path / "a", called="LUNGS")
    [job_dir] = node.done(1)
    assert read_job(job_dir)["sender"]["called_ae"] == "LUNGS"
    assert "matches no route; ignored" in node.service_log()
    staging = node.inbox / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == []
