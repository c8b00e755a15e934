"""contrib/Dockerfile and contrib/compose.yaml (issue 11), checked without a container engine (none runs here).

What is run: the Dockerfile's own install step (its RUN ``pip install ...``, which must be the README's install
command) on a copy of exactly what its COPY lines put in the image, in a fresh venv; and its HEALTHCHECK
command against a really started service. What is not: the image build itself (the base image, downloading
the dependencies' wheels into it) and the container's start. The venv sees the system's site-packages, so the
dependencies are taken as installed rather than downloaded: the step tested is Postbox's own install.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import Site

from pipeline.config import Config, WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "contrib" / "Dockerfile"
COMPOSE = ROOT / "contrib" / "compose.yaml"


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        found.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return found


def arguments(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def env() -> dict[str, str]:
    return dict(pair.split("=", 1) for rest in arguments("ENV") for pair in shlex.split(rest))


def readme_install_command() -> str:
    """The install command of the README's first line (``pip install -e . && postbox manage run``)."""
    block = re.search(r"```\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README starts with a code block"
    return block.group(1).splitlines()[0].split("&&")[0].strip()


def container_config() -> Config:
    copies = [rest.split() for rest in arguments("COPY")]
    config_path = next(dest for *srcs, dest in copies if srcs == ["contrib/config.yaml"])
    assert env()["POSTBOX_CONFIG"] == config_path
    return Config.from_file(ROOT / "contrib" / "config.yaml", check_folders=False)


def test_the_image_is_slim_python_and_runs_as_a_user_of_its_own() -> None:
    assert arguments("FROM") == ["python:3.11-slim"]
    user = arguments("USER")[-1]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert any("useradd" in run and user in run.split() for run in arguments("RUN")), "the user is made"
    assert [word for word, _ in instructions()].index("USER") < [word for word, _ in instructions()].index("CMD")
    assert json.loads(arguments("CMD")[-1]) == ["postbox", "manage", "run"]


def test_the_container_config_listens_everywhere_on_the_exposed_ports_and_keeps_its_folders_on_a_volume() -> None:
    cfg = container_config()
    assert (cfg.http.host, cfg.dicom.host) == ("0.0.0.0", "0.0.0.0")
    assert sorted(int(p) for p in arguments("EXPOSE")[0].split()) == sorted([cfg.http.port, cfg.dicom.port]) \
        == [7777, 8000]
    volumes = [Path(v) for v in json.loads(arguments("VOLUME")[0])]
    for folder in (cfg.inbox, cfg.outbox, cfg.database.parent):
        # one volume for all: the inbox and outbox must be one filesystem (jobs move by rename)
        assert folder.is_relative_to(volumes[0]), folder


def test_compose_publishes_the_ports_mounts_the_volume_and_outwaits_a_stop() -> None:
    service = yaml.safe_load(COMPOSE.read_text())["services"]["postbox"]
    assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert sorted(service["ports"]) == ["7777:7777", "8000:8000"]
    assert any(v.split(":")[1] == "/data" for v in service["volumes"])
    assert float(service["stop_grace_period"].removesuffix("s")) > WorkerConfig().stop_timeout
    assert service["init"] is True


def test_the_dockerfile_installs_with_the_readme_command(tmp_path: Path) -> None:
    command = readme_install_command()
    assert command in ("pip install -e .", "pip install .")
    assert command in arguments("RUN"), f"the Dockerfile installs with the README's own `{command}`"
    # The image's /opt/postbox: exactly what COPY puts there before the install.
    workdir = tmp_path / "opt-postbox"
    workdir.mkdir()
    for rest in arguments("COPY"):
        *sources, dest = rest.split()
        if not dest.startswith("/"):
            for src in sources:
                path = ROOT / src
                target = workdir / dest / (path.name if dest.endswith("/") and path.is_file() else "")
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    run_env = {**os.environ, **env(), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    run_env.pop("PYTHONPATH", None)
    # Docker's shell form: /bin/sh -c "<the RUN line>", in the WORKDIR, with the image's ENV.
    proc = subprocess.run(["/bin/sh", "-c", command], cwd=workdir, env=run_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    imports = "import pipeline, facade.cli; print(pipeline.__file__)"
    where = subprocess.run([str(venv / "bin" / "python"), "-c", imports], cwd=tmp_path, env=run_env,
                           capture_output=True, text=True, timeout=60, check=True)
    assert Path(where.stdout.strip()).is_relative_to(workdir), "the venv runs the copy it installed"
    helped = subprocess.run([str(venv / "bin" / "postbox"), "--help"], cwd=tmp_path, env=run_env,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "manage" in helped.stdout, helped.stderr


def test_the_healthcheck_command_passes_on_a_serving_service_and_fails_on_a_stopped_one(site: Site) -> None:
    rest = arguments("HEALTHCHECK")[0]
    argv = json.loads(rest[rest.index("CMD ") + 4:])
    assert argv[:2] == ["python", "-c"] and "/api/health" in argv[2] and "urllib" in argv[2]
    proc = site.start()
    port = site.doors(proc)["http"]["port"]
    check = [sys.executable, "-c", argv[2].replace(":8000/", f":{port}/")]
    assert check[2] != argv[2]
    ok = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert site.stop(proc) == 0
    failed = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert failed.returncode != 0


@pytest.mark.parametrize("path", ["inbox/", "outbox/", "*.db.json*"])
def test_the_build_context_leaves_out_patient_data(path: str) -> None:
    ignored = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert path in ignored
