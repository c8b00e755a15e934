"""The postbox command line: keys, submit, status, phantom, --help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Site, wait_for

from pipeline import phantom
from pipeline.index import Index


def test_keys_are_shown_once_and_stored_hashed(site: Site) -> None:
    key = site.cli("manage", "key", "--add", "planning").stdout.strip()
    assert key.startswith("pbx_") and len(key) > 30
    listing = site.cli("manage", "key", "--list").stdout
    assert "planning" in listing and key[:8] in listing and key not in listing
    stored = "".join(p.read_text() for p in site.root.glob("postbox.db.json*") if p.is_file())
    assert key not in stored
    again = site.cli("manage", "key", "--add", "planning", check=False)
    assert again.returncode == 2 and "exists already" in again.stderr
    reserved = site.cli("manage", "key", "--add", "*", check=False)
    assert reserved.returncode == 2 and "reserved" in reserved.stderr
    site.cli("manage", "key", "--remove", "planning")
    assert "planning" not in site.cli("manage", "key", "--list").stdout
    assert site.cli("manage", "key", "--remove", "planning", check=False).returncode == 2


def test_a_site_key_is_made_so_and_listed_so(site: Site) -> None:
    site.cli("manage", "key", "--add", "desktop")
    site.cli("manage", "key", "--add", "ops", "--site")
    site.cli("manage", "key", "--add", "desktop-2")
    rows = [line.split("\t") for line in site.cli("manage", "key", "--list").stdout.splitlines()]
    # name, created, prefix, kind, id: a key is plain unless made with --site; ids are never reused
    assert [(r[0], r[3]) for r in rows] == [("desktop", "plain"), ("ops", "site"), ("desktop-2", "plain")]
    ids = [int(r[4].removeprefix("key-")) for r in rows]
    assert ids == sorted(set(ids))
    site.cli("manage", "key", "--remove", "desktop")
    site.cli("manage", "key", "--add", "desktop")
    again = site.cli("manage", "key", "--list").stdout.splitlines()[-1].split("\t")
    assert again[0] == "desktop" and int(again[4].removeprefix("key-")) > max(ids)  # a new id, not the old one
    stray = site.cli("manage", "key", "--list", "--site", check=False)
    assert stray.returncode == 2 and "--site goes with --add" in stray.stderr
    taken = site.cli("manage", "key", "--add", "key-12", check=False)
    assert taken.returncode == 2 and "reserved" in taken.stderr


def test_submit_refuses_at_the_door_and_leaves_nothing(site: Site, tmp_path: Path) -> None:
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    cases = [
        (["--algorithm", "nope"], "unknown algorithm 'nope'"),
        (["--settings", "{not json"], "--settings is not JSON"),
        (["--settings", '{"colour": 1}'], "setting 'colour' is not a setting of algorithm 'noop'"),
        (["--settings", '{"n": "one"}'], "must be int, not str"),
    ]
    for args, message in cases:
        proc = site.cli("submit", str(payload), *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    missing = site.cli("submit", str(tmp_path / "missing"), check=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert [p.name for p in site.inbox.iterdir() if p.name != ".staging"] == []
    staging = site.inbox / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_submit_then_status(site: Site, tmp_path: Path) -> None:
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    job_id = site.cli("submit", str(payload), "--settings", '{"n": 2}').stdout.strip()
    table = site.cli("status").stdout
    assert job_id in table and "pending" in table
    one = json.loads(site.cli("status", job_id, "--json").stdout)
    assert one["settings"] == {"n": 2} and one["status"] == "pending" and one["folder"].endswith(job_id)
    site.start()
    site.done(1)
    assert json.loads(site.cli("status", "--json").stdout)[0]["status"] == "done"
    assert site.cli("status", "20990101T000000-00000000", check=False).returncode == 2


def test_without_a_config_only_run_and_initdb_set_up_a_folder(tmp_path: Path) -> None:
    here = tmp_path / "elsewhere"
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "POSTBOX_CONFIG"}

    def postbox(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "facade.cli", *args], cwd=here, env=env, capture_output=True,
                              text=True, timeout=60)

    (tmp_path / "scan.txt").write_text("x")
    for args in (["status"], ["status", "--json"], ["submit", str(tmp_path / "scan.txt")], ["audit"],
                 ["manage", "key", "--list"], ["manage", "key", "--add", "desk"]):
        proc = postbox(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "no config found" in proc.stderr and str(here) in proc.stderr
        assert "--config" in proc.stderr and "$POSTBOX_CONFIG" in proc.stderr and "config.yaml" in proc.stderr
        assert list(here.iterdir()) == [], f"postbox {' '.join(args)} created {list(here.iterdir())}"
    # What needs no config works without one.
    assert postbox("phantom", "ct", "--slices", "2", "--size", "16").returncode == 0
    assert postbox("manage", "certs", "pki").returncode == 0
    assert sorted(p.name for p in here.iterdir()) == ["ct", "pki"]
    # A config named by $POSTBOX_CONFIG is found from anywhere.
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "config.yaml").write_text("dicom: {enabled: false}\n")
    env["POSTBOX_CONFIG"] = str(site_dir / "config.yaml")
    assert postbox("status").returncode == 0 and (site_dir / "inbox").is_dir()
    del env["POSTBOX_CONFIG"]
    # initdb (as manage run) sets up the folder it runs in, on the embedded defaults.
    init = postbox("manage", "initdb")
    assert init.returncode == 0, init.stderr
    assert {"inbox", "outbox"} <= {p.name for p in here.iterdir()}


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_phantom_command(site: Site, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"ph-{fmt}"
    site.cli("phantom", str(out), "--format", fmt, "--slices", "8", "--size", "32")
    if fmt == "dicom":
        assert len(list(out.glob("*.dcm"))) == 8
    else:
        import SimpleITK as sitk

        assert sitk.ReadImage(str(next(out.rglob("*.nii.gz")) if out.is_dir() else out)).GetSize() == (32, 32, 8)


@pytest.mark.parametrize("args", [[], ["manage"], ["manage", "key"], ["manage", "run"], ["submit"], ["status"],
                                  ["phantom"]])
def test_help_on_each_command(site: Site, args: list[str]) -> None:
    proc = site.cli(*args, "--help")
    assert "usage: postbox" in proc.stdout


def test_readme_quick_start_phantom_lands_in_outbox(site: Site, tmp_path: Path) -> None:
    grid = phantom.axial_grid(slices=8, size=32)
    phantom.write_dicom(tmp_path / "ct", grid)
    job_id = site.cli("submit", str(tmp_path / "ct")).stdout.strip()
    site.start()
    site.done(1)
    assert (site.outbox / job_id / "output" / "result.txt").exists()


def test_submit_with_a_broken_dicom_file_is_refused_and_leaves_nothing(site: Site, tmp_path: Path) -> None:
    folder = tmp_path / "series"
    phantom.write_dicom(folder, phantom.axial_grid(slices=3, size=16))
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    proc = site.cli("submit", str(folder), check=False)
    assert proc.returncode == 2 and "broken.dcm" in proc.stderr and "DICOM file" in proc.stderr
    assert [p.name for p in site.inbox.iterdir() if p.name != ".staging"] == []
    assert not any((site.inbox / ".staging").iterdir())


def _damage(path: Path, how: str) -> bytes:
    """Damage ``path`` by hand as a full disk or a power cut would; return the damaged bytes."""
    raw = path.read_bytes()
    damaged = raw[: len(raw) // 2] if how == "half" else b""
    path.write_bytes(damaged)
    return damaged


def _refused(site: Site, file: str, holds: str) -> None:
    """Each command that would read or write the index refuses, naming the file (not a server path)."""
    for args in (["manage", "key", "--list"], ["manage", "key", "--add", "other"], ["manage", "initdb"],
                 ["manage", "run"]):
        proc = site.cli(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith(f"postbox: error: index file {file} is damaged"), proc.stderr
        assert holds in proc.stderr and "postbox manage initdb --repair" in proc.stderr
        assert str(site.root) not in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("how", ["half", "empty"])
def test_a_damaged_keys_file_is_refused_and_kept(site: Site, how: str) -> None:
    site.cli("manage", "key", "--add", "planning")
    main = site.root / "postbox.db.json"
    damaged = _damage(main, how)
    _refused(site, "postbox.db.json", "the API keys")
    assert main.read_bytes() == damaged


@pytest.mark.parametrize("how", ["half", "empty"])
def test_a_damaged_datasets_file_is_refused_and_kept(site: Site, how: str) -> None:
    site.cli("manage", "key", "--add", "planning")
    index = Index(site.root / "postbox.db.json")
    index.insert("datasets", {"owner": "planning"}, id_field="id")
    datasets = index.tables_dir / "datasets.json"
    damaged = _damage(datasets, how)
    _refused(site, "postbox.db.json.tables/datasets.json", "datasets")
    assert datasets.read_bytes() == damaged


def test_a_damaged_job_shard_is_rebuilt_from_the_folders(site: Site, tmp_path: Path) -> None:
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    job_id = site.cli("submit", str(payload)).stdout.strip()
    index = Index(site.root / "postbox.db.json")
    [shard] = [p for p in index.jobs_dir.glob("*.json") if job_id in p.read_text()]
    _damage(shard, "half")
    site.start()  # a job shard is no reason to refuse: the worker rebuilds it from the folders at start
    site.done(1)
    rec = wait_for(lambda: (lambda r: r if r and r["location"] == "outbox" else None)(index.get_job(job_id)))
    assert rec["status"] == "done"


def test_initdb_repair_moves_a_damaged_keys_file_aside(site: Site) -> None:
    site.cli("manage", "key", "--add", "planning")
    main = site.root / "postbox.db.json"
    damaged = _damage(main, "half")
    proc = site.cli("manage", "initdb", "--repair")
    [aside] = site.root.glob("postbox.db.json.damaged-*")
    assert re.fullmatch(r"postbox\.db\.json\.damaged-\d{8}T\d{6}", aside.name)
    assert aside.read_bytes() == damaged
    [line] = proc.stderr.splitlines()
    assert line.startswith("postbox: postbox.db.json was damaged") and aside.name in line
    assert "lost the API keys: make new ones with postbox manage key --add NAME" in line
    assert str(site.root) not in proc.stderr
    site.cli("manage", "key", "--add", "new")
    assert [row.split("\t")[0] for row in site.cli("manage", "key", "--list").stdout.splitlines()] == ["new"]
    site.stop(site.start())
    again = site.cli("manage", "initdb", "--repair")  # nothing damaged: initdb as usual
    assert again.stderr == "" and "index ready" in again.stdout
    assert len(list(site.root.glob("postbox.db.json.damaged-*"))) == 1
