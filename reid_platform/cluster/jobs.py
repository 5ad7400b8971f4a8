"""Training as Ray jobs: submit a config to a cluster's job server, then list, follow and stop jobs.

A job runs ``python jobs/train.py CONFIG`` (a search: ``python jobs/tune.py CONFIG --space SPACE``) in a
copy of the working directory (files that .gitignore names, such as data, runs and the virtual
environment, stay behind). The tracking URI travels as the
environment variable MLFLOW_TRACKING_URI; credentials never do: the job's entrypoint and environment
are stored with the job for anyone with dashboard access to read, so a tracking URI or a ``--set``
value with a password or token in it is refused, and MLFLOW_TRACKING_USERNAME / PASSWORD / TOKEN
must be set on the cluster (a Kubernetes Secret).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from reid_platform.cluster.local import auth_token
from reid_platform.config import load_config
from reid_platform.errors import ConfigError
from reid_platform.redaction import carries_secret, redact
from reid_platform.tune.space import load_space

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINT = "jobs/train.py"
TUNE_ENTRYPOINT = "jobs/tune.py"
# Never uploaded, whatever .gitignore says. Anchored: "data" alone would also drop reid_platform/data.
UPLOAD_EXCLUDES = ["/.git", "/.venv", "/data", "/runs", "/mlruns", "/mlartifacts", "*.db", "__pycache__"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def job_address(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def is_local(address: str) -> bool:
    return urlparse(address if "://" in address else f"http://{address}").hostname in LOCAL_HOSTS


@dataclass(frozen=True)
class Submission:
    entrypoint: str
    runtime_env: dict
    submission_id: str
    metadata: dict[str, str]
    tracking_uri: str  # as the job will see it (MLFLOW_TRACKING_URI of runtime_env)


def _in_job(path: Path, working_dir: Path, what: str) -> Path:
    try:
        return path.resolve().relative_to(working_dir)
    except ValueError:
        raise ConfigError(f"{path}: the {what} must be inside the uploaded working directory {working_dir}") from None


def build_submission(
    config: Path, overrides: list[str], working_dir: Path, address: str, remote: bool = False,
    search: tuple[Path, list[str]] | None = None,
) -> Submission:
    """Validate the config here and describe the job; raises ConfigError for anything the cluster would
    fail on, or that would store a secret with the job. Whether its tracking server answers is the
    caller's to check.

    ``remote`` marks a loopback address that leads to another machine (``kubectl port-forward``).
    ``search``: (space file, `reid tune` flags) makes the job a search (``jobs/tune.py``) instead of
    one training run; the space is checked against the config here.
    """
    cfg = load_config(config, overrides)
    working_dir = working_dir.resolve()
    config_in_job = _in_job(config, working_dir, "config")
    if not (working_dir / ENTRYPOINT).is_file():
        raise ConfigError(f"{working_dir}: not a reid-platform checkout (no {ENTRYPOINT}); pass --working-dir")
    uri = cfg.tracking.uri
    for what, text in [("tracking URI", uri), *(("--set", assignment) for assignment in overrides)]:
        if carries_secret(text):
            raise ConfigError(
                f"{what} {redact(text)} carries a password or token, which would be stored with the job; give "
                "the cluster its secrets in its own environment (for MLflow: MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)"
            )
    arguments = [ENTRYPOINT, str(config_in_job)]
    if search is not None:
        space, flags = search
        load_space(space, cfg)
        arguments = [TUNE_ENTRYPOINT, str(config_in_job), "--space", str(_in_job(space, working_dir, "space file")), *flags]
    if is_local(address) and not remote:
        # The job runs in a copy of the working directory on this machine: relative paths in the
        # config mean what they mean here.
        arguments += ["--base-dir", str(working_dir)]
        uri = cfg.with_absolute_paths(working_dir).tracking.uri
    elif relative := cfg.relative_paths():
        raise ConfigError(
            f"{config}: {', '.join(relative)} relative, but the cluster at {address} is remote; use absolute paths "
            "on its shared storage or an object store (e.g. --set data.shards=s3://bucket/shards/market1501)"
        )
    for assignment in overrides:
        arguments += ["--set", assignment]
    return Submission(
        entrypoint="python " + shlex.join(arguments),
        runtime_env={
            "working_dir": str(working_dir),
            "excludes": UPLOAD_EXCLUDES,
            "env_vars": {"MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"},
        },
        submission_id=f"{cfg.run.name}-{uuid.uuid4().hex[:8]}",
        metadata={"reid.config": str(config_in_job), "reid.run_name": cfg.run.name,
                  **({"reid.space": arguments[3]} if search else {})},  # fmt: skip
        tracking_uri=uri,
    )


def _token_headers(address: str) -> dict[str, str]:
    """The token for the job server (Ray's client sends one only with RAY_AUTH_MODE=token): the one
    given by RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or for a head on this machine the one it made."""
    token = auth_token(default_file=is_local(address))
    return {"Authorization": f"Bearer {token}"} if token else {}


class JobServer:
    """The job submission API of one cluster, with connection problems turned into one clear line."""

    def __init__(self, address: str | None):
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        self.address = job_address(address)
        try:
            self.client = JobSubmissionClient(self.address, headers=_token_headers(self.address))
        except AuthenticationError:
            raise RuntimeError(
                f"the Ray job server at {self.address} wants an authentication token: set RAY_AUTH_TOKEN "
                "or RAY_AUTH_TOKEN_PATH to the cluster's token"
            ) from None
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise RuntimeError(
                f"no Ray job server at {self.address} ({str(error).splitlines()[0][:160]}); start one with "
                "`reid cluster start` or pass --address / set RAY_ADDRESS"
            ) from None

    def submit(self, submission: Submission) -> str:
        return self.client.submit_job(
            entrypoint=submission.entrypoint,
            runtime_env=submission.runtime_env,
            submission_id=submission.submission_id,
            metadata=submission.metadata,
        )

    def _known(self, job_id: str):
        try:
            return self.client.get_job_info(job_id)
        except RuntimeError as error:
            if "404" not in str(error):
                raise
            raise ValueError(f"no job {job_id!r} on {self.address} (see `reid jobs list`)") from None

    def list(self) -> list:
        return sorted(self.client.list_jobs(), key=lambda job: job.start_time or 0)

    def status(self, job_id: str):
        return self._known(job_id)

    def logs(self, job_id: str) -> str:
        self._known(job_id)
        return self.client.get_job_logs(job_id)

    def follow(self, job_id: str) -> Iterator[str]:
        """Log chunks as the job writes them, until it ends."""
        self._known(job_id)
        stream = self.client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(stream.aclose())
            loop.close()

    def stop(self, job_id: str) -> bool:
        self._known(job_id)
        return self.client.stop_job(job_id)
