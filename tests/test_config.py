"""config.yaml: found in order, validated at start; a bad key stops the program with exit 2 naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import Site

from pipeline.config import Config
from pipeline.errors import ConfigError


@pytest.mark.parametrize(("change", "key", "problem"), [
    ({"inbx": "x"}, "inbx", "unknown key"),
    ({"worker": {"processes": "two"}}, "worker.processes", "must be of type int"),
    ({"worker": {"procs": 2}}, "worker.procs", "unknown key"),
    ({"worker": {"job_timeout": -1}}, "worker.job_timeout", "must be > 0"),
    ({"worker": {"keep_warm": "yes"}}, "worker.keep_warm", "must be of type bool"),
    ({"default_algorithm": "nope"}, "default_algorithm", "'nope' is not a configured algorithm"),
    ({"algorithms": [{"name": "x", "function": "no_such_module:run"}]}, "algorithms[x].function",
     "module 'no_such_module' not found"),
    ({"algorithms": [{"name": "x", "function": "testalgos:no_such_function"}]}, "algorithms[x].function",
     "has no callable 'no_such_function'"),
    ({"algorithms": [{"name": "x", "function": "testalgos"}]}, "algorithms[x].function", "module:callable"),
    ({"algorithms": [{"name": "x", "function": "testalgos:noop", "command": ["echo"]}]}, "algorithms[x]",
     "exactly one of"),
    ({"algorithms": [{"name": "x", "command": ["echo"], "colour": 1}]}, "algorithms[x].colour", "unknown key"),
    ({"algorithms": [{"name": "x", "command": ["echo"], "outputs": ["png"]}]}, "algorithms[x].outputs",
     "unknown output 'png'"),
    ({"dicom": {"incomplete": "maybe"}}, "dicom.incomplete", "must be 'fail' or 'run'"),
    ({"http": {"port": "80"}}, "http.port", "must be of type int"),
    ({"http": {"port": 70000}}, "http.port", "must be a TCP port"),
    ({"http": {"max_upload_mb": 0}}, "http.max_upload_mb", "must be > 0"),
    ({"http": {"threads": 0}}, "http.threads", "must be > 0"),
    ({"http": {"allowed_locations": "10.0.0.1"}}, "http.allowed_locations", "must be a list"),
    ({"http": {"allowed_locations": ["10.0.0.0/33"]}}, "http.allowed_locations[0]",
     "'10.0.0.0/33' is not a host name, an address or a CIDR block"),
    ({"http": {"allowed_locations": ["pacs", "10.0.0.300"]}}, "http.allowed_locations[1]", "not a host name"),
    ({"http": {"allowed_locations": ["pacs", 104]}}, "http.allowed_locations[1]", "must be a host name"),
    ({"http": {"allowed_locations": ["http://pacs"]}}, "http.allowed_locations[0]", "not a host name"),
    ({"http": {"allowed_locations": [{"host": "pacs", "port": 104}]}}, "http.allowed_locations[0].port",
     "is not a key of an allowed location"),
    ({"http": {"allowed_locations": [{"host": "pacs", "tls": {"ca": "ca.pem", "require_client_cert": True}}]}},
     "http.allowed_locations[0].tls.require_client_cert", "is for a door"),
    ({"http": {"allowed_locations": [{"tls": {"ca": "ca.pem"}}]}}, "http.allowed_locations[0].host",
     "must be a host name"),
    ({"http": {"allowed_locations": [{"host": "pacs", "tls": {"ca": "missing.pem"}}]}},
     "http.allowed_locations[0].tls.ca", "cannot read missing.pem"),
    ({"http": {"max_datasets_per_key": 0}}, "http.max_datasets_per_key", "must be > 0"),
    ({"http": {"max_stored_mb_per_key": -1}}, "http.max_stored_mb_per_key", "must be > 0"),
    ({"http": {"status_wait_ms": -1}}, "http.status_wait_ms", "must be >= 0"),
    ({"http": {"max_waiters": 2.5}}, "http.max_waiters", "must be of type int"),
    ({"inbox": "blocker/inbox"}, "inbox", "cannot create folder"),
])
def test_invalid_config_exits_2_naming_the_key(site: Site, change: dict, key: str, problem: str) -> None:
    (site.root / "blocker").write_text("a file where a folder should be")
    data = {k: v for k, v in site.config.items() if k not in change or not isinstance(v, dict)}
    for k, v in change.items():
        data[k] = {**site.config[k], **v} if isinstance(v, dict) and isinstance(site.config.get(k), dict) else v
    if "algorithms" in change:
        data["default_algorithm"] = change["algorithms"][0]["name"]
    site.config_path.write_text(yaml.safe_dump(data))
    proc = site.cli("status", check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"config key '{key}'" in proc.stderr
    assert problem in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, "one line, no traceback"


def test_config_found_by_flag_then_env_then_cwd(tmp_path: Path) -> None:
    for name in ("flag", "env", "cwd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"inbox": f"in-{name}"}))
    env = dict(os.environ, POSTBOX_CONFIG=str(tmp_path / "env" / "config.yaml"))
    code = "from pipeline.service import load_config; import sys; print(load_config(sys.argv[1] or None).inbox)"

    def inbox(flag: str, env: dict[str, str]) -> str:
        return subprocess.run([sys.executable, "-c", code, flag], cwd=tmp_path / "cwd", env=env,
                              capture_output=True, text=True, check=True).stdout.strip()

    assert inbox(str(tmp_path / "flag" / "config.yaml"), env) == str(tmp_path / "flag" / "in-flag")
    assert inbox("", env) == str(tmp_path / "env" / "in-env")
    env.pop("POSTBOX_CONFIG")
    assert inbox("", env) == str(tmp_path / "cwd" / "in-cwd")


def test_defaults_are_embedded_and_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    cfg = Config.from_dict({}, base_dir=tmp_path)
    assert cfg.inbox == tmp_path / "inbox" and cfg.outbox == tmp_path / "outbox"
    assert cfg.default_algorithm == "body-lungs"
    assert cfg.algorithm("body-lungs") is not None
    assert cfg.worker.keep_warm is True
    assert (cfg.http.port, cfg.dicom.ae_title, cfg.dicom.port) == (8000, "POSTBOX", 7777)
    assert (cfg.http.status_wait_ms, cfg.http.max_waiters, cfg.http.threads) == (900, 8, 16)


def test_allowed_locations_match_addresses_blocks_and_names_never_resolved(tmp_path: Path) -> None:
    http = Config.from_dict({"http": {"allowed_locations": ["10.1.0.0/16", "PACS.Hospital.", "::1", "192.0.2.7"]}},
                            base_dir=tmp_path).http
    assert [e.host for e in http.allowed_locations] == ["10.1.0.0/16", "pacs.hospital", "::1/128", "192.0.2.7/32"]
    for host in ("10.1.200.3", "pacs.hospital", "PACS.HOSPITAL.", "[::1]", "192.0.2.7"):
        assert http.allows_location(host), host
    # Not listed; a name is never resolved to pass an address entry, nor an address a name entry.
    for host in ("10.2.0.1", "192.0.2.8", "localhost", "pacs", "pacs.hospital.evil", "2130706433", "::ffff:10.1.0.1"):
        assert not http.allows_location(host), host
    # Empty: the hosts of dicom.destinations only.
    empty = Config.from_dict({}, base_dir=tmp_path).http
    assert (empty.max_datasets_per_key, empty.max_stored_mb_per_key, empty.allowed_locations) == (1000, 50000.0, ())
    assert empty.allows_location("TPS.local", destinations=["tps.local", "10.0.0.5"])
    assert empty.allows_location("10.0.0.5", destinations=["tps.local", "10.0.0.5"])
    assert not empty.allows_location("10.0.0.6", destinations=["tps.local", "10.0.0.5"])
    assert not empty.allows_location("127.0.0.1")


def test_an_allowed_location_entry_may_say_how_to_reach_it_over_tls(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    cfg = Config.from_dict({"http": {"allowed_locations": ["10.0.0.0/8", {"host": "pacs.hospital",
                                                                          "tls": {"ca": "ca.pem"}}]}},
                           base_dir=tmp_path)
    assert cfg.http.allows_location("pacs.hospital") and cfg.http.allows_location("10.3.3.3")
    tls = cfg.location_tls("PACS.hospital")
    assert tls is not None and tls.ca == tmp_path / "ca.pem" and tls.cert is None
    assert cfg.location_tls("10.3.3.3") is None  # listed without tls: plain DICOM
    assert cfg.location_tls("elsewhere") is None
    assert "http.allowed_locations[1].tls" in cfg.tls_files()


def test_config_error_survives_pickling() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("worker.processes", "must be > 0")))
    assert (err.key, err.problem) == ("worker.processes", "must be > 0")


def test_repo_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = Config.from_file(root / "config.yaml", check_folders=False)
    assert cfg.default_algorithm == "body-lungs"
    from pipeline.bodylungs import DEFAULT_SETTINGS

    assert cfg.algorithms[0].default_settings == DEFAULT_SETTINGS
