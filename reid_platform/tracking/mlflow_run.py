"""MLflow from the edges: the driver opens the run, the Ray Train controller logs each epoch's record
into it (run/epoch_log.py, pictures included), and the driver registers the model and closes it.

Nobody else starts a run: every attempt of a restarted or resumed job writes into the same one. The
tracking server is allowed to go away: training does not wait for it (``RunLogger`` queues and
retries), and the driver retries its few calls with backoff.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NOTE

from reid_platform.console import say
from reid_platform.data.manifest import ShardDataset
from reid_platform.errors import TrackingUnavailable
from reid_platform.redaction import first_line, redact

EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
PARAM_LIMIT = 100  # MLflow accepts at most 100 params per batch call
METRIC_LIMIT = 1000  # and 1000 metrics
# What a server that is down, restarting or overloaded answers; anything else is a real refusal.
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}

# One attempt per HTTP request where our own loops do the retrying: MLflow's backoff would hold a call
# for minutes after the server is back, and its retries send a POST again after a lost reply (a second
# model version, where our retry would have found the first).
# And a request that hangs must not hold the calls behind it for MLflow's default 120 s. One set of
# values for every scope: threads of a process share them while scopes overlap.
ONE_ATTEMPT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# MlflowClient.set_terminated prints a link to the run made of the tracking URI as given, password included.
NO_RUN_LINKS = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}

T = TypeVar("T")

_settings_lock = threading.Lock()
_settings_scopes: dict[str, int] = {}  # variable -> scopes that set it and are still open


@contextlib.contextmanager
def mlflow_settings(settings: dict[str, str]):
    """MLflow ``settings`` (environment variables) for the calls made inside only.

    MLflow reads them from the environment at every request (mlflow/utils/rest_utils.py) and has no
    argument for them through MlflowClient, so they are set while a scope is open and removed when
    the last scope that set them closes; threads of a process share them meanwhile (the same
    values: each variable has one). A variable the user set is left as the user set it.
    """
    with _settings_lock:
        for name, value in settings.items():
            if name in _settings_scopes and os.environ.get(name) != value:
                raise RuntimeError(f"{name}: an open scope set it to {os.environ.get(name)!r}, this one to {value!r}")
        ours = [name for name in settings if name in _settings_scopes or name not in os.environ]
        for name in ours:
            os.environ[name] = settings[name]
            _settings_scopes[name] = _settings_scopes.get(name, 0) + 1
    try:
        yield
    finally:
        with _settings_lock:
            for name in ours:
                _settings_scopes[name] -= 1
                if not _settings_scopes[name]:
                    del _settings_scopes[name]
                    os.environ.pop(name, None)


def is_transient(error: Exception) -> bool:
    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_CODES
    return isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def _short(error: Exception) -> str:
    text = first_line(str(error), 200)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def call_with_retries(call: Callable[[], T], what: str, uri: str, timeout_s: float, first_delay_s: float = 1.0) -> T:
    """``call()``, retried with exponential backoff while the failure looks transient, for ``timeout_s``;
    each of its HTTP requests is made once (``ONE_ATTEMPT``)."""
    deadline, delay = time.monotonic() + timeout_s, first_delay_s
    while True:
        try:
            with mlflow_settings(ONE_ATTEMPT):
                return call()
        except Exception as error:
            if not is_transient(error):
                raise
            if time.monotonic() + delay > deadline:
                raise TrackingUnavailable(
                    f"MLflow at {redact(uri)}: {what} kept failing for {timeout_s:.0f} s ({_short(error)})"
                ) from None
            say(f"MLflow at {uri}: {what} failed ({_short(error)}); retrying in {delay:.0f} s")
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def local_artifact_location(uri: str, experiment: str) -> str | None:
    """Where a SQLite store keeps an experiment's artifacts: beside its database file (MLflow's own
    default is ./mlruns of whichever folder the process runs in). A server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / folder)


