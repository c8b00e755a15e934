"""The Python client, ``postbox send`` and PlatiPy's own client against a real service running the bundled algorithm."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import SimpleITK as sitk
from _http import HttpSite, check_masks, http_site
from conftest import read_job

from facade.client import AlgorithmFailed, Client, ClientError
from pipeline import phantom
from pipeline.bodylungs import DEFAULT_SETTINGS

REPO = Path(__file__).resolve().parents[1]
PLATIPY_PYTHON = Path(os.environ.get("POSTBOX_PLATIPY_PYTHON", REPO / ".ci" / ".venv-platipy" / "bin" / "python"))
GRID = phantom.axial_grid(slices=40, size=128)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpSite]:
    # The DICOM locations the tests (and PlatiPy's own client) make are on the operator's list.
    site = http_site(tmp_path_factory.mktemp("client"), worker={"processes": 2},
                     http={"max_upload_mb": 8, "allowed_locations": ["127.0.0.1", "10.0.0.9"]})
    site.alice = site.key("alice")
    site.start_http()
    yield site
    site.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("phantom")
    nifti = phantom.write_nifti(out / "ct.nii.gz", grid=GRID)
    phantom.write_dicom(out / "ct", GRID)
    with zipfile.ZipFile(out / "ct.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted((out / "ct").iterdir()):
            zf.write(p, f"ct/{p.name}")
    return {"nifti": nifti, "dicom": out / "ct", "zip": out / "ct.zip"}


def _port(srv: HttpSite) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def _client(srv: HttpSite, algorithm: str = "body-lungs", **options: object) -> Client:
    return Client("127.0.0.1", _port(srv), srv.alice, algorithm, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["nifti", "dicom"])
def test_client_round_trip_on_the_phantom(srv: HttpSite, inputs: dict[str, Path], tmp_path: Path, kind: str) -> None:
    with _client(srv, "body") as client:  # a part of the name that names one algorithm, as PlatiPy finds it
        assert client.algorithm_name == "body-lungs"
        dataset = client.add_dataset()
        if kind == "nifti":
            obj = client.add_data_object(dataset, file_path=inputs["nifti"], meta_data={"case": 1})
            assert obj["type"] == "FILE" and obj["meta_data"] == {"case": 1}
        else:
            obj = client.add_dicom_folder(dataset, inputs["dicom"])  # zipped on the fly
            assert obj["type"] == "DICOM" and obj["meta_data"] == {"instances": 40}
        assert client.get_dataset_ready(dataset) is True
        settings = client.get_default_settings()
        assert settings["body_name"] == "body"
        states = [s["state"] for s in client.run_algorithm(dataset, config=settings)]
        assert states[-1] == "SUCCESS" and len(states) == len(set(states))  # each change once, the end included
        files = client.download_output_objects(dataset, output_path=tmp_path / "out")
        outputs = client.get_dataset(dataset)["output_data_objects"]
    assert sorted(f.name for f in files) == sorted(o["path"] for o in outputs)
    check_masks(files, GRID)
    if kind == "dicom":  # the DICOM output (an RTSTRUCT) downloads as its file
        [rtstruct] = [f for f in files if f.suffix == ".dcm"]
        assert rtstruct.read_bytes()[128:132] == b"DICM"
    assert not list((tmp_path / "out").glob(".*"))  # no partial download left


def test_client_errors_carry_the_servers_message(srv: HttpSite, tmp_path: Path) -> None:
    with pytest.raises(ClientError, match=r"a valid API key is needed.*HTTP 401"):
        Client("127.0.0.1", _port(srv), "pbx_wrong", "noop")
    with pytest.raises(ClientError, match="no algorithm named like 'segment-everything'"):
        _client(srv, "segment-everything")
    with pytest.raises(FileNotFoundError, match="CA certificate file not found"):
        _client(srv, verify=str(tmp_path / "missing-ca.pem"))
    with _client(srv, "raises") as client:
        with pytest.raises(ClientError, match=r"dataset 999999 not found \(HTTP 404\)"):
            client.get_dataset(999999)
        dataset = client.add_dataset()
        with pytest.raises(ClientError, match="has no data objects"):
            list(client.run_algorithm(dataset))
        big = tmp_path / "big.bin"
        big.write_bytes(b"\0" * (9 * 10**6))
        with pytest.raises(ClientError, match="accepts uploads up to 8 MB"):
            client.add_data_object(dataset, file_path=big)
        (tmp_path / "in.txt").write_text("x")
        client.add_data_object(dataset, file_path=tmp_path / "in.txt")
        with pytest.raises(AlgorithmFailed, match="the model found no CT in the input") as failed:
            list(client.run_algorithm(dataset))
        assert failed.value.state["state"] == "FAILURE"
        with pytest.raises(ClientError, match="'colour' is not a setting"):
            list(client.run_algorithm(dataset, config={"colour": "red"}))
        location = client.add_dicom_location("pacs", "127.0.0.1", 104, "PACS")
        assert client.add_dicom_location("pacs", "10.0.0.9", 11112) == location == client.get_dicom_location("pacs")
        assert client.get_dicom_location("nowhere") is None


def test_progress_bars_when_asked(srv: HttpSite, inputs: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with _client(srv, "noop", progress=True) as client:
        dataset = client.add_dataset()
        client.add_data_object(dataset, file_path=inputs["nifti"])
        list(client.run_algorithm(dataset))
        client.download_output_objects(dataset, tmp_path)
    err = capsys.readouterr().err
    assert "upload ct.nii.gz" in err and "download result.txt" in err


def test_postbox_send(srv: HttpSite, inputs: dict[str, Path], tmp_path: Path) -> None:
    def send(*args: str, key: str = srv.alice) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "facade.cli", "send", *args, "--port", str(_port(srv))],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "POSTBOX_API_KEY": key, "PYTHONPATH": str(REPO)})

    done = send(str(inputs["zip"]), "--algorithm", "body-lungs", "--settings", '{"body_name": "External"}',
                "--out", "out")
    assert done.returncode == 0, done.stderr
    files = [tmp_path / line for line in done.stdout.split()]
    assert sorted(f.name for f in files) == ["External.nii.gz", "lung_left.nii.gz", "lung_right.nii.gz",
                                             "rtstruct.dcm"]
    (tmp_path / "out" / "External.nii.gz").rename(tmp_path / "out" / "body.nii.gz")
    check_masks([tmp_path / "out" / n for n in ("body.nii.gz", "lung_left.nii.gz", "lung_right.nii.gz")], GRID)
    assert "SUCCESS" in done.stderr and "as data object" in done.stderr

    failed = send(str(inputs["nifti"]), "--algorithm", "raises")
    assert failed.returncode == 1 and "the model found no CT in the input" in failed.stderr
    refused = send(str(inputs["nifti"]), "--algorithm", "noop", key="pbx_wrong")
    assert refused.returncode == 2 and "API key" in refused.stderr
    bad = send(str(inputs["nifti"]), "--algorithm", "noop", "--settings", '{"n": "one"}')
    assert bad.returncode == 2 and "must be int" in bad.stderr


def test_the_readme_example_runs(srv: HttpSite, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## HTTP API and client", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("/tmp/", f"{tmp_path}/").replace("8000", str(_port(srv)))
    exec(compile(code, "README.md", "exec"), {"api_key": srv.alice})
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["External.nii.gz", "lung_left.nii.gz",
                                                                      "lung_right.nii.gz"]


def test_eight_clients_at_once(srv: HttpSite, tmp_path: Path) -> None:
    grids = [phantom.axial_grid(slices=12 + 2 * i, size=64) for i in range(8)]

    def one(i: int) -> list[Path]:
        ct = phantom.write_nifti(tmp_path / f"in-{i}" / "ct.nii.gz", grid=grids[i], seed=i)
        with _client(srv) as client:
            dataset = client.add_dataset()
            client.add_data_object(dataset, file_path=ct)
            assert list(client.run_algorithm(dataset))[-1]["state"] == "SUCCESS"
            return client.download_output_objects(dataset, tmp_path / f"out-{i}")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for i, files in enumerate(results):
        masks = [f for f in files if f.name.endswith(".nii.gz")]
        assert {sitk.ReadImage(str(f)).GetSize() for f in masks} == {(64, 64, 12 + 2 * i)}  # its own run's outputs
        check_masks(masks, grids[i])


PLATIPY_SCRIPT = textwrap.dedent('''
    # The seed's client.py flow, with PlatiPy's own client as installed from PyPI, unmodified.
    import sys
    from platipy.client import PlatiPyClient

    host, port, api_key, algorithm_name, ct_path, output_path = sys.argv[1:]
    client = PlatiPyClient(host, int(port), api_key, algorithm_name)
    location = client.add_dicom_location("pacs", "127.0.0.1", 104, ae_title="PACS")
    assert client.get_dicom_location("pacs") == location
    dataset = client.add_dataset(timeout=2)
    data_object = client.add_data_object(dataset, file_path=ct_path)
    assert client.get_dataset_ready(dataset) is True
    settings = client.get_default_settings()
    for status in client.run_algorithm(dataset, config=settings):
        print(status)
    client.download_output_objects(dataset, output_path=output_path)
    print("DATASET", client.get_dataset(dataset)["id"], data_object["type"])
''')


@pytest.mark.skipif(os.environ.get("POSTBOX_NO_PLATIPY") == "1", reason="POSTBOX_NO_PLATIPY=1: PlatiPy client skipped")
@pytest.mark.parametrize("kind", ["nifti", "zip"])
def test_platipys_own_client_unmodified(srv: HttpSite, inputs: dict[str, Path], tmp_path: Path, kind: str) -> None:
    assert PLATIPY_PYTHON.exists(), (
        f"no PlatiPy venv at {PLATIPY_PYTHON}: run .ci/run, or python3 -m venv .ci/.venv-platipy && "
        ".ci/.venv-platipy/bin/pip install platipy==0.7.2 (POSTBOX_NO_PLATIPY=1 skips this test)")
    script = tmp_path / "client.py"
    script.write_text(PLATIPY_SCRIPT)
    proc = subprocess.run([str(PLATIPY_PYTHON), str(script), "127.0.0.1", str(_port(srv)), srv.alice, "body-lungs",
                           str(inputs[kind]), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dataset_id, kind_seen = proc.stdout.split("DATASET ")[1].split()
    assert kind_seen == ("FILE" if kind == "nifti" else "DICOM")  # a zipped series becomes a DICOM object
    files = sorted((tmp_path / "out").iterdir())
    check_masks(files, GRID)
    jobs = [read_job(p) for p in srv.outbox.iterdir() if (p / "job.yaml").exists()]
    [job] = [j for j in jobs if j["dataset"] == dataset_id]
    assert job["status"] == "done" and job["source"] == "http" and job["settings"] == DEFAULT_SETTINGS
