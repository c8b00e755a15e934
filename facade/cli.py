"""The ``postbox`` command: manage (initdb, key, run, echo), submit, status, audit, phantom, send, selftest."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import jobs
from pipeline.checks import json_object
from pipeline.config import Config
from pipeline.errors import ConfigError, InvalidInput, PostboxError
from pipeline.health import is_disk_full
from pipeline.index import Index
from pipeline.logs import configure_logging

log = logging.getLogger("postbox")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="postbox", description="Run a medical image analysis tool as a service.")
    p.add_argument("--config", metavar="PATH",
                   help="config.yaml to use (default: $POSTBOX_CONFIG, then ./config.yaml; only 'manage run' and "
                        "'manage initdb' fall back to built-in defaults, the rest refuse without one)")
    p.add_argument("--log-json", action="store_true",
                   help="log one JSON object per line (time, level, logger, message, exception) for a log "
                        "collector, as config.yaml's log_format: json does (default: one line of text per event)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    manage = sub.add_parser("manage", help="set up and run the service")
    msub = manage.add_subparsers(dest="manage", required=True, metavar="ACTION")
    initdb = msub.add_parser("initdb", help="create the index and rebuild it from the job folders")
    initdb.add_argument("--repair", action="store_true",
                        help="first move each damaged index file that the folders cannot rebuild (API keys, "
                             "datasets, data objects, locations) aside under a dated name and start it afresh, "
                             "losing what it held")
    key = msub.add_parser("key", help="add, list or remove API keys (stored hashed)")
    group = key.add_mutually_exclusive_group(required=True)
    group.add_argument("--add", metavar="NAME", help="create a key and print it (shown only once)")
    group.add_argument("--list", action="store_true", help="list key names, creation times and prefixes")
    group.add_argument("--remove", metavar="NAME", help="delete a key")
    key.add_argument("--site", action="store_true",
                     help="with --add: an operator's key, which may list and download the jobs of every door "
                          "(folder, DICOM, CLI) and every key's datasets; a plain key sees only what it made")
    msub.add_parser("run", help="start the worker and every configured door; stop with Ctrl-C or SIGTERM")
    purge = msub.add_parser("purge", help="remove finished jobs older than DAYS from the outbox, with their index "
                                          "entries, lock files and HTTP records (as retention does); prints them")
    purge.add_argument("--older-than", metavar="DAYS", type=float, required=True,
                       help="days since the job finished (as recorded in its job.yaml)")
    purge.add_argument("--state", choices=("done", "failed"), help="only jobs that ended so (default: both)")
    purge.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    certs = msub.add_parser("certs", help="make a private CA, a server, a client and a node certificate (a test "
                                          "deployment)")
    certs.add_argument("folder", type=Path, help="where to write ca.pem, server.pem, client.pem and their keys")
    certs.add_argument("--host", action="append", default=None,
                       help="a name or address the server is reached by (repeatable; default: localhost, 127.0.0.1)")
    echo = msub.add_parser("echo", help="C-ECHO a DICOM node (verification)")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("ae_title", metavar="AE", help="the called AE title")
    echo.add_argument("--calling", default="POSTBOX", help="our AE title (default POSTBOX)")

    submit = sub.add_parser("submit", help="submit a file or folder as one job (atomic); prints the job id")
    submit.add_argument("path", nargs="+", type=Path, help="input files or folders")
    submit.add_argument("--algorithm", help="algorithm name (default: default_algorithm)")
    submit.add_argument("--settings", help="settings as a JSON object; keys must be the algorithm's")

    status = sub.add_parser("status", help="list jobs, or show one job's manifest")
    status.add_argument("job", nargs="?", help="a job id")
    status.add_argument("--json", action="store_true", help="print JSON")

    audit = sub.add_parser("audit", help="read the audit trail: who accessed patient data, when, from where")
    audit.add_argument("--job", help="only this job's entries")
    audit.add_argument("--since", help="from this ISO date or time (UTC), or a duration back from now: 24h, 7d")
    audit.add_argument("--json", action="store_true", help="print JSON lines")

    phantom = sub.add_parser("phantom", help="write a synthetic CT phantom (no data of your own needed)")
    phantom.add_argument("out", type=Path, help="output folder (dicom) or file/folder (nifti)")
    phantom.add_argument("--format", choices=("dicom", "nifti"), default="dicom")
    phantom.add_argument("--slices", type=int, default=40)
    phantom.add_argument("--size", type=int, default=128, help="rows and columns")
    phantom.add_argument("--seed", type=int, default=0)

    send = sub.add_parser("send", help="send inputs to a Postbox over HTTP, run an algorithm there, download "
                                       "the outputs (prints the files written)")
    send.add_argument("path", nargs="+", type=Path,
                      help="input files (a .zip of one DICOM series is fine), or DICOM series folders")
    send.add_argument("--host", default="127.0.0.1", help="the service's host (default 127.0.0.1)")
    send.add_argument("--port", type=int, default=8000, help="the service's HTTP port (default 8000)")
    send.add_argument("--key", default=os.environ.get("POSTBOX_API_KEY"),
                      help="API key (default: $POSTBOX_API_KEY, which keeps it out of the shell history)")
    send.add_argument("--algorithm", required=True, help="the algorithm's name (or a part naming just one)")
    send.add_argument("--settings", help="settings as a JSON object; keys must be the algorithm's")
    send.add_argument("--out", type=Path, default=Path("."), help="where to put the outputs (default: here)")
    send.add_argument("--verify", metavar="CA_FILE", help="use https, checking the server against this CA file")

    selftest = sub.add_parser("selftest", help="acceptance on site: send a phantom through every door of the running "
                                               "service and check the contours against its known structures")
    selftest.add_argument("--algorithm", help="algorithm for the folder and HTTP jobs (default: default_algorithm; "
                                              "the DICOM job takes its route's)")
    selftest.add_argument("--tls", action="store_true",
                          help="C-STORE over TLS, checking the node against dicom.tls's CA (client certificate: "
                               "--tls-cert, or client.pem beside the CA as 'manage certs' writes it)")
    selftest.add_argument("--tls-cert", type=Path, metavar="PEM", help="with --tls: our client certificate")
    selftest.add_argument("--tls-key", type=Path, metavar="PEM", help="with --tls: its private key")
    selftest.add_argument("--destination", metavar="NAME",
                          help="send the DICOM job's results to this dicom.destinations entry and check it stored "
                               "them (default: the self-test's series is sent nowhere)")
    selftest.add_argument("--slices", type=int, default=40, help="phantom slices (default 40)")
    selftest.add_argument("--size", type=int, default=128, help="phantom rows and columns (default 128)")
    selftest.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each job (default 300)")

    gpu = sub.add_parser("gpu-worker", help="serve one GPU of a Dask cluster (engine.kind: dask): a Dask worker that "
                                            "keeps each algorithm's process warm; exits 0 when its scheduler is gone")
    gpu.add_argument("--scheduler", required=True, metavar="ADDR",
                     help="the scheduler, tls://HOST:PORT (tcp:// only on 127.0.0.1)")
    gpu.add_argument("--config", dest="config", default=argparse.SUPPRESS, metavar="PATH",
                     help="the config.yaml of the Postbox services (same path on every node: algorithms, TLS)")
    gpu.add_argument("--resources", action="append", default=None, metavar="NAME=N",
                     help="what this worker offers (repeatable; default GPU=1: one GPU per worker, chosen with "
                          "CUDA_VISIBLE_DEVICES)")
    gpu.add_argument("--nthreads", type=int, default=1, help="Dask worker threads (default 1)")
    gpu.add_argument("--name", help="the worker's name on the scheduler, unique (default: the host name, with "
                                    "-gpuN when CUDA_VISIBLE_DEVICES names one GPU)")

    cluster = sub.add_parser("cluster", help="the GPU nodes of the Dask cluster: status, drain, resume")
    csub = cluster.add_subparsers(dest="cluster", required=True, metavar="ACTION")
    cstatus = csub.add_parser("status", help="one row per worker: address, resources, slots, running jobs, drained")
    cstatus.add_argument("--json", action="store_true", help="print JSON")
    cdrain = csub.add_parser("drain", help="stop sending jobs to NODE and wait until it runs none")
    cdrain.add_argument("node", metavar="NODE", help="a worker's name, address or host")
    cdrain.add_argument("--timeout", type=float, help="give up waiting after this many seconds (exit 1; it stays "
                                                      "drained)")
    cresume = csub.add_parser("resume", help="send jobs to a drained NODE again")
    cresume.add_argument("node", metavar="NODE", help="a worker's name, address or host")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``postbox``; returns the exit code (2 for refused input or config)."""
    args = _parser().parse_args(argv)
    configure_logging("INFO", "json" if args.log_json else "text")
    try:
        return _COMMANDS[args.command](args)
    except PostboxError as exc:
        print(f"postbox: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _config(args: argparse.Namespace, *, defaults: bool = False) -> Config:
    """The config in use; without ``defaults`` (only ``manage run`` and ``initdb`` set up a new folder),
    refuse (ConfigError, exit 2) rather than make an empty setup where there is no config file."""
    from pipeline.config import ENV_VAR
    from pipeline.service import load_config

    if not defaults and not args.config and not os.environ.get(ENV_VAR) and not Path("config.yaml").is_file():
        raise ConfigError("--config", f"no config found: no --config, no ${ENV_VAR}, no config.yaml in "
                                      f"{Path.cwd()}; give --config PATH, or run this where config.yaml is "
                                      "(nothing was created)")
    cfg = load_config(args.config)
    configure_logging(cfg.log_level, "json" if getattr(args, "log_json", False) else cfg.log_format)
    os.umask(cfg.permissions.umask)  # what this command writes (a job, the index) gets the configured modes
    return cfg


def _manage(args: argparse.Namespace) -> int:
    if args.manage == "echo":
        return _echo(args)
    if args.manage == "certs":
        from pipeline.tls import make_certificates

        hosts = args.host or ["localhost", "127.0.0.1"]
        for path in make_certificates(args.folder, hosts):
            print(path)
        print(f"server certificate for {', '.join(hosts)}; keys are 0600. For a test deployment only: a hospital "
              "uses its own PKI.", file=sys.stderr)
        return 0
    cfg = _config(args, defaults=args.manage in ("run", "initdb"))
    index = Index(cfg.database)
    if args.manage == "initdb" and args.repair:
        for lost in index.repair_files():
            print(f"postbox: {lost.file} was damaged ({lost.problem}); kept as {lost.aside} and started afresh: "
                  f"lost {lost.lost}: {lost.remedy}", file=sys.stderr)
    else:
        # Issue 8: refuse (IndexDamaged, exit 2) before a damaged file is read as empty and written over.
        index.check()
    if args.manage == "initdb":
        changed = index.repair(cfg.inbox, cfg.outbox)
        print(f"index ready: {cfg.database.name} ({changed} job entries updated from the folders)")
    elif args.manage == "key":
        if args.site and not args.add:
            print("postbox: error: --site goes with --add NAME (a key is made a site key when it is made)",
                  file=sys.stderr)
            return 2
        if args.add:
            try:
                key = index.add_key(args.add, site=args.site)
            except ValueError as exc:
                print(f"postbox: error: {exc}", file=sys.stderr)
                return 2
            print(key)
        elif args.list:
            for k in index.list_keys():
                print(f"{k.name}\t{k.created}\t{k.prefix}...\t{'site' if k.site else 'plain'}\tkey-{k.id}")
        elif not index.remove_key(args.remove):
            print(f"postbox: error: no key named '{args.remove}'", file=sys.stderr)
            return 2
    elif args.manage == "run":
        from pipeline.service import app

        return app.serve(cfg)
    elif args.manage == "purge":
        return _purge(args, cfg, index)
    return 0


def _purge(args: argparse.Namespace, cfg: Config, index: Index) -> int:
    from pipeline.retention import Retention

    from .records import forget_jobs

    if args.older_than < 0:
        raise InvalidInput(f"--older-than must be a number of days >= 0, not {args.older_than:g}")
    retention = Retention(cfg, index, who="manage purge")
    retention.forgetters.append(lambda ids: forget_jobs(index, ids))
    states = [args.state] if args.state else ["done", "failed"]
    report = retention.purge(dict.fromkeys(states, args.older_than), dry_run=args.dry_run)
    word = "would remove" if args.dry_run else "removed"
    for m in report.removed:
        print(f"{word} {m.id}\t{m.status.value}\tfinished {m.finished or '-'}")
    for job_id, reason in report.kept.items():
        print(f"kept {job_id}: {reason}")
    counts = ", ".join(f"{n} {state}" for state, n in sorted(report.counts().items()))
    print(f"{word} {len(report.removed)} job(s){f' ({counts})' if counts else ''}; kept {len(report.kept)}",
          file=sys.stderr)
    return 0


def _echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=args.calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate(args.host, args.port, ae_title=args.ae_title)
    if not assoc.is_established:
        print(f"postbox: error: no association with {args.ae_title}@{args.host}:{args.port}", file=sys.stderr)
        return 2
    status = assoc.send_c_echo()
    assoc.release()
    if getattr(status, "Status", None) != 0:
        print(f"postbox: error: C-ECHO failed: {status}", file=sys.stderr)
        return 2
    print(f"C-ECHO {args.ae_title}@{args.host}:{args.port}: success")
    return 0


def _settings(text: str | None) -> dict[str, Any] | None:
    """``--settings`` as a JSON object (None when not given); InvalidInput (exit 2) otherwise."""
    if not text:
        return None
    return json_object(text, "--settings")


def _require_paths(paths: Sequence[Path]) -> None:
    for path in paths:
        if not path.exists():
            raise InvalidInput(f"no such file or folder: {path}")


def _submit(args: argparse.Namespace) -> int:
    from pipeline.algorithms import merge_settings, resolve

    cfg = _config(args)
    settings = _settings(args.settings) or {}
    _require_paths(args.path)
    alg = resolve(cfg, args.algorithm)  # refuse at the door, not later in the worker
    merge_settings(alg, settings)
    try:
        manifest = jobs.submit(cfg.inbox, args.path, algorithm=alg.name, settings=settings, source="cli",
                               index=Index(cfg.database))
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # A failure at run time, not refused input (exit 1, not 2); jobs.submit left nothing behind.
        print("postbox: error: no space left on the inbox's filesystem; nothing was submitted", file=sys.stderr)
        return 1
    print(manifest.id)
    return 0


def _status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    index = Index(cfg.database)
    if args.job:
        job_dir = jobs.locate(cfg.inbox, cfg.outbox, args.job)
        if job_dir is None:
            print(f"postbox: error: no job {args.job}", file=sys.stderr)
            return 2
        manifest = jobs.read_manifest(job_dir)
        data = manifest.to_dict()
        # Where it is, relative to config.yaml's folder: no server path in an answer (issue 9).
        data["folder"] = os.path.relpath(job_dir, cfg.base_dir)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            import yaml

            print(yaml.safe_dump(data, sort_keys=False).rstrip())
        return 0
    records = index.jobs()
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(f"{'JOB':<25} {'STATUS':<8} {'ALGORITHM':<20} {'SOURCE':<7} {'TRIES':>5}  CREATED")
    for r in records:
        print(f"{r['id']:<25} {r['status']:<8} {str(r['algorithm'] or '-')[:20]:<20} {r['source']:<7} "
              f"{r['attempts']:>5}  {r['created']}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from pipeline.audit import AuditLog, parse_since

    cfg = _config(args)
    if args.since:
        try:
            parse_since(args.since)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    entries = AuditLog.beside(cfg.database).entries(job=args.job, since=args.since)
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
        return 0
    print(f"{'TIME':<29} {'ACTION':<17} {'WHO':<16} {'ADDRESS':<21} {'JOB':<25} {'DATASET':>7}  SERIES")
    for e in entries:
        print(f"{e.get('time', ''):<29} {e.get('action', ''):<17} {e.get('who', ''):<16} "
              f"{e.get('address') or '-':<21} {e.get('job') or '-':<25} {str(e.get('dataset') or '-'):>7}  "
              f"{e.get('series_uid') or '-'}")
    return 0


def _phantom(args: argparse.Namespace) -> int:
    from pipeline import phantom

    if args.format == "nifti":
        path = phantom.write_nifti(args.out, slices=args.slices, size=args.size, seed=args.seed)
        print(path)
    else:
        grid = phantom.axial_grid(slices=args.slices, size=args.size)
        files = phantom.write_dicom(args.out, grid, seed=args.seed)
        print(f"{args.out} ({len(files)} slices)")
    return 0


def _send(args: argparse.Namespace) -> int:
    from facade.client import AlgorithmFailed, Client, ClientError

    if not args.key:
        print("postbox: error: give --key or set POSTBOX_API_KEY", file=sys.stderr)
        return 2
    settings = _settings(args.settings)
    _require_paths(args.path)
    try:
        with Client(args.host, args.port, args.key, args.algorithm, verify=args.verify) as client:
            dataset = client.add_dataset()
            for path in args.path:
                obj = client.add_data_object(dataset, file_path=path)
                print(f"sent {path} as data object {obj['id']} ({obj['type']})", file=sys.stderr)
            for status in client.run_algorithm(dataset, config=settings):
                print(f"{status['state']}: {status.get('status', '')}", file=sys.stderr)
            for written in client.download_output_objects(dataset, output_path=args.out):
                print(written)
    except AlgorithmFailed as exc:
        print(f"postbox: error: {exc}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"postbox: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from . import selftest

    cfg = _config(args)
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_cert is not None and not args.tls):
        raise InvalidInput("--tls-cert and --tls-key go together, with --tls")
    if args.slices < 3 or args.size < 32:
        raise InvalidInput("the phantom needs --slices >= 3 and --size >= 32")
    options = selftest.Options(algorithm=args.algorithm, slices=args.slices, size=args.size, tls=args.tls,
                               tls_cert=args.tls_cert, tls_key=args.tls_key, destination=args.destination,
                               timeout=args.timeout)
    results = selftest.run(cfg, options)
    print(selftest.table(results))
    failed = [r.door for r in results if not r.ok]
    print(f"selftest: {'FAILED at ' + ', '.join(failed) if failed else 'passed'} ({len(results)} door(s))",
          file=sys.stderr)
    return 1 if failed else 0


def _resources(items: Sequence[str] | None) -> dict[str, float]:
    if not items:
        return {"GPU": 1.0}
    found = {}
    for item in items:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0:
            raise InvalidInput(f"--resources {item!r}: must look like NAME=N with N > 0 (GPU=1)")
        found[name] = value
    return found


def _gpu_worker(args: argparse.Namespace) -> int:
    from pipeline.config import DaskConfig
    from pipeline.gpuworker import default_name, serve

    if not getattr(args, "config", None):
        raise ConfigError("--config", "gpu-worker needs the Postbox config.yaml (its algorithms and TLS)")
    cfg = _config(args)
    DaskConfig(scheduler=args.scheduler, tls=cfg.engine.dask.tls)  # the same rules as the service's scheduler
    if args.nthreads < 1:
        raise InvalidInput("--nthreads must be at least 1")
    return serve(args.scheduler, cfg, resources=_resources(args.resources), nthreads=args.nthreads,
                 name=args.name or default_name())


def _cluster(args: argparse.Namespace) -> int:
    from pipeline import cluster

    cfg = _config(args)
    if cfg.engine.kind != "dask":
        raise ConfigError("engine.kind", "is local: there is no cluster (set engine.kind: dask and "
                                         "engine.dask.scheduler)")
    try:
        if args.cluster == "status":
            found = cluster.status(cfg)
            if args.json:
                print(json.dumps([r.to_dict() for r in found], indent=2))
                return 0
            print(f"{'ADDRESS':<28} {'NAME':<20} {'RESOURCES':<14} {'SLOTS':>5} {'DRAINED':<7} RUNNING")
            for r in found:
                res = ",".join(f"{k}={v:g}" for k, v in r.resources.items()) or "-"
                print(f"{r.address:<28} {r.name:<20} {res:<14} {r.slots:>5} {'yes' if r.drained else 'no':<7} "
                      f"{' '.join(r.running) or '-' if r.answered else '(no answer)'}")
            if not found:
                print("(no workers)")
            return 0
        if args.cluster == "drain":
            print(f"draining {args.node}: no new jobs go there; waiting for its running jobs to end", flush=True)
            cluster.drain(cfg, args.node, timeout=args.timeout)
            print(f"{args.node} is drained and idle")
            return 0
        cluster.resume(cfg, args.node)
        print(f"{args.node} takes jobs again")
        return 0
    except (OSError, TimeoutError) as exc:
        print(f"postbox: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


_COMMANDS = {"manage": _manage, "submit": _submit, "status": _status, "audit": _audit, "phantom": _phantom,
             "send": _send, "selftest": _selftest, "gpu-worker": _gpu_worker, "cluster": _cluster}

if __name__ == "__main__":
    sys.exit(main())