def dataset_inputs(dataset: ShardDataset) -> list[DatasetInput]:
    """The training and evaluation splits as MLflow datasets: shard folder, sample and identity
    counts, and a digest of the shards' sha256 sums (a repacked or changed dataset gets another)."""
    inputs = []
    for context, splits in (("training", ("train",)), ("evaluation", ("query", "gallery"))):
        entries = [dataset.manifest.splits[split] for split in splits]
        digest = hashlib.sha256("".join(shard.sha256 for entry in entries for shard in entry.shards).encode()).hexdigest()
        profile = {split: {"samples": entry.samples, "identities": entry.identities, "shards": len(entry.shards)}
                   for split, entry in zip(splits, entries)}  # fmt: skip
        entity = DatasetEntity(
            name=f"{dataset.manifest.dataset}-{'+'.join(splits)}",
            digest=digest[:10],
            source_type="local",
            source=json.dumps({"uri": str(dataset.root)}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def open_run(
    uri: str, experiment: str, run_name: str, params: dict[str, str], note: str,
    inputs: list[DatasetInput], texts: dict[str, str], run_id: str | None = None, tags: dict[str, str] | None = None,
) -> str:
    """Create (or, given ``run_id``, reopen) a run of ``experiment``; log its params, its description
    (MLflow's note), the datasets it reads, text artifacts (path -> text) and ``tags`` (``mlflow.parentRunId``
    makes it a child run): all of it redacted (the tracking URI's password, a signed URL in a path)."""
    client = MlflowClient(uri)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    found = client.get_experiment_by_name(experiment)
    experiment_id = (
        found.experiment_id if found
        else client.create_experiment(experiment, artifact_location=local_artifact_location(client.tracking_uri, experiment))
    )  # fmt: skip
    # the UI opens the experiment in its model-training view (GenAI is its default otherwise)
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    run_id = client.create_run(experiment_id, run_name=run_name, tags={k: redact(v) for k, v in (tags or {}).items()}).info.run_id
    logged = [Param(key, redact(value)[:6000]) for key, value in sorted(params.items())]
    for start in range(0, len(logged), PARAM_LIMIT):
        client.log_batch(run_id, params=logged[start : start + PARAM_LIMIT])
    client.set_tag(run_id, MLFLOW_RUN_NOTE, redact(note))
    client.log_inputs(run_id, inputs)
    for path, text in texts.items():
        client.log_text(run_id, redact(text), path)
    return run_id


class RunLogger:
    """Metric and artifact logging into an existing run that never blocks training.

    Calls are queued to one sender thread. While the tracking server is down the sender keeps the
    failed call and retries it with backoff; the calls behind it wait in order, so the history
    catches up unchanged once the server is back. ``close`` waits for the backlog.
    """

    def __init__(self, tracking_uri: str, run_id: str, retry_delay_s: float = 1.0, max_delay_s: float = 15.0):
        self.uri, self.run_id, self.client = tracking_uri, run_id, MlflowClient(tracking_uri)
        self._delays = (retry_delay_s, max_delay_s)
        self._calls: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._spool = Path(tempfile.mkdtemp(prefix="reid-mlflow-"))
        self._failures: list[str] = []
        self._given_up = threading.Event()  # set by a close that timed out: the sender stops retrying
        self._sender = threading.Thread(target=self._send, name="mlflow-sender", daemon=True)
        self._sender.start()

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        now = timestamp_ms or int(time.time() * 1000)
        self._put_metrics([Metric(key, float(value), now, step) for key, value in metrics.items()])

    def log_series(self, key: str, points: list[tuple[int, float]], timestamp_ms: int | None = None) -> None:
        """One metric's (step, value) points."""
        now = timestamp_ms or int(time.time() * 1000)
        self._put_metrics([Metric(key, float(value), now, step) for step, value in points])

    def set_tag(self, key: str, value: str) -> None:
        value = redact(value)[:5000]  # MLflow's limit of a tag's value
        self._calls.put(lambda: self.client.set_tag(self.run_id, key, value))

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until every call queued so far is sent; whether they all were."""
        sent = threading.Event()
        self._calls.put(sent.set)
        return sent.wait(timeout_s)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copies ``path`` first: the caller may delete it before the server is back."""
        copy = self._spool / uuid.uuid4().hex / Path(path).name
        copy.parent.mkdir()
        shutil.copyfile(path, copy)
        self._calls.put(lambda: self.client.log_artifact(self.run_id, str(copy), artifact_path))

    def _put_metrics(self, metrics: list[Metric]) -> None:
        for start in range(0, len(metrics), METRIC_LIMIT):
            chunk = metrics[start : start + METRIC_LIMIT]
            self._calls.put(lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))

    def _send(self) -> None:
        while (call := self._calls.get()) is not None:
            delay, outage_since = self._delays[0], None
            while True:
                try:
                    with mlflow_settings(ONE_ATTEMPT):  # this loop does the retrying
                        call()
                    break
                except Exception as error:  # noqa: BLE001 - see is_transient
                    if not is_transient(error):
                        self._failures.append(_short(error))
                        say(f"MLflow at {self.uri}: a logging call was refused: {_short(error)}")
                        break
                    if outage_since is None:
                        outage_since = time.monotonic()
                        say(f"MLflow at {self.uri} is unavailable ({_short(error)}); training goes on, "
                            f"{self._calls.qsize() + 1} logging calls are kept and retried")
                    if self._given_up.wait(delay):
                        return
                    delay = min(2 * delay, self._delays[1])
            if outage_since is not None:
                say(f"MLflow at {self.uri} is back after {time.monotonic() - outage_since:.0f} s; "
                    "catching up the kept calls")

    def close(self, timeout_s: float) -> str | None:
        """Wait up to ``timeout_s`` for every queued call. Returns None when all went out, else what
        was lost (training is over and its checkpoints are complete: a lost log is not worth failing it);
        the sender then stops retrying once its current attempt ends."""
        self._calls.put(None)
        self._sender.join(timeout_s)
        if self._sender.is_alive():  # qsize: the calls behind the stuck one, plus our None, minus nothing
            lost = self._calls.qsize()
            self._given_up.set()
            return f"MLflow at {redact(self.uri)} stayed unavailable: {lost} logging calls were not sent within {timeout_s:.0f} s"
        shutil.rmtree(self._spool, ignore_errors=True)
        if self._failures:
            return f"MLflow at {redact(self.uri)} refused {len(self._failures)} logging calls: {self._failures[0]}"
        return None


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    with mlflow_settings(NO_RUN_LINKS):
        MlflowClient(tracking_uri).set_terminated(run_id, status)
