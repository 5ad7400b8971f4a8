"""Every command that talks to MLflow, against a tracking server that is down (a closed port) or that
never answers (a socket that accepts and stays silent): one line naming the server, exit 1, within
10 s, where MLflow's own retries kept a command silent for minutes.

The commands run as a user runs them (`reid ...`, a process each), imports included; the URI comes
from --tracking-uri, a run config or the environment.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from reid_platform.tracking.server import HEALTH_TIMEOUT_S
from tests.services import REID, REPO, closed_port_uri, silent_server

LIMIT_S = 10.0
COMMANDS = {
    "models list": ["models", "list", "--tracking-uri", "{uri}"],
    "models pull": ["models", "pull", "reid@champion", "--out", "{tmp}/pulled", "--tracking-uri", "{uri}"],
    "models promote": ["models", "promote", "reid", "1", "--alias", "champion", "--tracking-uri", "{uri}"],
    "models serve": ["models", "serve", "reid@champion", "--tracking-uri", "{uri}"],
    "eval": ["eval", "--model", "reid@champion", "--data", "{tmp}", "--out", "{tmp}/eval", "--tracking-uri", "{uri}"],
    "embed": ["embed", str(REPO / "README.md"), "--model", "reid/1", "--out", "{tmp}/e.npz", "--tracking-uri", "{uri}"],
    "export onnx": ["export", "onnx", "--model", "models:/reid@champion", "--out", "{tmp}/m.onnx", "--tracking-uri", "{uri}"],
    "train": ["train", "configs/demo.yaml", "--set", "tracking.uri={uri}", "--set", "run.output_dir={tmp}/out"],
    "submit": ["submit", "configs/demo.yaml", "--address", "http://127.0.0.1:1"],  # the URI from the environment
}


def run_against(command: str, uri: str, reason: str, tmp_path) -> None:
    argv = [part.format(uri=uri, tmp=tmp_path) for part in COMMANDS[command]]
    started = time.monotonic()
    done = subprocess.run([REID, *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri})  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"reid: error: MLflow tracking server {uri} is unreachable ({reason}); check that it runs "
        "(reid mlflow serve starts one) and the URI (--tracking-uri, tracking.uri or MLFLOW_TRACKING_URI)"
    ]
    assert elapsed < LIMIT_S, f"{command}: {elapsed:.1f} s"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_server_that_is_down_is_one_line_at_once(command, tmp_path):
    run_against(command, closed_port_uri(), "ConnectionError", tmp_path)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_server_that_never_answers_is_one_line_within_10_s(command, tmp_path):
    with silent_server() as uri:
        run_against(command, uri, f"no answer within {HEALTH_TIMEOUT_S:g} s", tmp_path)
