"""`reid cluster`, `reid submit`, `reid jobs`, `reid mlflow serve`: running training as a service."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from reid_platform.cli.common import add_bind_address, add_run_config, format_columns, reachable
from reid_platform.cli.tune import add_search_flags, search_arguments, search_options
from reid_platform.redaction import redact

ADDRESS_HELP = "job server, e.g. http://127.0.0.1:8265 (default $RAY_ADDRESS or http://127.0.0.1:8265)"


def _node_resources(args: argparse.Namespace):
    from reid_platform.cluster.local import NodeResources
    from reid_platform.errors import ConfigError

    custom = {}
    for item in args.resource:
        name, _, quantity = item.partition("=")
        try:
            custom[name] = float(quantity)
        except ValueError:
            raise ConfigError(f"--resource {item}: expected NAME=QUANTITY, e.g. --resource reid_node_b=1") from None
    return NodeResources(args.num_cpus, args.num_gpus, custom)


def _placement(args: argparse.Namespace):
    from reid_platform.cluster.local import Placement

    return Placement(Path(args.temp_dir).resolve() if args.temp_dir else None, args.own_ports)


def _cmd_cluster_start(args: argparse.Namespace) -> int:
    from reid_platform.cluster.local import HeadOptions, start_head

    options = HeadOptions(args.host, args.port, args.dashboard_port, _node_resources(args))
    lines = [
        f"Ray head: dashboard and job server at {options.job_address}, cluster address {options.cluster_address}",
        f"  reid submit configs/demo.yaml --address {options.job_address}",
        f"  reid cluster join {options.cluster_address}   (on each machine to add, if it reaches {options.node_ip}; see --host)",
    ]
    _then_start(lines, args.block, functools.partial(start_head, options, args.block, _placement(args)))
    return 0


def _cmd_cluster_join(args: argparse.Namespace) -> int:
    from reid_platform.cluster.local import join_cluster, parse_cluster_address

    parse_cluster_address(args.address)
    lines = [f"a node of the Ray cluster at {args.address}; `reid cluster stop` takes this machine out"]
    start = functools.partial(
        join_cluster, args.address, _node_resources(args), args.node_ip_address, args.block, _placement(args)
    )
    _then_start(lines, args.block, start)
    return 0


def _then_start(lines: list[str], block: bool, start) -> None:
    """What a started node is, printed once it is: a blocking start becomes the node, so before it."""
    if block:
        print("\n".join(lines), flush=True)
    start()
    if not block:
        print("\n".join(lines))


def _cmd_cluster_stop(args: argparse.Namespace) -> int:
    from reid_platform.cluster.local import stop_all

    stop_all()
    print("Ray stopped on this machine")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from reid_platform.cluster.jobs import JobServer, build_submission, job_address

    address = job_address(args.address)
    search = (Path(args.space), search_arguments(args)) if args.space else None
    if search:
        search_options(args)  # a bad flag is refused here, not in the job
    submission = build_submission(Path(args.config), args.set, Path(args.working_dir), address, args.remote, search)
    if not args.no_tracking_check:
        reachable(submission.tracking_uri)
    server = JobServer(address)
    job_id = server.submit(submission)
    print(f"submitted {job_id} to {server.address}")
    print(f"  reid jobs logs {job_id} --follow")
    if args.follow:
        return _follow(server, job_id)
    return 0


def redacted_lines(chunks: Iterable[str]) -> Iterator[str]:
    """``chunks`` of a log, redacted a whole line at a time: a chunk may end inside a URI."""
    pending = ""
    for chunk in chunks:
        lines, newline, pending = (pending + chunk).rpartition("\n")
        if newline:
            yield redact(lines + newline)
    if pending:
        yield redact(pending)


def _follow(server, job_id: str) -> int:
    for text in redacted_lines(server.follow(job_id)):
        sys.stdout.write(text)
        sys.stdout.flush()
    status = _status_name(server.status(job_id).status)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _status_name(status) -> str:
    return getattr(status, "value", str(status))


def _cmd_jobs(args: argparse.Namespace) -> int:
    from reid_platform.cluster.jobs import JobServer

    server = JobServer(args.address)
    if args.jobs_command == "list":
        rows = [
            [job.submission_id or job.job_id or "-", _status_name(job.status), _when(job.start_time), _when(job.end_time),
             (job.metadata or {}).get("reid.config", job.entrypoint[:60])]
            for job in server.list()
        ]  # fmt: skip
        print(format_columns(["ID", "STATUS", "STARTED (UTC)", "ENDED (UTC)", "CONFIG"], rows) if rows else "no jobs")
    elif args.jobs_command == "status":
        job = server.status(args.job_id)
        print(f"{args.job_id}: {_status_name(job.status)}" + (f" ({redact(job.message)})" if job.message else ""))
        return 1 if _status_name(job.status) in ("FAILED", "STOPPED") else 0
    elif args.jobs_command == "logs":
        if args.follow:
            return _follow(server, args.job_id)
        sys.stdout.write(redact(server.logs(args.job_id)))
    elif args.jobs_command == "stop":
        stopped = server.stop(args.job_id)
        print(f"{args.job_id}: " + ("stop requested" if stopped else "not running"))
    return 0


def _cmd_mlflow_serve(args: argparse.Namespace) -> int:
    from reid_platform.storage import s3
    from reid_platform.storage.location import S3Uri, parse
    from reid_platform.tracking.server import serve_command

    artifacts = parse(args.artifacts)
    if isinstance(artifacts, S3Uri):  # a missing bucket or refused key: one line now, not on the first upload
        s3.check_bucket(artifacts)
    else:
        artifacts.mkdir(parents=True, exist_ok=True)
    arguments, environment = serve_command(
        args.host, args.port, args.backend_store_uri, artifacts, args.workers, args.allowed_hosts
    )
    print(redact(f"MLflow tracking server on http://{args.host}:{args.port} (runs in {args.backend_store_uri}, "
                 f"artifacts in {artifacts})"))
    print(f"  export MLFLOW_TRACKING_URI=http://{args.host}:{args.port}", flush=True)
    mlflow = Path(sys.executable).parent / "mlflow"
    if not mlflow.is_file():
        raise RuntimeError(f"{mlflow}: the mlflow command is not installed next to this Python")
    # the server replaces this process: Ctrl-C stops it
    os.execve(mlflow, [str(mlflow), *arguments], {**os.environ, **environment})


def _node_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-cpus", type=int, help="CPUs the node offers (default: all)")
    parser.add_argument("--num-gpus", type=int, help="GPUs the node offers (default: all)")
    parser.add_argument(
        "--resource", action="append", default=[], metavar="NAME=QUANTITY",
        help="a custom resource, to find or pin the node (repeatable)",
    )
    parser.add_argument("--block", action="store_true", help="stay in the foreground as the node until it ends")
    parser.add_argument(
        "--own-ports", action="store_true",
        help="free ports for the node's services instead of Ray's fixed defaults (several nodes on one machine)",
    )
    parser.add_argument(
        "--temp-dir", help="the node's own Ray folder instead of /tmp/ray (several nodes on one machine)"
    )


def add_commands(commands) -> None:
    cluster = commands.add_parser("cluster", help="Ray nodes on this machine: a head, or a node joining one").add_subparsers(
        dest="cluster_command", required=True, metavar="COMMAND"
    )
    start = cluster.add_parser("start", help="start a Ray head with its dashboard and job server")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the job server)")
    start.add_argument("--port", type=int, default=6379, help="Ray (GCS) port")
    start.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job server port")
    _node_flags(start)
    start.set_defaults(handler=_cmd_cluster_start)
    join = cluster.add_parser("join", help="add this machine to a Ray cluster as a worker node")
    join.add_argument("address", help="the head's HOST:PORT (its Ray port, as `reid cluster start` prints)")
    join.add_argument("--node-ip-address", help="the address other nodes reach this one at (default: found by Ray)")
    _node_flags(join)
    join.set_defaults(handler=_cmd_cluster_join)
    stop = cluster.add_parser("stop", help="stop Ray on this machine (every node on it)")
    stop.set_defaults(handler=_cmd_cluster_stop)

    submit = commands.add_parser("submit", help="submit a training config (or with --tune, a search) as a Ray job")
    add_run_config(submit, "YAML run config inside the working directory")
    submit.add_argument("--address", help=ADDRESS_HELP)
    submit.add_argument("--working-dir", default=".", help="folder uploaded as the job's working directory")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument(
        "--remote", action="store_true",
        help="the cluster is another machine even though the address is local (kubectl port-forward): "
        "config paths must be absolute on its storage",
    )
    submit.add_argument(
        "--no-tracking-check", action="store_true",
        help="skip the MLflow reachability check (for URIs only the cluster can resolve)",
    )
    add_search_flags(submit, "--tune")  # its flags (--trials, ...) apply with --tune only
    submit.set_defaults(handler=_cmd_submit)

    jobs = commands.add_parser("jobs", help="jobs on a Ray cluster").add_subparsers(
        dest="jobs_command", required=True, metavar="COMMAND"
    )
    for name, help_text in (("list", "every job"), ("status", "one job's status"), ("logs", "one job's output"),
                            ("stop", "stop a running job")):  # fmt: skip
        command = jobs.add_parser(name, help=help_text)
        if name != "list":
            command.add_argument("job_id", metavar="ID")
        if name == "logs":
            command.add_argument("--follow", action="store_true", help="stream until the job ends")
        command.add_argument("--address", help=ADDRESS_HELP)
        command.set_defaults(handler=_cmd_jobs)

    mlflow = commands.add_parser("mlflow", help="MLflow tracking service").add_subparsers(
        dest="mlflow_command", required=True, metavar="COMMAND"
    )
    serve = mlflow.add_parser("serve", help="a tracking server for one machine: SQLite, artifacts in a folder or S3")
    add_bind_address(serve, port=5000)
    serve.add_argument(
        "--backend-store-uri", default=os.environ.get("MLFLOW_BACKEND_STORE_URI", "sqlite:///mlflow.db"),
        help="where runs and the registry are kept (default $MLFLOW_BACKEND_STORE_URI, then sqlite:///mlflow.db); "
        "a database URI with a password is best given in that variable: arguments are visible in ps",
    )
    serve.add_argument(
        "--artifacts-destination", "--artifacts", dest="artifacts", default="mlartifacts", metavar="URI",
        help="where the server keeps artifacts: a folder or s3://bucket/prefix (the server's AWS credentials and "
        "AWS_ENDPOINT_URL; clients upload and download through the server and need none)",
    )
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument(
        "--allowed-hosts", help="Host headers to accept, e.g. mlflow.example.com:5000 (default: localhost, private IPs)"
    )
    serve.set_defaults(handler=_cmd_mlflow_serve)
